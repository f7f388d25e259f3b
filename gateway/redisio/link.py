"""One pipelined connection to one Redis server: the socket under the hot-path runners.

Commands issued during one event-loop tick are buffered and written together (the flush is
scheduled with ``loop.call_soon`` by the first command of the tick). A burst writes early:
after 2 buffered commands, then 4, 8 and every 16, so Redis starts on the first charges
while the server is still parsing the rest of the burst instead of idling until the tick
ends (BENCHMARKS.md, "Tuning done": the metered app's req/s at 64 connections rose
~10-12 %, and its added median latency at 8 connections fell from ~540 to ~390 µs).
Replies are parsed with ``hiredis.Reader`` and matched FIFO to futures.

- Per-command timeout: one watchdog timer per connection checks the oldest unanswered
  command; when it is older than the timeout the connection is closed and every command in
  flight on it fails with ``RedisUnavailable`` (the next call reconnects).
- Lazy connect and reconnect, with a backoff after a failed attempt so a dead server is not
  hammered (calls during the backoff fail at once); AUTH / SELECT / TLS on connect.

Replies: bulk and status strings are decoded as UTF-8 (``surrogateescape``), integers are
``int``, nil is ``None``, arrays are lists, the same as redis-py with ``decode_responses=True``;
an error reply is returned as an :class:`ErrorReply`, not raised (the runners decide).
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from gateway.core.errors import RedisUnavailable
from gateway.redisio.resp import pack_command

__all__ = ["ConnectionSettings", "ErrorReply", "Link", "exchange"]


class ErrorReply(hiredis.ReplyError):
    """An error reply, with where its command stood on its socket (for NOSCRIPT recovery:
    ``load_and_retry`` in gateway/redisio/pipelined.py). hiredis builds these
    (``Reader(replyError=...)``)."""

    position: int = -1
    proto: object = None


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """How to open and use one connection.

    ``timeout`` bounds connecting (TCP, TLS, AUTH, SELECT) and every command; ``backoff`` is
    the minimum time between two connect attempts after one failed.
    """

    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl_module.SSLContext | None = None
    timeout: float = 2.0
    backoff: float = 0.2


# Early writes within a tick: after this many buffered commands, doubling up to _FLUSH_MAX
# (2, 4, 8, 16, 16, ...). Chosen by bench/run_all.py: 2/16 gave the best latency at 8
# connections at the same throughput at 64 as 4/32 and 4/16.
_FLUSH_FIRST = 2
_FLUSH_MAX = 16


class _Protocol(asyncio.Protocol):
    """One socket: batches writes per tick, parses replies, fails everything on loss."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, name: str) -> None:
        self.loop = loop
        self.timeout = timeout
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(
            encoding="utf-8", errors="surrogateescape", replyError=ErrorReply
        )
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()
        self.buffer: list[bytes] = []
        self.tick_deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.writes = 0
        self.queued = 0  # commands sent so far on this socket
        self.answered = 0  # replies received so far
        self.loading: dict[str, int] = {}  # sha -> position of its last SCRIPT LOAD
        self.flush_at = _FLUSH_FIRST  # buffered commands that trigger an early write
        self.tick_pending = False  # a _flush_tick is scheduled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes) -> asyncio.Future[Any]:
        """Queue one encoded command; the future gets its reply (a ReplyError is a result)."""
        fut = self.loop.create_future()
        if self.closed:
            fut.set_exception(RedisUnavailable(f"redis {self.name}: connection closed"))
            return fut
        buffer = self.buffer
        if not self.tick_pending:
            # First command of this tick: what is queued until the loop gets back to its
            # ready queue goes out together (in one write, or a few early ones: below).
            self.tick_pending = True
            self.loop.call_soon(self._flush_tick)
            self.tick_deadline = self.loop.time() + self.timeout
        buffer.append(data)
        self.queued += 1
        self.pending.append(fut)
        self.deadlines.append(self.tick_deadline)
        if len(buffer) >= self.flush_at:
            # Early write: Redis starts on these while the loop still parses and admits
            # the rest of this tick's requests. The threshold doubles within a tick
            # (2, 4, 8, 16, 16, ...), so a big burst costs a few writes, not one per 2.
            self._flush()
            self.flush_at = min(self.flush_at * 2, _FLUSH_MAX)
        return fut

    def _flush_tick(self) -> None:
        self.tick_pending = False
        self.flush_at = _FLUSH_FIRST
        self._flush()

    def _flush(self) -> None:
        if self.closed or not self.buffer or self.transport is None:
            return
        buffer = self.buffer
        self.buffer = []
        self.transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
        self.writes += 1
        if self.timer is None and self.deadlines:
            self.timer = self.loop.call_at(self.deadlines[0], self._check_deadline)

    def _check_deadline(self) -> None:
        # Replies come back in order, so the oldest unanswered command is the only one
        # that can be overdue first.
        self.timer = None
        if self.closed or not self.deadlines:
            return
        head = self.deadlines[0]
        if head <= self.loop.time() + 0.001:
            self.abort(f"no reply within {self.timeout:g}s")
        else:
            self.timer = self.loop.call_at(head, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        deadlines = self.deadlines
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"protocol error: {exc}")
                return
            if reply is False:
                return
            if not pending:
                self.abort("reply received with no command in flight")
                return
            fut = pending.popleft()
            deadlines.popleft()
            if reply.__class__ is ErrorReply:
                # Where the failed command stood on this socket: NOSCRIPT recovery
                # (load_and_retry) needs to know whether a SCRIPT LOAD was sent after it.
                reply.position = self.answered
                reply.proto = self
            self.answered += 1
            if not fut.done():
                fut.set_result(reply)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost ({exc})" if exc else "connection closed by the server"
        self._close(reason)

    def abort(self, reason: str) -> None:
        """Close the socket now and fail every command in flight with ``reason``."""
        transport = self.transport
        self._close(reason)
        if transport is not None and not self.loop.is_closed():
            transport.abort()

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.buffer = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        error = f"redis {self.name}: {reason}"
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(RedisUnavailable(error))
        self.deadlines.clear()


