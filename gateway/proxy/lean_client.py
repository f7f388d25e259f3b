"""The lean upstream HTTP/1.1 client: what UpstreamProxy needs and nothing else.

aiohttp's client cost the proxy ~75 µs of CPU per request (request and response objects,
multidicts, yarl URLs, a writer task per body, timers). This client is an asyncio Protocol
with the httptools parser (the one uvicorn uses) over pooled keep-alive connections
(gateway/proxy/lean_pool.py). It implements the proxy's backend interface: ``open(method,
url, headers, body)`` returns a :class:`LeanResponse` once the response headers are in;
``TIMEOUT`` / ``FAILURE`` name the exceptions the proxy maps to 504 / 502.

Request: the head and a ``bytes`` body go out in one write. ``open`` takes str headers;
a caller that has the header lines in bytes already (the proxy) makes the head with
:func:`frame` and sends it with ``exchange``, skipping a decode and an encode per header.
An async-iterator body is sent by a writer task as it comes (so a full-duplex upstream
can answer while it reads), with the given Content-Length or else chunked; its writes are
corked until the end of the loop iteration, and it waits whenever the transport asks the
writer to pause, so a large upload never piles up in memory. If the upstream answers
3xx-5xx (or ``Connection: close``) before the upload is done, the upload stops and the
connection is not reused.

Response (gateway/proxy/lean_connection.py): 1xx responses are skipped; HEAD, 204 and 304 have no
body; bodies may be Content-Length, chunked, or read until the connection closes. Pieces
are handed over as they arrive; when more than 256 KiB wait unread, reading from the
socket pauses until the consumer catches up. A body cut short (connection lost before its
length or final chunk) raises :class:`UpstreamError` (an ``OSError``, as aiohttp's payload
error is a ``ClientError``: the proxy records it and ends the body as broken), never a
clean end.

Limit: at most ``max_connections`` connections at once (per event loop); a request beyond
them waits up to ``pool_wait`` seconds for one to free, then raises ``PoolBusy`` (``BUSY``,
which the proxy maps to 503 with Retry-After).

Timeouts: ``connect_timeout`` bounds connecting (and the TLS handshake); ``timeout``
bounds each wait for progress (the headers, the next body piece, the transport accepting
more of an upload), never the whole exchange, so long SSE streams are fine.

Retry rule (the keep-alive race: the server closes an idle connection just as a request is
written to it): a request fails over to one fresh connection only if the failed connection
was reused, the failure was the connection closing, no byte of a response arrived, the body
is replayable (``bytes`` or none), and the method is idempotent (GET, HEAD, OPTIONS, PUT,
DELETE, TRACE). A POST or PATCH is never sent twice: a pooled connection already known to
be closed is discarded before anything is written to it, which is the only case where
resending is certain to be safe.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator

from gateway.proxy.lean_connection import Connection, LeanResponse, UpstreamClosed, UpstreamError
from gateway.proxy.lean_pool import Origin, Pool, PoolBusy, default_ssl_context

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_CORK = 65536  # corked request bytes that are written at once
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body still gets a length
_MANAGED = frozenset({"content-length", "transfer-encoding", "host"})
_URL = re.compile(r"(https?)://([^/?#]+)(.*)", re.DOTALL)
# A body sent in one write. (A tuple: ``bytes | bytearray | memoryview`` in isinstance
# builds a union object on every call.)
_BUFFERS = (bytes, bytearray, memoryview)


def origin_of(scheme: str, netloc: str) -> Origin:
    """The :class:`Origin` of ``scheme://netloc`` (``netloc`` without credentials)."""
    if "@" in netloc:
        raise ValueError("the lean client does not take credentials in the URL")
    host, sep, port = netloc.rpartition(":")
    if not sep or host.endswith(":") or "]" in port:  # no port, or a bare IPv6 host
        host, port = netloc, ""
    default = 443 if scheme == "https" else 80
    number = int(port) if port else default
    header = host if number == default else f"{host}:{number}"
    return Origin(scheme, host.strip("[]"), number, header)


