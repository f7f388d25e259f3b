"""The auto-pipelined script runner for Redis Cluster (see ``gateway/redisio/pipelined.py``).

Each call is routed by the hash slot of ``keys[0]`` (every key of one script call shares a
hash tag, see ``gateway/core/redis_keys.py``) through a slot map loaded with
``CLUSTER SLOTS``; there is
one pipelined connection per master, opened on first use.

Redirections and refusals that mean "nothing ran" are followed, so retrying is safe:
- ``MOVED``: the slot now lives elsewhere: patch the map, refresh it fully in the
  background, and send the call to the named node;
- ``ASK``: the slot is being migrated and the key is already on the target: send
  ``ASKING`` and the call to the named node (the map is left alone);
- ``TRYAGAIN``: a multi-key call met a half-migrated slot: wait a little and try again;
- ``NOSCRIPT``: load the script on that node and run it again (once per node).
``CLUSTERDOWN``, a lost connection or a timeout raise ``RedisUnavailable`` and are never
retried (a lost reply may belong to a debit that committed); a lost connection also
triggers a background refresh of the map, in case of a failover.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from gateway.core.errors import RedisUnavailable
from gateway.redisio.link import ConnectionSettings, ErrorReply, Link
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import (
    ASKING,
    RedisReplyError,
    SharedWaits,
    load_and_retry,
    reply_error,
    run_then_wait,
)
from gateway.redisio.resp import ScriptArg, decode_args, evalsha_header, pack_command

__all__ = ["FastRedisCluster", "slot_of"]

log = logging.getLogger(__name__)

_pack = pack_command
_ReplyError = ErrorReply  # what the pipelined reader builds for error replies

_CLUSTER_SLOTS = _pack(("CLUSTER", "SLOTS"))
# Pauses before each TRYAGAIN retry: a slot migration moves a batch of keys in milliseconds.
_TRYAGAIN_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
# Errors (lost node, CLUSTERDOWN, MOVED) ask for a reload of the slot map at most this often.
_REFRESH_INTERVAL = 0.25


def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (honouring ``{hash tags}``)."""
    return key_slot(key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key)


