"""The hot-path script runner for one Redis server: auto-pipelined EVALSHA (one per request).

Commands go out on :class:`~gateway.redisio.link.Link` connections, which batch every
command of one event-loop tick into a few writes and parse replies with hiredis: a
fraction of the CPU of redis-py's asyncio client per call, while keeping what matters:

- NOSCRIPT recovery: ``SCRIPT LOAD`` and the ``EVALSHA`` again, pipelined (one load per
  socket however many calls hit NOSCRIPT together); NOSCRIPT means nothing ran, so the
  retry is safe. Nothing else is ever retried: after a timeout or a lost connection a
  debit may have committed, so the caller gets ``RedisUnavailable``.
- Error replies become ``RedisUnavailable`` (CLUSTERDOWN, LOADING, ...: nothing ran) or
  ``RedisReplyError`` (a rejected command or a failed script), as with every runner.
- Timeouts, lazy (re)connects with a backoff, AUTH / SELECT / TLS: see the link.

The Redis Cluster runner lives in ``gateway/redisio/pipelined_cluster.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.core.errors import RedisUnavailable
from gateway.core.loops import running_loop
from gateway.redisio.link import ConnectionSettings, ErrorReply, Link, exchange
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.resp import ScriptArg, evalsha_header, pack_command

__all__ = [
    "ASKING",
    "ConnectionSettings",
    "ErrorReply",
    "FastRedis",
    "Link",
    "RedisReplyError",
    "RedisUnavailable",
    "ScriptArg",
    "SharedWaits",
    "load_and_retry",
    "pack_command",
    "reply_error",
    "run_then_wait",
]


# Error replies meaning "Redis cannot serve this now, nothing ran": they become
# RedisUnavailable (HTTP 503) rather than RedisReplyError (a bug or a script error).
_UNAVAILABLE_CODES = frozenset(
    {
        "CLUSTERDOWN",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "MISCONF",
        "NOAUTH",
        "TRYAGAIN",
    }
)


class RedisReplyError(Exception):
    """Redis answered with an error reply (a rejected command or an error raised by a script).

    ``code`` is the reply's first word (``ERR``, ``WRONGTYPE``, ``NOSCRIPT`` ...).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.split(" ", 1)[0]


def reply_error(message: str) -> RedisUnavailable | RedisReplyError:
    """The exception for an error reply: ``RedisUnavailable`` for CLUSTERDOWN, LOADING, BUSY,
    MASTERDOWN, READONLY, OOM, MISCONF, NOAUTH and TRYAGAIN (the server refused to run
    anything), else ``RedisReplyError``."""
    if message.split(" ", 1)[0] in _UNAVAILABLE_CODES:
        return RedisUnavailable(f"redis: {message}")
    return RedisReplyError(message)


async def _after_error(link: Link, script: LuaScript, command: bytes, reply: Any) -> Any:
    # An EVALSHA's error reply on a single node: NOSCRIPT is recovered once, the rest raise.
    message = str(reply)
    if not message.startswith("NOSCRIPT"):
        raise reply_error(message)
    reply = await load_and_retry(link, script, command, failed=reply)
    if isinstance(reply, ErrorReply):
        raise reply_error(str(reply))
    return reply


async def load_and_retry(
    link: Link, script: LuaScript, command: bytes, asking: bool = False, failed: Any = None
) -> Any:
    """After NOSCRIPT: ``SCRIPT LOAD`` and the EVALSHA ``command`` again (after ASKING if
    ``asking``), in one write; returns the EVALSHA reply as is (possibly an error reply).

    When many calls hit NOSCRIPT at once (a restarted or flushed Redis), only the first
    sends the source: if a SCRIPT LOAD of this script was queued on the same socket after
    the EVALSHA that failed (``failed``, its NOSCRIPT reply, knows its position), resending
    the EVALSHA alone puts it behind that load, answered or not. If that resend still fails
    (the load failed), the call sends its own load. Every step only ever follows a
    NOSCRIPT, which means nothing ran.
    """
    prefix = [ASKING] if asking else []
    proto = await link.connection()
    position = getattr(failed, "position", None)
    if (
        position is not None
        and getattr(failed, "proto", None) is proto
        and proto.loading.get(script.sha, -1) > position
    ):
        reply = (await exchange(proto, [*prefix, command]))[-1]
        if not (isinstance(reply, ErrorReply) and str(reply).startswith("NOSCRIPT")):
            return reply
        proto = await link.connection()  # that load failed: send our own
    proto.loading[script.sha] = proto.queued
    load = pack_command(("SCRIPT", "LOAD", script.source))
    replies = await exchange(proto, [load, *prefix, command])
    if isinstance(replies[0], ErrorReply):
        raise reply_error(f"{replies[0]} (SCRIPT LOAD of {script.name})")
    return replies[-1]


