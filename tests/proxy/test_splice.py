"""The stream fast path: the response splice (gateway/core/splice.py) of ``creditgate
serve``'s protocol (gateway/commands/splice.py) and the proxy's use of it.

The framing is compared byte for byte with uvicorn's own ``send`` on the same cycle type;
the proxy is served as ``serve`` serves it (tests/support/served_gateway.py) and read with
a raw socket, so the chunked framing on the wire is checked strictly, and the same
request through plain uvicorn (no splice: the ASGI path) must give the same body. The
metered cases (ledger rows, refunds) are in tests/e2e/test_stream_splice.py.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.commands.splice import UvicornSplice
from gateway.core.splice import RESPONSE_SPLICE, SEND_PASSES_BODY, splice_for
from gateway.proxy.app import UpstreamProxy
from gateway.proxy.lean_connection import Connection, LeanResponse
from gateway.proxy.lean_pool import Origin
from tests.support import upstream_app
from tests.support.reference import reference_config
from tests.support.served_gateway import served
from tests.support.upstream_app import pattern_bytes, serve_in_thread
from tests.support.uvicorn_cycle import RecordingTransport, uvicorn_cycle


def _cycle(
    method: str = "GET", high_water: int = 1 << 30
) -> tuple[RequestResponseCycle, RecordingTransport]:
    return uvicorn_cycle(method, high_water=high_water)


START = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
PIECES = [b"d", b"data: x\n\n", b"y" * 15, b"z" * 16, pattern_bytes(4096), pattern_bytes(70_000)]


async def test_spliced_pieces_are_byte_for_byte_what_send_writes() -> None:
    asgi, via_send = _cycle()
    spliced, via_splice = _cycle()
    for cycle in (asgi, spliced):
        await cycle.send(START)  # type: ignore[arg-type]
    splice = UvicornSplice(spliced)
    assert splice.ready()
    for piece in PIECES:
        await asgi.send({"type": "http.response.body", "body": piece, "more_body": True})
        assert splice.write(piece) is True
    assert bytes(via_splice.out) == bytes(via_send.out)
    for cycle in (asgi, spliced):
        await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert bytes(via_splice.out) == bytes(via_send.out)
    assert via_send.out.endswith(b"\r\n" + pattern_bytes(70_000) + b"\r\n0\r\n\r\n")
    assert spliced.response_complete and not splice.ready()


async def test_splice_is_ready_only_for_a_started_chunked_response() -> None:
    cycle, _ = _cycle()
    splice = UvicornSplice(cycle)
    assert not splice.ready()  # not started
    length_start: Any = {**START, "headers": [(b"content-length", b"3")]}
    await cycle.send(length_start)
    assert not splice.ready()  # Content-Length framing: left to send
    head, _ = _cycle("HEAD")
    await head.send(START)  # type: ignore[arg-type]
    assert not UvicornSplice(head).ready()
    gone, transport = _cycle()
    await gone.send(START)  # type: ignore[arg-type]
    gone.disconnected = True
    before = len(transport.out)
    assert not UvicornSplice(gone).ready()
    assert UvicornSplice(gone).write(b"late") is True  # dropped, as send drops it
    assert len(transport.out) == before


async def test_write_reports_a_full_client_and_drain_waits_for_room() -> None:
    cycle, _ = _cycle(high_water=100)
    await cycle.send(START)  # type: ignore[arg-type]
    splice = UvicornSplice(cycle)
    assert splice.write(b"a" * 10) is True
    assert splice.write(b"b" * 200) is False  # past the high water mark
    drained = asyncio.create_task(splice.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()
    cycle.flow.resume_writing()  # the transport's buffer went below its low water mark
    await asyncio.wait_for(drained, 1)
    await asyncio.wait_for(splice.drain(), 1)  # not paused: returns at once


async def test_splice_for_needs_the_server_send_or_a_declared_wrapper() -> None:
    cycle, _ = _cycle()
    splice = UvicornSplice(cycle)
    scope: dict[str, Any] = {"extensions": {RESPONSE_SPLICE: splice}, "state": {}}

    async def wrapper(message: Any) -> None:
        await cycle.send(message)

    assert splice_for(scope, cycle.send) is splice
    assert splice_for({"state": {}}, cycle.send) is None  # another server: no extension
    assert splice_for(scope, wrapper) is None  # an undeclared wrapper may need the body
    scope["state"][SEND_PASSES_BODY] = (wrapper, cycle.send)
    assert splice_for(scope, wrapper) is splice

    async def outer(message: Any) -> None:
        await wrapper(message)

    scope["state"][SEND_PASSES_BODY] = (wrapper, outer)  # wraps a wrapper nobody declared
    assert splice_for(scope, wrapper) is None


async def test_a_declared_observer_sees_every_piece_in_order_also_after_the_client_left() -> (
    None
):  # fmt: skip
    """A wrapper that reads the body without changing it (the usage tap) declares an
    observer: the splice hands it each piece before the client's transport, and keeps
    handing it the pieces once the client is gone (a drained stream's usage still counts),
    while the client gets nothing more; False keeps the body to send, True needs none."""
    cycle, transport = _cycle()
    await cycle.send(START)  # type: ignore[arg-type]
    splice = UvicornSplice(cycle)
    scope: dict[str, Any] = {"extensions": {RESPONSE_SPLICE: splice}, "state": {}}
    seen: list[bytes] = []

    async def wrapper(message: Any) -> None:
        await cycle.send(message)

    scope["state"][SEND_PASSES_BODY] = (wrapper, cycle.send, lambda: False)
    assert splice_for(scope, wrapper) is None  # it holds or copies the body: via send
    scope["state"][SEND_PASSES_BODY] = (wrapper, cycle.send, lambda: True)
    assert splice_for(scope, wrapper) is splice and splice._observer is None
    scope["state"][SEND_PASSES_BODY] = (wrapper, cycle.send, lambda: seen.append)
    assert splice_for(scope, wrapper) is splice
    for piece in (b"data: 1\n\n", b"data: 2\n\n"):
        assert splice.write(piece) is True
    assert seen == [b"data: 1\n\n", b"data: 2\n\n"]
    assert transport.out.endswith(b"9\r\ndata: 2\n\n\r\n")
    cycle.disconnected = True
    before = len(transport.out)
    assert splice.write(b"data: usage\n\n") is True
    assert seen[-1] == b"data: usage\n\n" and len(transport.out) == before


class _UpstreamTransport:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        pass


class _Pool:
    def lost(self, conn: Connection) -> None:
        pass

    def release(self, conn: Connection) -> None:
        pass


HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


async def test_the_pieces_of_one_read_reach_the_sink_in_one_call() -> None:
    """One client write per upstream read, however many chunks it held; a full sink
    pauses the upstream's reading and wakes the response's owner."""
    loop = asyncio.get_running_loop()
    conn = Connection(_Pool(), Origin("http", "u", 80, "u"), loop)  # type: ignore[arg-type]
    transport = _UpstreamTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    resp = conn.resp = LeanResponse(conn, False, 5.0)
    conn.data_received(HEAD + b"3\r\nabc\r\n")  # the headers and a first piece
    assert resp.headers_done and list(resp.pieces) == [b"abc"]
    calls: list[bytes] = []
    room = [True]

    def sink(data: bytes) -> bool:
        calls.append(data)
        return room[0]

    resp.splice(sink)
    assert calls == [b"abc"] and not resp.pieces  # what was queued goes first
    conn.data_received(b"2\r\nde\r\n1\r\nf\r\n4\r\nghij\r\n")
    assert calls == [b"abc", b"defghij"]  # three chunks, one call
    room[0] = False
    waiting = asyncio.ensure_future(resp.wait())
    await asyncio.sleep(0)
    conn.data_received(b"1\r\nk\r\n")
    await asyncio.wait_for(waiting, 1)  # woken: the sink is full
    assert resp.reading_paused and transport.paused
    resp.resume_reading()
    assert not resp.reading_paused and not transport.paused
    conn.data_received(b"1\r\nl\r\n0\r\n\r\n")
    assert calls[-1] == b"l" and resp.complete
    resp.close()


# --- served as `creditgate serve` serves it -------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(upstream_app.app) as url:
        yield url


class SpliceSpy:
    """Counts spliced pieces and the largest client write buffer seen after one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pieces = 0
        self.max_buffered = 0
        self.paused = 0
        original = UvicornSplice.write

        def write(splice: UvicornSplice, data: bytes) -> bool:
            ok = original(splice, data)
            self.pieces += 1
            cycle = splice()  # the splice is the weak reference to its cycle
            assert cycle is not None
            buffered = cycle.transport.get_write_buffer_size()
            self.max_buffered = max(self.max_buffered, buffered)
            self.paused += not ok
            return ok

        monkeypatch.setattr(UvicornSplice, "write", write)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SpliceSpy:
    return SpliceSpy(monkeypatch)


def _request(port: int, target: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    sock.settimeout(20)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    sock.close()
    return b"".join(parts)


def _dechunk(raw: bytes) -> tuple[bytes, int]:
    """The body of a chunked response, read strictly (sizes, CRLFs, the final chunk and
    nothing after it); and how many chunks it had."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ntransfer-encoding: chunked" in head.lower()
    body, pos, chunks = bytearray(), 0, 0
    while True:
        end = rest.index(b"\r\n", pos)
        size_text = rest[pos:end]
        assert size_text == size_text.strip() and size_text, size_text
        size = int(size_text, 16)
        assert b"%x" % size == size_text  # lower-case hex, no padding, no extensions
        pos = end + 2
        if size == 0:
            assert rest[pos:] == b"\r\n"  # no trailers, nothing after the end
            return bytes(body), chunks
        body += rest[pos : pos + size]
        assert rest[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2
        chunks += 1


def test_a_stream_through_serve_is_spliced_and_equals_the_asgi_path(
    upstream: str, spy: SpliceSpy
) -> None:
    target = "/big?size=300001&chunk=1000"
    with served(UpstreamProxy(upstream), reference_config()) as port:
        spliced, chunks = _dechunk(_read_all(_request(port, target)))
    assert spy.pieces > 0 and chunks == spy.pieces  # every piece went through the splice
    with serve_in_thread(UpstreamProxy(upstream)) as url:  # plain uvicorn: no splice
        before = spy.pieces
        port = int(url.rpartition(":")[2])
        relayed, _ = _dechunk(_read_all(_request(port, target)))
        assert spy.pieces == before
    assert spliced == relayed == pattern_bytes(300_001)


def test_sse_through_serve_is_spliced_event_by_event(upstream: str, spy: SpliceSpy) -> None:
    with served(UpstreamProxy(upstream), reference_config()) as port:
        body, chunks = _dechunk(_read_all(_request(port, "/sse?n=5&delay=0.02")))
    assert body == b"".join(f"id: {i}\ndata: {i}\n\n".encode() for i in range(5))
    # One chunk per upstream read: events that arrive together share one.
    assert 1 <= chunks <= 5 and chunks == spy.pieces


def test_a_slow_client_pauses_the_upstream_and_memory_stays_bounded(
    upstream: str, spy: SpliceSpy
) -> None:
    """The client reads nothing for a while: the gateway's write buffer to it stays at
    the transport's high water mark plus one read, reading from the upstream pauses
    (the upstream is blocked with most of the body unsent), and after the client reads
    again every byte arrives intact."""
    size = 64 << 20
    sent: dict[str, int] = {}
    with served(UpstreamProxy(upstream), reference_config()) as port:
        sock = _request(port, f"/big?size={size}&chunk=65536", rcvbuf=16384)
        first = sock.recv(4096)  # the headers (and the first bytes): the stream is on
        time.sleep(1.5)  # the client reads nothing: everything must stop and wait
        sent["at_pause"] = spy.pieces
        time.sleep(0.5)
        sent["later"] = spy.pieces
        digest = hashlib.sha256()
        raw = first + _read_all(sock)
    assert spy.paused > 0
    assert sent["later"] == sent["at_pause"]  # nothing more was taken from the upstream
    # uvicorn's high water mark (64 KiB) plus one upstream read (at most 256 KiB).
    assert spy.max_buffered <= (64 + 256 + 4) * 1024  # + chunk sizes
    body, _ = _dechunk(raw)
    digest.update(body)
    assert digest.digest() == hashlib.sha256(pattern_bytes(size)).digest()


def test_a_client_that_leaves_stops_the_upstream_read(upstream: str, spy: SpliceSpy) -> None:
    """Unmetered here (the metered outcomes are in tests/e2e/test_stream_splice.py): the
    upstream connection is closed when the client leaves, so the upstream stops."""
    gate = f"leave{threading.get_ident()}{time.monotonic_ns()}"
    with served(UpstreamProxy(upstream), reference_config()) as port:
        sock = _request(port, f"/sse?n=3&gate={gate}")
        seen = b""
        while b"data: 0" not in seen:
            seen += sock.recv(4096)
        sock.close()
        deadline = time.monotonic() + 5
        while not upstream_app._progress.get(gate, {}).get("cancelled"):
            assert time.monotonic() < deadline, "the upstream stream was not abandoned"
            time.sleep(0.02)


async def test_a_splice_outliving_its_cycle_is_never_ready_and_drops_what_it_gets() -> None:
    """The splice holds its cycle weakly (no reference cycle through the scope): once the
    request's cycle is gone, it is not ready, writes nothing and still feeds its observer."""
    cycle, transport = _cycle()
    await cycle.send(START)  # type: ignore[arg-type]
    splice = UvicornSplice(cycle)
    send = cycle.send
    assert splice.ready() and splice.is_server_send(send)
    seen: list[bytes] = []
    splice.observe(seen.append)
    del cycle, send
    gc.collect()
    before = len(transport.out)
    assert not splice.ready()
    assert splice.write(b"late") is True
    assert seen == [b"late"] and len(transport.out) == before
    await asyncio.wait_for(splice.drain(), 1)
