"""Connection protocol and response of the lean upstream client (gateway/proxy/lean_client.py).

A :class:`Connection` is an asyncio Protocol feeding the httptools response parser; it
carries one exchange at a time, whose state lives in a :class:`LeanResponse`. Response
body pieces are queued on the response as they arrive; past ``_HIGH_WATER`` unread bytes
the transport stops reading until the consumer takes the queue. A response
on a connection that closes before its end fails with :class:`UpstreamClosed`.

Or, once :meth:`LeanResponse.splice` gave it a sink, the body pieces of each read go to
the sink together from inside ``data_received``, once the read is parsed: one call (one
client write) per read, no future, no task step (the proxy's stream fast path:
gateway/core/splice.py). A sink that reports its consumer full pauses reading until
:meth:`LeanResponse.resume_reading`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httptools

from gateway.proxy.lean_pool import Origin, Pool

_HIGH_WATER = 256 * 1024  # unread response bytes before reading pauses
_MAX_HEAD = 256 * 1024  # response header bytes accepted


# Per sequence of response header names as the upstream sent them (an upstream answers
# with the same few): the names lowercased (a list the responses share: never changed) and
# where the one Content-Length is (-1: none), or _UNUSUAL for a Transfer-Encoding, a
# Connection or more than one Content-Length (Connection.on_headers_complete reads those
# values). Bounded: emptied when full, long sequences never kept.
_UNUSUAL = -2
_NAMES: dict[tuple[bytes, ...], tuple[list[bytes], int]] = {}
_NAMES_MAX = 256
_NAMES_LONG = 64
_NAMES_BYTES = 4096


def _names_of(names: tuple[bytes, ...]) -> tuple[list[bytes], int]:
    """What ``_NAMES`` keeps for ``names``, kept for the next response with the same."""
    lnames = b"\n".join(names).lower().split(b"\n")  # a name holds no LF: parsed
    if (
        b"transfer-encoding" in lnames
        or b"connection" in lnames
        or lnames.count(b"content-length") > 1
    ):
        length_at = _UNUSUAL
    elif b"content-length" in lnames:
        length_at = lnames.index(b"content-length")
    else:
        length_at = -1
    known = (lnames, length_at)
    if len(names) <= _NAMES_LONG and sum(map(len, lnames)) <= _NAMES_BYTES:
        if len(_NAMES) >= _NAMES_MAX:
            _NAMES.clear()
        _NAMES[names] = known
    return known


class UpstreamError(ConnectionError):
    """The upstream broke the exchange: closed early, sent garbage, or was unreachable."""


class UpstreamClosed(UpstreamError):
    """The connection closed (EOF or reset) before the exchange was complete."""


class Connection(asyncio.Protocol):
    """One upstream connection; it carries one exchange at a time."""

    def __init__(
        self, pool: Pool[Connection], origin: Origin, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pool = pool
        self.loop = loop
        self.origin = origin
        self.idle_since = 0.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: LeanResponse | None = None
        self.headers: list[tuple[bytes, bytes]] = []  # the raw headers of the message parsed
        self.closed = False
        self.dirty = False  # the parser is mid-message (HEAD) or the stream is out of step
        self.drain: asyncio.Future[None] | None = None  # set while writing is paused
        # The timer that bounds its exchanges' waits (LeanResponse.wait): one per
        # connection, kept armed across exchanges, re-armed only when it fires.
        self.timer: asyncio.TimerHandle | None = None

    @property
    def reusable(self) -> bool:
        """Open, between exchanges, and in step with the server."""
        return not self.closed and self.resp is None and not self.dirty

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: the stream is out of step
            self.abort(UpstreamError("upstream sent data between responses"))
            return
        resp.received = True
        counting = not resp.headers_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.abort(UpstreamError("upstream switched protocols, which was not asked for"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self.abort(
                cause
                if isinstance(cause, UpstreamError)
                else UpstreamError(f"malformed upstream response: {exc}")
            )
        if resp.sink is not None and resp.pieces:
            resp.spill()  # after the parse, also a failed one: what was valid goes out
        if counting and not resp.headers_done and not self.closed:
            # A read that began and ended inside the headers is all header bytes: this
            # bounds a huge header (held by the parser until it is complete) to the limit
            # plus one read, without a count per header.
            resp.head_bytes += len(data)
            if resp.head_bytes > _MAX_HEAD:
                self.abort(UpstreamError("upstream response headers too large"))

    def check_timeout(self) -> None:
        """The timer fired: its exchange, if one is waiting, checks how long it waited."""
        self.timer = None
        resp = self.resp
        if resp is not None and not self.closed:
            resp.check_timeout()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool | None:
        resp = self.resp
        if resp is not None and resp.until_eof and not resp.complete:
            resp.complete = True  # a body without length or chunking ends with the connection
            resp.keep_alive = False
            resp.wake()
        self.closed = True
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        error = UpstreamClosed(f"upstream closed the connection ({exc or 'EOF'})")
        resp = self.resp
        if resp is not None and not resp.complete:
            if resp.until_eof and resp.headers_done and exc is None:
                resp.complete = True
                resp.wake()
            else:
                resp.fail(error)
        self._wake_writer(error)
        self.pool.lost(self)

    def pause_writing(self) -> None:
        if self.drain is None:
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer(None)

    def _wake_writer(self, exc: BaseException | None) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            if exc is None:
                drain.set_result(None)
            else:
                drain.set_exception(exc)
                drain.exception()  # nobody may be waiting: do not log "never retrieved"

    def abort(self, exc: BaseException) -> None:
        """Fail the exchange in progress, if any, and drop the connection."""
        self.closed = True
        self._stop_timer()
        resp = self.resp
        if resp is not None and not resp.complete:
            resp.fail(exc)
        self._wake_writer(exc)
        if self.transport is not None:
            self.transport.abort()
        self.pool.lost(self)  # free the slot now, not when the transport reports back

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            raise UpstreamError("upstream sent more than one response")
        self.headers = resp.raw_headers = []
        resp.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))  # their size: see data_received

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        if status < 200 and status >= 100:
            if status != 101:
                return  # informational (100 Continue, 103 Early Hints): the real answer follows
            raise UpstreamError("upstream switched protocols, which was not asked for")
        resp.status = status
        resp.keep_alive = self.parser.should_keep_alive()
        # The names lowercased, kept for the proxy's own filtering, and where the one
        # Content-Length is: what depends on the names alone, kept per sequence of names.
        raw = resp.raw_headers
        if raw:
            names, values = zip(*raw, strict=True)
            known = _NAMES.get(names)
            if known is None:
                known = _names_of(names)
            lnames, length_at = known
        else:
            lnames, values, length_at = [], (), -1
        resp.lower_names, resp.values = lnames, values
        length = None
        chunked = conn_close = False
        if length_at >= 0:  # the usual answer: one length, nothing else
            value = values[length_at]
            length = int(value) if value.strip().isdigit() else None
        elif length_at == _UNUSUAL:
            te = False
            for lname, value in zip(lnames, values, strict=True):
                if lname == b"content-length":
                    length = int(value) if value.strip().isdigit() else None
                elif lname == b"transfer-encoding":  # chunked only if it is the final coding
                    te = True
                    chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                elif lname == b"connection":
                    conn_close = conn_close or b"close" in value.lower()
            if te:
                length = None  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
        resp.content_length = length
        # Read until the connection closes: no length, not chunked, and a body at all (the
        # usual answer, with a length, is decided by the first test).
        resp.until_eof = (
            length is None
            and not chunked
            and not resp.head_only
            and status != 204
            and status != 304
        )
        resp.headers_done = True
        if resp.head_only:
            # The parser cannot be told this answers a HEAD: it would wait for the body the
            # headers announce. The response ends here; a fresh parser takes the next one.
            resp.complete = True
            resp.keep_alive = self.parser.get_http_version() == "1.1" and not conn_close
            self.dirty = True
        if status >= 300 or not resp.keep_alive:
            self._wake_writer(None)  # an upload waiting on a server that will not read: stop
        waiter = resp._waiter  # resp.wake(), inlined: every response comes this way
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if resp.complete:
            raise UpstreamError("upstream sent a body after a bodiless response")
        if resp.sink is not None:
            # Spliced: no wake-up; data_received hands the read's pieces to the sink once
            # it is parsed, so a read of several chunks costs the client one write.
            resp.pieces.append(body)
            return
        resp.pieces.append(body)
        resp.buffered += len(body)
        if resp.buffered > _HIGH_WATER and not resp.reading_paused:
            resp.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = resp._waiter  # resp.wake(), inlined (the headers' wake-up often came first)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if not resp.headers_done:
            return  # the end of a 1xx response
        resp.complete = True
        waiter = resp._waiter  # resp.wake(), inlined
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class LeanResponse:
    """An upstream response: ``status``, ``raw_headers``, and the body via ``read()`` or
    ``chunks()``. ``aclose()`` must follow: it pools or closes the connection."""

    __slots__ = (
        "_conn",
        "_error",
        "_loop",
        "_timeout",
        "_timer",
        "_waiter",
        "buffered",
        "complete",
        "content_length",
        "head_bytes",
        "head_only",
        "headers_done",
        "keep_alive",
        "lower_names",
        "pieces",
        "progress_at",
        "raw_headers",
        "reading_paused",
        "received",
        "sink",
        "status",
        "until_eof",
        "uploader",
        "values",
    )

    # Set once the headers are in, never read before (so not set in __init__: a response
    # is made per exchange): the status; the headers as they came (from the message's
    # first byte on), their names lowercased and their values, in order; the body length
    # they declare. And when the exchange last made progress (a wait began, a spliced
    # piece came): the gap that the timeout bounds starts there (set by every wait).
    status: int
    raw_headers: list[tuple[bytes, bytes]]
    lower_names: list[bytes]
    values: tuple[bytes, ...]
    content_length: int | None
    progress_at: float

    def __init__(self, conn: Connection, head_only: bool, timeout: float) -> None:
        self._loop = conn.loop
        self._timeout = timeout
        self._conn: Connection | None = conn
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self.pieces: list[bytes] = []
        self.buffered = self.head_bytes = 0
        self.head_only = head_only
        self.headers_done = self.complete = self.keep_alive = self.until_eof = False
        self.reading_paused = self.received = False
        self.uploader: asyncio.Task[None] | None = None  # the rest of a full-duplex upload
        self.sink: Callable[[bytes], bool] | None = None  # set by splice()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def wait(self) -> asyncio.Future[None]:
        """Until something happens (headers, a body piece, the end); at most the timeout.

        The awaitable is the wake-up's future itself, not a coroutine: no coroutine object,
        frame and await level of its own on the task's resume (``await resp.wait()`` as
        before; raises at once when the exchange failed already)."""
        if self._error is not None:
            raise self._error
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self.progress_at = now = loop.time()
        # One timer per connection, kept across its exchanges and re-armed only when it
        # fires (Connection.check_timeout): no timer made and cancelled per exchange. A
        # response closed already has none of its own connection's: its own timer.
        conn = self._conn
        if conn is not None:
            if conn.timer is None:
                conn.timer = loop.call_at(now + self._timeout, conn.check_timeout)
        elif self._timer is None:
            self._timer = loop.call_at(now + self._timeout, self.check_timeout)
        # The future stays in _waiter once done (set, failed or cancelled): whoever looks
        # at it (wake, fail, check_timeout) treats a done one as no wait in progress.
        return waiter

    def check_timeout(self) -> None:
        """The timer fired (the connection's, or this response's own once closed): fail
        the wait in progress if nothing happened for the timeout, else arm the timer for
        the rest of it; not waiting now, the next wait arms it."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        loop = self._loop
        due = self.progress_at + self._timeout
        if loop.time() < due:
            conn = self._conn
            if conn is not None:
                conn.timer = loop.call_at(due, conn.check_timeout)
            else:
                self._timer = loop.call_at(due, self.check_timeout)
            return
        error = TimeoutError(f"upstream sent nothing for {self._timeout:g} s")
        waiter.set_exception(error)
        self._error = error
        if self._conn is not None:
            self._conn.abort(error)

    def _take(self) -> bytes:
        """Every unread body byte so far, resuming reading if it was paused."""
        pieces = self.pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.buffered = 0
        if self.reading_paused:
            self._resume()
        return data

    def _resume(self) -> None:
        self.reading_paused = False
        conn = self._conn
        if conn is not None and not conn.closed and conn.transport is not None:
            conn.transport.resume_reading()

    def read_now(self) -> bytes | None:
        """The whole body if it is all here already, else None (then :meth:`read`)."""
        if self.complete:
            return self._take() if self.pieces else b""
        return None

    async def read(self) -> bytes:
        """The whole body."""
        if self.complete:
            return self._take() if self.pieces else b""
        parts = []
        while not self.complete:
            if self.pieces:
                parts.append(self._take())
            await self.wait()
        if self.pieces:
            parts.append(self._take())
        return b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (whatever is buffered, joined)."""
        return _Chunks(self)

    def splice(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the body pieces from now on to ``sink``, those of one read joined, from
        inside the connection's ``data_received``; what is already queued goes first.

        ``sink`` takes a non-empty piece and returns False when its consumer is full:
        reading from the upstream then pauses and a :meth:`wait` in progress returns; the
        owner resumes with :meth:`resume_reading` once the consumer has room. The owner
        waits for the end with :meth:`wait` (which raises as for any exchange: the
        upstream failed or fell silent for the timeout) until ``complete``, and sets
        ``sink`` back to None when it stops (an abandoned response is then closed)."""
        self.sink = sink
        if self.pieces:
            self.spill()

    def spill(self) -> None:
        """Hand every queued piece to the sink at once (the connection calls this after
        each read it parsed); a full sink pauses reading and wakes the owner."""
        sink = self.sink
        assert sink is not None
        self.progress_at = self._loop.time()  # the gap the timeout bounds starts again
        if not sink(self._take()) and not self.reading_paused:
            self._pause()
            self.wake()  # its owner waits for the sink's consumer to drain, then resumes

    def resume_reading(self) -> None:
        """Read from the upstream again after a full sink paused it (no-op otherwise)."""
        if self.reading_paused:
            self._resume()

    def _pause(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and conn.transport is not None:
            self.reading_paused = True
            conn.transport.pause_reading()

    async def aclose(self) -> None:
        """Pool the connection if the response was read to its end cleanly, else close it."""
        self.close()

    def close(self) -> None:
        """Synchronous :meth:`aclose`."""
        conn, self._conn = self._conn, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if conn is None:
            return
        uploading = self.uploader is not None and not self.uploader.done()
        if uploading:
            assert self.uploader is not None
            self.uploader.cancel()
        if (
            self.complete
            and self.keep_alive
            and self._error is None
            and not conn.closed
            and not uploading
        ):
            conn.resp = None
            if conn.dirty:
                conn.parser = httptools.HttpResponseParser(conn)
                conn.dirty = False
            if self.reading_paused:
                self.reading_paused = False
                assert conn.transport is not None
                conn.transport.resume_reading()
            conn.pool.release(conn)
        else:
            conn.abort(UpstreamError("response closed before its end"))
            conn.resp = None


class _Chunks:
    """Async iterator over a response body (cheaper than an async generator)."""

    __slots__ = ("_resp",)

    def __init__(self, resp: LeanResponse) -> None:
        self._resp = resp

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        while not resp.pieces:
            if resp.complete:
                raise StopAsyncIteration
            await resp.wait()
        return resp._take()