ASKING = pack_command(("ASKING",))


class _NodeWaits:
    """One node's WAITs (``run_then_wait``): at most one in flight; the calls that queue
    their command meanwhile share the next one, sent when it returns."""

    __slots__ = ("inflight", "next", "params")

    def __init__(self, params: tuple[int, int]) -> None:
        self.params = params
        self.inflight = False
        self.next: asyncio.Future[Any] | None = None


# Per node (host:port).
SharedWaits = dict[str, _NodeWaits]


async def run_then_wait(
    waits: SharedWaits, link: Link, command: bytes, replicas: int, timeout_ms: int
) -> tuple[Any, Any]:
    """Send ``command`` on ``link`` and return its reply with that of a ``WAIT replicas
    timeout_ms`` queued behind it on the same socket (so it counts the command's write).

    Group commit: a WAIT blocks its connection on the server until the replicas answer,
    so one per command would serialise every settle behind a replica round trip. At most
    one WAIT per node is in flight; every command queued while it is out shares the next,
    sent as soon as it returns (the first of a tick's commands waits for the end of the
    tick, so they all share one). A socket still connecting gets a WAIT of its own.
    """
    proto = link.protocol
    params = (replicas, timeout_ms)
    state = waits.get(link.name)
    if (
        proto is None
        or proto.closed
        or proto.loop is not asyncio.get_running_loop()
        or (state is not None and state.params != params)
    ):
        reply, acked = await link.request_many(command, pack_command(("WAIT", *params)))
        return reply, acked
    if state is None:
        state = waits[link.name] = _NodeWaits(params)
    sent = proto.send(command)  # queued now: any WAIT queued after this covers it
    fut = state.next
    if fut is None:
        fut = state.next = proto.loop.create_future()
        if not state.inflight:
            state.inflight = True
            proto.loop.call_soon(_send_wait, state, link)
    reply = await sent
    return reply, await asyncio.shield(fut)


def _send_wait(state: _NodeWaits, link: Link) -> None:
    # Sends the WAIT every call so far joined (state.next); the calls after it join another.
    fut, state.next = state.next, None
    if fut is None:
        state.inflight = False
        return
    proto = link.protocol
    if proto is None or proto.closed:
        state.inflight = False
        fut.set_exception(RedisUnavailable(f"redis {link.name}: connection lost before WAIT"))
        if state.next is not None:  # joined meanwhile: they get the same news
            state.next.set_exception(RedisUnavailable(f"redis {link.name}: connection lost"))
            state.next = None
        return
    reply = proto.send(pack_command(("WAIT", *state.params)))

    def returned(done: asyncio.Future[Any]) -> None:
        if not fut.done():
            error = done.exception()
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(done.result())
        _send_wait(state, link)  # the next group, if any, goes now

    reply.add_done_callback(returned)


