"""``creditgate serve``'s protocol answers what uvicorn's own would, request for request.

gateway/commands/limited_protocol.py inlines uvicorn's per-request callbacks (the scope,
the headers' end, the body, the task's start), makes a keep-alive request's cycle a
``FastCycle`` directly and keeps a request target's path, raw path and query string per
target. This drives the same reads through uvicorn's ``HttpToolsProtocol`` and through
``LimitedHttpToolsProtocol`` (both on in-memory transports, in front of an app that echoes
what it was given) and compares what the app saw (the scope, the request body) and the
bytes the client got: keep-alive, a target seen again, percent-encoding and queries,
HTTP/1.0, ``Connection: close``, HEAD, ``Expect: 100-continue``, pipelining, a chunked
body, headers split over reads, a root path, a smuggling attempt and a bad target.
test_response_cycle.py runs it against another uvicorn too (``CREDITGATE_UVICORN_PATH``:
the oldest ``pyproject.toml`` allows, 0.30, passes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.commands import limited_protocol
from gateway.commands.limited_protocol import LimitedHttpToolsProtocol
from gateway.config.schema import ServerConfig


class _Transport(asyncio.Transport):
    """The client's side in memory: what was written, and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


_SCOPE_KEYS = (
    "type", "asgi", "http_version", "server", "client", "scheme", "root_path", "headers",
    "method", "path", "raw_path", "query_string",
)  # fmt: skip


