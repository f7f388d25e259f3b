"""UpstreamProxy against a real upstream over TCP (tests/support/upstream_app.py served by uvicorn).

Most tests call the proxy as an ASGI app with hand-made receive/send so they can see every
message and when it was sent; the end-to-end tests put the proxy itself behind uvicorn.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from typing import Any

import httpx
import pytest

from gateway.core.problem import problem_body, send_problem
from gateway.core.scope_keys import (
    ASKS_IDENTITY_ENCODING,
    CLIENT_DISCONNECTED,
    UPSTREAM_ERROR,
    UPSTREAM_LATENCY_MS,
    UPSTREAM_STATUS,
    USAGE_TAP,
)
from gateway.proxy.app import UpstreamProxy
from tests.support import upstream_app
from tests.support.upstream_app import pattern_bytes, serve_in_thread

Message = MutableMapping[str, Any]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(upstream_app.app) as url:
        yield url


@pytest.fixture(params=["lean", "aiohttp", "httpx"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def proxy(upstream: str, kind: str) -> AsyncIterator[UpstreamProxy]:
    app = UpstreamProxy(upstream, client=kind, timeout=5.0)  # type: ignore[arg-type]
    yield app
    await app.aclose()


class Exchange:
    """One call of the ASGI app: the scope it saw and every message it sent."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.messages: list[Message] = []
        self.first_body = asyncio.Event()

    async def send(self, message: Message) -> None:
        self.messages.append(dict(message, at=time.monotonic()))
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_body.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.messages[0]["headers"])

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def state(self) -> dict[str, Any]:
        return dict(self.scope["state"])

    def ended(self) -> bool:
        last = self.messages[-1]
        return last["type"] == "http.response.body" and not last.get("more_body", False)


def make_scope(
    method: str, path: str, query: bytes = b"", headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"public.example"), *headers],
        "client": ("10.0.0.9", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call(
    app: UpstreamProxy,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: Sequence[bytes] = (b"",),
) -> Exchange:
    """Run one request whose client sends ``body`` in those pieces and never disconnects."""
    exchange = Exchange(make_scope(method, path, query, headers))
    chunks = list(body)

    async def receive() -> Message:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.Event().wait()  # until the proxy cancels its disconnect watcher
        raise AssertionError("unreachable")

    await app(exchange.scope, receive, exchange.send)
    return exchange


async def release(upstream: str, gate: str) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(f"{upstream}/control/release/{gate}")).raise_for_status()


def progress(name: str) -> dict[str, Any]:
    return dict(upstream_app._progress.get(name, {}))