class FastRedis:
    """The hot-path ``ScriptRunner`` for one Redis server: auto-pipelined connections.

    ``connections`` > 1 spreads calls round-robin over that many sockets; one is usually
    fastest, since pipelining already batches everything issued in a tick.
    Construction does no I/O and needs no running loop; the first call connects.
    """

    cross_slot = True
    """A script may touch keys of any hash slot (one server, not a cluster): settle.lua's
    multi-shard form may be sent (``Settlement.multi_shard``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        settings: ConnectionSettings | None = None,
        connections: int = 1,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.settings = settings or ConnectionSettings()
        self.links = [Link(host, port, self.settings) for _ in range(connections)]
        self._next = 0
        # (script sha, argument count) -> the command's encoded head up to its arguments.
        self._heads: dict[tuple[str, int], bytes] = {}
        self._waits: SharedWaits = {}

    def _link(self) -> Link:
        links = self.links
        if len(links) == 1:
            return links[0]
        self._next = (self._next + 1) % len(links)
        return links[self._next]

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` by SHA with ``keys`` and ``args``; return its reply.

        Raises ``RedisReplyError`` for an error reply (e.g. the script failed) and
        ``RedisUnavailable`` when Redis is unreachable or slow (the script may have run).
        """
        link = self._link()
        command = pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        reply = await link.request(command)
        if reply.__class__ is ErrorReply:
            return await _after_error(link, script, command, reply)
        return reply

    async def run_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Any:
        """``run`` with the keys and arguments already encoded (see ``ScriptRunner``): they
        go on the wire as they are. Same replies, errors and NOSCRIPT recovery as ``run``."""
        reply = await self.send_encoded(script, count, encoded)
        if reply.__class__ is ErrorReply:
            return await self.recover_encoded(script, count, encoded, reply)
        return reply

    def send_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Awaitable[Any]:
        """``run_encoded``'s first step without a coroutine of its own: send the call now
        and return what awaits its reply *as it comes*, an error reply (``ErrorReply``)
        included, which the caller hands to :meth:`recover_encoded`. On a live socket the
        awaitable is the reply's future itself, so a caller that awaits it (the charge of
        every metered request, ``Admitter.admit``) resumes through one coroutine level
        fewer than through ``run_encoded``."""
        head = self._heads.get((script.sha, count))
        if head is None:
            head = self._heads[(script.sha, count)] = evalsha_header(script.sha, count)
        links = self.links
        link = links[0] if len(links) == 1 else self._link()
        # Link.request inlined (the hot path): a live socket on this loop takes it at once.
        proto = link._proto
        # (running_loop: asyncio.get_running_loop() without a getpid() system call per charge)
        if proto is not None and not proto.closed and proto.loop is running_loop():
            return proto.send(head + encoded)
        return link._request_slow(head + encoded)

    async def recover_encoded(
        self, script: LuaScript, count: int, encoded: bytes, reply: Any
    ) -> Any:
        """What ``run_encoded`` returns or raises after ``send_encoded`` answered the error
        reply ``reply``: NOSCRIPT recovered once (the script loaded and the call sent
        again), any other error raised (``RedisUnavailable`` or ``RedisReplyError``)."""
        # The socket the error came on (data_received marks it), for load_and_retry's
        # check of a SCRIPT LOAD already queued there; else any (nothing ran).
        proto = getattr(reply, "proto", None)
        link = next((lk for lk in self.links if lk._proto is proto), None) or self._link()
        command = evalsha_header(script.sha, count) + encoded
        return await _after_error(link, script, command, reply)

    async def run_encoded_many(
        self, script: LuaScript, calls: Sequence[tuple[int, bytes]]
    ) -> list[Any]:
        """Several ``run_encoded`` calls of ``script`` queued at once, in one coroutine: on a
        live socket they go out in the tick's write like separate calls, without a task and
        a coroutine per call (the settle batches of many shards, flushed together). Returns
        one entry per call, in order: its reply, or the ``RedisUnavailable`` or
        ``RedisReplyError`` it would have raised (each call's NOSCRIPT recovered as in
        ``run``), so one failed call leaves the others' replies to their callers."""
        heads = self._heads
        link = self._link()  # one socket: the calls go out together
        # Link.request, decided once for all the calls: a live socket on this loop takes
        # each at once (the calls' futures); else each waits for the connection.
        proto = link._proto
        send: Callable[[bytes], Awaitable[Any]] = (
            proto.send
            if proto is not None and not proto.closed and proto.loop is running_loop()
            else link.request
        )
        sha = script.sha
        sent: list[tuple[bytes, Awaitable[Any]]] = []
        for count, encoded in calls:
            head = heads.get((sha, count))
            if head is None:
                head = heads[(sha, count)] = evalsha_header(sha, count)
            command = head + encoded
            sent.append((command, send(command)))
        replies: list[Any] = []
        for command, pending in sent:
            try:
                reply = await pending
                if reply.__class__ is ErrorReply:
                    reply = await _after_error(link, script, command, reply)
            except (RedisUnavailable, RedisReplyError) as exc:
                reply = exc
            replies.append(reply)
        return replies

    async def run_replicated(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int, str]:
        """``run``, then ``WAIT replicas timeout_ms`` on the same socket in the same write;
        returns the script's reply, how many replicas acknowledged every write made on
        that socket so far (the script's included) and the node that ran it
        (host:port). WAIT blocks the socket, so this is for a runner of its own (the
        settle's, ``settle_wait_replicas``), never the hot path's.
        """
        link = self.links[0]  # one socket: WAIT counts the writes of its own connection
        command = pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        reply, acked = await run_then_wait(self._waits, link, command, replicas, timeout_ms)
        if reply.__class__ is ErrorReply:
            reply = await _after_error(link, script, command, reply)
            acked = await link.request(pack_command(("WAIT", replicas, timeout_ms)))
        return reply, acked if isinstance(acked, int) else 0, link.name

    async def execute(self, *args: ScriptArg) -> Any:
        """Run any single command (off the hot path: tests, health checks)."""
        reply = await self._link().request(pack_command(args))
        if isinstance(reply, ErrorReply):
            raise reply_error(str(reply))
        return reply

    @property
    def connect_attempts(self) -> int:
        """Connection attempts made so far (all sockets)."""
        return sum(link.connect_attempts for link in self.links)

    async def close(self) -> None:
        """Close the sockets (in-flight calls fail); a later call would reconnect."""
        for link in self.links:
            link.drop()
