"""The outbox and the rules as the admin API and /metrics see them (contract A11).

Per-org rules (``PUT /admin/orgs/{org}/alerts``), deliveries with their attempts
(``GET /admin/webhooks/deliveries``), a resend (``POST .../{id}/resend``) and the counts
behind the ``creditgate_alert_*`` metrics. Every function takes a pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.config.alerts import AlertsConfig, Threshold, parse_threshold

__all__ = [
    "DeliveryCounts",
    "Unset",
    "delivery_counts",
    "get_rules",
    "list_deliveries",
    "put_rules",
    "resend",
]


class Unset:
    """A rule field the request did not give: left as it is."""


UNSET = Unset()

_PUT = """
INSERT INTO alert_rules AS r (organization_id, webhook_url, thresholds, pct, abs, forecast,
    levels)
VALUES ($1, $2, $3::jsonb, $4, $5, $6, $10)
ON CONFLICT (organization_id) DO UPDATE SET
    webhook_url = CASE WHEN $7 THEN EXCLUDED.webhook_url ELSE r.webhook_url END,
    thresholds = CASE WHEN $8 THEN EXCLUDED.thresholds ELSE r.thresholds END,
    pct = CASE WHEN $8 THEN EXCLUDED.pct ELSE r.pct END,
    abs = CASE WHEN $8 THEN EXCLUDED.abs ELSE r.abs END,
    forecast = CASE WHEN $9 THEN EXCLUDED.forecast ELSE r.forecast END,
    levels = CASE WHEN $11 THEN EXCLUDED.levels ELSE r.levels END,
    updated_at = now()
"""


async def put_rules(
    pool: asyncpg.Pool,
    org: str,
    *,
    webhook_url: str | Unset = UNSET,
    thresholds: list[Threshold] | Unset = UNSET,
    forecast: bool | Unset = UNSET,
    levels: list[str] | Unset | None = UNSET,
) -> None:
    """Override the given fields of ``org``'s rules (``webhook_url=""``, ``levels=None``:
    the default again). ``levels`` must already be checked (``levels_errors``).

    Naming a URL enables its endpoint again if it was disabled (the operator has looked)."""
    url = None if isinstance(webhook_url, Unset) or not webhook_url else webhook_url
    given = not isinstance(thresholds, Unset)
    parsed = [] if isinstance(thresholds, Unset) else thresholds
    shown = json.dumps([t.as_json() for t in parsed]) if given else None
    pct = [t.value for t in parsed if t.unit == "percent"] if given else None
    tokens = [int(t.value) for t in parsed if t.unit == "tokens"] if given else None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            _PUT, org, url, shown, pct, tokens,
            None if isinstance(forecast, Unset) else forecast,
            not isinstance(webhook_url, Unset), not isinstance(thresholds, Unset),
            not isinstance(forecast, Unset),
            None if isinstance(levels, Unset) else levels, not isinstance(levels, Unset),
        )  # fmt: skip
        if url is not None:
            await _enable(conn, url)


async def _enable(conn: Any, url: str) -> None:
    await conn.execute(
        "UPDATE alert_endpoints SET disabled_at = NULL, failing_since = NULL WHERE url = $1", url
    )


async def get_rules(pool: asyncpg.Pool, org: str, defaults: AlertsConfig) -> dict[str, Any]:
    """``org``'s effective rules, each with where it comes from, and its endpoint's state."""
    row = await pool.fetchrow(
        "SELECT webhook_url, thresholds, forecast, levels FROM alert_rules"
        " WHERE organization_id = $1",
        org,
    )
    url = (row and row["webhook_url"]) or defaults.webhook_url
    thresholds = (
        json.loads(row["thresholds"])
        if row is not None and row["thresholds"] is not None
        else [parse_threshold(t).as_json() for t in defaults.thresholds]
    )
    forecast = row["forecast"] if row is not None and row["forecast"] is not None else None
    levels = (
        list(row["levels"])
        if row is not None and row["levels"] is not None
        else list(defaults.levels)
    )
    endpoint = None
    if url:
        endpoint = await pool.fetchrow(
            "SELECT disabled_at, failing_since, last_success_at, last_error"
            " FROM alert_endpoints WHERE url = $1",
            url,
        )
    return {
        "org": org,
        "webhook_url": url,
        "thresholds": thresholds,
        "levels": levels,
        "forecast": defaults.forecast if forecast is None else forecast,
        "overrides": [
            k for k in ("forecast", "levels", "thresholds", "webhook_url")
            if row is not None and row[k] is not None
        ],
        "endpoint_disabled_at": endpoint and endpoint["disabled_at"],
        "endpoint_failing_since": endpoint and endpoint["failing_since"],
    }  # fmt: skip


_LIST = """
SELECT e.id, e.organization_id, e.level, e.token_type, e.period, e.kind, e.threshold,
    e.payload::text AS payload, e.created_at, e.status, e.attempts, e.next_attempt_at,
    e.delivered_at, e.last_error,
    coalesce((SELECT json_agg(json_build_object(
        'at', to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'url', a.url, 'outcome', a.outcome, 'response_code', a.response_code,
        'error', a.error, 'duration_ms', a.duration_ms) ORDER BY a.id)
        FROM alert_attempts a WHERE a.event_id = e.id), '[]')::text AS attempts_list
