"""``serve``'s protocol calls an app's ``http_call`` for each HTTP request when it offers
one (gateway/commands/limited_protocol.py ``HTTP_CALL``): GatewayApp does, so the request's
task runs without GatewayApp's own coroutine level (and, a keep-alive request, without
uvicorn's ``run_asgi`` either: ``FastCycle.run_direct``), and the endpoint picked is the one
``GatewayApp.__call__`` picks; an app that offers none keeps ``run_asgi``."""

from __future__ import annotations

import sys
from typing import Any

from gateway.commands.limited_protocol import HTTP_CALL
from gateway.commands.server import GatewayApp
from gateway.metering.gate import CreditGate
from tests.commands.test_protocol_cycles import _serve, connected
from tests.support.reference import reference_config

BODY = b'{"ok":true}'


def _chain() -> list[str]:
    """The qualified names of the frames the running task's step is in, outermost first
    (the caller's frame last): each coroutine level it resumes through."""
    names = []
    frame = sys._getframe(1)
    while frame is not None:
        names.append(frame.f_code.co_qualname)
        frame = frame.f_back  # type: ignore[assignment]
    return names[::-1]


class _Endpoint:
    """An ASGI endpoint that records the task's coroutine chain and answers 11 bytes."""

    def __init__(self) -> None:
        self.chains: list[list[str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.chains.append(_chain())
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})


async def _served(app: Any, count: int, path: bytes = b"/v1/x") -> None:
    protocol, transport = connected(app)
    await _serve(protocol, transport, count, b"GET %b HTTP/1.1\r\nHost: gw\r\n\r\n" % path)
    protocol.connection_lost(None)


class _Offering:
    """An app offering ``http_call``; its own ``__call__`` must not be used for HTTP."""

    def __init__(self) -> None:
        self.endpoint = _Endpoint()
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("the protocol called the app, not its http_call")

    def http_call(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        self.calls += 1
        return self.endpoint(scope, receive, send)


async def test_the_protocol_calls_http_call_and_the_task_skips_the_apps_level() -> None:
    app = _Offering()
    await _served(app, 3)
    assert app.calls == 3
    for chain in app.endpoint.chains:  # the task's step runs the endpoint itself
        assert chain[-2:] == ["Handle._run", "_Endpoint.__call__"], chain  # (run_direct)


async def test_an_app_without_it_is_called_itself() -> None:
    endpoint = _Endpoint()
    await _served(endpoint, 2)
    for chain in endpoint.chains:
        assert chain[-2:] == ["RequestResponseCycle.run_asgi", "_Endpoint.__call__"], chain


async def test_gateway_app_offers_it_and_picks_the_endpoint_its_call_picks() -> None:
    own = _Endpoint()
    upstream = _Endpoint()
    app = GatewayApp(CreditGate(reference_config()), upstream=upstream, own=own, sync=False)
    assert callable(getattr(app, HTTP_CALL))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    for path, picked in (
        ("/healthz", "_Endpoint.__call__"),
        ("/admin/orgs", "_Endpoint.__call__"),
        ("/v1/chat", "CreditGateMiddleware.__call__"),
        ("/healthzz", "CreditGateMiddleware.__call__"),
    ):
        scope = {"type": "http", "path": path}
        call = app.http_call(scope, receive, send)
        assert call.cr_code.co_qualname == picked, path  # type: ignore[attr-defined]
        call.close()  # type: ignore[attr-defined]

    # Through serve's protocol: creditgate's own endpoint, with no GatewayApp level.
    await _served(app, 2, b"/healthz")
    assert len(own.chains) == 2
    for chain in own.chains:  # nor run_asgi's (FastCycle.run_direct)
        assert chain[-2:] == ["Handle._run", "_Endpoint.__call__"], chain
    await app.gate.close()
