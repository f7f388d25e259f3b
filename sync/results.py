"""What the sync worker reports: per-pass results and overall lag and health."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SyncPassResult:
    """What one pass over all shards did."""

    read: int = 0  # entries read (new, re-read or claimed)
    claimed: int = 0  # of which taken over from idle consumers
    inserted: int = 0  # new ledger rows
    duplicates: int = 0  # events already in the ledger (redeliveries)
    fallbacks: int = 0  # new batches that met a duplicate and were redone the safe way
    dead_lettered: int = 0  # malformed entries moved to the dead-letter stream
    vanished: int = 0  # pending entries whose content was already trimmed
    acked: int = 0
    trimmed: int = 0
    swept: int = 0  # expired holds turned into events by sweep_holds.lua
    # of which holds of calls whose cost was to be read after them (or reservations): their
    # rows say usage missing, like a settle whose usage never came
    swept_usage_missing: int = 0
    alerts: int = 0  # alert events written to the outbox (gateway/alerts/evaluation.py)

    def add(self, other: SyncPassResult) -> None:
        """Accumulate ``other`` into this result."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True, slots=True)
class SyncStats:
    """Lag and health of the sync job, for /metrics and /readyz."""

    backlog_per_shard: dict[int, int]  # pending + never delivered, per shard
    oldest_unsynced_age_ms: int | None  # age of the oldest event not yet committed
    last_success_at: float | None  # wall time of the last pass that succeeded
    last_error: str | None  # error of the last pass if it failed, else None
    last_error_at: float | None
    totals: SyncPassResult  # everything this worker did since it started

    @property
    def backlog(self) -> int:
        """Total unsynced entries over all shards."""
        return sum(self.backlog_per_shard.values())
