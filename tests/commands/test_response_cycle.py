"""``creditgate serve``'s cheaper response head (gateway/commands/response_cycle.py).

Every case runs the same ASGI messages through uvicorn's own ``RequestResponseCycle`` and
through ``FastCycle`` and compares what the client would get (the bytes written, the
transport closed or not), what the app is told (the exception ``send`` raises, if any) and
the cycle's state afterwards: the fast path must be invisible except in its cost. The cases
include every header uvicorn refuses, so a hostile header (CR, LF, NUL, a bad name) never
reaches a client through the fast path either. Through a real server: a hostile upstream's
headers through the proxy as ``serve`` serves it.

The module runs against the uvicorn installed; ``CREDITGATE_UVICORN_PATH`` (a directory
holding another uvicorn, e.g. the oldest ``pyproject.toml`` allows, unpacked from its
wheel) makes a subprocess run the comparison cases against that one too.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.commands.response_cycle import FastCycle, fast_cycle_allowed
from tests.support.uvicorn_cycle import RecordingTransport, uvicorn_cycle

Message = dict[str, Any]


def _cycle(
    cls: type[RequestResponseCycle],
    method: str = "GET",
    keep_alive: bool = True,
    request_headers: list[tuple[bytes, bytes]] | None = None,
    default_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[RequestResponseCycle, RecordingTransport, list[int]]:
    completed: list[int] = []
    cycle, transport = uvicorn_cycle(
        method, keep_alive, request_headers, default_headers,
        on_response=lambda: completed.append(1),
    )  # fmt: skip
    # As the protocol does it; a closing cycle too, as one whose keep-alive ends during the
    # response (the header deadline, a shutdown) is.
    if cls is FastCycle and (fast_cycle_allowed(cycle, request_headers or []) or not keep_alive):
        cycle.__class__ = FastCycle
    return cycle, transport, completed


def _start(headers: Any, status: int = 200) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(body: bytes = b"", more: bool = False) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": more}


def _run(cls: type[RequestResponseCycle], messages: list[Message], **kw: Any) -> dict[str, Any]:
    cycle, transport, completed = _cycle(cls, **kw)

    async def go() -> str | None:
        for message in messages:
            try:
                await cycle.send(message)  # type: ignore[arg-type]
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
        return None

    error = asyncio.run(go())
    return {
        "bytes": b"".join(transport.writes),
        "error": error,
        "closed": transport.closing,
        "completed": completed,
        "state": (
            cycle.response_started,
            cycle.response_complete,
            cycle.chunked_encoding,
            cycle.expected_content_length,
            cycle.keep_alive,
        ),
        "writes": len(transport.writes),
    }


class _Headers:
    """An iterable of headers that is neither a list nor a tuple (ASGI allows any)."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.headers)


