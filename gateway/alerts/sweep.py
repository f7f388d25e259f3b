"""The forecast sweep: ``balance.forecast_exhaustion`` for buckets burning too fast.

It runs in the deliverer's loop every ``alerts.forecast_every_seconds``, not in the sync
job's batches: a forecast moves with time as much as with events (smoothed daily usage),
and reading a week of rollups per bucket per batch would cost the sync job's throughput.
It is set-based: one query for the candidates (forecast on, tokens left, period not over,
no forecast alert yet this period, some usage in the window), one for their daily usage,
the method of gateway/alerts/forecast.py in Python, one INSERT of those that fire. The
outbox key (generation 0) makes it once per (org, bucket, period) however many
deliverers sweep; a crash before the commit loses nothing (the next sweep finds it).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta

import asyncpg

from gateway.alerts.evaluation import AlertDefaults, payload_sql
from gateway.alerts.forecast import WINDOW_DAYS, burn_rate, projected_exhaustion

__all__ = ["forecast_sweep"]

_CANDIDATES = """
SELECT t.organization_id AS org, t.token_type AS bucket, t.balance + t.extra AS rem,
    t.used, t.total_allocated, t.period, t.refresh_date
FROM ai_tokens t
LEFT JOIN alert_rules r ON r.organization_id = t.organization_id
WHERE coalesce(r.forecast, $1::boolean) AND (r.webhook_url IS NOT NULL OR $2::boolean)
  AND t.balance + t.extra > 0 AND t.period <> '' AND t.refresh_date > $3
  AND EXISTS (SELECT 1 FROM usage_daily_feature f WHERE f.organization_id = t.organization_id
              AND f.day >= $4 AND f.token_type = t.token_type)
  AND NOT EXISTS (SELECT 1 FROM alert_events e WHERE e.organization_id = t.organization_id
      AND e.level = 'org' AND e.scope_id = '' AND e.token_type = t.token_type
      AND e.period = t.period AND e.kind = 'forecast_exhaustion' AND e.threshold = ''
      AND e.generation = 0)
"""

_DAILY = """
SELECT organization_id, token_type, day, sum(tokens)::bigint AS tokens
FROM usage_daily_feature
WHERE organization_id = ANY($1::text[]) AND day >= $2 AND day <= $3
GROUP BY 1, 2, 3
"""

_INSERT = f"""
WITH f AS (
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', '') AS id,
        'forecast_exhaustion' AS kind, x.*, NULL::numeric AS thr, NULL::text AS unit
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                $7::timestamptz[], $8::timestamptz[])
        AS x(org, bucket, period, used, total_allocated, rem, refresh_date, exhaustion)
)
INSERT INTO alert_events (id, organization_id, level, scope_id, token_type, period, kind,
    threshold, generation, payload)
SELECT f.id, f.org, 'org', '', f.bucket, f.period, f.kind, '', 0,
    {payload_sql(exhaustion="f.exhaustion")}
FROM f
ON CONFLICT (organization_id, level, scope_id, token_type, period, kind, threshold,
    generation) DO NOTHING
RETURNING 1
"""


async def forecast_sweep(pool: asyncpg.Pool, defaults: AlertDefaults, now: datetime) -> int:
    """Evaluate every candidate bucket at ``now`` (UTC); returns the alerts inserted."""
    today = now.date()
    since = today - timedelta(days=WINDOW_DAYS)
    async with pool.acquire() as conn:
        candidates = await conn.fetch(_CANDIDATES, defaults.forecast, defaults.has_url, now, since)
        if not candidates:
            return 0
        orgs = sorted({c["org"] for c in candidates})
        daily: dict[tuple[str, str], dict[date, int]] = defaultdict(dict)
        for row in await conn.fetch(_DAILY, orgs, since, today):
            daily[(row[0], row[1])][row[2]] = row[3]
        fire = []
        for c in candidates:
            rate = burn_rate(daily.get((c["org"], c["bucket"]), {}), now)
            when = projected_exhaustion(c["rem"], rate, now)
            if when is not None and when < c["refresh_date"]:
                fire.append((c, when))
        if not fire:
            return 0
        columns = ("org", "bucket", "period", "used", "total_allocated", "rem", "refresh_date")
        arrays = [[c[name] for c, _ in fire] for name in columns]
        inserted = await conn.fetch(_INSERT, *arrays, [when for _, when in fire])
        return len(inserted)
