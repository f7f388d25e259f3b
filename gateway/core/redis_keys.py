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
- ``P:{sN}:idem:<org>:<sha256>``  string: an Idempotency-Key's state
- ``P:{sN}:rl:<org>:<limiter>``   string: a per-user GCRA limiter's theoretical arrival time
- ``P:keys:<sha256 hex>``         string: cached API-key lookup (not per org)
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass


def shard_of(org: str, shards: int) -> int:
    """Return the virtual shard of ``org``."""
    return zlib.crc32(org.encode("utf-8")) % shards


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The per-shard keys (holds, hold expiries, event stream) of one virtual shard."""

    shard: int
    tag: str
    holds: str
    holdexp: str
    events: str


class KeySpace:
    """Builds key names for one deployment (prefix and shard count)."""

    def __init__(self, prefix: str = "cg", shards: int = 16) -> None:
        self.prefix = prefix
        self.shards = shards
        self._shard_keys = [self._make_shard(n) for n in range(shards)]

    def _make_shard(self, n: int) -> ShardKeys:
        tag = f"{self.prefix}:{{s{n}}}"
        return ShardKeys(n, tag, f"{tag}:holds", f"{tag}:holdexp", f"{tag}:events")

    def shard(self, org: str) -> ShardKeys:
        """The shard keys of ``org``."""
        return self._shard_keys[shard_of(org, self.shards)]

    def all_shards(self) -> list[ShardKeys]:
        """Every shard, in order."""
        return list(self._shard_keys)

    def org(self, org: str) -> str:
        """The org's state hash."""
        return f"{self.shard(org).tag}:org:{org}"

    def idempotency(self, org: str, client_key: str) -> str:
        """The key recording an ``Idempotency-Key`` (hashed: clients choose its bytes)."""
        digest = hashlib.sha256(client_key.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.shard(org).tag}:idem:{org}:{digest}"

    def no_idempotency(self, org: str) -> str:
        """A placeholder in the org's shard for requests without an Idempotency-Key.

        Scripts take a fixed number of keys; this one is never written.
        """
        return f"{self.shard(org).tag}:idem:-"

    def limiter(self, org: str, limiter_id: str) -> str:
        """A rate limiter's key (``limiter_id`` already includes the user when per user)."""
        return f"{self.shard(org).tag}:rl:{org}:{limiter_id}"

    def api_key_cache(self, key_hash_hex: str) -> str:
        """Cached resolution of an API key hash."""
        return f"{self.prefix}:keys:{key_hash_hex}"