FROM alert_events e
WHERE ($1::text IS NULL OR e.organization_id = $1) AND ($2::text IS NULL OR e.status = $2)
ORDER BY e.created_at DESC, e.id DESC
LIMIT $3
"""


async def list_deliveries(
    pool: asyncpg.Pool, org: str | None, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest deliveries (of ``org``, in ``status``), each with its attempts."""
    rows = await pool.fetch(_LIST, org, status, limit)
    return [
        {
            "id": r["id"], "org": r["organization_id"], "level": r["level"],
            "bucket": r["token_type"], "period": r["period"], "type": f"balance.{r['kind']}",
            "threshold": r["threshold"] or None, "status": r["status"],
            "created_at": r["created_at"], "next_attempt_at": (
                r["next_attempt_at"] if r["status"] == "pending" else None
            ),
            "delivered_at": r["delivered_at"], "last_error": r["last_error"],
            "payload": json.loads(r["payload"]),
            "attempts": json.loads(r["attempts_list"]),
        }
        for r in rows
    ]  # fmt: skip


async def resend(pool: asyncpg.Pool, event_id: str, default_url: str | None) -> bool:
    """Queue ``event_id`` again (same webhook-id), with a fresh retry window; its endpoint
    is enabled again. False when there is no such delivery."""
    async with pool.acquire() as conn, conn.transaction():
        org = await conn.fetchval(
            "UPDATE alert_events SET status = 'pending', next_attempt_at = now(),"
            " retry_from = now(), delivered_at = NULL WHERE id = $1 RETURNING organization_id",
            event_id,
        )
        if org is None:
            return False
        url = await conn.fetchval(
            "SELECT webhook_url FROM alert_rules WHERE organization_id = $1", org
        )
        target = url or default_url
        if target:
            await _enable(conn, target)
        return True


@dataclass(frozen=True, slots=True)
class DeliveryCounts:
    """The outbox for /metrics: events pending and failed now (gauges), every event ever
    delivered or failed (counters: they only grow, retention included), and disabled
    endpoints."""

    pending: int
    failed: int
    delivered_total: int
    failed_total: int
    disabled_endpoints: int


# One statement, none of it proportional to the events delivered: pending and failed are
# ranges of the status index (the rows in that status only), the totals two rows kept by
# migration 0012's trigger, the disabled endpoints a scan of the (few) endpoints.
_COUNTS = """
SELECT (SELECT count(*) FROM alert_events WHERE status = 'pending'),
       (SELECT count(*) FROM alert_events WHERE status = 'failed'),
       coalesce((SELECT n FROM alert_delivery_totals WHERE status = 'delivered'), 0),
       coalesce((SELECT n FROM alert_delivery_totals WHERE status = 'failed'), 0),
       (SELECT count(*) FROM alert_endpoints WHERE disabled_at IS NOT NULL)
"""


async def delivery_counts(pool: asyncpg.Pool) -> DeliveryCounts:
    """The outbox's figures now (see :class:`DeliveryCounts`)."""
    row = await pool.fetchrow(_COUNTS)
    assert row is not None
    return DeliveryCounts(*(int(v) for v in row))
