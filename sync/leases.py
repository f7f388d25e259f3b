"""Shard ownership of the sync processes: each shard is read by one process at a time.

Every sync process (``SyncWorker.run``) is a member of ``P:sync:members`` (a zset of
consumer names scored by when their membership expires, renewed by a heartbeat), and owns
the shards it holds a lease on: ``P:{sN}:sync:lease``, a string naming the owner with a
TTL, in the shard's own hash tag (a key of the shard's cluster slot). The live members,
sorted by name, split the shards the same way in every process: shard ``i`` goes to
member ``i mod N`` (``assignment``), so N processes own S/N shards each and a shard's
events are written in one process's batches, not split between two transactions that
write the same rollup and snapshot keys and wait on the shard's advisory lock.

A process gives back (deletes) a lease it no longer wants and takes (``SET NX``) the
wanted ones that are free, between passes, when no batch of theirs is in flight
(``rebalance``). A heartbeat (``heartbeat``, every ``lease_ms / 5``) renews the
membership and every lease held; the process counts a lease as its own only until
``0.6 * lease_ms`` after the renewal that last confirmed it, so it stops starting batches
of a shard before the lease can expire in Redis and another process take the shard.
A process that dies leaves its membership and leases to expire after ``lease_ms``: the
others then split its shards and claim its pending entries. The ledger's per-shard
advisory lock and the idempotent insert stay the safety net (a batch already being
written when its lease lapsed; a ``run_once`` pass, which reads every shard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from gateway.core.redis_keys import KeySpace
from gateway.redisio.lua_scripts import load as load_script
from sync.batch import text

log = logging.getLogger("creditgate.sync")

DEFAULT_LEASE_MS = 5000
MIN_LEASE_MS = 500
# A lease counts as ours this fraction of its TTL after the renewal that confirmed it: a
# heartbeat runs every fifth of the TTL, so two may be late before another process can
# take the shard.
_VALID_FRACTION = 0.6
_HEARTBEATS_PER_LEASE = 5

__all__ = ["DEFAULT_LEASE_MS", "MIN_LEASE_MS", "ShardLeases", "assignment", "check_lease_ms"]


def check_lease_ms(lease_ms: int) -> int:
    """``lease_ms`` if valid (0: no ownership, every process reads every shard; else at
    least ``MIN_LEASE_MS``), else ValueError saying why."""
    if isinstance(lease_ms, bool) or not isinstance(lease_ms, int):
        raise ValueError(f"lease_ms must be an integer number of milliseconds, got {lease_ms!r}")
    if lease_ms != 0 and lease_ms < MIN_LEASE_MS:
        raise ValueError(
            f"lease_ms must be 0 (no shard ownership: every process reads every shard) or at"
            f" least {MIN_LEASE_MS} (ms), got {lease_ms}"
        )
    return lease_ms


def assignment(members: Sequence[str], me: str, shards: int) -> frozenset[int]:
    """The shards ``me`` should own when ``members`` (sorted) are the live processes: shard
    ``i`` goes to member ``i mod len(members)`` (none if ``me`` is not a member)."""
    if me not in members:
        return frozenset()
    k, n = members.index(me), len(members)
    return frozenset(range(k, shards, n))


class ShardLeases:
    """One sync process's membership and shard leases (see the module docstring)."""

    def __init__(self, redis: Any, keyspace: KeySpace, consumer: str, lease_ms: int) -> None:
        self.redis = redis
        self.consumer = consumer
        self.lease_ms = check_lease_ms(lease_ms)
        self.heartbeat_every_s = lease_ms / 1000 / _HEARTBEATS_PER_LEASE
        self._valid_s = lease_ms / 1000 * _VALID_FRACTION
        self._members_key = keyspace.sync_members
        self._lease_keys = [keys.sync_lease for keys in keyspace.all_shards()]
        self._lease_script = redis.register_script(load_script("shard_lease").source)
        self._members_script = redis.register_script(load_script("sync_members").source)
        self._held: dict[int, float] = {}  # shard -> monotonic time it stops counting as ours
        self._wanted: frozenset[int] = frozenset()
        self.members: tuple[str, ...] = ()
        self.beats = 0  # heartbeats done: a new one may have changed what is wanted

    def owns(self, shard: int) -> bool:
        """Whether we hold ``shard``'s lease, confirmed recently enough to start a batch."""
        return self._held.get(shard, float("-inf")) > time.monotonic()

    def keeps(self, shard: int) -> bool:
        """Whether we own ``shard`` and still want it (else finish up, don't read on)."""
        return shard in self._wanted and self.owns(shard)

    def owned(self) -> list[int]:
        """The shards we own now, in order."""
        now = time.monotonic()
        return sorted(s for s, until in self._held.items() if until > now)

    async def _lease(self, shard: int, ttl_ms: int) -> int:
        reply = await self._lease_script(
            keys=[self._lease_keys[shard]], args=[self.consumer, ttl_ms]
        )
        return int(reply)

    async def heartbeat(self) -> None:
        """Renew our membership and every lease we hold; learn the live members (and so
        the shards we should own). A lease found in another's hands is dropped."""
        started = time.monotonic()
        reply = await self._members_script(
            keys=[self._members_key], args=[self.consumer, self.lease_ms]
        )
        self.members = tuple(text(m) for m in reply)
        self._wanted = assignment(self.members, self.consumer, len(self._lease_keys))
        held = sorted(self._held)
        renewed = await asyncio.gather(*(self._lease(s, self.lease_ms) for s in held))
        for shard, ok in zip(held, renewed, strict=True):
            if ok:
                self._held[shard] = started + self._valid_s
            else:
                log.warning("sync %s: lost the lease of shard %d", self.consumer, shard)
                del self._held[shard]
        self.beats += 1

    async def rebalance(self) -> tuple[list[int], list[int]]:
        """Give back the leases we hold but no longer want, take the wanted ones that are
        free; returns (taken, given back). Call it only when no batch of a shard we hold
        is in flight."""
        give = sorted(s for s in self._held if s not in self._wanted)
        for shard in give:
            await self._lease(shard, 0)
            del self._held[shard]
        take = sorted(s for s in self._wanted if s not in self._held)
        started = time.monotonic()
        got = await asyncio.gather(*(self._lease(s, self.lease_ms) for s in take))
        taken = [s for s, ok in zip(take, got, strict=True) if ok]
        for shard in taken:
            self._held[shard] = started + self._valid_s
        if taken or give:
            log.info(
                "sync %s: %d live processes; took shards %s, gave back %s; owns %s",
                self.consumer, len(self.members), taken, give, self.owned(),
            )  # fmt: skip
        return taken, give

    async def leave(self) -> None:
        """Give back every lease and leave the members (clean shutdown: the others take
        the shards over at their next heartbeat, not after the leases' TTL)."""
        held = sorted(self._held)
        self._held.clear()
        self._wanted = frozenset()
        await asyncio.gather(*(self._lease(s, 0) for s in held))
        await self._members_script(keys=[self._members_key], args=[self.consumer, 0])
