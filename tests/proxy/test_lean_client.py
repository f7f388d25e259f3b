"""The lean upstream client (gateway/proxy/lean_client.py) against hand-written HTTP servers.

Each test runs a raw asyncio server on its own event loop, so it can misbehave exactly as
needed (close idle connections, cut bodies short, never answer, send 1xx, refuse to read)
and count the connections it sees. tests/proxy/test_proxy_app.py runs the proxy suite on this
client as well (``kind == "lean"``).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import ConfigError, parse_config
from gateway.core.scope_keys import UPSTREAM_ERROR
from gateway.proxy import lean_client as upstream_lean
from gateway.proxy.app import UpstreamProxy
from gateway.proxy.lean_client import LeanBackend, UpstreamClosed, UpstreamError
from gateway.proxy.lean_connection import _HIGH_WATER
from tests.proxy.test_proxy_app import make_scope
from tests.support import upstream_app
from tests.support.upstream_app import serve_in_thread

pytestmark = pytest.mark.timeout(60)  # a deadlock fails fast instead of after 300 s

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    """One request: method, target, headers (lower-cased, last wins), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            del body[-2:]
            if size == 0:
                break
        return method, target, headers, bytes(body)
    length = int(headers.get("content-length", "0"))
    return method, target, headers, await reader.readexactly(length)


