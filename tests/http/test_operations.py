"""The API surface is declared once (gateway.http.endpoint.Operation): routes, handlers and
the OpenAPI document all come from the same operations, and a handler cannot answer
something other than what its operation documents."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from gateway.http.app import build_ops_app
from gateway.http.endpoint import Api, Call, Doc, Operation, Reply, routes_of
from gateway.http.models.token import CheckResult, DeductResult
from gateway.http.openapi import ADMIN_OPERATIONS, TOKEN_OPERATIONS, openapi_document
from gateway.metering.gate import CreditGate
from tests.support.api_support import ADMIN_TOKEN
from tests.support.reference import reference_config

UNDOCUMENTED = {"/healthz", "/readyz", "/metrics", "/webhooks/stripe"}


@pytest.fixture
async def gate() -> AsyncIterator[CreditGate]:
    config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}", admin_token=ADMIN_TOKEN)
    g = CreditGate(config)
    yield g
    await g.close()


def _served(routes: list[object], prefix: str = "") -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount):
            inner = route.app.routes if isinstance(route.app, Starlette) else route.routes
            out |= _served(list(inner), prefix + route.path)
        elif isinstance(route, Route) and route.methods and not route.path.endswith("{name}"):
            path = prefix + route.path
            if path not in UNDOCUMENTED:
                out |= {(m, path) for m in route.methods if m != "HEAD"}
    return out


async def test_the_document_lists_exactly_the_served_operations(gate: CreditGate) -> None:
    served = _served(list(build_ops_app(gate).routes))
    doc = openapi_document(gate.config)
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert served == documented
    assert len(documented) == len(TOKEN_OPERATIONS) + len(ADMIN_OPERATIONS) == 28


def test_handlers_are_module_level_functions() -> None:
    for op in [*TOKEN_OPERATIONS, *ADMIN_OPERATIONS]:
        handler = op.handler
        module = importlib.import_module(handler.__module__)
        assert handler.__qualname__ == handler.__name__, op.operation_id  # not a closure
        assert getattr(module, handler.__name__) is handler, op.operation_id


async def _answers(gate: CreditGate, body: BaseModel | None, status: int) -> httpx.Response:
    async def handler(call: Call) -> Reply:
        return Reply(body, status=status)

    op = Operation(
        "GET", "/x", handler, "x", "test", {200: Doc("ok", CheckResult), 204: Doc("none")},
        security="public",
    )  # fmt: skip
    app = Starlette(routes=routes_of([op], Api.of(gate)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        return await http.get("/x")


async def test_a_reply_that_is_not_the_documented_model_is_a_500(gate: CreditGate) -> None:
    right = CheckResult(
        allowed=True, code=None, feature="f", bucket="b", cost=1, balance=1,
        refresh_at="2026-12-01T00:00:00Z",
    )  # fmt: skip
    assert (await _answers(gate, right, 200)).json()["feature"] == "f"
    assert (await _answers(gate, None, 204)).status_code == 204
    wrong = DeductResult(
        charged=1, replayed=False, remaining=1, feature="f", bucket="b", request_id=None
    )
    for body, status in ((wrong, 200), (right, 201), (right, 204), (None, 200)):
        r = await _answers(gate, body, status)
        assert r.status_code == 500 and r.json()["code"] == "internal_error"