def frame(
    method: str,
    target: bytes,
    block: bytes,
    lines: int,
    host: bytes,
    length: int | None,
    body: bytes | AsyncIterator[bytes] | None,
) -> tuple[bytes, int | None]:
    """A request head: the request line, ``block`` (``lines`` header lines, each
    ``name: value\\r\\n``, none of Host, Content-Length or Transfer-Encoding), Host, and
    the body's framing; and the body length it declares (None for chunked). ``length``:
    the Content-Length the caller was given for a streamed body, if any.

    Raises ValueError when a CR or LF is anywhere but at the end of a line: it would let a
    header value start a header (or a request) of its own."""
    if body is None or isinstance(body, _BUFFERS):
        size = len(body) if body else 0
        if size or length is not None or method in _BODY_METHODS:
            framing = b"content-length: %d\r\n\r\n" % size
            ends = lines + 4  # the request line, the block, host, content-length, the end
        else:
            framing = b"\r\n"
            ends = lines + 3
        length = size
    else:
        framing = (
            b"content-length: %d\r\n\r\n" % length
            if length is not None
            else b"transfer-encoding: chunked\r\n\r\n"
        )
        ends = lines + 4
    head = b"%b %b HTTP/1.1\r\n%bhost: %b\r\n%b" % (
        method.encode("latin-1"), target, block, host, framing,
    )  # fmt: skip
    if head.count(b"\n") != ends or head.count(b"\r") != ends:
        raise ValueError("CR or LF in a request header name, value, method or target")
    return head, length


