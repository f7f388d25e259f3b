"""Outbox retention: delivered and failed alert events older than ``alerts.retention_days``
are deleted (their attempts with them: ``ON DELETE CASCADE``), so the outbox, the admin
API's delivery list and the deliverer's tables stay the size of the window.

Run by the deliverer's loop at most every :data:`PRUNE_EVERY_S` (and by every
``creditgate deliver --once`` pass, which a cron job may run), in batches of
:data:`BATCH`, each its own short transaction, so pruning never holds locks for long.

An event is deleted only once its period has ended: the outbox's unique key (org, level,
scope, bucket, period, kind, threshold, generation) is what keeps an alert from firing
twice in its period (a refund that dips under a threshold and crosses it again, the next
forecast sweep), so a row of a period still running must stay whatever its age. The
period's end comes from its id (:func:`gateway.core.anchors.period_end`, read in UTC with a
day's margin for the config's time zone, which is within 14 hours of UTC); an id that
cannot be read is kept. The delivered/failed counters of /metrics are kept apart
(``alert_delivery_totals``, migration 0012), so deleting rows never makes them go down.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from gateway.core.anchors import period_end

__all__ = ["BATCH", "PRUNE_EVERY_S", "prune_outbox"]

PRUNE_EVERY_S = 3600.0
BATCH = 5000
# Periods are ids of local dates: their end in UTC can be up to 14 h later.
_ZONE_MARGIN = timedelta(days=1)

_OLD_PERIODS = """
SELECT DISTINCT period FROM alert_events
WHERE status <> 'pending' AND created_at < $1
"""

_DELETE = """
DELETE FROM alert_events WHERE id IN (
    SELECT id FROM alert_events
    WHERE status <> 'pending' AND created_at < $1 AND period = ANY($2::text[])
    LIMIT $3
)
"""


async def prune_outbox(
    pool: asyncpg.Pool, keep: timedelta, now: datetime, *, batch: int = BATCH
) -> int:
    """Delete delivered and failed events created before ``now - keep`` whose period
    ended; returns how many were deleted."""
    cutoff = now - keep
    periods = [r["period"] for r in await pool.fetch(_OLD_PERIODS, cutoff)]
    ended = [p for p in periods if (end := period_end(p)) is not None and end + _ZONE_MARGIN <= now]
    if not ended:
        return 0
    deleted = 0
    while True:
        status = await pool.execute(_DELETE, cutoff, ended, batch)
        n = int(status.split()[-1])  # "DELETE <n>"
        deleted += n
        if n < batch:
            return deleted