def _consume_exception(task: asyncio.Future[Any]) -> None:
    # Every waiter may have been cancelled; don't let asyncio log the failure as unhandled.
    if not task.cancelled():
        task.exception()


class Link:
    """One lazily (re)connected, pipelined connection to one Redis server."""

    def __init__(self, host: str, port: int, settings: ConnectionSettings) -> None:
        self.host = host
        self.port = port
        self.settings = settings
        self.name = f"{host}:{port}"
        self.connect_attempts = 0
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._retry_at = 0.0
        self._last_error = ""

    @property
    def protocol(self) -> _Protocol | None:
        """The current socket's protocol (for instrumentation), or None."""
        return self._proto

    def request(self, data: bytes) -> Awaitable[Any]:
        """Send one encoded command; await its reply (a ``hiredis.ReplyError`` is returned,
        not raised). Raises ``RedisUnavailable`` on connection trouble or timeout."""
        proto = self._proto
        if proto is not None and not proto.closed and proto.loop is asyncio.get_running_loop():
            return proto.send(data)
        return self._request_slow(data)

    async def _request_slow(self, data: bytes) -> Any:
        proto = await self.connection()
        return await proto.send(data)

    async def request_many(self, *commands: bytes) -> list[Any]:
        """Send several encoded commands back to back on this connection (nothing can be
        interleaved between them, as ASKING needs) and return their replies."""
        return await exchange(await self.connection(), list(commands))

    async def connection(self) -> _Protocol:
        """The live connection, connecting first if needed (concurrent callers share one
        attempt). Raises ``RedisUnavailable`` at once during the backoff after a failure."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or used from a new event loop: the old socket belongs to the old one.
            self.drop("event loop changed")
            self._loop = loop
            self._retry_at = 0.0
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        task = self._connecting
        if task is None:
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise RedisUnavailable(
                    f"{self._last_error}; not retrying for another {wait * 1000:.0f} ms"
                )
            task = self._connecting = loop.create_task(self._connect(loop))
            task.add_done_callback(_consume_exception)
        return await asyncio.shield(task)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        self.connect_attempts += 1
        settings = self.settings
        proto = _Protocol(loop, settings.timeout, self.name)
        try:
            await self._open(loop, proto)
        except RedisUnavailable as exc:
            proto.abort(str(exc))
            self._retry_at = loop.time() + settings.backoff
            self._last_error = str(exc)
            raise
        except BaseException:
            proto.abort("connect cancelled")
            raise
        finally:
            if self._connecting is asyncio.current_task():
                self._connecting = None
        self._proto = proto
        return proto

    async def _open(self, loop: asyncio.AbstractEventLoop, proto: _Protocol) -> None:
        settings = self.settings
        handshake: list[tuple[str | int, ...]] = []
        if settings.password is not None:
            if settings.username:
                handshake.append(("AUTH", settings.username, settings.password))
            else:
                handshake.append(("AUTH", settings.password))
        if settings.db:
            handshake.append(("SELECT", settings.db))
        try:
            async with asyncio.timeout(settings.timeout):
                await loop.create_connection(
                    lambda: proto,
                    self.host,
                    self.port,
                    ssl=settings.ssl,
                    server_hostname=self.host if settings.ssl is not None else None,
                )
                futures = [proto.send(pack_command(command)) for command in handshake]
                for command, fut in zip(handshake, futures, strict=True):
                    reply = await fut
                    if isinstance(reply, ErrorReply):
                        raise RedisUnavailable(f"redis {self.name}: {command[0]} failed: {reply}")
        except TimeoutError as exc:
            raise RedisUnavailable(
                f"redis {self.name}: connect timed out after {settings.timeout:g}s"
            ) from exc
        except OSError as exc:
            raise RedisUnavailable(f"redis {self.name}: cannot connect: {exc}") from exc

    def drop(self, reason: str = "client closed") -> None:
        """Close the connection (failing whatever is in flight); the next call reconnects."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._proto is not None:
            self._proto.abort(reason)
            self._proto = None


async def exchange(proto: _Protocol, commands: list[bytes]) -> list[Any]:
    # Back to back on one socket, so nothing is interleaved (as ASKING needs).
    futures = [proto.send(command) for command in commands]
    for fut in futures:
        # If one fails they all do; only the first failure is raised.
        fut.add_done_callback(_consume_exception)
    return [await fut for fut in futures]
