"""PROTOTYPE: a lean HTTP/1.1 upstream client for UpstreamProxy (httptools + asyncio.Protocol).

The proxy benchmark showed aiohttp's client costing the gateway ~100 µs of CPU per proxied
request (request and response objects, multidicts, a writer task per request body, yarl
URLs, timers). This client does what the proxy needs and nothing else: pooled keep-alive
connections, the request head and a bytes body in one write (a streamed body as chunked
encoding), the response parsed by httptools (the parser uvicorn uses), body pieces handed
over as they arrive. It implements the backend interface of gateway/proxy.py
(``open(method, url, headers, body)`` -> response with ``status``, ``raw_headers``,
``content_length``, ``read()``, ``chunks()``, ``aclose()``; ``TIMEOUT``/``FAILURE``), so the
benchmark can put it under the real ``GatewayApp`` (kind ``gateway-lean``) and measure what
swapping the client would buy. Plain http:// only; no proxies, no TLS, no redirects.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools

_KEEPALIVE_S = 4.0  # as gateway/proxy.py: below uvicorn's 5 s keep-alive


class UpstreamError(ConnectionError):
    """The upstream broke the exchange (closed early, sent garbage)."""


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.resp: LeanResponse | None = None
        self.received = False  # any byte of the current response
        self.write_paused: asyncio.Future[None] | None = None

    # -- transport side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.abort(UpstreamError(f"malformed upstream response: {exc}"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_exception(UpstreamError("upstream closed the connection"))
        resp = self.resp
        if resp is not None and not resp.complete:
            resp.fail(UpstreamError(f"upstream closed the connection ({exc or 'EOF'})"))

    def pause_writing(self) -> None:
        self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        self.write_paused = None

    def abort(self, exc: BaseException) -> None:
        """Fail the exchange and drop the connection."""
        self.closed = True
        if self.resp is not None and not self.resp.complete:
            self.resp.fail(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        self.resp.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        resp.keep_alive = self.parser.should_keep_alive()
        resp.headers_done = True
        if resp.head_only:
            resp.complete = True  # no body follows; the parser cannot be told, so close after
            resp.keep_alive = False
        resp.wake()

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp.pieces.append(body)
        self.resp.wake()

    def on_message_complete(self) -> None:
        assert self.resp is not None
        self.resp.complete = True
        self.resp.wake()


class LeanResponse:
    """An upstream response whose body arrives as ``chunks()`` (or whole via ``read()``)."""

    __slots__ = ("_backend", "_conn", "_error", "_timer", "_waiter", "complete", "head_only",
                 "headers_done", "keep_alive", "pieces", "raw_headers", "status")

    def __init__(self, backend: LeanBackend, conn: _Conn, head_only: bool) -> None:
        self._backend = backend
        self._conn = conn
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.pieces: collections.deque[bytes] = collections.deque()
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.head_only = head_only

    @property
    def content_length(self) -> int | None:
        """The Content-Length the upstream declared, if any."""
        for name, value in self.raw_headers:
            if name.lower() == b"content-length":
                return int(value) if value.isdigit() else None
        return None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def wait(self) -> None:
        """Until something happens (headers, a body piece, the end), within the timeout."""
        if self._error is not None:
            raise self._error
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._backend.timeout, self._expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError("upstream read timed out"))
            self._conn.abort(TimeoutError("upstream read timed out"))

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            await self.wait()
        body = b"".join(self.pieces)
        self.pieces.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive."""
        pieces = self.pieces
        while True:
            while pieces:
                yield pieces.popleft()
            if self.complete:
                return
            await self.wait()

    async def aclose(self) -> None:
        """Give the connection back to the pool (a fully read keep-alive one) or close it."""
        conn = self._conn
        conn.resp = None
        if self.complete and self.keep_alive and not conn.closed and self._error is None:
            self._backend.release(conn)
        else:
            conn.abort(UpstreamError("response abandoned"))


class LeanBackend:
    """Pooled keep-alive connections to one upstream; ``open`` sends one request."""

    TIMEOUT: tuple[type[BaseException], ...] = (TimeoutError,)
    FAILURE: tuple[type[BaseException], ...] = (OSError, httptools.HttpParserError)

    def __init__(self, timeout: float, connect_timeout: float, max_connections: int) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: collections.deque[_Conn] = collections.deque()
        self._netloc = ""
        self._host_header = b""
        self._addr: tuple[str, int] = ("", 0)

    def release(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, proto = await loop.create_connection(lambda: _Conn(loop), *self._addr)
        return proto

    def _pooled(self) -> _Conn | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            if not conn.closed and now - conn.idle_since < _KEEPALIVE_S:
                return conn
            conn.abort(UpstreamError("expired"))
        return None

    async def open(self, method: str, url: str, headers: list[tuple[str, str]], body: Any
                   ) -> LeanResponse:
        """Send the request; return once the response headers are in."""
        scheme, _, rest = url.partition("://")
        netloc, _, target = rest.partition("/")
        if netloc != self._netloc:
            if scheme != "http":
                raise UpstreamError("the lean client speaks plain http:// only")
            host, _, port = netloc.rpartition(":")
            self._netloc, self._addr = netloc, (host, int(port or 80))
            self._host_header = f"host: {netloc}\r\n".encode("latin-1")
        lines = [f"{method} /{target} HTTP/1.1\r\n".encode("latin-1"), self._host_header]
        has_length = False
        for name, value in headers:
            has_length = has_length or name == "content-length"
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        streamed = body is not None and not isinstance(body, bytes)
        if streamed and not has_length:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif not streamed and not has_length and (body or method in ("POST", "PUT", "PATCH")):
            lines.append(b"content-length: %d\r\n" % len(body or b""))
        lines.append(b"\r\n")
        if not streamed and body:
            lines.append(body)
        head = b"".join(lines)
        for attempt in (0, 1):
            conn = self._pooled()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            resp = conn.resp = LeanResponse(self, conn, method == "HEAD")
            conn.received = False
            transport = conn.transport
            assert transport is not None
            try:
                transport.write(head)
                if streamed:
                    await self._stream(conn, body, chunked=not has_length)
                while not resp.headers_done:
                    await resp.wait()
            except UpstreamError:
                # A pooled connection the upstream closed meanwhile: nothing was processed,
                # so a request whose body we still have is sent once more on a new one.
                if reused and not conn.received and not streamed and attempt == 0:
                    continue
                raise
            return resp
        raise AssertionError("unreachable")

    @staticmethod
    async def _stream(conn: _Conn, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = conn.transport
        assert transport is not None
        async for piece in body:
            if conn.closed:
                raise UpstreamError("upstream closed the connection during the upload")
            if piece:
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if conn.write_paused is not None:
                await conn.write_paused
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def aclose(self) -> None:
        """Close every pooled connection."""
        while self._idle:
            self._idle.pop().abort(UpstreamError("client closed"))
