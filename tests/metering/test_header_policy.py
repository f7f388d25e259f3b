"""The header policy as the middleware applies it, on raw ASGI scopes: every scope type
that reaches the app, any header-name case, and the fast path that copies nothing.

The behaviour over HTTP in both modes is in tests/e2e/test_edges.py.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gateway import CreditGate, CreditGateMiddleware
from tests.support.reference import reference_config

SPOOFED = [
    (b"X-CREDITGATE-ORG", b"victim"),
    (b"X_Creditgate_User", b"mallory"),
    (b"X-HTTP-Method-Override", b"POST"),
    (b"X-Org-Id", b"victim"),
]


class Recorder:
    """An ASGI app that keeps the scopes it was called with and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})


def middleware(app: Recorder, **overrides: Any) -> CreditGateMiddleware:
    config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}", **overrides)
    return CreditGateMiddleware(app, gate=CreditGate(config))


async def call(mw: CreditGateMiddleware, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    return sent


def http_scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> Scope:
    return {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(),
        "query_string": b"", "headers": headers, "client": ("10.0.0.1", 1), "state": {},
    }  # fmt: skip


async def test_unmetered_scope_is_cleaned_in_any_case() -> None:
    app = Recorder()
    mw = middleware(app, identity={"trusted_headers": False})
    headers = [(b"host", b"app"), *SPOOFED, (b"Accept", b"*/*")]
    await call(mw, http_scope("/anything", headers))
    assert app.scopes[0]["headers"] == [(b"host", b"app"), (b"Accept", b"*/*")]
    assert headers[1] == (b"X-CREDITGATE-ORG", b"victim")  # the caller's list is not modified


async def test_plain_unmetered_request_is_passed_on_as_it_is() -> None:
    """The fast path: nothing to remove, so the very same scope reaches the app."""
    app = Recorder()
    mw = middleware(app)
    scope = http_scope("/anything", [(b"host", b"app"), (b"content-type", b"text/plain")])
    await call(mw, scope)
    assert app.scopes[0] is scope


async def test_refused_but_unmetered_path_is_cleaned_too() -> None:
    """A path the router refuses (here a servlet ;parameter) that could not be metered
    passes through unmetered: cleaned like any other."""
    app = Recorder()
    mw = middleware(app, identity={"trusted_headers": False})
    await call(mw, http_scope("/static/app.js;v=1", [(b"host", b"app"), *SPOOFED]))
    assert app.scopes[0]["headers"] == [(b"host", b"app")]


async def test_the_token_api_mounted_in_the_app_keeps_the_key() -> None:
    """creditgate's own token API, mounted behind the middleware, authenticates with the
    caller's key: under ``api_prefix`` the key stays (the rest of the policy applies)."""
    app = Recorder()
    mw = middleware(app)
    key = (b"authorization", b"Bearer cg_" + b"k" * 43)
    await call(mw, http_scope("/api/v1/tokens/balance", [key, (b"x-creditgate-org", b"v")]))
    await call(mw, http_scope("/api/v1/tokens", [key]))
    await call(mw, http_scope("/api/v1/tokens-not/x", [key]))
    await call(mw, http_scope("/api/v1/x/../tokens/balance", [key]))  # normalised first
    got = [scope["headers"] for scope in app.scopes]
    assert got == [[key], [key], [], [key]]


async def test_websocket_scope_is_cleaned() -> None:
    app = Recorder()
    mw = middleware(app, identity={"trusted_headers": False})
    scope = {"type": "websocket", "path": "/ws", "headers": [(b"host", b"app"), *SPOOFED]}

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        pass

    await mw(scope, receive, send)
    assert app.scopes[0]["headers"] == [(b"host", b"app")]


async def test_metered_request_headers_are_cleaned_and_identity_added() -> None:
    app = Recorder()
    mw = middleware(app)  # trusted headers on (the reference config)
    await mw.gate.set_plan("acme", "pro")
    headers = [
        (b"x-org-id", b"acme"), (b"X-Creditgate-Org", b"victim"), (b"x_creditgate_org", b"v"),
        (b"authorization", b"Bearer cg_" + b"k" * 43), (b"x-trace", b"1"),
    ]  # fmt: skip
    scope = http_scope("/api/v1/goals/g/quests", headers, method="POST")
    scope["state"]["creditgate_org"] = "acme"  # the app's own auth named the caller
    sent = await call(mw, scope)
    assert sent[0]["status"] == 200
    got = app.scopes[0]["headers"]
    assert [h for h in got if not h[0].startswith(b"x-creditgate-")] == [
        (b"x-org-id", b"acme"), (b"x-trace", b"1"),
    ]  # fmt: skip
    assert (b"x-creditgate-org", b"acme") in got
    await mw.gate.close()