OK = [(b"content-type", b"application/json"), (b"content-length", b"5")]
COOKIES = [*OK, (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
PROXIED = [
    (b"server", b"uvicorn"),
    (b"date", b"Sat, 05 Dec 2026 23:00:00 GMT"),
    (b"content-length", b"5"),
    (b"content-type", b"application/json"),
    (b"x-tokens-cost", b"1"),
    (b"x-tokens-remaining", b"999"),
    (b"x-creditgate-request-id", b"req_0123456789abcdef"),
    (b"ratelimit-limit", b"1000000000"),
    (b"ratelimit-remaining", b"999999999"),
    (b"ratelimit-reset", b"1"),
]

# (name, messages, cycle options): each is compared between the two classes.
CASES: list[tuple[str, list[Message], dict[str, Any]]] = [
    ("proxied short answer", [_start(PROXIED), _body(b"hello")], {}),
    ("no headers, chunked", [_start([]), _body(b"ab", True), _body(b"c", True), _body()], {}),
    ("tuple of headers", [_start(tuple(OK)), _body(b"hello")], {}),
    ("body in pieces", [_start(OK), _body(b"he", True), _body(b"llo")], {}),
    ("empty body then end", [_start(OK), _body(b"", True), _body(b"hello")], {}),
    ("content-length 0", [_start([(b"content-length", b"0")]), _body()], {}),
    ("two content-lengths", [_start([*OK, (b"content-length", b"9")]), _body(b"hello")], {}),
    ("body too long", [_start(OK), _body(b"hello!")], {}),
    ("body too short", [_start(OK), _body(b"hell")], {}),
    ("start twice", [_start(OK), _start(OK)], {}),
    ("body first", [_body(b"x")], {}),
    ("after the end", [_start(OK), _body(b"hello"), _body(b"x")], {}),
    ("HEAD", [_start(OK), _body()], {"method": "HEAD"}),
    ("HEAD chunked", [_start([]), _body()], {"method": "HEAD"}),
    ("204", [_start([], 204), _body()], {}),
    ("304 with length", [_start(OK, 304), _body(b"hello")], {}),
    ("status 600", [_start(OK, 600), _body(b"hello")], {}),
    ("big body", [_start([(b"content-length", b"70000")]), _body(b"x" * 70_000)], {}),
    ("bad length", [_start([(b"content-length", b"five")]), _body(b"hello")], {}),
    ("CR in a value", [_start([(b"x-a", b"1\rx-b: 2"), *OK]), _body(b"hello")], {}),
    ("LF in a value", [_start([(b"x-a", b"1\nx-b: 2"), *OK]), _body(b"hello")], {}),
    ("CRLF in a value", [_start([(b"x-a", b"1\r\nx-b: 2"), *OK]), _body(b"hello")], {}),
    ("CR ending a value", [_start([(b"x-a", b"1\r"), *OK]), _body(b"hello")], {}),
    ("LF ending a value", [_start([(b"x-a", b"1\n"), *OK]), _body(b"hello")], {}),
    ("LF starting a value", [_start([*OK, (b"x-a", b"\n1")]), _body(b"hello")], {}),
    ("two cookies", [_start(COOKIES), _body(b"hello")], {}),
    ("NUL in a value", [_start([(b"x-a", b"1\x002"), *OK]), _body(b"hello")], {}),
    ("DEL in a value", [_start([(b"x-a", b"1\x7f"), *OK]), _body(b"hello")], {}),
    ("tab in a value", [_start([(b"x-a", b"1\t2"), *OK]), _body(b"hello")], {}),
    ("obs-text value", [_start([(b"x-a", "é".encode("latin-1")), *OK]), _body(b"hello")], {}),
    ("CRLF in a name", [_start([(b"x-a: 1\r\nx-b", b"2"), *OK]), _body(b"hello")], {}),
    ("colon-space in a name", [_start([(b"x-a: b", b"2"), *OK]), _body(b"hello")], {}),
    ("space in a name", [_start([(b"x a", b"2"), *OK]), _body(b"hello")], {}),
    ("slash in a name", [_start([(b"x/a", b"2"), *OK]), _body(b"hello")], {}),
    ("empty name", [_start([(b"", b"2"), *OK]), _body(b"hello")], {}),
    ("uppercase name", [_start([(b"X-A", b"2"), *OK]), _body(b"hello")], {}),
    ("str header", [_start([("x-a", "2"), *OK]), _body(b"hello")], {}),
    ("list header", [_start([[b"x-a", b"2"], *OK]), _body(b"hello")], {}),
    ("three items", [_start([(b"x-a", b"2", b"3"), *OK]), _body(b"hello")], {}),
    ("bytearray value", [_start([(b"x-a", bytearray(b"2")), *OK]), _body(b"hello")], {}),
    ("another iterable", [_start(_Headers(OK)), _body(b"hello")], {}),
    ("connection close", [_start([*OK, (b"connection", b"close")]), _body(b"hello")], {}),
    ("connection keep-alive", [_start([*OK, (b"connection", b"keep-alive")]), _body(b"hello")], {}),
    ("chunked", [_start([(b"transfer-encoding", b"chunked")]), _body(b"a", True), _body()], {}),
    ("closing connection", [_start(OK), _body(b"hello")], {"keep_alive": False}),
    ("defaults", [_start(OK), _body(b"hello")], {"default_headers": [(b"server", b"x")]}),
    (
        "request asked to close",
        [_start(OK), _body(b"hello")],
        {"request_headers": [(b"connection", b"close")]},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("messages", "options"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_fast_cycle_sends_what_uvicorn_sends(messages: list[Message], options: Any) -> None:
    slow = _run(RequestResponseCycle, messages, **options)
    fast = _run(FastCycle, messages, **options)
    assert {**fast, "writes": 0} == {**slow, "writes": 0}


def test_a_short_answer_is_one_write() -> None:
    fast = _run(FastCycle, [_start(PROXIED), _body(b"hello")])
    slow = _run(RequestResponseCycle, [_start(PROXIED), _body(b"hello")])
    assert (fast["writes"], slow["writes"]) == (1, 2)
    assert fast["completed"] == [1] and not fast["closed"]


@pytest.mark.parametrize(
    "value", [b"1\r\nx-evil: 1", b"1\nx-evil: 1", b"1\rx-evil: 1", b"\x00", b"a\x1fb"]
)
def test_a_hostile_value_never_reaches_the_client(value: bytes) -> None:
    fast = _run(FastCycle, [_start([(b"x-a", value), *OK]), _body(b"hello")])
    assert fast["bytes"] == b"" and fast["error"] == "RuntimeError: Invalid HTTP header value."


def test_names_kept_as_tokens_never_let_another_name_through() -> None:
    """The joined names found to be lowercase tokens are kept per sequence: the same
    sequence again (other values) takes the fast path, and a sequence with a name outside
    the rule still goes to uvicorn's send, whatever was kept before; the set is bounded."""
    from gateway.commands import response_cycle

    for round_ in range(3):  # the first decides and keeps, the next ones use the kept
        headers = [(b"x-a", b"%d" % round_), *OK]
        fast = _run(FastCycle, [_start(headers), _body(b"hello")])
        slow = _run(RequestResponseCycle, [_start(headers), _body(b"hello")])
        assert fast["bytes"] == slow["bytes"] and fast["writes"] == 1
    for name in (b"x-A", b"x a", b"x-a:", b"x-a\r\nx-b", b"X-a"):
        headers = [(name, b"1"), *OK]
        fast = _run(FastCycle, [_start(headers), _body(b"hello")])
        slow = _run(RequestResponseCycle, [_start(headers), _body(b"hello")])
        assert (fast["bytes"], fast["error"]) == (slow["bytes"], slow["error"]), name
        assert b"".join([name, *(n for n, _ in OK)]) not in response_cycle._TOKEN_NAMES
    for i in range(response_cycle._TOKEN_NAMES_MAX + 5):
        _run(FastCycle, [_start([(b"x-%d" % i, b"1"), *OK]), _body(b"hello")])
        assert len(response_cycle._TOKEN_NAMES) <= response_cycle._TOKEN_NAMES_MAX
    long = [(b"x-" + b"a" * 5000, b"1"), *OK]
    assert _run(FastCycle, [_start(long), _body(b"hello")])["writes"] == 1
    assert b"".join(n for n, _ in long) not in response_cycle._TOKEN_NAMES


def test_the_protocol_uses_it_only_for_a_connection_kept_open() -> None:
    cycle, _, _ = _cycle(RequestResponseCycle)
    assert fast_cycle_allowed(cycle, [(b"host", b"x")])
    assert not fast_cycle_allowed(cycle, [(b"host", b"x"), (b"connection", b"close")])
    closing, _, _ = _cycle(RequestResponseCycle, keep_alive=False)
    assert not fast_cycle_allowed(closing, [])
    defaults, _, _ = _cycle(RequestResponseCycle, default_headers=[(b"server", b"x")])
    assert not fast_cycle_allowed(defaults, [])
    cycle.access_log = True
    assert not fast_cycle_allowed(cycle, [])


def test_a_head_without_its_body_is_not_written() -> None:
    """The one difference, in an app's failure only: a Content-Length head that no body
    follows (uvicorn then closes the connection) is never written; the client sees the
    connection close without an answer instead of a head and a cut-off body."""
    assert _run(FastCycle, [_start(OK)])["bytes"] == b""
    assert _run(RequestResponseCycle, [_start(OK)])["bytes"].endswith(b"content-length: 5\r\n\r\n")


def test_a_slow_client_gets_the_held_head_before_uvicorn_waits() -> None:
    """A client whose buffer is full when the body comes: the head is written, then
    uvicorn's send waits for room and writes the body."""
    cycle, transport, _ = _cycle(FastCycle)

    async def go() -> None:
        await cycle.send(_start(OK))  # type: ignore[arg-type]
        assert transport.writes == []  # held
        cycle.flow.pause_writing()
        task = asyncio.create_task(cycle.send(_body(b"hello")))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert len(transport.writes) == 1 and not task.done()  # the head; the body waits
        cycle.flow.resume_writing()
        await task

    asyncio.run(go())
    assert b"".join(transport.writes).endswith(b"\r\n\r\nhello") and cycle.response_complete


def test_a_gone_client_gets_nothing_more() -> None:
    cycle, transport, _ = _cycle(FastCycle)

    async def go() -> None:
        await cycle.send(_start(OK))  # type: ignore[arg-type]
        cycle.disconnected = True
        await cycle.send(_body(b"hello"))  # type: ignore[arg-type]

    asyncio.run(go())
    assert transport.writes == []


# --- through a real server: a hostile upstream's headers --------------------------------


@contextmanager
def _raw_upstream(head: bytes) -> Iterator[str]:
    """An upstream that answers every request with ``head`` and a 5-byte body."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def run() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(head + b"content-length: 5\r\n\r\nhello")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"hello" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


HOSTILE = [
    b"x-evil: a\rinjected: 1\r\n",  # a bare CR
    b"x-evil: a\x00b\r\n",
    b"x-evil: a\x7fb\r\n",
    b"x(evil): 1\r\n",
    b"x evil: 1\r\n",
    b"x-evil: a\r\n folded: 1\r\n",  # obs-fold
    b"x-evil\x01: 1\r\n",
]


@pytest.mark.parametrize("line", HOSTILE)
def test_a_hostile_upstream_header_never_reaches_the_client(line: bytes) -> None:
    from gateway.proxy.app import UpstreamProxy
    from tests.support.reference import reference_config
    from tests.support.served_gateway import served

    with (
        _raw_upstream(b"HTTP/1.1 200 OK\r\nx-fine: 1\r\n" + line) as upstream,
        served(UpstreamProxy(upstream), reference_config()) as port,
    ):
        answer = _get(port)
    # Refused by the proxy's parser (502), or by the server's check (the connection is
    # closed before the head); never forwarded.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 502 "), answer
    assert b"injected" not in answer and b"folded" not in answer and b"evil" not in answer


def test_a_fine_upstream_answer_is_one_write_through_serve() -> None:
    """The proxied answer reaches the client whole (the head and body written together)."""
    from gateway.proxy.app import UpstreamProxy
    from tests.support.reference import reference_config
    from tests.support.served_gateway import served

    with (
        _raw_upstream(b"HTTP/1.1 200 OK\r\nx-fine: 1\r\n") as upstream,
        served(UpstreamProxy(upstream), reference_config()) as port,
    ):
        answer = _get(port)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello")
    assert b"\r\nx-fine: 1\r\n" in answer and b"\r\ncontent-length: 5\r\n" in answer


# --- the oldest uvicorn pyproject.toml allows -------------------------------------------


def test_the_comparison_holds_on_another_uvicorn() -> None:
    other = os.environ.get("CREDITGATE_UVICORN_PATH")
    if not other:
        pytest.skip("CREDITGATE_UVICORN_PATH names no other uvicorn to compare against")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([other, str(root)])}
    env.pop("CREDITGATE_UVICORN_PATH")
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"{__file__}::test_the_fast_cycle_sends_what_uvicorn_sends",
            f"{__file__}::test_a_short_answer_is_one_write",
            f"{__file__}::test_a_hostile_value_never_reaches_the_client",
            f"{__file__}::test_a_slow_client_gets_the_held_head_before_uvicorn_waits",
            f"{__file__}::test_a_hostile_upstream_header_never_reaches_the_client",
            # serve's protocol, read for read against that uvicorn's own
            str(Path(__file__).with_name("test_protocol_equivalence.py")),
        ],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    version = subprocess.run(
        [sys.executable, "-c", "import uvicorn; print(uvicorn.__file__, uvicorn.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert version.startswith(other), version


# --- receive ---------------------------------------------------------------------------


def _receive_states() -> list[dict[str, Any]]:
    states = []
    for event_set in (True, False):
        for body in (b"", b"{}"):
            for more_body in (True, False):
                for continue_ in (False, True):
                    for ended in ("", "disconnected", "response_complete"):
                        states.append(
                            {"event": event_set, "body": body, "more": more_body,
                             "continue": continue_, "ended": ended}
                        )  # fmt: skip
    return states


@pytest.mark.parametrize("state", _receive_states())
def test_receive_gives_what_uvicorns_receive_gives(state: dict[str, Any]) -> None:
    """Every combination of the cycle's request state: the same message (or the same wait),
    the same state after it, the same bytes written (100 Continue)."""

    async def go(cls: type[RequestResponseCycle]) -> tuple[Any, ...]:
        cycle, transport, _ = _cycle(cls, "POST")
        cycle.body = bytearray(state["body"])
        cycle.more_body = state["more"]
        cycle.waiting_for_100_continue = state["continue"]
        if state["ended"]:
            setattr(cycle, state["ended"], True)
        if state["event"]:
            cycle.message_event.set()
        task = asyncio.ensure_future(cycle.receive())
        for _ in range(3):
            await asyncio.sleep(0)
        waited = not task.done()
        if waited:  # uvicorn waits for the next read: give it one
            cycle.body += b"more"
            cycle.message_event.set()
        message = await asyncio.wait_for(task, 1)
        return (
            waited, message, bytes(cycle.body), cycle.more_body, cycle.message_event.is_set(),
            cycle.waiting_for_100_continue, b"".join(transport.writes),
        )  # fmt: skip

    assert asyncio.run(go(FastCycle)) == asyncio.run(go(RequestResponseCycle))


def test_the_fast_send_is_done_when_it_returns() -> None:
    """FastCycle.send writes what its fast path takes during the call and returns a future
    done already (no coroutine per message); what it hands to uvicorn is uvicorn's own
    ``send`` coroutine. Either is awaited as before."""
    cycle, transport, _ = _cycle(FastCycle)

    async def go() -> None:
        start = cycle.send(_start(OK))  # type: ignore[arg-type]
        assert isinstance(start, asyncio.Future) and start.done()
        await start
        body = cycle.send(_body(b"hello"))  # type: ignore[arg-type]
        assert isinstance(body, asyncio.Future) and body.done()
        assert b"".join(transport.writes).endswith(b"\r\n\r\nhello")  # before the await
        await body
        late = cycle.send(_body(b"more"))  # type: ignore[arg-type]
        assert asyncio.iscoroutine(late)  # uvicorn's send: it raises for a message too many
        with pytest.raises(RuntimeError):
            await late

    asyncio.run(go())
    assert cycle.response_complete
