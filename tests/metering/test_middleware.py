"""creditgate inside a Starlette app: app.add_middleware(CreditGateMiddleware, config=...)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import CreditGate, CreditGateMiddleware
from tests.support.reference import REFERENCE_YAML


class FakeAuth:
    """Stands for the app's own auth: names the org and user in scope["state"]."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-session":
                    org, _, user = value.decode().partition(":")
                    scope.setdefault("state", {})["creditgate_org"] = org
                    scope["state"]["creditgate_user"] = user or None
        await self.app(scope, receive, send)


async def quests(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "org": request.headers.get("x-creditgate-org")})


async def boom(request: Request) -> Response:
    raise RuntimeError("model crashed")


async def fails(request: Request) -> Response:
    return PlainTextResponse("upstream model unavailable", status_code=503)


@pytest.fixture
async def app_and_gate(tmp_path: Path) -> AsyncIterator[tuple[Starlette, CreditGate]]:
    data = yaml.safe_load(REFERENCE_YAML)
    data["redis_url"] = f"memory://{uuid.uuid4().hex}"
    data["routes"] += [
        {"method": "POST", "path": "/boom", "feature": "lead_generation"},
        {"method": "POST", "path": "/fails", "feature": "lead_generation"},
    ]
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump(data))
    app = Starlette(
        routes=[
            Route("/api/v1/goals/{goal_id}/quests", quests, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/fails", fails, methods=["POST"]),
            Route("/free", quests, methods=["GET"]),
        ]
    )
    app.add_middleware(CreditGateMiddleware, config=str(path))
    app.add_middleware(FakeAuth)
    gate = CreditGate.from_config(path)  # same memory:// server: inspects the same state
    yield app, gate
    await gate.close()


async def test_middleware_meters_with_scope_identity(
    app_and_gate: tuple[Starlette, CreditGate],
) -> None:
    app, gate = app_and_gate
    await gate.set_plan("acme", "pro")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        r = await http.post("/api/v1/goals/7/quests", headers={"X-Session": "acme:alice"})
        assert r.status_code == 200 and r.headers["x-tokens-remaining"] == "17"
        assert r.json() == {"path": "/api/v1/goals/7/quests", "org": "acme"}
        r = await http.post("/api/v1//goals/7/./quests/", headers={"X-Session": "acme:alice"})
        assert r.status_code == 200 and r.json()["path"] == "/api/v1/goals/7/quests"
        r = await http.post("/api/v1/goals/7/quests")
        assert r.status_code == 401
        r = await http.get("/free")
        assert r.status_code == 200 and "x-tokens-cost" not in r.headers
        r = await http.post("/fails", headers={"X-Session": "acme:alice"})
        assert r.status_code == 503
        r = await http.post("/boom", headers={"X-Session": "acme:alice"})
        assert r.status_code == 500
    await gate.meter.drain()
    for mw_gate in _gates(app):
        await mw_gate.meter.drain()
    bal = await gate.balance("acme")
    assert bal.buckets["goal_generation"].balance == 14
    assert bal.buckets["lead_generation"].balance == 60  # both failures refunded


def _gates(app: Starlette) -> list[CreditGate]:
    return [layer.gate for layer in _walk(app) if isinstance(layer, CreditGateMiddleware)]


def test_middleware_needs_a_config() -> None:
    with pytest.raises(TypeError):
        CreditGateMiddleware(Starlette())


async def who(request: Request) -> Response:
    return JSONResponse(
        {n: request.headers.get(n) for n in ("x-creditgate-org", "x-creditgate-user")}
    )


async def test_the_apps_identity_headers_per_caller_and_kept_per_identity(tmp_path: Path) -> None:
    """The app sees each caller's org and user headers; an identity serving many requests
    (a cached key's) has them encoded once and kept with it, never in its value."""
    from gateway.identity.principal import Identity

    data = yaml.safe_load(REFERENCE_YAML)
    data["redis_url"] = f"memory://{uuid.uuid4().hex}"
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump(data))
    app = Starlette(routes=[Route("/api/v1/goals/{goal_id}/quests", who, methods=["POST"])])
    app.add_middleware(CreditGateMiddleware, config=str(path))
    app.add_middleware(FakeAuth)
    gate = CreditGate.from_config(path)
    try:
        await gate.set_plan("acme", "pro")
        await gate.set_plan("beta", "pro")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            for session, expected in [
                ("acme:alice", ["acme", "alice"]),
                ("beta:bob", ["beta", "bob"]),
                ("acme", ["acme", ""]),
                ("acme:alice", ["acme", "alice"]),
            ]:
                r = await http.post("/api/v1/goals/7/quests", headers={"X-Session": session})
                assert r.status_code == 200
                assert list(r.json().values()) == expected
        for mw_gate in _gates(app):
            await mw_gate.meter.drain()
    finally:
        await gate.close()

    middleware = next(layer for layer in _walk(app) if isinstance(layer, CreditGateMiddleware))
    kept = Identity("acme", "alice", "api_key", "key_1")
    scope: Scope = {"type": "http", "headers": [], "state": {}}
    match = middleware.router.resolve("POST", b"/api/v1/goals/7/quests")[0]
    assert match is not None
    rid = (b"x-creditgate-request-id", b"r1")
    for _ in range(2):
        inner = middleware._inner_scope(scope, None, "/p", b"/p", kept, match, rid)
        assert inner["headers"][:2] == [
            (b"x-creditgate-org", b"acme"),
            (b"x-creditgate-user", b"alice"),
        ]
        assert kept.inner_headers is not None
    assert kept == Identity("acme", "alice", "api_key", "key_1") and "inner" not in repr(kept)


def _walk(app: Starlette) -> list[object]:
    layers = []
    layer: object = app.middleware_stack
    while layer is not None:
        layers.append(layer)
        layer = getattr(layer, "app", None)
    return layers


async def test_the_app_gets_a_bound_method_as_send_and_it_is_the_declared_one(
    app_and_gate: tuple[Starlette, CreditGate],
) -> None:
    """The fixed-cost request's ``send`` is the sender's bound method (a call the
    interpreter makes in its own loop, not through ``__call__``), and it is the very object
    declared for the splice (``SEND_PASSES_BODY``), so a splice check still finds it."""
    import inspect

    from gateway.core.splice import SEND_PASSES_BODY

    app, gate = app_and_gate
    await gate.set_plan("acme", "pro")
    seen: list[tuple[Any, Any]] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        await http.get("/free")  # builds the middleware stack
        middleware = next(layer for layer in _walk(app) if isinstance(layer, CreditGateMiddleware))
        inner_app = middleware.app

        async def watching(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((send, scope["state"].get(SEND_PASSES_BODY)))
            await inner_app(scope, receive, send)

        middleware.app = watching
        r = await http.post("/api/v1/goals/7/quests", headers={"X-Session": "acme:alice"})
    assert r.status_code == 200 and r.headers["x-tokens-cost"] == "3"
    ((send, declared),) = seen
    assert inspect.ismethod(send) and type(send.__self__).__name__ == "_ChargedSend"
    assert declared is not None and declared[0] is send