async def eventually(predicate: Callable[[], object], seconds: float) -> bool:
    """Poll a condition set by the upstream, which runs on another thread's event loop."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


async def test_get_echo_forwards_path_query_and_cleans_headers(
    proxy: UpstreamProxy, upstream: str
) -> None:
    sent = [
        (b"connection", b"keep-alive, x-dropped-by-connection, x-creditgate-org"),
        (b"x-dropped-by-connection", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic eA=="),
        (b"trailer", b"x-t"),
        (b"proxy-connection", b"keep-alive"),
        (b"x-http-method-override", b"DELETE"),
        (b"x-http-method", b"DELETE"),
        (b"x-method-override", b"DELETE"),
        (b"x-original-url", b"/admin"),
        (b"x-rewrite-url", b"/admin"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil.example"),
        (b"x-creditgate-org", b"org_1"),
        (b"authorization", b"Bearer cg_x"),
        (b"x-custom", b"a"),
        (b"x-custom", b"b"),
        (b"accept-encoding", b"identity"),
    ]
    ex = await call(proxy, "GET", "/echo/a/b", query=b"x=1&y=%20z", headers=sent)
    assert ex.status == 200 and ex.ended()
    echo = json.loads(ex.body)
    assert echo["method"] == "GET"
    assert echo["raw_path"] == "/echo/a/b" and echo["query_string"] == "x=1&y=%20z"
    got = [(k, v) for k, v in echo["headers"]]
    names = {k for k, _ in got}
    dropped = {
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "trailer",
        "proxy-connection",
        "x-dropped-by-connection",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "transfer-encoding",
        "content-length",
        "user-agent",
        "accept",
    }
    assert not names & dropped
    assert dict(got)["host"] == upstream.removeprefix("http://")
    assert dict(got)["x-forwarded-for"] == "1.2.3.4, 10.0.0.9"
    assert dict(got)["x-forwarded-proto"] == "http"
    assert dict(got)["x-forwarded-host"] == "public.example"
    assert dict(got)["x-creditgate-org"] == "org_1"  # Connection may not name it away
    assert dict(got)["authorization"] == "Bearer cg_x"
    assert dict(got)["accept-encoding"] == "identity"
    assert [v for k, v in got if k == "x-custom"] == ["a", "b"]
    assert ex.header(b"x-upstream") == b"echo"
    assert ex.header(b"content-type") == b"application/json"
    assert ex.state[UPSTREAM_STATUS] == 200 and ex.state[UPSTREAM_LATENCY_MS] > 0
    assert UPSTREAM_ERROR not in ex.state


async def test_underscore_spellings_of_dropped_headers_are_dropped(proxy: UpstreamProxy) -> None:
    """Servers that merge X_HTTP_Method_Override with the dash spelling would honour it."""
    sent = [
        (b"x_http_method_override", b"DELETE"),
        (b"X_Original_URL", b"/admin"),
        (b"x_forwarded_host", b"evil.example"),
        (b"my_header", b"kept"),
    ]
    ex = await call(proxy, "GET", "/echo/a", headers=sent)
    got = dict(json.loads(ex.body)["headers"])
    assert not {"x_http_method_override", "x_original_url", "x_forwarded_host"} & got.keys()
    assert got["my_header"] == "kept"  # forwarded under its own name


async def test_post_small_body_in_pieces(proxy: UpstreamProxy) -> None:
    body = [b"hello ", b"wor", b"ld"]
    ex = await call(
        proxy,
        "POST",
        "/echo/p",
        body=body,
        headers=[(b"content-length", b"11"), (b"content-type", b"text/plain")],
    )
    echo = json.loads(ex.body)
    assert echo["method"] == "POST" and echo["body"] == "hello world"
    assert dict(echo["headers"])["content-length"] == "11"
    assert dict(echo["headers"])["content-type"] == "text/plain"


async def test_get_without_body_sends_none(proxy: UpstreamProxy) -> None:
    echo = json.loads((await call(proxy, "GET", "/echo/x")).body)
    assert echo["body_len"] == 0
    names = {k for k, _ in echo["headers"]}
    assert "content-length" not in names and "transfer-encoding" not in names


async def test_base_path_is_joined(upstream: str, kind: str) -> None:
    app = UpstreamProxy(upstream + "/echo/", client=kind)  # type: ignore[arg-type]
    try:
        echo = json.loads((await call(app, "DELETE", "/v1/x%2Fy", query=b"q=1")).body)
    finally:
        await app.aclose()
    assert echo["method"] == "DELETE"
    assert echo["raw_path"] in ("/echo/v1/x%2Fy", "/echo/v1/x%2fy")
    assert echo["query_string"] == "q=1"


async def test_response_headers_redirects_and_encoding_pass_through(
    proxy: UpstreamProxy,
) -> None:
    ex = await call(proxy, "GET", "/headers")
    names = [k for k, _ in ex.headers]
    assert b"keep-alive" not in names and b"connection" not in names and b"x-hop" not in names
    assert [v for k, v in ex.headers if k == b"set-cookie"] == [b"a=1; Path=/", b"b=2; Path=/"]
    assert ex.header(b"x-kept") == b"yes" and ex.body == b"ok"

    ex = await call(proxy, "GET", "/redirect")
    assert ex.status == 302 and ex.header(b"location") == b"/echo/redirected"

    ex = await call(proxy, "GET", "/gzip", headers=[(b"accept-encoding", b"gzip")])
    assert ex.header(b"content-encoding") == b"gzip"
    assert gzip.decompress(ex.body) == b"hello " * 100  # the raw gzip bytes, not decoded


@pytest.mark.parametrize("code", [201, 204, 418, 500, 503])
async def test_status_codes_pass_through(proxy: UpstreamProxy, code: int) -> None:
    ex = await call(proxy, "POST", f"/status/{code}")
    assert ex.status == code and ex.ended()
    assert ex.state[UPSTREAM_STATUS] == code
    assert ex.body == (b"" if code == 204 else b'{"status":%d}' % code)


async def test_head_has_no_body(proxy: UpstreamProxy) -> None:
    ex = await call(proxy, "HEAD", "/echo/h")
    assert ex.status == 200 and ex.body == b"" and ex.ended()
    assert ex.header(b"content-length") is not None


async def test_sse_first_event_arrives_before_upstream_finishes(
    proxy: UpstreamProxy, upstream: str
) -> None:
    gate = uuid.uuid4().hex
    exchange = Exchange(make_scope("GET", "/sse", f"n=3&gate={gate}".encode()))
    done = asyncio.Event()

    async def receive() -> Message:
        if not done.is_set():
            done.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.create_task(proxy(exchange.scope, receive, exchange.send))
    await asyncio.wait_for(exchange.first_body.wait(), 5)
    # The upstream is parked on the gate: this event came through unbuffered.
    assert b"data: 0" in exchange.body
    assert not task.done() and not progress(gate).get("finished")
    assert exchange.messages[1]["more_body"] is True
    released_at = time.monotonic()
    await release(upstream, gate)
    await asyncio.wait_for(task, 5)
    assert exchange.body == b"".join(f"id: {i}\ndata: {i}\n\n".encode() for i in range(3))
    assert exchange.ended() and progress(gate).get("finished")
    assert exchange.messages[1]["at"] < released_at < exchange.messages[-1]["at"]
    assert exchange.header(b"content-type") == b"text/event-stream; charset=utf-8"


async def test_sse_end_to_end_through_uvicorn(upstream: str, kind: str) -> None:
    gate = uuid.uuid4().hex
    app = UpstreamProxy(upstream, client=kind)  # type: ignore[arg-type]
    with serve_in_thread(app) as proxy_url:
        async with (
            httpx.AsyncClient(timeout=5) as client,
            client.stream("GET", f"{proxy_url}/sse?n=3&gate={gate}") as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), 5)
            assert first.startswith(b"id: 0\ndata: 0\n\n")
            assert not progress(gate).get("finished")
            await release(upstream, gate)
            rest = b"".join([c async for c in chunks])
    assert first + rest == b"".join(f"id: {i}\ndata: {i}\n\n".encode() for i in range(3))


@pytest.mark.parametrize("declared", [False, True])
async def test_large_request_body_streams(proxy: UpstreamProxy, declared: bool) -> None:
    upload_id = uuid.uuid4().hex
    pieces = [os.urandom(64 * 1024) for _ in range(32)]  # 2 MiB
    total = sum(map(len, pieces))
    exchange = Exchange(
        make_scope(
            "POST",
            f"/upload/{upload_id}",
            headers=[(b"content-length", str(total).encode())]
            if declared
            else [(b"transfer-encoding", b"chunked")],
        )
    )
    sent = 0
    upstream_had_bytes_midway: list[bool] = []

    async def receive() -> Message:
        nonlocal sent
        if sent == 8:
            # Hold back the rest until the upstream has some: a proxy that collected the
            # whole body first would never get here with the upstream fed.
            upstream_had_bytes_midway.append(
                await eventually(lambda: progress(upload_id).get("received"), 5)
            )
        if sent < len(pieces):
            sent += 1
            return {
                "type": "http.request",
                "body": pieces[sent - 1],
                "more_body": sent < len(pieces),
            }
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    await proxy(exchange.scope, receive, exchange.send)
    assert upstream_had_bytes_midway == [True]
    result = json.loads(exchange.body)
    assert result["len"] == total
    assert result["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    if declared:  # the known length is kept rather than switching the upstream to chunked
        assert result["content_length"] == str(total) and result["transfer_encoding"] is None
    else:
        assert result["transfer_encoding"] == "chunked" and result["content_length"] is None


async def test_client_disconnect_during_upload_is_a_5xx(proxy: UpstreamProxy) -> None:
    upload_id = uuid.uuid4().hex
    exchange = Exchange(
        make_scope("POST", f"/upload/{upload_id}", headers=[(b"transfer-encoding", b"chunked")])
    )
    pieces = [b"x" * 65536] * 4

    async def receive() -> Message:
        if pieces:
            return {"type": "http.request", "body": pieces.pop(), "more_body": True}
        return {"type": "http.disconnect"}

    await asyncio.wait_for(proxy(exchange.scope, receive, exchange.send), 5)
    # Nobody is left to read it, but the 5xx is what tells the meter to refund.
    assert exchange.status == 502
    assert exchange.state[CLIENT_DISCONNECTED] is True and UPSTREAM_ERROR in exchange.state
    assert not progress(upload_id).get("finished")


async def test_content_length_with_chunked_is_not_forwarded(proxy: UpstreamProxy) -> None:
    # Both framings: the body we relay was framed by chunking, so Content-Length must go.
    upload_id = uuid.uuid4().hex
    ex = await call(
        proxy,
        "POST",
        f"/upload/{upload_id}",
        body=[b"x" * 70000, b"y" * 30],
        headers=[(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    )
    result = json.loads(ex.body)
    assert result["len"] == 70030 and result["content_length"] is None


async def test_large_chunked_response_streams(proxy: UpstreamProxy) -> None:
    size = 4 * 1024 * 1024 + 123
    ex = await call(proxy, "GET", "/big", query=f"size={size}&chunk=65536".encode())
    assert ex.status == 200 and ex.ended()
    assert ex.header(b"content-length") is None and ex.header(b"transfer-encoding") is None
    bodies = [m for m in ex.messages[1:] if m.get("body")]
    assert len(bodies) > 8 and all(m["more_body"] for m in bodies)
    assert ex.body == pattern_bytes(size)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_upstream_down_is_502_problem(kind: str) -> None:
    app = UpstreamProxy(f"http://127.0.0.1:{_dead_port()}", client=kind)  # type: ignore[arg-type]
    try:
        ex = await call(
            app, "POST", "/api/v1/leads/generate", body=[b"{}"], headers=[(b"content-length", b"2")]
        )
    finally:
        await app.aclose()
    assert ex.status == 502 and ex.header(b"content-type") == b"application/problem+json"
    problem = json.loads(ex.body)
    assert problem["code"] == "bad_gateway" and problem["status"] == 502
    assert problem["type"] == "https://creditgate.dev/problems/bad_gateway"
    assert "unavailable" in ex.state[UPSTREAM_ERROR] and UPSTREAM_STATUS not in ex.state


async def test_slow_upstream_is_504_after_timeout(upstream: str, kind: str) -> None:
    app = UpstreamProxy(upstream, client=kind, timeout=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        ex = await call(app, "GET", "/slow", query=b"delay=3")
    finally:
        await app.aclose()
    assert 0.25 < time.monotonic() - started < 2.0
    assert ex.status == 504 and json.loads(ex.body)["code"] == "upstream_timeout"
    assert "timeout" in ex.state[UPSTREAM_ERROR]


async def test_stall_mid_body_leaves_response_unfinished_and_records_error(
    upstream: str, kind: str
) -> None:
    app = UpstreamProxy(upstream, client=kind, timeout=0.3)  # type: ignore[arg-type]
    try:
        ex = await call(app, "GET", "/stall", query=b"delay=3")
    finally:
        await app.aclose()
    # Not ended: the server closes the connection, so the client sees a cut-off body.
    assert ex.status == 200 and ex.body == b"first;" and not ex.ended()
    assert "timeout" in ex.state[UPSTREAM_ERROR] and ex.state[UPSTREAM_STATUS] == 200


@pytest.mark.parametrize("mode", ["chunked", "big"])
async def test_abrupt_close_mid_body_leaves_response_unfinished(
    proxy: UpstreamProxy, mode: str
) -> None:
    ex = await call(proxy, "GET", "/abort", query=f"mode={mode}".encode())
    assert ex.status == 200 and not ex.ended()
    assert ex.body == b"partial" * 10
    assert "upstream body failed" in ex.state[UPSTREAM_ERROR]


async def test_abrupt_close_of_small_body_is_502(proxy: UpstreamProxy) -> None:
    ex = await call(proxy, "GET", "/abort", query=b"mode=small")
    assert ex.status == 502 and json.loads(ex.body)["code"] == "bad_gateway"
    assert ex.state[UPSTREAM_STATUS] == 200 and "upstream body failed" in ex.state[UPSTREAM_ERROR]


async def test_client_disconnect_stops_the_stream(proxy: UpstreamProxy) -> None:
    gate = uuid.uuid4().hex
    exchange = Exchange(make_scope("GET", "/sse", f"n=3&gate={gate}".encode()))
    gone = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(proxy(exchange.scope, receive, exchange.send))
    await asyncio.wait_for(exchange.first_body.wait(), 5)  # the upstream is now parked
    gone.set()
    await asyncio.wait_for(task, 2)  # well before any read timeout (5 s)
    assert exchange.state[CLIENT_DISCONNECTED] is True and not exchange.ended()
    # The upstream connection was dropped, so the upstream's generator was cancelled.
    assert await eventually(lambda: progress(gate).get("cancelled"), 3)
    assert not progress(gate).get("finished")


def _is_closed(backend: Any) -> bool:
    if hasattr(backend, "pool"):  # lean
        return bool(backend.pool.closed)
    if hasattr(backend, "_session"):  # aiohttp
        return bool(backend._session.closed)
    return bool(backend._client.is_closed)  # httpx


def test_lean_is_the_default_client(upstream: str) -> None:
    assert UpstreamProxy(upstream).client == "lean"
    # The lean client takes no credentials in the URL: aiohttp serves such an upstream.
    assert UpstreamProxy("http://u:p@127.0.0.1:1").client == "aiohttp"
    with pytest.raises(ValueError, match="client must be one of"):
        UpstreamProxy(upstream, client="curl")  # type: ignore[arg-type]


async def test_lifespan_shutdown_closes_the_session(upstream: str, kind: str) -> None:
    app = UpstreamProxy(upstream, client=kind)  # type: ignore[arg-type]
    await call(app, "GET", "/echo/x")
    session = app._backends[asyncio.get_running_loop()]
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    outbox: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        outbox.append(dict(message))

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in outbox] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert _is_closed(session) and not app._backends


def test_bad_upstream_url_is_rejected() -> None:
    for bad in ("ftp://h/x", "127.0.0.1:9000", "http://h/x?q=1"):
        with pytest.raises(ValueError):
            UpstreamProxy(bad)


async def test_send_problem_writes_rfc9457_with_facts() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(dict(message))

    await send_problem(
        send,
        429,
        "rate_limited",
        "Too Many Requests",
        "Slow down.",
        headers=[(b"ratelimit-limit", b"60")],
        feature="lead_generation",
        retry_after=2.2,
        balance=None,
    )
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 429 and headers[b"content-type"] == b"application/problem+json"
    assert headers[b"retry-after"] == b"3" and headers[b"ratelimit-limit"] == b"60"
    assert int(headers[b"content-length"]) == len(sent[1]["body"])
    doc = json.loads(sent[1]["body"])
    assert doc == {
        "type": "https://creditgate.dev/problems/rate_limited",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Slow down.",
        "code": "rate_limited",
        "feature": "lead_generation",
        "retry_after": 2.2,
    }
    with pytest.raises(ValueError):
        problem_body(402, "insufficient_tokens", "t", "d", type="x")


# -- a complete answer handed over in one call (USAGE_TAP) ---------------------------------------


SendTo = Callable[[Message], Any]


class Whole:
    """A declared one-call taker: what it was handed; it answers ``target`` (default: the
    exchange's send), where the proxy then sends both messages."""

    def __init__(self, exchange: Exchange, target: SendTo | str | None = "exchange") -> None:
        self.exchange = exchange
        self.handed: list[tuple[Message, bytes]] = []
        self.target = target

    def answer(self, start: Message, body: bytes) -> SendTo | None:
        self.handed.append((start, body))
        if self.target == "exchange":
            return self.exchange.send
        assert not isinstance(self.target, str)
        return self.target


async def _call_declared(
    app: UpstreamProxy,
    method: str,
    path: str,
    *,
    same_send: bool = True,
    target: SendTo | str | None = "exchange",
) -> tuple[Exchange, Whole]:
    exchange = Exchange(make_scope(method, path))
    whole = Whole(exchange, target)
    declared = send = exchange.send  # one bound method: the declaration names this object
    if not same_send:

        async def other(message: Message) -> None:
            await declared(message)

        send = other  # something between the declaration and the proxy
    exchange.scope["state"] = {USAGE_TAP: (declared, whole.answer, None)}

    async def receive() -> Message:
        if not hasattr(receive, "sent"):
            receive.sent = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    await app(exchange.scope, receive, send)
    return exchange, whole


async def test_an_answer_of_known_length_is_handed_over_whole(proxy: UpstreamProxy) -> None:
    ex, whole = await _call_declared(proxy, "POST", "/echo/w")
    assert len(whole.handed) == 1 and ex.ended()
    start, data = whole.handed[0]
    assert start["status"] == 200 and data == ex.body and json.loads(data)["path"] == "/echo/w"
    assert [m["type"] for m in ex.messages] == ["http.response.start", "http.response.body"]


async def test_both_messages_go_where_the_taker_says(proxy: UpstreamProxy) -> None:
    """The taker's answer decides where the start and the body go: the ``send`` it returns
    (past the tap: the server's), or nowhere (``None``); never also through the app's."""
    past: list[Message] = []

    async def behind(message: Message) -> None:
        past.append(message)

    ex, whole = await _call_declared(proxy, "POST", "/echo/w", target=behind)
    assert len(whole.handed) == 1 and ex.messages == []
    assert [m["type"] for m in past] == ["http.response.start", "http.response.body"]
    assert past[0] is whole.handed[0][0] and past[1]["body"] == whole.handed[0][1]
    assert past[1]["more_body"] is False
    ex, whole = await _call_declared(proxy, "POST", "/echo/w", target=None)
    assert len(whole.handed) == 1 and ex.messages == []  # taken: nothing more to send


async def test_only_the_declared_send_and_a_complete_body_are_handed_over(
    proxy: UpstreamProxy,
) -> None:
    ex, whole = await _call_declared(proxy, "POST", "/echo/w", same_send=False)
    assert whole.handed == [] and json.loads(ex.body)["path"] == "/echo/w"
    ex, whole = await _call_declared(proxy, "GET", "/big", same_send=True)  # streamed
    assert whole.handed == [] and ex.ended() and len(ex.body) > 65536
    ex, whole = await _call_declared(proxy, "HEAD", "/echo/h")
    assert whole.handed == [] and ex.ended()


# -- the request body left to the proxy by the usage tap (USAGE_TAP's request element) ---------

_STREAM_CHAT = json.dumps(
    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


async def _call_tapped(
    app: UpstreamProxy, pieces: Sequence[bytes], headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[Exchange, dict[str, Any]]:
    """POST ``pieces`` to the echo upstream with the usage tap's request side declared; the
    exchange and what the upstream received (its echo)."""
    from gateway.metering.usage_tap import read_asking_stream_usage, stream_usage_asked

    exchange = Exchange(make_scope("POST", "/echo/chat", headers=headers))
    exchange.scope["state"] = {
        USAGE_TAP: (object(), None, (stream_usage_asked, read_asking_stream_usage))
    }
    chunks = list(pieces)

    async def receive() -> Message:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    await app(exchange.scope, receive, exchange.send)
    echoed = json.loads(exchange.body)
    return exchange, echoed


def _forwarded_length(echoed: dict[str, Any]) -> int:
    lengths = [int(v) for k, v in echoed["headers"] if k == "content-length"]
    assert len(lengths) == 1
    return lengths[0]


@pytest.mark.parametrize("split", [1, 3], ids=["whole", "pieces"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_the_proxy_asks_a_stream_for_its_usage_when_told(
    proxy: UpstreamProxy, split: int, framing: str
) -> None:
    """The body the tap would have rewritten (include_usage), rewritten by the proxy, framed
    by its new length whatever the client declared, from one message or several."""
    size = len(_STREAM_CHAT)
    pieces = [_STREAM_CHAT[i * size // split : (i + 1) * size // split] for i in range(split)]
    declared = (
        [(b"content-length", str(size).encode())]
        if framing == "length"
        else [(b"transfer-encoding", b"chunked")]
    )
    ex, echoed = await _call_tapped(
        proxy, pieces, [(b"content-type", b"application/json"), *declared]
    )
    assert ex.status == 200
    sent = echoed["body"].encode("latin-1")
    assert json.loads(sent)["stream_options"] == {"include_usage": True}
    assert json.loads(sent)["messages"] == [{"role": "user", "content": "hi"}]
    assert _forwarded_length(echoed) == len(sent) == echoed["body_len"] > size


async def test_what_needs_no_usage_asked_goes_as_it_came(proxy: UpstreamProxy) -> None:
    plain = json.dumps({"model": "m", "messages": []}).encode()
    for pieces in ([plain], [plain[:5], plain[5:]]):
        _, echoed = await _call_tapped(proxy, pieces, [(b"content-length", b"%d" % len(plain))])
        assert echoed["body"].encode("latin-1") == plain and _forwarded_length(echoed) == len(plain)
    from gateway.metering.usage_tap import REQUEST_BODY_LIMIT

    # Past the limit the middleware would not have read it whole either: forwarded untouched.
    big = _STREAM_CHAT[:-1] + b', "pad": "' + b"x" * REQUEST_BODY_LIMIT + b'"}'
    pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    _, echoed = await _call_tapped(proxy, pieces, [(b"content-length", b"%d" % len(big))])
    assert echoed["body_len"] == len(big) == _forwarded_length(echoed)
    assert echoed["body"].encode("latin-1") == big


async def test_a_client_gone_while_the_proxy_reads_its_body_is_not_forwarded(
    proxy: UpstreamProxy,
) -> None:
    from gateway.metering.usage_tap import read_asking_stream_usage, stream_usage_asked

    exchange = Exchange(
        make_scope("POST", "/echo/chat", headers=[(b"content-length", b"%d" % len(_STREAM_CHAT))])
    )
    exchange.scope["state"] = {
        USAGE_TAP: (object(), None, (stream_usage_asked, read_asking_stream_usage))
    }
    messages: list[Message] = [
        {"type": "http.request", "body": _STREAM_CHAT[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    await proxy(exchange.scope, receive, exchange.send)
    assert exchange.messages == [] and exchange.scope["state"][CLIENT_DISCONNECTED] is True
    assert UPSTREAM_STATUS not in exchange.scope["state"]  # nothing went upstream


# -- Accept-Encoding: identity asked by the proxy itself on a usage cost (ASKS_IDENTITY_ENCODING) --


@pytest.mark.parametrize(
    "sent",
    [
        [],
        [(b"accept-encoding", b"gzip, br")],
        [(b"accept-encoding", b"gzip"), (b"x-a", b"1"), (b"accept-encoding", b"br")],
        [(b"x-accept-encoding", b"gzip"), (b"accept-encodings", b"x")],
        [(b"Accept-Encoding", b"gzip")],  # not lowercase: the lean client's general path
    ],
    ids=["none", "one", "two", "look-alikes", "capitalised"],
)
async def test_a_usage_cost_asks_the_upstream_for_identity(
    proxy: UpstreamProxy, sent: list[tuple[bytes, bytes]]
) -> None:
    """With USAGE_TAP declared the upstream gets one ``Accept-Encoding: identity`` in place of
    the client's, whichever client; without it the client's go as they came."""
    assert getattr(UpstreamProxy, ASKS_IDENTITY_ENCODING) is True
    headers = [(b"content-type", b"application/json"), *sent]
    _, echoed = await _call_tapped(proxy, [b"{}"], headers)
    got = [(k, v) for k, v in echoed["headers"] if k.lower() == "accept-encoding"]
    assert got == [("accept-encoding", "identity")]
    kept = ("x-a", "x-accept-encoding")
    others = [(k, v) for k, v in echoed["headers"] if k in kept]
    assert others == [(k.decode(), v.decode()) for k, v in sent if k.decode() in kept]
    plain = await call(proxy, "POST", "/echo/chat", headers=headers, body=[b"{}"])
    untouched = [(k, v) for k, v in json.loads(plain.body)["headers"] if k == "accept-encoding"]
    assert untouched == [
        ("accept-encoding", v.decode()) for k, v in sent if k.lower() == b"accept-encoding"
    ]


def test_identity_is_asked_without_hiding_a_cr_or_lf_from_the_framing() -> None:
    """A value smuggling a line (``x: v\\r\\naccept-encoding: gzip``) is not cleaned up into a
    head frame() would accept: the counts still differ, and frame() refuses it."""
    from gateway.proxy.app import _identity_asked
    from gateway.proxy.lean_client import frame

    clean = (b"x-a: 1\r\naccept-encoding: gzip\r\nx-forwarded-proto: http\r\n", 3, None)
    block, lines, _ = _identity_asked(clean)
    assert block == b"x-a: 1\r\nx-forwarded-proto: http\r\naccept-encoding: identity\r\n"
    assert lines == 3
    frame("GET", b"/", block, lines, b"h", None, None)  # accepted
    assert _identity_asked((b"x-forwarded-proto: http\r\n", 1, 7)) == (
        b"x-forwarded-proto: http\r\naccept-encoding: identity\r\n",
        2,
        7,
    )
    for smuggled in (
        b"x: v\r\naccept-encoding: gzip\r\nx-forwarded-proto: http\r\n",
        b"x: v\naccept-encoding: gzip\r\nx-forwarded-proto: http\r\n",
        b"accept-encoding: g\r\nx: v\rq\r\nx-forwarded-proto: http\r\n",
    ):
        block, lines, _ = _identity_asked((smuggled, 2, None))
        with pytest.raises(ValueError):
            frame("GET", b"/", block, lines, b"h", None, None)
