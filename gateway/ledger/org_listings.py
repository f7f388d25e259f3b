"""Listings of every org (``GET /admin/orgs``, contract A12): each org's usage over its
own current period, the top spenders or a page in id order.

The rollups are per UTC day, so an org's period is read from the UTC day its first
instant falls on (local midnight in the config's period.timezone) to today (UTC): whole
days, as the calendar listing always was. Without per-org periods every org shares the
calendar's period and the queries take one window ($3/$4 below); with them, each org's
first day is computed in SQL from organizations.period_anchor_day/_since and the 31
possible anchored starts (gateway.core.anchors.anchor_day_starts), so there is still no
round trip per org. An org without a row in organizations (usage only) or without an
anchor has the calendar's period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from gateway.core.anchors import Calendar, anchor_day_starts, local_date, org_period
from gateway.core.timefmt import utc_date

__all__ = ["OrgPeriods", "orgs_by_id", "top_spenders"]

_SPEND = """
WITH spend AS (
    SELECT organization_id, sum(tokens) AS tokens, sum(requests) AS requests
    FROM usage_daily_feature WHERE day >= $1 AND day <= $2 GROUP BY organization_id
    ORDER BY tokens DESC, organization_id LIMIT $3
)
SELECT s.organization_id AS org, o.plan, s.tokens, s.requests, $1::date AS start
FROM spend s LEFT JOIN organizations o ON o.id = s.organization_id
ORDER BY s.tokens DESC, s.organization_id
"""

_ORGS_BY_ID = """
WITH page AS (
    SELECT id, plan FROM organizations WHERE id > $1 ORDER BY id LIMIT $2
)
SELECT p.id AS org, p.plan, $3::date AS start,
       coalesce(sum(d.tokens), 0) AS tokens, coalesce(sum(d.requests), 0) AS requests
FROM page p LEFT JOIN usage_daily_feature d
    ON d.organization_id = p.id AND d.day >= $3 AND d.day <= $4
GROUP BY p.id, p.plan ORDER BY p.id
"""


def _org_starts(source: str) -> str:
    """SELECT id, plan, start (the UTC day the org's current period starts) FROM
    ``source`` (rows of organizations). Parameters: $4 the calendar's first UTC day, $5
    the local first day per anchor day 1..31, $6 today's local date, $7 the time zone."""
    return f"""
    SELECT o.id, o.plan,
           CASE WHEN o.period_anchor_day IS NULL THEN $4::date
                ELSE ((CASE WHEN o.period_anchor_since > a.start
                             AND o.period_anchor_since <= $6::date
                            THEN o.period_anchor_since ELSE a.start END)::timestamp
                      AT TIME ZONE $7::text AT TIME ZONE 'UTC')::date
           END AS start
    FROM {source} o
    LEFT JOIN unnest($5::date[]) WITH ORDINALITY AS a(start, day)
        ON a.day = o.period_anchor_day
    """


# $1 the earliest first day of any org, $2 today (UTC), $3 the limit; $4.. _org_starts'.
_SPEND_PER_ORG = f"""
WITH starts AS ({_org_starts("organizations")}),
spend AS (
    SELECT d.organization_id, sum(d.tokens) AS tokens, sum(d.requests) AS requests,
           coalesce(min(s.start), $4::date) AS start
    FROM usage_daily_feature d LEFT JOIN starts s ON s.id = d.organization_id
    WHERE d.day >= $1 AND d.day <= $2 AND d.day >= coalesce(s.start, $4::date)
    GROUP BY d.organization_id ORDER BY tokens DESC, d.organization_id LIMIT $3
)
SELECT sp.organization_id AS org, o.plan, sp.tokens, sp.requests, sp.start
FROM spend sp LEFT JOIN organizations o ON o.id = sp.organization_id
ORDER BY sp.tokens DESC, sp.organization_id
"""

# $1 after, $2 the limit, $3 today (UTC); $4.. _org_starts'.
_ORGS_BY_ID_PER_ORG = f"""
WITH page AS (
    SELECT id, plan, period_anchor_day, period_anchor_since FROM organizations
    WHERE id > $1 ORDER BY id LIMIT $2
), starts AS ({_org_starts("page")})
SELECT p.id AS org, p.plan, p.start,
       coalesce(sum(d.tokens), 0) AS tokens, coalesce(sum(d.requests), 0) AS requests
FROM starts p LEFT JOIN usage_daily_feature d
    ON d.organization_id = p.id AND d.day >= p.start AND d.day <= $3
GROUP BY p.id, p.plan, p.start ORDER BY p.id
"""


@dataclass(frozen=True, slots=True)
class OrgPeriods:
    """Where every org's current period starts, for the listings of every org.

    ``start`` is the UTC day the calendar's period starts (every org's, without per-org
    periods); ``today`` the UTC day now. With per-org periods (``anchor_starts`` not
    None) an anchored org's period starts on ``anchor_starts[day - 1]`` (a local date),
    or on its anchor's ``since`` when that is later and not after ``today_local``.
    """

    start: date
    today: date
    anchor_starts: tuple[date, ...] | None = None
    today_local: date | None = None
    timezone: str = "UTC"

    @classmethod
    def at(cls, cal: Calendar, now_ms: int) -> OrgPeriods:
        """The periods of the config's calendar ``cal`` at ``now_ms``."""
        first, _, _ = org_period(cal, "", now_ms)
        start, today = utc_date(first), utc_date(now_ms)
        if not cal.anchored:
            return cls(start, today)
        zone = cal.zone
        return cls(
            start, today, anchor_day_starts(cal, now_ms), local_date(now_ms, zone), cal.timezone
        )

    def _utc_day(self, local: date) -> date:
        midnight = datetime(local.year, local.month, local.day, tzinfo=ZoneInfo(self.timezone))
        return midnight.astimezone(UTC).date()

    @property
    def earliest(self) -> date:
        """The first day any org's period can start on (a since is never earlier)."""
        if self.anchor_starts is None:
            return self.start
        return min(self.start, *(self._utc_day(d) for d in self.anchor_starts))

    def args(self) -> tuple[object, ...]:
        """$4.. of the per-org queries."""
        return (self.start, list(self.anchor_starts or ()), self.today_local, self.timezone)


def _org_item(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "org": r["org"], "plan": r["plan"],
        "tokens": int(r["tokens"]), "requests": int(r["requests"]),
        "from": r["start"].isoformat(),
    }  # fmt: skip


async def top_spenders(pool: asyncpg.Pool, periods: OrgPeriods, limit: int) -> list[dict[str, Any]]:
    """The orgs that used the most tokens over their own current period (``from`` of each:
    its first day) up to today, most first."""
    if periods.anchor_starts is None:
        rows = await pool.fetch(_SPEND, periods.start, periods.today, limit)
    else:
        rows = await pool.fetch(
            _SPEND_PER_ORG, periods.earliest, periods.today, limit, *periods.args()
        )
    return [_org_item(r) for r in rows]


async def orgs_by_id(
    pool: asyncpg.Pool, after: str, limit: int, periods: OrgPeriods
) -> list[dict[str, Any]]:
    """Orgs in id order after ``after``, with their usage over their own current period."""
    if periods.anchor_starts is None:
        rows = await pool.fetch(_ORGS_BY_ID, after, limit, periods.start, periods.today)
    else:
        rows = await pool.fetch(_ORGS_BY_ID_PER_ORG, after, limit, periods.today, *periods.args())
    return [_org_item(r) for r in rows]