class LeanBackend:
    """Pooled keep-alive HTTP/1.1 connections for one event loop; ``open`` sends a request.

    Create it inside the event loop it serves (UpstreamProxy keeps one per loop).
    ``ssl_context`` defaults to :func:`ssl.create_default_context` for https:// origins.
    """

    TIMEOUT: tuple[type[BaseException], ...] = (TimeoutError,)
    FAILURE: tuple[type[BaseException], ...] = (OSError,)  # UpstreamError, refused, reset, TLS
    BUSY: tuple[type[BaseException], ...] = (PoolBusy,)  # no connection freed within the wait

    def __init__(
        self,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        pool_wait: float | None = None,
        *,
        keepalive: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self.pool: Pool[Connection] = Pool(
            self._connect, max_connections, keepalive, wait=pool_wait
        )
        self._ssl = ssl_context
        self._origins: dict[str, Origin] = {}

    def origin(self, scheme: str, netloc: str) -> Origin:
        """The pool key of ``scheme://netloc`` (cached for up to 64 of them)."""
        key = f"{scheme}://{netloc}"
        origin = self._origins.get(key)
        if origin is None:
            origin = origin_of(scheme, netloc)
            if len(self._origins) < 64:
                self._origins[key] = origin
        return origin

    async def _connect(self, origin: Origin) -> Connection:
        context = None
        if origin.tls:
            context = self._ssl = self._ssl or default_ssl_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self.pool, origin, self.loop),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                )
        except TimeoutError:
            raise TimeoutError(f"connecting to {origin.host}:{origin.port} timed out") from None
        return conn

    def _head(
        self,
        method: str,
        target: str,
        origin: Origin,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> tuple[bytes, int | None]:
        """The request head, and the body length it declares (None for chunked)."""
        lines = []
        host = length = None
        for name, value in headers:
            lname = name.lower()
            if lname in _MANAGED:
                if lname == "host":
                    host = value
                elif lname == "content-length" and value.isdigit():
                    length = int(value)
                continue
            lines.append(f"{name}: {value}\r\n")
        return frame(
            method,
            target.encode("latin-1"),
            "".join(lines).encode("latin-1"),
            len(lines),
            (host or origin.host_header).encode("latin-1"),
            length,
            body,
        )

    async def open(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> LeanResponse:
        """Send the request; return once the final response's headers are in."""
        match = _URL.fullmatch(url)
        if match is None:
            raise ValueError(f"not an http(s) URL: {url!r}")
        scheme, netloc, target = match.groups()
        if not target.startswith("/"):
            target = "/" + target
        origin = self.origin(scheme, netloc)
        head, length = self._head(method, target, origin, headers, body)
        return await self.exchange(origin, method, head, length, body)

    async def exchange(
        self,
        origin: Origin,
        method: str,
        head: bytes,
        length: int | None,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> LeanResponse:
        """Send a request whose head :func:`frame` made (``length``: the body length it
        declares); return once the final response's headers are in."""
        streamed = body is not None and not isinstance(body, _BUFFERS)
        if not streamed and body:
            head += body  # type: ignore[operator]  # one write, one segment
        for attempt in (0, 1):
            conn = None if attempt else self.pool.pop_idle(origin)
            reused = conn is not None
            if conn is None:
                conn, reused = await self.pool.acquire(origin, fresh=attempt > 0)
            resp = conn.resp = LeanResponse(conn, method == "HEAD", self.timeout)
            transport = conn.transport
            assert transport is not None
            try:
                if streamed:
                    writer = _BodyWriter(conn, resp, length, self.timeout)
                    resp.uploader = self.loop.create_task(writer.run(head, body))  # type: ignore[arg-type]
                else:
                    transport.write(head)
                while not resp.headers_done:
                    await resp.wait()
            except BaseException as exc:
                resp.close()
                if (
                    attempt == 0
                    and reused
                    and isinstance(exc, UpstreamClosed)
                    and not resp.received
                    and not streamed
                    and method in _IDEMPOTENT
                ):
                    continue  # the keep-alive race: see the module docstring
                raise
            return resp
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close every connection of the pool; later requests fail with an OSError."""
        await self.pool.aclose()


class _BodyWriter:
    """Sends the head and a streamed body (chunked, or exactly ``length`` bytes) in its own
    task, so that the response can arrive, and be relayed, while the upload goes on.

    Writes are corked until the end of the event loop iteration (or ``_CORK`` bytes): the
    head, the pieces that are already there and the final chunk usually leave in one
    send() instead of one each, and flow control still sees every byte in time.
    """

    __slots__ = ("buf", "buffered", "conn", "flush_at", "length", "resp", "sent", "timeout")

    def __init__(
        self, conn: Connection, resp: LeanResponse, length: int | None, timeout: float
    ) -> None:
        self.conn, self.resp, self.length, self.timeout = conn, resp, length, timeout
        self.sent = self.buffered = 0
        self.buf: list[bytes] = []
        self.flush_at: asyncio.Handle | None = None

    async def run(self, head: bytes, body: AsyncIterator[bytes]) -> None:
        """Send it all, unless the upstream answers no or goes away. Never raises (nobody
        awaits this task): a failure breaks the connection, which fails the response."""
        conn, resp = self.conn, self.resp
        self.put(head)
        try:
            async for piece in body:
                if conn.closed:
                    break  # the response reports why
                if resp.headers_done and (resp.status >= 300 or not resp.keep_alive):
                    # It will not read the rest (RFC 9112 9.5): stop, and never reuse.
                    resp.keep_alive = False
                    conn.dirty = True
                    break
                await self.write(piece)
            else:
                self.finish()
        except asyncio.CancelledError:  # the response was closed first
            conn.abort(UpstreamError("request body abandoned"))
            await _close_body(body)
            raise
        except Exception as exc:
            conn.abort(
                exc if isinstance(exc, OSError) else UpstreamError(f"request body failed: {exc!r}")
            )
        finally:
            self.flush()
        await _close_body(body)

    def put(self, data: bytes) -> None:
        self.buf.append(data)
        self.buffered += len(data)
        if self.buffered >= _CORK:
            self.flush()
        elif self.flush_at is None:
            self.flush_at = self.conn.loop.call_soon(self.flush)

    def flush(self) -> None:
        if self.flush_at is not None:
            self.flush_at.cancel()
            self.flush_at = None
        buf = self.buf
        if not buf:
            return
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.buffered = 0
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            conn.transport.write(data)

    async def write(self, piece: bytes) -> None:
        if not piece:
            return
        self.sent += len(piece)
        if self.length is None:
            self.put(b"%x\r\n" % len(piece))
            self.put(piece)
            self.put(b"\r\n")
        elif self.sent > self.length:
            raise UpstreamError(f"request body exceeds its Content-Length {self.length}")
        else:
            self.put(piece)
        if self.conn.drain is not None:  # the socket buffer is full: wait until it drains
            async with asyncio.timeout(self.timeout):
                await self.conn.drain

    def finish(self) -> None:
        if self.length is None:
            self.put(b"0\r\n\r\n")
        elif self.sent != self.length:
            raise UpstreamError(f"request body ended at {self.sent} of {self.length} bytes")


async def _close_body(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


__all__ = [
    "LeanBackend",
    "LeanResponse",
    "Origin",
    "PoolBusy",
    "UpstreamClosed",
    "UpstreamError",
    "frame",
    "origin_of",
]