class FastRedisCluster:
    """The hot-path ``ScriptRunner`` for a Redis Cluster.

    ``seeds`` are (host, port) pairs of any nodes; the slot map is loaded from the first that
    answers. Construction does no I/O and needs no running loop.
    ``stats`` counts what was followed (``moved``, ``ask``, ``tryagain``, ``noscript``,
    ``refreshes``), for metrics and tests.
    """

    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        *,
        settings: ConnectionSettings | None = None,
        max_redirects: int = 8,
    ) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        if settings is not None and settings.db:
            raise ValueError("Redis Cluster has only database 0")
        self.settings = settings or ConnectionSettings()
        self.max_redirects = max_redirects
        self.stats: Counter[str] = Counter()
        self._seeds = [(host, int(port)) for host, port in seeds]
        self._links: dict[tuple[str, int], Link] = {}
        self._slots: list[Link | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = float("-inf")
        self._loaded = False
        # (script sha, argument count) -> the command's encoded head (run_encoded).
        self._heads: dict[tuple[str, int], bytes] = {}
        self._waits: SharedWaits = {}  # run_replicated's WAITs, one per node and tick

    def link(self, host: str, port: int) -> Link:
        """The connection to node ``host:port`` (created, unconnected, on first use)."""
        link = self._links.get((host, port))
        if link is None:
            link = self._links[(host, port)] = Link(host, port, self.settings)
        return link

    def node_for_slot(self, slot: int) -> Link | None:
        """The master currently mapped to ``slot`` (None before the map is loaded)."""
        return self._slots[slot]

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` by SHA on the master of ``keys[0]``'s slot and return its reply.

        Raises ``RedisReplyError`` for an error reply and ``RedisUnavailable`` when the
        cluster is unreachable, slow or down (after a timeout the script may have run).
        """
        if not keys:
            raise ValueError(f"script {script.name}: Redis Cluster routes by key, none given")
        command = _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        return await self._send(slot_of(keys[0]), script, command)

    async def run_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Any:
        """``run`` with the keys and arguments already encoded (see ``ScriptRunner``),
        routed by the first key in them; the encoded bytes go on the wire as they are."""
        numkeys, *first = decode_args(encoded, 2)
        if numkeys == b"0" or not first:
            raise ValueError(f"script {script.name}: Redis Cluster routes by key, none given")
        head = self._heads.get((script.sha, count))
        if head is None:
            head = self._heads[(script.sha, count)] = evalsha_header(script.sha, count)
        return await self._send(slot_of(first[0]), script, head + encoded)

    async def _send(self, slot: int, script: LuaScript, command: bytes) -> Any:
        link = self._slots[slot]
        if link is None:
            link = await self._mapped_node(slot)
        try:
            reply = await link.request(command)
        except RedisUnavailable:
            self.refresh_soon()
            raise
        if reply.__class__ is _ReplyError:
            return await self._follow(slot, script, command, link, reply)
        return reply

    async def run_replicated(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int, str]:
        """``run`` on the slot's master, then ``WAIT replicas timeout_ms`` on the same
        socket in the same write (see ``FastRedis.run_replicated``); after a redirection the
        WAIT goes to the node that now owns the slot."""
        if not keys:
            raise ValueError(f"script {script.name}: Redis Cluster routes by key, none given")
        slot = slot_of(keys[0])
        link = self._slots[slot] or await self._mapped_node(slot)
        command = _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        try:
            reply, acked = await run_then_wait(self._waits, link, command, replicas, timeout_ms)
            if reply.__class__ is _ReplyError:
                reply = await self._follow(slot, script, command, link, reply)
                link = self._slots[slot] or link
                acked = await link.request(_pack(("WAIT", replicas, timeout_ms)))
        except RedisUnavailable:
            self.refresh_soon()
            raise
        return reply, acked if isinstance(acked, int) else 0, link.name

    async def execute(self, key: str, *args: ScriptArg) -> Any:
        """Run one command on the master of ``key``'s slot (off the hot path: tests, checks).
        MOVED is followed; nothing else is. A lost node or CLUSTERDOWN reloads the slot map
        in the background, as for scripts: after a failover the next call goes to the
        promoted replica (the sync worker's stream commands come through here)."""
        slot = slot_of(key)
        link = self._slots[slot] or await self._mapped_node(slot)
        command = _pack(args)
        try:
            reply = await link.request(command)
            if isinstance(reply, _ReplyError) and str(reply).startswith("MOVED "):
                link = self._moved(slot, str(reply), link)
                reply = await link.request(command)
        except RedisUnavailable:
            self.refresh_soon()
            raise
        if isinstance(reply, _ReplyError):
            if str(reply).startswith("CLUSTERDOWN"):
                self.refresh_soon()
            raise reply_error(str(reply))
        return reply

    async def _follow(
        self, slot: int, script: LuaScript, command: bytes, link: Link, reply: Any
    ) -> Any:
        asking = False
        loaded: set[str] = set()
        tries = 0
        for tries in range(self.max_redirects):
            message = str(reply)
            code = message.split(" ", 1)[0]
            try:
                if code == "MOVED":
                    link = self._moved(slot, message, link)
                    asking = False
                    reply = await link.request(command)
                elif code == "ASK":
                    self.stats["ask"] += 1
                    link = self._target(message, link)
                    asking = True
                    reply = (await link.request_many(ASKING, command))[1]
                elif code == "TRYAGAIN":
                    self.stats["tryagain"] += 1
                    await asyncio.sleep(_TRYAGAIN_DELAYS[min(tries, len(_TRYAGAIN_DELAYS) - 1)])
                    # Start over from the slot's owner: it answers ASK once the keys moved.
                    link = self._slots[slot] or link
                    asking = False
                    reply = await link.request(command)
                elif code == "NOSCRIPT" and link.name not in loaded:
                    self.stats["noscript"] += 1
                    loaded.add(link.name)
                    reply = await load_and_retry(link, script, command, asking, failed=reply)
                else:
                    if code == "CLUSTERDOWN":
                        self.refresh_soon()
                    raise reply_error(message)
            except RedisUnavailable:
                self.refresh_soon()
                raise
            if reply.__class__ is not _ReplyError:
                return reply
        raise RedisUnavailable(
            f"redis cluster: slot {slot}: gave up after {tries + 1} redirections ({reply})"
        )

    def _target(self, message: str, current: Link) -> Link:
        # "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381"; an empty or "?" host
        # means "the host you are talking to".
        try:
            host, _, port = message.split(" ")[2].rpartition(":")
            return self.link(host if host and host != "?" else current.host, int(port))
        except (IndexError, ValueError):
            raise RedisReplyError(f"malformed redirection from {current.name}: {message}") from None

    def _moved(self, slot: int, message: str, current: Link) -> Link:
        self.stats["moved"] += 1
        link = self._target(message, current)
        self._slots[slot] = link
        self.refresh_soon()
        return link

    async def _mapped_node(self, slot: int) -> Link:
        task = self.refresh_soon()
        if task is not None:
            await asyncio.shield(task)
        link = self._slots[slot]
        if link is None:
            raise RedisUnavailable(f"redis cluster: slot {slot} is not served by any master")
        return link

    def refresh_soon(self) -> asyncio.Task[None] | None:
        """Reload the slot map in the background and return the reload's task; None when a
        reload started less than 0.25 s ago (MOVED keeps patching the map meanwhile)."""
        loop = asyncio.get_running_loop()
        task = self._refresh_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return task
        if self._loaded and loop.time() - self._refreshed_at < _REFRESH_INTERVAL:
            return None
        self._refreshed_at = loop.time()
        task = self._refresh_task = loop.create_task(self._reload())
        task.add_done_callback(_log_refresh_failure)
        return task

    async def refresh(self) -> None:
        """Reload the slot map now (or join a reload under way)."""
        self._refreshed_at = float("-inf")
        task = self.refresh_soon()
        assert task is not None
        await asyncio.shield(task)

    async def _reload(self) -> None:
        self.stats["refreshes"] += 1
        known = {link.name: link for link in self._slots if link is not None}
        candidates = list(known.values()) + [self.link(h, p) for h, p in self._seeds]
        errors: list[str] = []
        for link in dict.fromkeys(candidates):
            try:
                reply = await link.request(_CLUSTER_SLOTS)
            except RedisUnavailable as exc:
                errors.append(str(exc))
                continue
            if isinstance(reply, _ReplyError):
                errors.append(f"{link.name}: {reply}")
                continue
            self._apply(reply, link)
            self._loaded = True
            return
        raise RedisUnavailable(
            "redis cluster: no node answered CLUSTER SLOTS: " + "; ".join(errors)
        )

    def _apply(self, reply: list[Any], source: Link) -> None:
        slots: list[Link | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0] or source.host  # no endpoint: same host as the one asked
            if host == "?":
                host = source.host
            link = self.link(host, int(master[1]))
            slots[start : end + 1] = [link] * (end - start + 1)
        self._slots = slots

    @property
    def connect_attempts(self) -> int:
        """Connection attempts made so far (all nodes)."""
        return sum(link.connect_attempts for link in self._links.values())

    async def close(self) -> None:
        """Close every node's socket (in-flight calls fail); a later call reconnects."""
        task = self._refresh_task
        if task is not None and not task.done():
            task.cancel()
        self._refresh_task = None
        for link in self._links.values():
            link.drop()


def _log_refresh_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("redis cluster slot map refresh failed: %s", task.exception())
