"""Keep-alive connection pool of the lean upstream client (gateway/proxy/lean_client.py).

One pool belongs to one event loop (the proxy keeps one backend per loop). Connections are
kept per :class:`Origin` (scheme, host, port). At most ``max_connections`` exist at once,
counting those being opened; beyond that ``acquire`` waits in FIFO order, for at most
``wait`` seconds, then raises :class:`PoolBusy` (the proxy answers 503 with Retry-After and
the metering middleware refunds: a request past the limit never waits without end). A released
connection goes straight to the oldest waiter for its origin; when only waiters for other
origins exist it is closed so that its slot goes to the oldest waiter instead. Idle
connections are reused newest first (LIFO: the one least likely to be timing out at the
server) and closed once idle for ``keepalive`` seconds, which should be below the upstream
server's own keep-alive timeout (uvicorn: 5 s) so that the server rarely closes a connection
just as a request is written to it.

The pool knows nothing of HTTP: a connection is anything with the :class:`Pooled` surface,
and it must call :meth:`Pool.lost` exactly when its transport is gone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Generic, NamedTuple, Protocol, TypeVar


class Origin(NamedTuple):
    """Where a pooled connection goes: the pool key, plus what connecting needs. (A named
    tuple: it is hashed on every pool lookup, which a tuple does in C.)"""

    scheme: str
    host: str  # without IPv6 brackets: what the socket layer and TLS SNI want
    port: int
    host_header: str  # the Host header value (brackets kept, default port left out)

    @property
    def tls(self) -> bool:
        """Whether connections to this origin use TLS."""
        return self.scheme == "https"


class Pooled(Protocol):
    """What the pool needs of a connection."""

    origin: Origin
    idle_since: float

    @property
    def reusable(self) -> bool:
        """Open, with no exchange in progress and no unread bytes."""

    def abort(self, exc: BaseException) -> None:
        """Drop the transport (the connection then reports :meth:`Pool.lost`)."""


C = TypeVar("C", bound=Pooled)
Connect = Callable[[Origin], Awaitable[C]]


class PoolClosed(ConnectionError):
    """The pool was closed while a request waited for (or held) a connection."""


class PoolBusy(Exception):
    """Every connection stayed busy for the whole wait: nothing was sent upstream.

    Deliberately neither an ``OSError`` nor a ``TimeoutError``: the proxy maps those to 502
    and 504 (the upstream failed), while this is the gateway's own limit (503, retry later).
    """

    def __init__(self, max_connections: int, wait: float) -> None:
        super().__init__(f"all {max_connections} upstream connections stayed busy for {wait:g} s")
        self.max_connections = max_connections
        self.wait = wait


class Pool(Generic[C]):
    """Bounded keep-alive connections per origin for one event loop."""

    def __init__(
        self,
        connect: Connect[C],
        max_connections: int,
        keepalive: float,
        *,
        wait: float | None = None,
    ) -> None:
        """``wait``: the longest ``acquire`` waits for a free slot before raising
        :class:`PoolBusy` (None: no bound; 0: refuse at once when full)."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        if wait is not None and not wait >= 0:
            raise ValueError(f"wait must be 0 or more, got {wait}")
        self._connect = connect
        self._max = max_connections
        self._keepalive = keepalive
        self._wait = wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[Origin, list[C]] = {}  # a stack per origin: newest last
        self._live: set[C] = set()  # every open connection, idle or busy
        self._opening = 0  # slots reserved for connects in progress
        self._waiters: collections.deque[tuple[Origin, asyncio.Future[C | None]]] = (
            collections.deque()
        )
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return len(self._live) + self._opening

    def idle_count(self, origin: Origin | None = None) -> int:
        """Reusable idle connections (to ``origin``, or to any origin)."""
        stacks = self._idle.values() if origin is None else [self._idle.get(origin, [])]
        return sum(1 for stack in stacks for conn in stack if conn.reusable)

    def pop_idle(self, origin: Origin) -> C | None:
        """The newest reusable idle connection to ``origin``, if any (no waiting)."""
        stack = self._idle.get(origin)
        if not stack:
            return None
        assert self._loop is not None  # set when the connection was first released
        deadline = self._loop.time() - self._keepalive
        while stack:
            conn = stack.pop()
            if conn.reusable and conn.idle_since > deadline:
                return conn
            conn.abort(ConnectionResetError("idle connection expired"))
        return None

    @property
    def max_connections(self) -> int:
        """The most connections open (or being opened) at once."""
        return self._max

    async def acquire(self, origin: Origin, *, fresh: bool = False) -> tuple[C, bool]:
        """A connection to ``origin`` and whether it was reused; ``fresh`` skips idle ones.

        Raises :class:`PoolBusy` when none frees within the pool's ``wait``."""
        if self.closed:
            raise PoolClosed("upstream client is closed")
        if not fresh and (conn := self.pop_idle(origin)) is not None:
            return conn, True
        if self.size >= self._max and not self._evict_idle():
            if self._wait == 0:
                raise PoolBusy(self._max, 0)
            waiter: asyncio.Future[C | None] = asyncio.get_running_loop().create_future()
            entry = (origin, waiter)
            self._waiters.append(entry)
            try:
                # The timeout cancels the wait; _abandon then passes on whatever was
                # handed over in the same instant, so no slot or connection is lost.
                async with asyncio.timeout(self._wait):
                    try:
                        handed = await waiter
                    except BaseException:
                        self._abandon(entry)
                        raise
            except TimeoutError:
                assert self._wait is not None
                raise PoolBusy(self._max, self._wait) from None
            if handed is not None:  # a released connection, handed over directly
                return handed, True
            self._opening -= 1  # the slot reserved for us becomes our own reservation below
        return await self._open(origin), False

    async def _open(self, origin: Origin) -> C:
        self._opening += 1
        try:
            conn = await self._connect(origin)
        except BaseException:
            self._opening -= 1
            self._hand_slot()
            raise
        self._opening -= 1
        if self.closed:
            conn.abort(PoolClosed("upstream client is closed"))
            raise PoolClosed("upstream client is closed")
        self._live.add(conn)
        return conn

    def _abandon(self, entry: tuple[Origin, asyncio.Future[C | None]]) -> None:
        """A waiter gave up (cancelled): pass on whatever it was handed meanwhile."""
        waiter = entry[1]
        if not waiter.done() or waiter.cancelled():
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            return
        if waiter.exception() is not None:
            return
        handed = waiter.result()
        if handed is None:
            self._opening -= 1
            self._hand_slot()
        else:
            self.release(handed)

    def release(self, conn: C) -> None:
        """Take back a connection whose exchange finished cleanly (closes it if not reusable)."""
        if not conn.reusable or self.closed or conn not in self._live:
            conn.abort(ConnectionResetError("connection not reusable"))
            return
        for entry in self._waiters:
            if entry[0] == conn.origin and not entry[1].done():
                self._waiters.remove(entry)
                entry[1].set_result(conn)
                return
        if self._waiters:  # only other origins wait: trade this connection for a slot
            self._drop(conn)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        stack = self._idle.get(conn.origin)
        if stack is None:
            stack = self._idle[conn.origin] = []
        stack.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + self._keepalive, self._expire)

    def lost(self, conn: C) -> None:
        """A connection's transport is gone: free its slot (idempotent)."""
        if conn in self._live:
            self._live.discard(conn)
            self._hand_slot()

    def _drop(self, conn: C) -> None:
        self._live.discard(conn)
        conn.abort(ConnectionResetError("connection closed to make room"))
        self._hand_slot()

    def _hand_slot(self) -> None:
        """If someone waits and there is room, reserve a slot and wake the oldest waiter."""
        while self._waiters and self.size < self._max:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                self._opening += 1
                waiter.set_result(None)

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection (of any origin) to make room; False if none."""
        oldest: C | None = None
        for stack in self._idle.values():
            while stack and not stack[0].reusable:
                stack.pop(0)
            if stack and (oldest is None or stack[0].idle_since < oldest.idle_since):
                oldest = stack[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].remove(oldest)
        self._live.discard(oldest)
        oldest.abort(ConnectionResetError("connection closed to make room"))
        return True

    def _expire(self) -> None:
        """Close connections idle for ``keepalive``; re-arm for the next one to expire."""
        self._sweep = None
        assert self._loop is not None
        now = self._loop.time()
        nxt: float | None = None
        for origin, stack in list(self._idle.items()):
            keep = []
            for conn in stack:
                if not conn.reusable:
                    continue
                if now - conn.idle_since >= self._keepalive:
                    conn.abort(ConnectionResetError("idle connection expired"))
                    continue
                keep.append(conn)
                due = conn.idle_since + self._keepalive
                nxt = due if nxt is None else min(nxt, due)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        if nxt is not None:
            self._sweep = self._loop.call_at(nxt, self._expire)

    async def aclose(self) -> None:
        """Close every connection, idle or busy, and fail every waiter."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("upstream client is closed"))
        conns = list(self._live)
        self._idle.clear()
        self._live.clear()
        for conn in conns:
            conn.abort(PoolClosed("upstream client is closed"))
        if conns:
            await asyncio.sleep(0)  # let the transports report connection_lost


def default_ssl_context() -> ssl.SSLContext:
    """Certificate and host name checks against the system's trust store."""
    return ssl.create_default_context()