def _echo(seen: list[Any]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        fields = {key: scope.get(key) for key in _SCOPE_KEYS}
        seen.append((fields, body))
        answer = repr((fields["method"], fields["path"], fields["query_string"], body)).encode()
        if b"chunked" in fields["raw_path"]:
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


class _Picker:
    """An app offering ``http_call`` (as GatewayApp does): serve's protocol calls that,
    and runs a keep-alive request without run_asgi's coroutine (FastCycle.run_direct)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return await self.http_call(scope, receive, send)  # (what the app returns, too)

    def http_call(self, scope: Any, receive: Any, send: Any) -> Any:
        return self.app(scope, receive, send)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _drive(
    limited: bool,
    reads: list[bytes],
    root_path: str,
    app: Any = None,
    picker: bool = False,
    cancel: bool = False,
) -> tuple[bytes, bool, list[Any]]:
    seen: list[Any] = []
    app = app if app is not None else _echo(seen)
    config = UvicornConfig(
        _Picker(app) if picker else app, loop="none", lifespan="off", access_log=False,
        server_header=False, date_header=False, proxy_headers=False, root_path=root_path,
    )  # fmt: skip
    config.load()
    loop = asyncio.get_running_loop()
    state = ServerState()
    protocol: HttpToolsProtocol
    if limited:
        protocol = LimitedHttpToolsProtocol(config, state, {}, loop, limits=ServerConfig())
    else:
        protocol = HttpToolsProtocol(config, state, {}, loop)
    records = _Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(records)
    try:
        transport = _Transport()
        protocol.connection_made(transport)
        for data in reads:
            if not transport.closed:
                protocol.data_received(data)
            for _ in range(30):
                await asyncio.sleep(0)
        if cancel:
            for task in list(state.tasks):
                task.cancel()
            for _ in range(30):
                await asyncio.sleep(0)
        assert not state.tasks, "a request's task is still in the server's set"
        protocol.connection_lost(None)
        for _ in range(5):
            await asyncio.sleep(0)
    finally:
        logger.removeHandler(records)
    return bytes(transport.out), transport.closed, [*seen, *records.messages]


POST = b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
CASES: dict[str, list[bytes]] = {
    "keep-alive, the same target again": [
        POST + b"Content-Length: 2\r\n\r\n{}",
        POST + b"Content-Length: 3\r\n\r\n[1]",
        b"GET /v1/chat?x=2 HTTP/1.1\r\nHost: gw\r\n\r\n",
    ],
    "percent-encoding and queries": [
        b"GET /a%20b/%2Fc?q=%20&r HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /a%20b/%2Fc?q=%20&r HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /a%20b/%2Fc HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /caf%C3%A9?%C3%A9=1 HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET http://gw/abs/path?z=9 HTTP/1.1\r\nHost: gw\r\n\r\n",
    ],
    "HTTP/1.0": [b"GET /old HTTP/1.0\r\nHost: gw\r\n\r\n", b"GET /after HTTP/1.0\r\n\r\n"],
    "HTTP/1.0 keep-alive asked": [
        b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /after HTTP/1.1\r\nHost: gw\r\n\r\n",
    ],
    "Connection: close": [b"GET /bye HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"],
    "HEAD": [b"HEAD /h HTTP/1.1\r\nHost: gw\r\n\r\n", b"GET /h HTTP/1.1\r\nHost: gw\r\n\r\n"],
    "a chunked answer": [b"GET /chunked HTTP/1.1\r\nHost: gw\r\n\r\n"] * 2,
    "Expect: 100-continue": [
        b"POST /e HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"hello",
        POST + b"Content-Length: 2\r\n\r\n{}",
    ],
    "pipelined": [
        POST + b"Content-Length: 2\r\n\r\n{}"
        b"GET /second HTTP/1.1\r\nHost: gw\r\n\r\n"
        b"GET /third?t HTTP/1.1\r\nHost: gw\r\n\r\n"
    ],
    "a chunked request body": [
        b"POST /c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"2\r\nde\r\n0\r\n\r\n",
    ],
    "headers split over reads": [
        b"POST /s",
        b"plit?y=1 HTTP/1.1\r\nHo",
        b"st: gw\r\nContent-",
        b"Length: 2\r\n\r\n{",
        b"}",
    ],
    "smuggling: Content-Length and Transfer-Encoding": [
        b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ],
    "a bad target": [b"GET /a b HTTP/1.1\r\nHost: gw\r\n\r\n"],
    "trailing spaces in a value, an upper-case name": [
        b"GET /t HTTP/1.1\r\nHost: gw \t\r\nX-UPPER: v  \r\n\r\n"
    ],
}


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_serve_answers_as_uvicorn_does(case: str, root_path: str) -> None:
    limited_protocol._URLS.clear()
    reads = CASES[case]
    expected = await _drive(False, reads, root_path)
    for _ in range(2):  # the second time with the targets' parts kept
        got = await _drive(True, reads, root_path)
        assert got[2] == expected[2], "the app saw something else"
        assert got[0] == expected[0], "the client got other bytes"
        assert got[1] == expected[1]


async def test_targets_kept_are_bounded_and_not_under_a_root_path() -> None:
    limited_protocol._URLS.clear()
    reads = [b"GET /n%d?i=%d HTTP/1.1\r\nHost: gw\r\n\r\n" % (i, i) for i in range(300)]
    await _drive(True, reads, "")
    assert 0 < len(limited_protocol._URLS) <= limited_protocol._URLS_MAX
    assert limited_protocol._URLS[b"/n299?i=299"] == ("/n299", b"/n299", b"i=299")
    limited_protocol._URLS.clear()
    await _drive(True, reads[:3], "/api")
    assert not limited_protocol._URLS
    long = b"/" + b"x" * limited_protocol._URL_LONG
    await _drive(True, [b"GET " + long + b" HTTP/1.1\r\nHost: gw\r\n\r\n"], "")
    assert not limited_protocol._URLS


@pytest.mark.parametrize("root_path", ["", "/api"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_an_app_offering_http_call_is_served_as_uvicorn_serves_it(
    case: str, root_path: str
) -> None:
    reads = CASES[case]
    expected = await _drive(False, reads, root_path, picker=True)
    assert await _drive(True, reads, root_path, picker=True) == expected


def _start(more: bool = True) -> list[dict[str, Any]]:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    messages: list[dict[str, Any]] = [
        {"type": "http.response.start", "status": 200, "headers": headers}
    ]
    if not more:
        messages.append({"type": "http.response.body", "body": b"hello"})
    return messages


def _failing(kind: str) -> Any:
    """An app that ends some other way than with a whole response and None."""

    async def app(scope: Any, receive: Any, send: Any) -> Any:
        await receive()
        if kind in ("raises after the start", "returns after the start"):
            # A chunked head: FastCycle holds a Content-Length head for its body (what it
            # documents: a head with no body after it never reaches the client).
            await send({"type": "http.response.start", "status": 200, "headers": []})
        if kind.startswith("raises"):
            raise RuntimeError("the app failed")
        if kind == "returns a value":
            for message in _start(more=False):
                await send(message)
            return 42
        if kind == "waits forever":
            await asyncio.Event().wait()
        return None

    return app


def _picking(kind: str) -> Any:
    """An http_call that raises itself, or gives an awaitable that is not a coroutine."""

    class Picker(_Picker):
        def http_call(self, scope: Any, receive: Any, send: Any) -> Any:
            if kind == "the call raises":
                raise RuntimeError("no endpoint")
            return asyncio.ensure_future(self.app(scope, receive, send))

    return Picker


@pytest.mark.parametrize(
    "kind",
    [
        "raises before the start",
        "raises after the start",
        "returns before the start",
        "returns after the start",
        "returns a value",
        "waits forever",
    ],
)
async def test_an_app_ending_badly_gets_what_uvicorn_gives(kind: str) -> None:
    """A failure logged, then a 500 (nothing sent yet) or a close; an app cancelled (the
    server's shutdown) as one that raised. The same bytes, the same log lines."""
    reads = [POST + b"Content-Length: 2\r\n\r\n{}", b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n"]
    cancel = kind == "waits forever"
    for picker in (False, True):
        app = _failing(kind)
        expected = await _drive(False, reads, "", app, picker, cancel)
        got = await _drive(True, reads, "", app, picker, cancel)
        assert got == expected
        assert expected[2], "the failure was logged"


@pytest.mark.parametrize("kind", ["the call raises", "a future, not a coroutine"])
async def test_a_call_that_raises_or_gives_a_future(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.commands.test_protocol_equivalence._Picker", _picking(kind))
    reads = CASES["keep-alive, the same target again"]
    expected = await _drive(False, reads, "", picker=True)
    got = await _drive(True, reads, "", picker=True)
    assert got == expected
