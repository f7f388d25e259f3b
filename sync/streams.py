"""Redis side of the sync job: one shard's event stream read through a consumer group.

Every entry is read with ``XREADGROUP`` (or claimed with ``XAUTOCLAIM`` from a consumer
that stopped acking), stays in the group's pending list until the ledger has committed it,
and is acked only then. The stream is trimmed only below its oldest pending entry, so an
entry leaves Redis only after it is in Postgres.

The bulk commands (read, claim, ack) go through a ``FastClient`` when there is one: the
hiredis-parsed replies of gateway/redisio/pipelined.py, with each entry's fields left as the flat
``[name, value, ...]`` list Redis sent, cost a fraction of redis-py's parsing (which builds
a dict per entry). Everything else, and everything when there is no fast client
(``memory://``, TLS, unix sockets), uses the redis-py client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

from gateway.core.redis_keys import ShardKeys
from gateway.redisio.pipelined import ConnectionSettings, FastRedis, RedisReplyError
from gateway.redisio.pipelined_cluster import FastRedisCluster
from sync.batch import Entry, text
from sync.records import Fields

# A redis-py asyncio client (Redis or RedisCluster); typed loosely because both work.
RedisClient = Redis | Any
FastClient = FastRedis | FastRedisCluster

__all__ = [
    "Backlog",
    "FastClient",
    "RedisClient",
    "ShardStream",
    "fast_client_for",
    "is_nogroup",
    "next_id",
    "parse_id",
    "streams_in",
]


def fast_client_for(client: RedisClient, *, min_timeout: float = 5.0) -> FastClient | None:
    """A pipelined client to the server(s) ``client`` (redis-py) talks to, or None when
    that is not a plain TCP connection (fakeredis, TLS, unix socket, credential provider).

    Its timeout is the client's, but at least ``min_timeout``: a read returns megabytes.
    """
    if isinstance(client, redis.asyncio.RedisCluster):
        kwargs = client.connection_kwargs
        if kwargs.get("connection_class") is not Connection:
            return None
        seeds = [(n.host, int(n.port)) for n in client.nodes_manager.startup_nodes.values()]
        settings = _settings(kwargs, min_timeout, db=0)
        return FastRedisCluster(seeds, settings=settings) if seeds and settings else None
    pool = getattr(client, "connection_pool", None)
    if not isinstance(client, Redis) or pool is None or pool.connection_class is not Connection:
        return None
    kwargs = pool.connection_kwargs
    settings = _settings(kwargs, min_timeout, db=int(kwargs.get("db") or 0))
    if settings is None or "host" not in kwargs:
        return None
    return FastRedis(kwargs["host"], int(kwargs.get("port") or 6379), settings=settings)


def _settings(kwargs: Mapping[str, Any], min_timeout: float, db: int) -> ConnectionSettings | None:
    if kwargs.get("credential_provider") is not None:
        return None
    timeout = max(float(kwargs.get("socket_timeout") or 0), min_timeout)
    return ConnectionSettings(
        username=kwargs.get("username"), password=kwargs.get("password"), db=db, timeout=timeout
    )


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` says the stream or its consumer group does not exist."""
    if not isinstance(exc, ResponseError | RedisReplyError):
        return False
    return "NOGROUP" in str(exc) or "no such key" in str(exc)


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a tuple of ints (ordered like stream ids)."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or "0")


def next_id(entry_id: bytes | str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


def streams_in(reply: Any) -> list[tuple[str, list[Entry]]]:
    """Normalise an XREAD/XREADGROUP reply (RESP2 list or RESP3 dict) to (stream, entries)."""
    if not reply:
        return []
    items: Iterable[Any] = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[str, list[Entry]]] = []
    for name, entries in items:
        # RESP3 replies nest the entry list one level deeper.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        out.append((text(name), [(text(e[0]), e[1] or {}) for e in entries if e[0] is not None]))
    return out


@dataclass(frozen=True, slots=True)
class Backlog:
    """A shard's unsynced entries: pending (delivered, not acked) plus never delivered."""

    shard: int
    pending: int
    undelivered: int
    oldest_ms: int | None  # stream-id time of the oldest unsynced entry


