"""Redis key layout: every key of one organization lives in one virtual shard.

A virtual shard is ``crc32(org) % shards``; its hash tag ``{s<n>}`` makes Redis Cluster
place all of the shard's keys in one slot, so each Lua script (which only ever touches one
org, or one shard) runs unchanged on a single Redis or a cluster. ``shards`` is fixed at
deploy time: changing it moves orgs to other shards (see README, "Scaling out").

Keys (P = key_prefix, default ``cg``):
- ``P:{sN}:org:<org>``            hash: plan, seq, per bucket b:/a:/u:/p:/x:/l: fields, and
                                  ``rl:o:<count>/<period ms>``: a per-org GCRA limiter's
                                  theoretical arrival time (lua/charge.lua)
- ``P:{sN}:holds``                hash: request id -> JSON hold of an in-flight request
- ``P:{sN}:holdexp``              zset: request id scored by the hold's expiry (ms)
- ``P:{sN}:events``               stream: the shard's audit events (gateway/core/events.py)
- ``P:{sN}:events:dead``          stream: events the sync job could not write (sync/)
- ``P:{sN}:sync:lease``           string: the sync process that owns the shard, with a TTL
                                  (sync/leases.py)
- ``P:{sN}:idem:<org>:<sha256>``  string: an Idempotency-Key's state
- ``P:{sN}:idem:-``               never written: the idempotency key of scripts run for a
                                  request without one (scripts take a fixed set of keys)
- ``P:{sN}:rsv:<org>:<id>``       string: a reservation's settle result (JSON), kept for
                                  the idempotency window once it is settled, released or
                                  expired (lua/settle.lua, lua/sweep_holds.lua)
- ``P:{sN}:rl:<org>:u:<user>:<count>/<period ms>``
                                  string: a per-user GCRA limiter's theoretical arrival time
- ``P:keys:<sha256 hex>``         string: cached API-key lookup (not per org)
- ``P:stripe:evt:<event id>``     string: a Stripe webhook event's outcome (not per org)
- ``P:stripe:sub:<org>``          string: the org's last applied subscription change
- ``P:sync:members``              zset: live sync processes scored by when their
                                  membership expires (ms, Redis time; sync/leases.py)

Every key name is built here; nothing else spells one out.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass


def shard_of(org: str, shards: int) -> int:
    """Return the virtual shard of ``org``."""
    return zlib.crc32(org.encode("utf-8")) % shards


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one virtual shard: its own (holds, hold expiries, event streams, the
    idempotency placeholder) and, for an org in it, the org's."""

    shard: int
    tag: str
    holds: str
    holdexp: str
    events: str
    dead_letters: str
    sync_lease: str
    no_idempotency: str
    org_prefix: str  # of every org state key in the shard (SCAN MATCH <org_prefix>*)

    @classmethod
    def build(cls, prefix: str, shard: int) -> ShardKeys:
        """The keys of shard ``shard`` under ``prefix``."""
        tag = f"{prefix}:{{s{shard}}}"
        return cls(
            shard, tag, f"{tag}:holds", f"{tag}:holdexp", f"{tag}:events",
            f"{tag}:events:dead", f"{tag}:sync:lease", f"{tag}:idem:-", f"{tag}:org:",
        )  # fmt: skip

    def org(self, org: str) -> str:
        """The state hash of ``org`` (an org of this shard)."""
        return f"{self.org_prefix}{org}"

    def idempotency(self, org: str, client_key: str) -> str:
        """The key recording an ``Idempotency-Key`` of ``org`` (hashed: clients choose its
        bytes)."""
        digest = hashlib.sha256(client_key.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.tag}:idem:{org}:{digest}"

    def user_limiter(self, org: str, user: str, count: int, period_ms: int) -> str:
        """The key of a per-user rate limiter (``count`` per ``period_ms``) of ``org``."""
        return f"{self.tag}:rl:{org}:u:{user}:{count}/{period_ms}"

    def reservation(self, org: str, reservation_id: str) -> str:
        """The key keeping the settle result of ``org``'s reservation ``reservation_id``."""
        return f"{self.tag}:rsv:{org}:{reservation_id}"


@dataclass(frozen=True, slots=True)
class OrgKeys:
    """An org's shard and state key, looked up once (``KeySpace.of_org``)."""

    shard: ShardKeys
    state: str


# Orgs whose keys KeySpace.of_org keeps; the cache is emptied when full (a lookup costs
# well under a microsecond, so nothing smarter is worth its own overhead).
_ORG_CACHE_SIZE = 20_000


class KeySpace:
    """Builds key names for one deployment (prefix and shard count)."""

    def __init__(self, prefix: str = "cg", shards: int = 16) -> None:
        self.prefix = prefix
        self.shards = shards
        self._shard_keys = [ShardKeys.build(prefix, n) for n in range(shards)]
        self._orgs: dict[str, OrgKeys] = {}
        # of_org's answer when it is cached, else None, without of_org's Python call (the
        # settle of every metered request asks: BENCHMARKS.md section 1, round 12).
        self.cached_org: Callable[[str], OrgKeys | None] = self._orgs.get

    def shard(self, org: str) -> ShardKeys:
        """The shard keys of ``org``."""
        return self._shard_keys[shard_of(org, self.shards)]

    def all_shards(self) -> list[ShardKeys]:
        """Every shard, in order."""
        return list(self._shard_keys)

    @property
    def sync_members(self) -> str:
        """The zset of live sync processes (not per shard: one key, one cluster slot)."""
        return f"{self.prefix}:sync:members"

    def of_org(self, org: str) -> OrgKeys:
        """``org``'s shard and state key (cached: the hot path asks for them twice per
        request)."""
        found = self._orgs.get(org)
        if found is None:
            shard = self.shard(org)
            if len(self._orgs) >= _ORG_CACHE_SIZE:
                self._orgs.clear()
            found = self._orgs[org] = OrgKeys(shard, shard.org(org))
        return found

    def org(self, org: str) -> str:
        """The org's state hash."""
        return self.of_org(org).state

    def idempotency(self, org: str, client_key: str) -> str:
        """The key recording an ``Idempotency-Key`` (hashed: clients choose its bytes)."""
        return self.of_org(org).shard.idempotency(org, client_key)

    def no_idempotency(self, org: str) -> str:
        """A placeholder in the org's shard for requests without an Idempotency-Key.

        Scripts take a fixed number of keys; this one is never written.
        """
        return self.shard(org).no_idempotency

    def user_limiter(self, org: str, user: str, count: int, period_ms: int) -> str:
        """A per-user rate limiter's key (``count`` per ``period_ms``)."""
        return self.shard(org).user_limiter(org, user, count, period_ms)

    def reservation(self, org: str, reservation_id: str) -> str:
        """The key keeping the settle result of ``org``'s reservation ``reservation_id``."""
        return self.of_org(org).shard.reservation(org, reservation_id)

    def api_key_cache(self, key_hash_hex: str) -> str:
        """Cached resolution of an API key hash."""
        return f"{self.prefix}:keys:{key_hash_hex}"

    def stripe_event(self, event_id: str) -> str:
        """The outcome of a Stripe webhook event (its replays change nothing)."""
        return f"{self.prefix}:stripe:evt:{event_id}"

    def stripe_subscription(self, org: str) -> str:
        """The last subscription change applied to ``org`` (``<created>:<object id>``)."""
        return f"{self.prefix}:stripe:sub:{org}"
