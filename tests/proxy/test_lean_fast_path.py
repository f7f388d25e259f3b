"""The proxy's lean fast path: the request head built in bytes (``UpstreamProxy._lean_lines``
and ``gateway.proxy.lean_client.frame``) and the response headers taken from the names the
lean connection lowercased. Each is compared with the general path it replaces, which
stays for the other clients and for the requests the fast path declines: the upstream
must receive the same bytes and the client the same headers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.proxy.app import UpstreamProxy
from gateway.proxy.lean_client import LeanBackend, frame, origin_of
from gateway.proxy.lean_connection import Connection, LeanResponse

ORIGIN = origin_of("http", "upstream:8000")
USUAL = [
    (b"host", b"127.0.0.1:8080"),
    (b"user-agent", b"wrk"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer cg_x"),
    (b"content-length", b"15"),
    (b"x-creditgate-org", b"acme"),
    (b"x-creditgate-user", b""),
    (b"x-creditgate-feature", b"lead_generation"),
    (b"x-creditgate-request-id", b"req_1"),
]
POOL = [
    *USUAL,
    (b"host", b"other"),
    (b"content-length", b"7"),
    (b"content-length", b"abc"),
    (b"accept", b"*/*"),
    (b"accept", b"text/html"),
    (b"connection", b"keep-alive"),
    (b"connection", b"close, x-hop, X-Creditgate-Org"),
    (b"connection", b"content-length"),
    (b"x-hop", b"1"),
    (b"transfer-encoding", b"chunked"),
    (b"te", b"trailers"),
    (b"upgrade", b"websocket"),
    (b"proxy-authorization", b"x"),
    (b"expect", b"100-continue"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"x-forwarded-for", b"10.0.0.2, 10.0.0.3"),
    (b"x-forwarded-host", b"spoofed"),
    (b"x-forwarded-proto", b"https"),
    (b"x-http-method-override", b"DELETE"),
    (b"x-method-override", b"DELETE"),
    (b"cookie", b"a=1; b=2"),
    (b"x-empty", b""),
]


def _scope(headers: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "http", "method": "POST", "path": "/v1/x", "raw_path": b"/v1/x",
        "query_string": b"", "headers": headers, "client": ("10.1.2.3", 5555),
        "scheme": "http", **extra,
    }  # fmt: skip


async def _streamed() -> AsyncIterator[bytes]:
    yield b"x"


def _both(scope: dict[str, Any], body: Any, method: str = "POST") -> tuple[Any, Any]:
    """(general path's head and length, fast path's), or the exception each raised."""

    async def general() -> Any:
        backend = LeanBackend(5.0, 5.0, 10)
        headers, declared = UpstreamProxy._request_headers(scope)
        try:
            return backend._head(method, "/v1/x", ORIGIN, headers, body), declared
        except ValueError as exc:
            return type(exc), declared

    def fast() -> Any:
        lean = UpstreamProxy._lean_lines(scope)
        if lean is None:
            return None  # declined: the proxy takes the general path
        block, count, declared = lean
        host = ORIGIN.host_header.encode()
        try:
            return frame(method, b"/v1/x", block, count, host, declared, body), declared
        except ValueError as exc:
            return type(exc), declared

    return asyncio.run(general()), fast()


@pytest.mark.parametrize("body", [b"", b"hello", None, "streamed"])
def test_the_usual_request_gives_the_same_head(body: Any) -> None:
    body = _streamed() if body == "streamed" else body
    old, new = _both(_scope(list(USUAL)), body)
    assert new == old


def test_random_header_sets_give_the_same_head() -> None:
    rng = random.Random(20261205)
    for _ in range(400):
        headers = rng.sample(POOL, rng.randint(0, 12))
        extra: dict[str, Any] = rng.choice(
            [{}, {"client": None}, {"scheme": "https"}, {"client": ("::1", 1)}]
        )
        for body in (b"", b"abc", None):
            for method in ("POST", "GET", "HEAD"):
                old, new = _both(_scope(headers, **extra), body, method)
                if new is None:  # declined only for a repeated Content-Length
                    assert [n for n, _ in headers].count(b"content-length") > 1
                    continue
                assert new == old, (headers, extra, body, method)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"host", b"h"), (b"content-length", b"3")],  # no line kept
        [(b"host", b"h"), (b"x-one", b"1")],  # one line kept
        [(b"x-100%", b"%s%b%%"), (b"%b", b"1"), (b"content-length", b"3")],  # % in names
        [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3"), (b"host", b"h")],
    ],
    ids=["none", "no line kept", "one kept", "percent", "three kept"],
)
def test_the_kept_decision_gives_the_same_head_each_time(headers: list[Any]) -> None:
    """The usual request's decision is kept per sequence of names: the first request
    (deciding) and the next ones (kept decision, other values) give the general path's
    head."""
    for round_ in range(3):
        values = [(n, v + b"%d" % round_ if n != b"content-length" else v) for n, v in headers]
        for body in (b"abc", None):
            old, new = _both(_scope(values), body)
            assert new == old, (values, body)


def test_the_kept_decisions_are_bounded() -> None:
    from gateway.proxy import app

    for i in range(app._USUAL_MAX + 10):
        assert UpstreamProxy._lean_lines(_scope([(b"x-n%d" % i, b"v")])) is not None
        assert len(app._USUAL) <= app._USUAL_MAX
    many = [(b"x-%d" % i, b"v") for i in range(app._USUAL_NAMES_MAX + 1)]
    assert UpstreamProxy._lean_lines(_scope(many)) is not None
    assert tuple(n for n, _ in many) not in app._USUAL  # too long to keep


def test_identity_asked_by_the_kept_decision_gives_identity_asked_on_the_lines() -> None:
    """A usage cost's request (``_USUAL_IDENTITY``: the identity line made by the kept
    format) gets exactly the lines ``_identity_asked`` makes of the plain ones, first
    request and next ones, with and without an Accept-Encoding of the client's, smuggled
    lines included; and the kept decisions stay bounded."""
    from gateway.proxy import app

    rng = random.Random(20261206)
    pool = [
        *POOL,
        (b"accept-encoding", b"gzip, br"),
        (b"accept-encoding", b"gzip\r\nx-evil: 1"),
        (b"x-accept-encoding", b"gzip"),
        (b"x-a", b"1\r\naccept-encoding: gzip"),
    ]
    cases = [list(USUAL), [*USUAL, (b"accept-encoding", b"gzip")], []]
    cases += [rng.sample(pool, rng.randint(0, 12)) for _ in range(400)]
    for headers in cases:
        extra: dict[str, Any] = rng.choice([{}, {"client": None}, {"scheme": "https"}])
        for round_ in range(2):
            values = [(n, v + b"%d" % round_ if n != b"content-length" else v) for n, v in headers]
            scope = _scope(values, **extra)
            plain = UpstreamProxy._lean_lines(scope)
            asked = UpstreamProxy._lean_lines(scope, app._USUAL_IDENTITY)
            assert asked == (None if plain is None else app._identity_asked(plain)), values
            if plain is not None and b"accept-encoding" not in [n for n, _ in values]:
                assert asked is not None and asked[0].endswith(b"accept-encoding: identity\r\n")
    for i in range(app._USUAL_MAX + 10):
        scope = _scope([(b"x-i%d" % i, b"v")])
        assert UpstreamProxy._lean_lines(scope, app._USUAL_IDENTITY) is not None
        assert len(app._USUAL_IDENTITY) <= app._USUAL_MAX


def test_a_str_name_is_declined_also_after_its_bytes_twin_was_kept() -> None:
    assert UpstreamProxy._lean_lines(_scope([(b"x-a", b"1")])) is not None
    assert UpstreamProxy._lean_lines(_scope([(b"x-a", "1")])) is None  # str value
    assert UpstreamProxy._lean_lines(_scope([("x-a", b"1")])) is None  # str name


@pytest.mark.parametrize(
    "value", [b"1\r\nx-evil: 1", b"1\nx-evil: 1", b"1\rx-evil: 1"], ids=["crlf", "lf", "cr"]
)
def test_a_cr_or_lf_in_a_value_is_refused_on_both_paths(value: bytes) -> None:
    old, new = _both(_scope([*USUAL, (b"x-a", value)]), b"hi")
    assert old == new and old[0] is ValueError


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Host", b"x")],
        [(b"x_http_method_override", b"DELETE")],
        [("host", "x")],
        [(b"host", b"x", b"y")],
        [(b"host", "x")],
    ],
    ids=["uppercase", "underscore", "str", "three items", "str value"],
)
def test_the_fast_path_declines_what_it_does_not_normalise(headers: list[Any]) -> None:
    assert UpstreamProxy._lean_lines(_scope(headers)) is None


class _Pool:
    def lost(self, conn: Any) -> None:
        pass


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nServer: u\r\nContent-Length: 2\r\nContent-Type: a/b\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nconnection: x-hop, Keep-Alive\r\nX-Hop: 1\r\nkeep-alive: 5\r\n"
        b"content-length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
    ids=["usual", "connection", "chunked", "two lengths (refused)", "no headers"],
)
def test_response_headers_are_what_the_general_filter_gives(head: bytes) -> None:
    """The proxy's fast pairing of lowercased names (no hop-by-hop header) and its general
    filter give the client the same headers; the length is read the same way."""
    for _ in range(2):  # the second time, what the names decide is the kept decision
        _check_response(head)


RESPONSE_POOL = [
    b"Server: u",
    b"content-type: a/b",
    b"Content-Type: text/plain",
    b"Content-Length: 2",
    b"content-length: 2",
    b"Transfer-Encoding: chunked",
    b"transfer-encoding: gzip, chunked",
    b"Connection: close",
    b"connection: x-hop",
    b"X-Hop: 1",
    b"Keep-Alive: 5",
    b"date: now",
    b"X-Empty: ",
]


def test_random_response_header_sets_read_the_same_each_time() -> None:
    """Names, values and framing read from random response heads, each parsed three times
    (the names' decision kept after the first) with other values, as the general code
    reads them."""
    rng = random.Random(20261206)
    for _ in range(300):
        lines = rng.sample(RESPONSE_POOL, rng.randint(0, 6))
        for round_ in range(3):
            varied = [line + b"%d" % round_ if b"ength" not in line else line for line in lines]
            te = any(line.lower().startswith(b"transfer-encoding") for line in varied)
            body = b"2\r\nhi\r\n0\r\n\r\n" if te else b"hi"
            _check_response(
                b"HTTP/1.1 200 OK\r\n" + b"".join(v + b"\r\n" for v in varied) + b"\r\n" + body
            )


def _check_response(head: bytes) -> None:
    from gateway.proxy.app import HOP_BY_HOP, _connection_tokens

    async def parse() -> LeanResponse:
        loop = asyncio.get_running_loop()
        conn = Connection(_Pool(), ORIGIN, loop)  # type: ignore[arg-type]
        resp = conn.resp = LeanResponse(conn, False, 5.0)
        conn.data_received(head)
        return resp

    resp = asyncio.run(parse())
    if resp._error is not None:  # httptools refused it (two lengths): nothing is forwarded
        assert not resp.headers_done
        return
    named = _connection_tokens(resp.raw_headers)
    general = [
        (n.lower(), v)
        for n, v in resp.raw_headers
        if n.lower() not in HOP_BY_HOP and n.lower() not in named
    ]
    assert resp.lower_names == [n.lower() for n, _ in resp.raw_headers]
    assert list(resp.values) == [v for _, v in resp.raw_headers]
    if HOP_BY_HOP.isdisjoint(resp.lower_names):
        assert list(zip(resp.lower_names, resp.values, strict=True)) == general
    lengths = [v for n, v in resp.raw_headers if n.lower() == b"content-length"]
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in resp.raw_headers)
    expected = None if chunked or not lengths else int(lengths[-1])
    assert resp.content_length == expected


def test_huge_response_headers_are_refused() -> None:
    """The header size limit (counted per read now, not per header) still holds."""
    from gateway.proxy.lean_connection import _MAX_HEAD

    async def parse() -> BaseException | None:
        loop = asyncio.get_running_loop()
        conn = Connection(_Pool(), ORIGIN, loop)  # type: ignore[arg-type]

        class _T:
            def abort(self) -> None:
                pass

        conn.transport = _T()  # type: ignore[assignment]
        resp = conn.resp = LeanResponse(conn, False, 5.0)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        line = b"x-big: " + b"a" * 8000 + b"\r\n"
        for _ in range(_MAX_HEAD // len(line) + 2):
            conn.data_received(line)
            if conn.closed:
                break
        return resp._error

    error = asyncio.run(parse())
    assert error is not None and "too large" in str(error)


def test_the_kept_forwarded_lines_follow_each_client_and_scheme() -> None:
    """The usual request's X-Forwarded-For and -Proto lines are kept per client address and
    scheme: requests with the same names from other clients, schemes, or none, taken in
    turn after their lines were kept, each get the general path's head."""
    from gateway.proxy import app

    extras: list[dict[str, Any]] = [
        {},
        {"client": ("10.0.0.9", 1)},
        {"client": ("10.0.0.9", 2), "scheme": "https"},
        {"client": None},
        {"client": ("::1", 3)},
        {"scheme": "wss"},
        {"client": ["10.0.0.8", 4]},
        {"client": (None, 5)},  # an address str() makes "None": not the no-client lines
    ]
    for round_ in range(3):
        for extra in extras:
            for headers in (USUAL, [(b"x-a", b"%d" % round_)], []):
                old, new = _both(_scope(headers, **extra), b"abc")
                assert new == old, (headers, extra)
    assert len(app._TAILS) <= app._TAILS_MAX


def test_the_kept_forwarded_lines_are_bounded() -> None:
    from gateway.proxy import app

    for i in range(app._TAILS_MAX + 10):
        old, new = _both(_scope(USUAL, client=(f"10.1.{i // 256}.{i % 256}", 1)), b"abc")
        assert new == old
        assert len(app._TAILS) <= app._TAILS_MAX


def test_a_wait_is_the_wake_up_future_itself() -> None:
    """``LeanResponse.wait()`` returns the future the connection resolves (no coroutine
    level of its own on the task's resume); it is resolved by the headers, and a wait after
    a failure raises at once."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(_Pool(), ORIGIN, loop)  # type: ignore[arg-type]
        resp = conn.resp = LeanResponse(conn, False, 5.0)
        waiting = resp.wait()
        assert isinstance(waiting, asyncio.Future) and not waiting.done()
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        assert waiting.done()
        await waiting
        assert resp.read_now() == b"hi"
        resp.fail(OSError("gone"))
        with pytest.raises(OSError):
            resp.wait()
        conn._stop_timer()

    asyncio.run(go())