class ShardStream:
    """One shard's event stream, as one consumer of the sync group sees it."""

    def __init__(
        self,
        redis: RedisClient,
        keys: ShardKeys,
        group: str,
        consumer: str,
        fast: FastClient | None = None,
    ) -> None:
        self.redis = redis
        self.fast = fast
        self.keys = keys
        self.key = keys.events
        self.dead_key = keys.dead_letters
        self.group = group
        self.consumer = consumer

    async def _fast(self, *args: str | int) -> Any:
        assert self.fast is not None
        if isinstance(self.fast, FastRedisCluster):
            return await self.fast.execute(self.key, *args)
        return await self.fast.execute(*args)

    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the start) unless it exists."""
        try:
            await self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, start: str, count: int) -> list[Entry]:
        """XREADGROUP from ``start``: ``">"`` for new entries, ``"0"`` for our own pending."""
        if self.fast is not None:
            reply = await self._fast(
                "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count,
                "STREAMS", self.key, start,
            )  # fmt: skip
            if not reply:
                return []
            # Each entry as the reply's [id, fields] list: it unpacks as an Entry does.
            entries: list[Entry] = reply[0][1]
            return entries
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.key: start}, count=count
        )
        for _, entries in streams_in(reply):
            return entries
        return []

    async def claim(self, min_idle_ms: int, count: int) -> list[Entry]:
        """XAUTOCLAIM up to ``count`` entries idle for ``min_idle_ms`` (crashed consumers)."""
        claimed: list[Entry] = []
        start = "0-0"
        while len(claimed) < count:
            n = count - len(claimed)
            if self.fast is not None:
                reply = await self._fast(
                    "XAUTOCLAIM", self.key, self.group, self.consumer, min_idle_ms, start,
                    "COUNT", n,
                )  # fmt: skip
            else:
                reply = await self.redis.xautoclaim(
                    self.key, self.group, self.consumer, min_idle_ms, start, n
                )
            start = text(reply[0])
            claimed.extend((text(e[0]), e[1] or {}) for e in reply[1] if e[0] is not None)
            if start == "0-0":
                break
        return claimed

    async def ack(self, ids: Sequence[str]) -> None:
        """XACK ``ids`` (a no-op for ids no longer pending)."""
        if not ids:
            return
        if self.fast is not None:
            await self._fast("XACK", self.key, self.group, *ids)
        else:
            await self.redis.xack(self.key, self.group, *ids)

    async def dead_letter(self, items: Sequence[tuple[str, Fields, str]]) -> None:
        """Copy malformed entries to ``P:{sN}:events:dead`` with the error and their id."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields, error in items:
            record: dict[Any, Any] = (
                dict(fields)
                if isinstance(fields, Mapping)
                else dict(zip(fields[::2], fields[1::2], strict=False))
            )
            record["dead_error"] = error[:1000]
            record["dead_entry"] = entry_id
            pipe.xadd(self.dead_key, record)
        await pipe.execute()

    async def trim(self) -> int:
        """XTRIM MINID below the oldest entry the group still needs; returns entries removed.

        The group's last-delivered id is read before the pending summary: an entry at or
        below that id that is not pending then is acked, and an acked entry never becomes
        pending again, so whatever is trimmed is committed even if other workers read on.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.key)
        pipe.xpending(self.key, self.group)
        groups, pending = await pipe.execute()
        last = _group_info(groups, self.group).get("last-delivered-id")
        if last is None:
            return 0
        minid = pending["min"] if pending["pending"] else next_id(last)
        if parse_id(minid) <= (0, 1):
            return 0
        return int(await self.redis.xtrim(self.key, minid=text(minid), approximate=True))

    async def backlog(self) -> Backlog:
        """Count what the group has not yet committed, and how old the oldest of it is."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.key)
        pipe.xinfo_groups(self.key)
        try:
            length, groups = await pipe.execute()
        except ResponseError:  # no stream yet
            return Backlog(self.keys.shard, 0, 0, None)
        info = _group_info(groups, self.group)
        if not info:
            first: list[Any] | None = await self.redis.xrange(self.key, count=1)
            start = parse_id(first[0][0])[0] if first else None
            return Backlog(self.keys.shard, 0, int(length), start)
        pending = await self.redis.xpending(self.key, self.group)
        last = info.get("last-delivered-id") or "0-0"
        lag = info.get("lag")
        if pending["pending"]:
            oldest: int | None = parse_id(pending["min"])[0]
        else:
            after: list[Any] | None = await self.redis.xrange(self.key, min=next_id(last), count=1)
            oldest = parse_id(after[0][0])[0] if after else None
        if lag is None:  # the server could not count it: bound it by the stream length
            lag = length
        return Backlog(self.keys.shard, int(pending["pending"]), int(lag), oldest)

    async def delete_consumer_if_idle(self) -> bool:
        """Remove this consumer from the group when it has nothing pending (clean exit)."""
        consumers = await self.redis.xinfo_consumers(self.key, self.group)
        for c in consumers:
            if text(c["name"]) == self.consumer and int(c["pending"]) == 0:
                await self.redis.xgroup_delconsumer(self.key, self.group, self.consumer)
                return True
        return False


def _group_info(groups: Sequence[Mapping[str, Any]], group: str) -> dict[str, Any]:
    for g in groups:
        if text(g["name"]) == group:
            return {k: (text(v) if isinstance(v, bytes) else v) for k, v in g.items()}
    return {}