def response(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def echo_forever(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
) -> None:
    """Keep-alive echo: answers ``cid:method:target:body length`` until the client leaves."""
    while True:
        try:
            method, target, _, body = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(response(f"{cid}:{method}:{target}:{len(body)}".encode()))
        await writer.drain()


class RawServer:
    """An asyncio TCP (or TLS) server on 127.0.0.1 that counts its connections."""

    def __init__(self, handler: Handler = echo_forever, tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.closed: list[int] = []  # connection ids, in the order the client closed them
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        cid = self.accepted
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer, cid)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler task would make asyncio log an error in 3.11
        finally:
            self._tasks.discard(task)
            self.open -= 1
            self.closed.append(cid)
            writer.close()


@pytest.fixture
async def backend() -> AsyncIterator[LeanBackend]:
    client = LeanBackend(timeout=2.0, connect_timeout=1.0, max_connections=10)
    yield client
    await client.aclose()


async def get(
    client: LeanBackend,
    url: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: Any = None,
) -> tuple[int, bytes]:
    resp = await client.open(method, url, headers or [], body)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.aclose()


async def until(predicate: Callable[[], object], seconds: float = 2.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


# -- pool -----------------------------------------------------------------------------------


async def test_keepalive_reuses_one_connection(backend: LeanBackend) -> None:
    async with RawServer() as server:
        for i in range(5):
            status, body = await get(backend, f"{server.url}/a{i}")
            assert status == 200 and body == f"1:GET:/a{i}:0".encode()
        assert server.accepted == 1 and backend.pool.idle_count() == 1


async def test_idle_connections_reused_newest_first(backend: LeanBackend) -> None:
    async with RawServer() as server:
        first = await backend.open("GET", f"{server.url}/", [], None)
        second = await backend.open("GET", f"{server.url}/", [], None)
        assert (await first.read(), await second.read()) == (b"1:GET:/:0", b"2:GET:/:0")
        await first.aclose()
        await second.aclose()  # released last: reused first
        assert (await get(backend, f"{server.url}/"))[1].startswith(b"2:")
        assert (await get(backend, f"{server.url}/"))[1].startswith(b"2:")


async def test_pool_is_per_origin() -> None:
    client = LeanBackend(timeout=2.0, connect_timeout=1.0, max_connections=1)
    try:
        async with RawServer() as one, RawServer() as two:
            assert (await get(client, f"{one.url}/"))[1] == b"1:GET:/:0"
            # The limit is 1: the idle connection to `one` is closed to make room.
            assert (await get(client, f"{two.url}/"))[1] == b"1:GET:/:0"
            assert await until(lambda: one.closed == [1])
            assert client.pool.size == 1 and client.pool.idle_count() == 1
    finally:
        await client.aclose()


async def test_max_connections_bounds_and_queues() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(response(str(cid).encode()))

    client = LeanBackend(timeout=5.0, connect_timeout=1.0, max_connections=2)
    try:
        async with RawServer(slow) as server:
            results = await asyncio.gather(*(get(client, f"{server.url}/") for _ in range(8)))
            assert [s for s, _ in results] == [200] * 8
            assert server.max_open == 2 and server.accepted == 2
            assert client.pool.size == 2
    finally:
        await client.aclose()


async def test_cancelled_waiter_gives_its_turn_back() -> None:
    client = LeanBackend(timeout=5.0, connect_timeout=1.0, max_connections=1)
    try:
        async with RawServer() as server:
            held = await client.open("GET", f"{server.url}/", [], None)
            waiting = asyncio.create_task(get(client, f"{server.url}/w"))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await held.read()
            await held.aclose()
            assert await get(client, f"{server.url}/n") == (200, b"1:GET:/n:0")
            assert client.pool.size == 1
    finally:
        await client.aclose()


async def test_idle_connection_closed_after_keepalive() -> None:
    client = LeanBackend(timeout=2.0, connect_timeout=1.0, max_connections=4, keepalive=0.15)
    try:
        async with RawServer() as server:
            await get(client, f"{server.url}/")
            assert client.pool.idle_count() == 1
            assert await until(lambda: server.closed == [1], 1.0)
            assert client.pool.size == 0
            await get(client, f"{server.url}/")
            assert server.accepted == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["eof_when_idle", "connection_close", "http10"])
async def test_connection_the_server_closes_is_not_reused(backend: LeanBackend, how: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await read_request(reader)
        if how == "connection_close":
            writer.write(response(b"bye", extra="connection: close\r\n"))
        elif how == "http10":
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nbye")
        else:
            writer.write(response(b"bye"))
        await writer.drain()
        # Keep the socket open for the first two cases: the client must not wait for EOF.
        await asyncio.sleep(0 if how == "eof_when_idle" else 0.3)

    async with RawServer(handler) as server:
        assert await get(backend, f"{server.url}/") == (200, b"bye")
        if how == "eof_when_idle":
            assert await until(lambda: backend.pool.size == 0)
        else:
            assert backend.pool.idle_count() == 0
        assert await get(backend, f"{server.url}/") == (200, b"bye")
        assert server.accepted == 2


# -- keep-alive race retry ------------------------------------------------------------------


def race_server() -> tuple[Handler, list[str]]:
    """Answers a connection's first request; closes it on the second without answering."""
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        method, _, _, _ = await read_request(reader)
        seen.append(method)
        writer.write(response(f"{cid}".encode()))
        await writer.drain()
        method, _, _, _ = await read_request(reader)
        seen.append(method)  # ...and the connection closes: the race, lost

    return handler, seen


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_idempotent_request_retried_once_on_a_fresh_connection(
    backend: LeanBackend, method: str
) -> None:
    handler, seen = race_server()
    async with RawServer(handler) as server:
        assert await get(backend, f"{server.url}/") == (200, b"1")
        assert await get(backend, f"{server.url}/", method, body=b"x") == (200, b"2")
        assert seen == ["GET", method, method] and server.accepted == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_is_never_sent_twice(backend: LeanBackend, method: str) -> None:
    handler, seen = race_server()
    async with RawServer(handler) as server:
        await get(backend, f"{server.url}/")
        with pytest.raises(UpstreamClosed):
            await get(backend, f"{server.url}/", method, body=b"{}")
        assert seen == ["GET", method] and server.accepted == 1


async def test_streamed_body_is_never_replayed(backend: LeanBackend) -> None:
    handler, seen = race_server()

    async def body() -> AsyncIterator[bytes]:
        yield b"part"

    async with RawServer(handler) as server:
        await get(backend, f"{server.url}/")
        with pytest.raises(UpstreamClosed):
            await get(backend, f"{server.url}/", "PUT", body=body())
        assert seen == ["GET", "PUT"]


async def test_fresh_connection_failure_is_not_retried(backend: LeanBackend) -> None:
    async def close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        await read_request(reader)

    async with RawServer(close_at_once) as server:
        with pytest.raises(UpstreamClosed):
            await get(backend, f"{server.url}/")
        assert server.accepted == 1


# -- request --------------------------------------------------------------------------------


async def test_head_and_small_body_in_one_write(backend: LeanBackend) -> None:
    async with RawServer() as server:
        await get(backend, f"{server.url}/")
        conn = backend.pool._idle[next(iter(backend.pool._idle))][-1]
        assert conn.transport is not None
        writes: list[bytes] = []
        real = conn.transport.write

        def counting(data: Any) -> None:
            writes.append(bytes(data))
            real(data)

        conn.transport.write = counting  # type: ignore[method-assign]
        status, body = await get(
            backend, f"{server.url}/p", "POST", [("content-type", "text/plain")], b"hello"
        )
        assert (status, body) == (200, b"1:POST:/p:5")
        assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\nhello")
        assert b"content-length: 5\r\n" in writes[0] and b"content-type: text/plain" in writes[0]


async def test_request_head_framing(backend: LeanBackend) -> None:
    heads: list[dict[str, str]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        while True:
            _, _, headers, body = await read_request(reader)
            heads.append(headers)
            writer.write(response(body))

    async def stream() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cd"

    async with RawServer(record) as server:
        await get(backend, f"{server.url}/x?q=1")  # GET without body: no framing headers
        await get(backend, f"{server.url}/x", "POST")  # POST without body: length 0
        assert await get(backend, f"{server.url}/x", "POST", body=stream()) == (200, b"abcd")
        assert await get(
            backend, f"{server.url}/x", "PUT", [("Content-Length", "4")], stream()
        ) == (200, b"abcd")
        await get(backend, f"{server.url}/x", headers=[("host", "virtual.example")])
    assert "content-length" not in heads[0] and "transfer-encoding" not in heads[0]
    assert heads[0]["host"] == f"127.0.0.1:{server.port}"
    assert heads[1]["content-length"] == "0"
    assert heads[2]["transfer-encoding"] == "chunked" and "content-length" not in heads[2]
    assert heads[3]["content-length"] == "4" and "transfer-encoding" not in heads[3]
    assert heads[4]["host"] == "virtual.example"


async def test_streamed_body_must_match_its_length(backend: LeanBackend) -> None:
    async def stream(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async with RawServer() as server:
        for data in (b"toolong", b"ab"):
            with pytest.raises(UpstreamError, match=r"Content-Length|ended at"):
                await get(
                    backend, f"{server.url}/", "POST", [("content-length", "4")], stream(data)
                )
        assert backend.pool.size == 0  # a connection out of step is never pooled


async def test_header_injection_is_refused(backend: LeanBackend) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        await backend.open("GET", "http://127.0.0.1:1/", [("x-a", "1\r\nx-b: 2")], None)
    with pytest.raises(ValueError, match="CR or LF"):
        await backend.open("GET", "http://127.0.0.1:1/a\nb", [], None)


async def test_upload_waits_for_the_socket_to_drain(backend: LeanBackend) -> None:
    reading = asyncio.Event()
    piece = b"x" * 65536
    total = 1024 * len(piece)  # 64 MiB offered; far more than socket buffers hold
    produced = 0

    async def late_reader(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reading.wait()
        got = 0
        while got < total:
            got += len(await reader.read(1 << 20))
        writer.write(response(str(got).encode()))

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(total // len(piece)):
            produced += len(piece)
            yield piece

    async with RawServer(late_reader) as server:
        task = asyncio.create_task(
            get(backend, f"{server.url}/up", "PUT", [("content-length", str(total))], body())
        )
        await asyncio.sleep(0.3)
        held = produced
        assert held < total // 4  # paused: the producer is not drained into memory
        reading.set()
        assert await asyncio.wait_for(task, 20) == (200, str(total).encode())


async def test_early_answer_stops_the_upload(backend: LeanBackend) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response(b"too big", 413))
        await writer.drain()
        await asyncio.sleep(0.5)

    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await gate.wait()  # the answer arrives while the client is still uploading
        yield b"b" * 1000
        yield b"c" * 1000

    async def release() -> None:
        await asyncio.sleep(0.1)
        gate.set()

    async with RawServer(refuse) as server:
        releaser = asyncio.create_task(release())
        status, data = await get(backend, f"{server.url}/", "POST", body=body())
        await releaser
        assert (status, data) == (413, b"too big")
        assert backend.pool.size == 0  # the server may still expect the rest: not reused


async def test_full_duplex_upload_goes_on_after_a_2xx(backend: LeanBackend) -> None:
    async def duplex(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nstart;\r\n"
            )  # answers before reading the body
            await writer.drain()
            size = 0
            while chunk := int((await reader.readuntil(b"\r\n")).strip(), 16):
                size += len((await reader.readexactly(chunk + 2))[:-2])
            await reader.readexactly(2)
            end = str(size).encode()
            writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(end), end))

    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 100
        await gate.wait()
        for _ in range(50):
            yield b"b" * 1000

    async with RawServer(duplex) as server:
        resp = await backend.open("POST", f"{server.url}/", [], body())
        chunks = resp.chunks()
        assert await anext(chunks) == b"start;"
        gate.set()
        assert b"".join([c async for c in chunks]) == b"50100"
        await resp.aclose()
        assert await get(backend, f"{server.url}/", "POST", body=body()) == (200, b"start;50100")
        assert server.accepted == 1  # a finished full-duplex exchange leaves a clean connection


# -- response -------------------------------------------------------------------------------


async def test_body_framings(backend: LeanBackend) -> None:
    async def framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        while True:
            _, target, _, _ = await read_request(reader)
            if target == "/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                )
            elif target == "/length":
                writer.write(response(b"12345"))
            elif target == "/gzip-te":  # a coding without chunked: the body ends with the close
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzipped")
                return
            else:  # until close
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b" close")
                return

    async with RawServer(framed) as server:
        resp = await backend.open("GET", f"{server.url}/chunked", [], None)
        assert resp.content_length is None and [c async for c in resp.chunks()] == [b"abcde"]
        await resp.aclose()
        resp = await backend.open("GET", f"{server.url}/length", [], None)
        assert resp.content_length == 5 and await resp.read() == b"12345"
        await resp.aclose()
        assert server.accepted == 1
        resp = await backend.open("GET", f"{server.url}/gzip-te", [], None)
        assert resp.content_length is None and await resp.read() == b"zipped"
        await resp.aclose()
        resp = await backend.open("GET", f"{server.url}/eof", [], None)
        assert b"".join([c async for c in resp.chunks()]) == b"until close"
        await resp.aclose()
        assert await until(lambda: backend.pool.size == 0)


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_and_head_keep_the_connection(
    backend: LeanBackend, status: int
) -> None:
    async def bodiless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        while True:
            method, _, _, _ = await read_request(reader)
            if method == "HEAD":  # announces a body it does not send
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")
            elif method == "DELETE":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            elif method == "OPTIONS":
                writer.write(f"HTTP/1.1 {status} X\r\netag: x\r\n\r\n".encode())
            else:
                writer.write(response(b"next"))

    async with RawServer(bodiless) as server:
        for method in ("HEAD", "GET", "OPTIONS", "GET", "HEAD", "GET"):
            code, body = await get(backend, f"{server.url}/", method)
            assert body == (b"next" if method == "GET" else b"")
            assert code == (status if method == "OPTIONS" else 200)
        resp = await backend.open("HEAD", f"{server.url}/", [], None)
        assert resp.content_length == 5000 and [c async for c in resp.chunks()] == []
        await resp.aclose()
        assert server.accepted == 1


async def test_informational_responses_are_skipped(backend: LeanBackend) -> None:
    async def continue_first(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            size = 0
            while True:  # a chunked body: the client sends it without waiting for the 100
                line = await reader.readuntil(b"\r\n")
                chunk = int(line.strip(), 16)
                await reader.readexactly(chunk + 2)
                size += chunk
                if chunk == 0:
                    break
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
            expect = b"expect: 100-continue" in head.lower()
            writer.write(response(f"{size}:{expect}".encode(), extra="x-final: 1\r\n"))

    async def body() -> AsyncIterator[bytes]:
        yield b"12345"

    async with RawServer(continue_first) as server:
        resp = await asyncio.wait_for(
            backend.open("POST", f"{server.url}/", [("expect", "100-continue")], body()), 2
        )
        assert resp.status == 200 and resp.raw_headers[-1] == (b"x-final", b"1")
        assert not any(n == b"link" for n, _ in resp.raw_headers)
        assert await resp.read() == b"5:True"
        await resp.aclose()
        assert await get(backend, f"{server.url}/", "POST", body=body()) == (200, b"5:False")
        assert server.accepted == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_truncated_body_is_an_error(backend: LeanBackend, framing: str) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await read_request(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly this")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nonly\r\n")
        await writer.drain()

    async with RawServer(cut) as server:
        resp = await backend.open("GET", f"{server.url}/", [], None)
        with pytest.raises(UpstreamError):
            _ = [c async for c in resp.chunks()]
        await resp.aclose()
        resp = await backend.open("GET", f"{server.url}/", [], None)
        with pytest.raises(UpstreamError):
            await resp.read()
        await resp.aclose()
        assert backend.pool.size == 0


async def test_reading_pauses_when_the_consumer_is_behind(backend: LeanBackend) -> None:
    size = 8 * 1024 * 1024
    data = bytes(range(256)) * (size // 256)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await read_request(reader)
        writer.write(response(data))
        await writer.drain()

    async with RawServer(flood) as server:
        resp = await backend.open("GET", f"{server.url}/", [], None)
        await asyncio.sleep(0.2)  # the server pushes; nobody reads
        assert resp.reading_paused and resp.buffered < _HIGH_WATER + 2 * 1024 * 1024
        got = bytearray()
        async for chunk in resp.chunks():
            got += chunk
        assert bytes(got) == data
        await resp.aclose()
        assert backend.pool.idle_count() == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
        b"not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
    ],
)
async def test_malformed_response_is_an_error(backend: LeanBackend, garbage: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await read_request(reader)
        writer.write(garbage)
        await writer.drain()
        await asyncio.sleep(0.5)

    async with RawServer(bad) as server:
        with pytest.raises(UpstreamError):
            await get(backend, f"{server.url}/")
        assert backend.pool.size == 0


# -- timeouts and errors --------------------------------------------------------------------


async def test_read_timeout_on_headers_and_between_chunks() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        _, target, _, _ = await read_request(reader)
        if target == "/mid":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        await asyncio.sleep(2)

    client = LeanBackend(timeout=0.2, connect_timeout=1.0, max_connections=4)
    try:
        async with RawServer(stall) as server:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await client.open("GET", f"{server.url}/head", [], None)
            assert 0.15 < loop.time() - started < 1.0
            resp = await client.open("GET", f"{server.url}/mid", [], None)
            chunks = resp.chunks()
            assert await anext(chunks) == b"ab"
            with pytest.raises(TimeoutError):
                await anext(chunks)
            await resp.aclose()
            assert client.pool.size == 0
    finally:
        await client.aclose()


async def test_exchanges_on_one_connection_share_one_timeout_timer() -> None:
    """The timer that bounds an exchange's waits is the connection's, kept across its
    exchanges (none made and cancelled per exchange); a later exchange on the reused
    connection that stalls still fails after the timeout, counted from its own start."""
    requests = 0

    async def later_stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        nonlocal requests
        while True:
            await read_request(reader)
            requests += 1
            if requests == 22:
                await asyncio.sleep(3)
            writer.write(response(b"ok"))
            await writer.drain()

    client = LeanBackend(timeout=0.4, connect_timeout=1.0, max_connections=1)
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__name__", "") in ("check_timeout", "_check_timeout"):
            timers.append(when)  # the exchanges' timeouts (not the pool's, the server's)
        return call_at(when, callback, *args, **kw)

    try:
        async with RawServer(later_stall) as server:
            loop.call_at = counting_call_at  # type: ignore[method-assign,assignment]
            for _ in range(20):
                resp = await client.open("GET", f"{server.url}/x", [], None)
                assert await resp.read() == b"ok"
                await resp.aclose()
            assert server.accepted == 1
            assert len(timers) == 1  # one per exchange before: 20
            await asyncio.sleep(0.5)  # the timer fires while the connection is idle: lapses
            resp = await client.open("GET", f"{server.url}/x", [], None)
            assert await resp.read() == b"ok"
            await resp.aclose()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await client.open("GET", f"{server.url}/x", [], None)
            assert 0.35 < loop.time() - started < 1.2
            assert server.accepted == 1 and client.pool.size == 0
    finally:
        del loop.call_at
        await client.aclose()


async def test_connect_timeout_and_refused_map_to_the_proxy_errors(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await asyncio.sleep(2)  # accepts TCP, never answers the TLS handshake

    client = LeanBackend(timeout=2.0, connect_timeout=0.2, max_connections=4)
    try:
        async with RawServer(silent) as server:
            url = f"https://127.0.0.1:{server.port}/"
            with pytest.raises(client.TIMEOUT):
                await client.open("GET", url, [], None)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
        with pytest.raises(client.FAILURE) as caught:
            await client.open("GET", f"http://127.0.0.1:{dead}/", [], None)
        assert not isinstance(caught.value, TimeoutError)
        assert client.pool.size == 0
    finally:
        await client.aclose()


async def test_proxy_maps_connect_timeout_to_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        await asyncio.sleep(2)

    async with RawServer(silent) as server:
        app = UpstreamProxy(f"https://127.0.0.1:{server.port}", connect_timeout=0.2)
        try:
            status, body, state = await proxy_call(app, "GET", "/x")
        finally:
            await app.aclose()
    assert status == 504 and json.loads(body)["code"] == "upstream_timeout"
    assert "timeout" in state[UPSTREAM_ERROR]


# -- TLS ------------------------------------------------------------------------------------


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1/localhost: (server context, client context)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "creditgate test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_https_upstream(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)
    client = LeanBackend(
        timeout=2.0, connect_timeout=2.0, max_connections=4, ssl_context=client_ctx
    )
    untrusting = LeanBackend(timeout=2.0, connect_timeout=2.0, max_connections=4)
    try:
        async with RawServer(tls=server_ctx) as server:
            assert server.url.startswith("https://")
            for _ in range(3):
                status, body = await get(client, f"{server.url}/s", "POST", body=b"abc")
                assert (status, body) == (200, b"1:POST:/s:3")
            assert server.accepted == 1  # TLS connections are pooled too
            # The default context checks the certificate against the system's roots.
            with pytest.raises(ssl.SSLCertVerificationError):
                await get(untrusting, f"{server.url}/")
            assert untrusting.FAILURE and isinstance(ssl.SSLCertVerificationError(), OSError)
    finally:
        await client.aclose()
        await untrusting.aclose()


async def test_proxy_to_https_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)
    monkeypatch.setattr(upstream_lean, "default_ssl_context", lambda: client_ctx)
    async with RawServer(tls=server_ctx) as server:
        app = UpstreamProxy(server.url)
        try:
            status, body, _ = await proxy_call(app, "GET", "/via/tls")
        finally:
            await app.aclose()
    assert status == 200 and body == b"1:GET:/via/tls:0"


# -- lifecycle ------------------------------------------------------------------------------


async def test_aclose_closes_idle_and_busy_connections() -> None:
    client = LeanBackend(timeout=5.0, connect_timeout=1.0, max_connections=4)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int) -> None:
        while True:
            _, target, _, _ = await read_request(reader)
            if target == "/hold":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                await reader.read()  # until the client goes away
                return
            writer.write(response(b"ok"))

    async with RawServer(handler) as server:
        busy = await client.open("GET", f"{server.url}/hold", [], None)
        await get(client, f"{server.url}/")
        assert client.pool.size == 2
        await client.aclose()
        assert await until(lambda: sorted(server.closed) == [1, 2])
        with pytest.raises(OSError):  # in FAILURE: the proxy ends the body as broken
            await busy.read()
        await busy.aclose()
        with pytest.raises(OSError):
            await client.open("GET", f"{server.url}/", [], None)


async def test_cancelled_exchange_is_never_pooled(backend: LeanBackend) -> None:
    async def slow_stream(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
    ) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            await writer.drain()
            await reader.read()  # until the client goes away
            return

    async with RawServer(slow_stream) as server:

        async def consume() -> None:
            resp = await backend.open("GET", f"{server.url}/", [], None)
            try:
                async for _ in resp.chunks():
                    pass
            finally:
                await resp.aclose()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await until(lambda: server.closed == [1])
        assert backend.pool.size == 0

        # Cancelled while waiting for the headers: the connection is dropped too.
        async def silent(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int
        ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.read()

        server.handler = silent
        task = asyncio.create_task(backend.open("GET", f"{server.url}/never", [], None))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert backend.pool.size == 0
        assert await until(lambda: server.closed == [1, 2])


def test_one_proxy_serves_several_event_loops() -> None:
    """The proxy keeps one lean backend per loop: sequential and concurrent loops work."""
    results: list[int] = []

    async def calls(app: UpstreamProxy) -> None:
        for _ in range(3):
            status, body, _ = await proxy_call(app, "GET", "/echo/x")
            results.append(status if json.loads(body)["path"] == "/echo/x" else 0)
        await app.aclose()  # what lifespan shutdown does: closes this loop's pool only

    with serve_in_thread(upstream_app.app) as url:
        shared = UpstreamProxy(url)
        assert shared.client == "lean"
        asyncio.run(calls(shared))
        asyncio.run(calls(shared))  # the first loop is closed: its backend is replaced
        threads = [threading.Thread(target=asyncio.run, args=(calls(shared),)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert results == [200] * 15


async def proxy_call(
    app: UpstreamProxy, method: str, path: str
) -> tuple[int, bytes, dict[str, Any]]:
    """Call the proxy as an ASGI app with an empty request body."""
    scope = make_scope(method, path)
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return int(sent[0]["status"]), body, dict(scope["state"])


def test_config_knob_picks_the_client() -> None:
    base = "features: {f: {cost: 1}}\nplans: {p: {allocations: {f: 1}}}\ndefault_plan: p\n"
    assert parse_config(base, "c.yaml").upstream_client == "lean"
    config = parse_config(base + "upstream_client: aiohttp\n", "c.yaml")
    assert config.upstream_client == "aiohttp"
    assert UpstreamProxy("http://127.0.0.1:1", client=config.upstream_client).client == "aiohttp"
    with pytest.raises(ConfigError) as caught:
        parse_config(base + "upstream_client: curl\n", "c.yaml")
    assert caught.value.errors == [
        "c.yaml: upstream_client: must be 'lean', 'aiohttp' or 'httpx', got 'curl'"
    ]
