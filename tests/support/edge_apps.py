"""Apps for the edge tests of both modes (tests/metering/test_header_policy.py,
tests/metering/test_refunds.py, tests/e2e/test_edges.py).

- :func:`edge_config`: the reference config on the real Redis of a ``redisgate`` fixture
  (same URL, same key prefix, so its cleanup covers these tests), with overrides.
- :func:`target_app`: a Starlette app that records what reached it: ``POST /generate``
  (a metered handler), ``/anything`` (any method, echoes the headers), ``/status/{code}``
  and ``/raise`` (an exception in the handler).
- :class:`MethodOverride`: the method-override middleware some apps run (Rack's
  MethodOverride, Express's method-override), honouring ``X-HTTP-Method-Override``.
- :func:`in_middleware_mode` / :func:`in_proxy_mode`: an httpx client on the app behind
  ``CreditGateMiddleware`` (in process) or behind ``creditgate serve``'s ``GatewayApp``
  (both over TCP, uvicorn), and the gate that meters it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import CreditGate, CreditGateMiddleware
from gateway.commands.server import GatewayApp
from gateway.config import Config
from gateway.core.events import decode
from gateway.core.periods import FixedClock
from tests.support.reference import MID_NOVEMBER_MS, reference_config
from tests.support.upstream_app import serve_in_thread

EDGE_ROUTES = [
    {"method": "POST", "path": "/generate", "feature": "goal_generation"},
    {"method": "GET", "path": "/status/{code}", "feature": "goal_generation"},
    {"method": "GET", "path": "/raise", "feature": "goal_generation"},
]


def edge_config(base: Config, **overrides: Any) -> Config:
    """The reference config on ``base``'s Redis and key prefix, routes = EDGE_ROUTES."""
    overrides.setdefault("routes", EDGE_ROUTES)
    return reference_config(redis_url=base.redis_url, key_prefix=base.key_prefix, **overrides)


class Calls:
    """What reached the app: one entry per handler call (method, path, headers)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def record(self, request: Request) -> dict[str, Any]:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        entry = {"method": request.method, "path": request.url.path, "headers": headers}
        self.seen.append(entry)
        return entry

    def header_names(self) -> set[str]:
        """Every header name (lower-cased) any call received."""
        return {name.lower() for call in self.seen for name, _ in call["headers"]}


def target_app(calls: Calls) -> Starlette:
    """The app behind creditgate; every handler records its call in ``calls``."""

    async def generate(request: Request) -> Response:
        return JSONResponse(calls.record(request))

    async def anything(request: Request) -> Response:
        return JSONResponse(calls.record(request))

    async def status(request: Request) -> Response:
        calls.record(request)
        code = int(request.path_params["code"])
        return JSONResponse({"status": code}, status_code=code)

    async def boom(request: Request) -> Response:
        calls.record(request)
        raise RuntimeError("the model crashed")

    return Starlette(
        routes=[
            Route("/generate", generate, methods=["POST"]),
            Route("/anything", anything, methods=["GET", "POST"]),
            Route("/status/{code:int}", status, methods=["GET"]),
            Route("/raise", boom, methods=["GET"]),
        ]
    )


class MethodOverride:
    """Take the method from ``X-HTTP-Method-Override`` (as Rack and Express apps do)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name.lower() == b"x-http-method-override":
                    scope = {**scope, "method": value.decode("latin-1").upper()}
        await self.app(scope, receive, send)


@asynccontextmanager
async def in_middleware_mode(
    config: Config, app: ASGIApp
) -> AsyncIterator[tuple[httpx.AsyncClient, CreditGate]]:
    """``app`` behind CreditGateMiddleware, in process; the gate that meters it."""
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    await gate.set_plan("acme", "pro")
    transport = httpx.ASGITransport(
        CreditGateMiddleware(app, gate=gate), raise_app_exceptions=False
    )
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http, gate
        await gate.meter.drain()
    finally:
        await gate.close()


@asynccontextmanager
async def in_proxy_mode(
    config: Config, app: ASGIApp
) -> AsyncIterator[tuple[httpx.AsyncClient, CreditGate]]:
    """``app`` served over TCP behind GatewayApp (the proxy), also over TCP.

    The gate yielded inspects the same Redis; the served gate settles in the server's own
    loop, so callers wait with :func:`settled` before reading balances.
    """
    with serve_in_thread(app) as upstream:
        served_config = config.model_copy(update={"upstream": upstream})
        clock = FixedClock(MID_NOVEMBER_MS)
        inspect = CreditGate(served_config, clock=clock)
        await inspect.set_plan("acme", "pro")
        try:
            with serve_in_thread(
                GatewayApp(CreditGate(served_config, clock=clock), sync=False)
            ) as url:
                async with httpx.AsyncClient(base_url=url) as http:
                    yield http, inspect
        finally:
            await inspect.close()


async def outcomes(gate: CreditGate, count: int) -> list[tuple[str, int | None, int]]:
    """The settles of org acme's requests, ``(kind, upstream status, tokens)`` in order, once
    ``count`` of them are in the shard's event stream (a proxy's gate settles in its
    server's loop): polled for up to 5 s."""
    stream = gate.keys.shard("acme").events
    client: Any = gate.redis.client
    found: list[tuple[str, int | None, int]] = []
    for _ in range(100):
        await gate.meter.drain()
        found = [
            (e.kind, e.upstream_status, e.tokens)
            for e in (decode(f) for _, f in await client.xrange(stream))
            if e.org == "acme" and e.kind in ("charge", "refund")
        ]
        if len(found) >= count:
            break
        await asyncio.sleep(0.05)
    return found


async def balance(gate: CreditGate, bucket: str = "goal_generation") -> int:
    """Org acme's balance of ``bucket``."""
    return (await gate.balance("acme")).buckets[bucket].balance
