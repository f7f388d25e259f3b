"""Usage statistics and the audit trail, read from Postgres for the token and admin APIs.

Aggregates come from the daily rollups, never from scanning ``ai_token_usage_log``: the
sync job maintains ``usage_daily`` (org, day, feature, user) and, in the same statement,
``usage_daily_feature`` (org, day, feature) and ``usage_daily_user`` (org, day, user)
(tables of migration 0002; triggers kept them until 0010). A window of one org is then
an index scan of at most days x features plus days x users rows, whatever its request
volume or its number of features x users (the sums are read from the heap: migration
0014 took them out of the keys so that the sync job's increments are HOT updates).
Usage by model (requests whose cost came from the call, contract A8) is read from
``usage_daily_model`` (org, day, model; migration 0006, kept by the sync job in the same
transaction too): at most days x models rows. The log itself is only read a page at a
time, newest first, by keyset over ``(created_at, id)`` (the
``usage_log_org_created`` index, one per monthly partition since 0010: the newest months
are read first and older ones only as far as the page needs).

Reads acting for one org run in a read-only transaction that sets ``creditgate.org_id``
(row-level security applies when the gateway connects as a restricted role) and every
query also filters by organization, so isolation never depends on the role alone.

"Today" is the gate's clock (UTC), so stats agree with the balances' periods in tests and
simulations too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.core.anchors import Calendar, anchor_day_starts, local_date, org_period
from gateway.core.balances import Balance
from gateway.core.timefmt import iso, iso_ms, utc_date
from gateway.ledger.usage_groups import Group, group_usage

if TYPE_CHECKING:
    # A connection taken from the store's pool (generic only in the stubs).
    Conn = PoolConnectionProxy[asyncpg.Record]

BURN_DAYS = 7  # the "recent" in the forecast's recent burn rate
TOP_USERS = 50

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@asynccontextmanager
async def org_reader(pool: asyncpg.Pool, org: str) -> AsyncIterator[Conn]:
    """A read-only transaction scoped to ``org`` (``SET LOCAL creditgate.org_id``)."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('creditgate.org_id', $1, true)", org)
        yield conn


# -- one org's usage -------------------------------------------------------------------

# One round trip: the org's (day, feature) rows, from which by_day, by_feature and the
# burn are summed in Python (at most days x features rows), its top users, and its usage
# per model over the window. ``part``: 0 feature, 1 user, 2 model (in the feature column).
_ORG_USAGE = """
(SELECT 0 AS part, day, feature, token_type, NULL::text AS user_id, requests, tokens,
        0::bigint AS input_tokens, 0::bigint AS cached_input_tokens,
        0::bigint AS output_tokens, 0::bigint AS reasoning_tokens, 0::bigint AS overage,
        0::bigint AS usage_missing
 FROM usage_daily_feature
 WHERE organization_id = $1 AND day >= least($2::date, $4::date) AND day <= $3)
UNION ALL
(SELECT 1, NULL, NULL, NULL, user_id, sum(requests), sum(tokens), 0, 0, 0, 0, 0, 0
 FROM usage_daily_user
 WHERE organization_id = $1 AND day >= $2 AND day <= $3
 GROUP BY user_id HAVING sum(requests) > 0
 ORDER BY 7 DESC, 6 DESC, 5 LIMIT $5)
UNION ALL
(SELECT 2, NULL, model, NULL, NULL, sum(requests), sum(tokens), sum(input_tokens),
        sum(cached_input_tokens), sum(output_tokens), sum(reasoning_tokens), sum(overage),
        sum(usage_missing)
 FROM usage_daily_model
 WHERE organization_id = $1 AND day >= $2 AND day <= $3
 GROUP BY model)
"""

# The sums of a usage_daily_model row (or of a group of them), in model-item order.
_MODEL_SUMS = (
    "requests", "tokens", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens", "overage", "usage_missing",
)  # fmt: skip


def _usage_item(key: str, value: Any, requests: int, tokens: int) -> dict[str, Any]:
    return {key: value, "requests": int(requests), "tokens": int(tokens)}


def _model_item(model: str, r: asyncpg.Record) -> dict[str, Any]:
    """One model's usage (``r`` has the sums); ``model`` None for requests that reported
    none (``''`` in the rollup)."""
    item: dict[str, Any] = {"model": model or None}
    for name in _MODEL_SUMS:
        item["usage_missing_requests" if name == "usage_missing" else name] = int(r[name])
    return item


def _by_model(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [i for i in items if i["requests"]]
    items.sort(key=lambda i: (-i["tokens"], -i["requests"], i["model"] or ""))
    return items


async def org_usage(
    conn: Conn, org: str, start: date, end: date, burn_start: date
) -> dict[str, Any]:
    """The org's usage over [start, end] by feature, user, day and model, the overage, and
    tokens per bucket since ``burn_start`` (for the forecast), in one pass over its
    rollups."""
    rows = await conn.fetch(_ORG_USAGE, org, start, end, burn_start, TOP_USERS)
    features: dict[str, list[int]] = {}
    days: dict[date, list[int]] = {}
    burn: dict[str, int] = {}
    by_user: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for r in rows:
        part = r["part"]
        if part == 1:
            by_user.append(_usage_item("user_id", r["user_id"] or None, r["requests"], r["tokens"]))
            continue
        if part == 2:
            models.append(_model_item(r["feature"], r))
            continue
        day, requests, tokens = r["day"], int(r["requests"]), int(r["tokens"])
        if day >= burn_start:
            burn[r["token_type"]] = burn.get(r["token_type"], 0) + tokens
        if day >= start:
            for acc in (features.setdefault(r["feature"], [0, 0]), days.setdefault(day, [0, 0])):
                acc[0] += requests
                acc[1] += tokens
    by_feature = [_usage_item("feature", f, n, t) for f, (n, t) in features.items() if n]
    by_feature.sort(key=lambda i: (-i["tokens"], -i["requests"], i["feature"]))
    by_day = []
    for n in range((end - start).days + 1):
        day = start + timedelta(days=n)
        requests, tokens = days.get(day, (0, 0))
        by_day.append(_usage_item("day", day.isoformat(), requests, tokens))
    return {
        "by_feature": by_feature,
        "by_user": by_user,
        "by_day": by_day,
        "by_model": _by_model(models),
        "overage": sum(m["overage"] for m in models),
        "burn": burn,
    }


def forecast(
    balance: Balance, burn: dict[str, int], now_ms: int, today: date
) -> dict[str, dict[str, Any]]:
    """Per bucket: daily burn (last BURN_DAYS days), days until empty, and whether that
    comes before the period's refresh. ``days_left`` is null when nothing is burning."""
    out: dict[str, dict[str, Any]] = {}
    for name, b in balance.buckets.items():
        rate = max(0, burn.get(name, 0)) / BURN_DAYS
        days_left = None if rate <= 0 else round(b.available / rate, 1)
        empty_on = None
        before_refresh = False
        if days_left is not None:
            empty_on = (today + timedelta(days=int(days_left))).isoformat()
            before_refresh = now_ms + days_left * 86_400_000 < balance.period_end_ms
        out[name] = {
            "available": b.available,
            "burn_per_day": round(rate, 2),
            "days_left": days_left,
            "empty_on": empty_on,
            "empties_before_refresh": before_refresh,
        }
    return out


async def org_stats(
    pool: asyncpg.Pool,
    org: str,
    balance_of: Awaitable[Balance],
    now_ms: int,
    days: int = 30,
    group: Group | None = None,
) -> dict[str, Any]:
    """``GET /stats``: usage over the last ``days`` days (today included) by feature, user,
    day and model, the overage, and the forecast (the library's ``stats``; the seed's
    getTokenStats). ``balance_of`` reads the org's
    balance (from Redis) while the ledger is queried; ``now_ms`` is the caller's clock.
    ``group`` (team or user, contract A10) adds ``by_group``, read from the log in the
    same read-only transaction (gateway.ledger.usage_groups)."""
    today = utc_date(now_ms)
    start = today - timedelta(days=days - 1)
    burn_start = today - timedelta(days=BURN_DAYS - 1)

    async def read_usage() -> dict[str, Any]:
        async with org_reader(pool, org) as conn:
            found = await org_usage(conn, org, start, today, burn_start)
            if group is not None:
                found["by_group"] = await group_usage(conn, org, group, start, today)
            return found

    # Redis and Postgres at the same time: neither waits for the other.
    balance, usage = await asyncio.gather(balance_of, read_usage())
    burn = usage.pop("burn")
    return {
        "org": org,
        "days": days,
        "from": start.isoformat(),
        "to": today.isoformat(),
        "period": balance.period,
        "refresh_at": iso_ms(balance.period_end_ms),
        **usage,
        "forecast": forecast(balance, burn, now_ms, today),
        "group": group,
    }


# -- the audit trail -------------------------------------------------------------------

_LOG_COLUMNS = (
    "id, event_id, created_at, kind, feature_used, token_type, user_id, tokens_deducted,"
    " balance_after, extra_after, request_id, method, route, upstream_status, latency_ms,"
    " plan, reference, model, input_tokens, cached_input_tokens, output_tokens,"
    " reasoning_tokens, reserved, overage, cost_source, usage_missing"
)
# Kinds of the rows a request leaves; only these have an actual charge.
_REQUEST_KINDS = frozenset({"charge", "refund", "expired_hold"})


def encode_cursor(created_at: datetime, row_id: int) -> str:
    """An opaque cursor for the row after which the next page starts."""
    micros = (created_at - _EPOCH) // _US
    raw = f"{micros}.{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (created_at, id) of a cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros_s, _, id_s = raw.partition(".")
        if not micros_s.lstrip("-").isdigit() or not id_s.isdigit():
            raise ValueError(cursor)
        when = _EPOCH + int(micros_s) * _US
        row_id = int(id_s)
    except (binascii.Error, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(cursor) from exc
    if row_id > 2**63 - 1:
        raise ValueError(cursor)
    return when, row_id


def _log_item(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "event_id": r["event_id"],
        "created_at": iso(r["created_at"]),
        "kind": r["kind"],
        "feature": r["feature_used"],
        "bucket": r["token_type"],
        "user_id": r["user_id"],
        "tokens": r["tokens_deducted"],
        "balance_after": r["balance_after"],
        "extra_after": r["extra_after"],
        "request_id": r["request_id"],
        "method": r["method"] or None,
        "route": r["route"] or None,
        "upstream_status": r["upstream_status"],
        "latency_ms": r["latency_ms"],
        "plan": r["plan"] or None,
        "reference": r["reference"] or None,
        # What the call cost (migration 0006): NULL for fixed-cost and older rows.
        "model": r["model"],
        "input_tokens": r["input_tokens"],
        "cached_input_tokens": r["cached_input_tokens"],
        "output_tokens": r["output_tokens"],
        "reasoning_tokens": r["reasoning_tokens"],
        "reserved": r["reserved"],
        "charged": r["tokens_deducted"] + r["overage"] if r["kind"] in _REQUEST_KINDS else None,
        "overage": r["overage"],
        "cost_source": r["cost_source"],
        "usage_missing": r["usage_missing"],
    }


async def usage_page(
    pool: asyncpg.Pool, org: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the org's audit rows, newest first, and the cursor of the next page
    (None on the last). ValueError for a cursor that is not one of ours."""
    after = decode_cursor(cursor) if cursor else None
    async with org_reader(pool, org) as conn:
        if after is None:
            rows = await conn.fetch(
                f"SELECT {_LOG_COLUMNS} FROM ai_token_usage_log WHERE organization_id = $1"
                " ORDER BY created_at DESC, id DESC LIMIT $2",
                org, limit + 1,
            )  # fmt: skip
        else:
            rows = await conn.fetch(
                f"SELECT {_LOG_COLUMNS} FROM ai_token_usage_log WHERE organization_id = $1"
                " AND (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $4",
                org, after[0], after[1], limit + 1,
            )  # fmt: skip
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return [_log_item(r) for r in rows], next_cursor


# -- every org (admin) -----------------------------------------------------------------

# Listings of every org (contract A12): each org's usage over its own current period.
#
# The rollups are per UTC day, so an org's period is read from the UTC day its first
# instant falls on (local midnight in the config's period.timezone) to today (UTC): whole
# days, as the calendar listing always was. Without per-org periods every org shares the
# calendar's period and the queries take one window ($3/$4 below); with them, each org's
# first day is computed in SQL from organizations.period_anchor_day/_since and the 31
# possible anchored starts (gateway.core.anchors.anchor_day_starts), so there is still no
# round trip per org. An org without a row in organizations (usage only) or without an
# anchor has the calendar's period.

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


_PERIOD_OVERAGE = """
SELECT token_type, sum(overage) AS overage FROM ai_token_usage_log
WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3 AND overage > 0
GROUP BY token_type
"""


async def period_overage(
    pool: asyncpg.Pool, org: str, start: datetime, end: datetime
) -> dict[str, int]:
    """``org``'s overage per bucket over [start, end) (its period): the tokens its calls
    cost beyond what the balances could cover, from the audit rows (so as of the sync
    lag). Buckets without any are left out. Reads only the rows with overage, through the
    partial index ``usage_log_overage`` (migration 0011)."""
    async with org_reader(pool, org) as conn:
        rows = await conn.fetch(_PERIOD_OVERAGE, org, start, end)
    return {r["token_type"]: int(r["overage"]) for r in rows}


async def window_usage(pool: asyncpg.Pool, start: date, end: date, limit: int) -> dict[str, Any]:
    """Usage of every org over [start, end]: by feature, by day, the top orgs and the top
    users (each user's share of their org's tokens: the per-user contribution), the top
    models and the overage of all of them."""
    window = "FROM usage_daily_feature WHERE day >= $1 AND day <= $2"
    user_window = "FROM usage_daily_user WHERE day >= $1 AND day <= $2"
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        features = await conn.fetch(
            f"SELECT feature, sum(requests) AS requests, sum(tokens) AS tokens {window}"
            " GROUP BY feature ORDER BY tokens DESC, feature", start, end,
        )  # fmt: skip
        days = await conn.fetch(
            f"SELECT day, sum(requests) AS requests, sum(tokens) AS tokens {window}"
            " GROUP BY day", start, end,
        )  # fmt: skip
        orgs = await conn.fetch(
            f"SELECT organization_id, sum(requests) AS requests, sum(tokens) AS tokens {window}"
            " GROUP BY organization_id ORDER BY tokens DESC, organization_id LIMIT $3",
            start, end, limit,
        )  # fmt: skip
        users = await conn.fetch(
            "WITH u AS (SELECT organization_id, user_id, sum(requests) AS requests,"
            f" sum(tokens) AS tokens {user_window} GROUP BY organization_id, user_id)"
            " SELECT *, sum(tokens) OVER (PARTITION BY organization_id) AS org_tokens FROM u"
            " ORDER BY tokens DESC, organization_id, user_id LIMIT $3",
            start, end, limit,
        )  # fmt: skip
        active = await conn.fetchval(f"SELECT count(DISTINCT organization_id) {window}", start, end)
        sums = ", ".join(f"sum({c}) AS {c}" for c in _MODEL_SUMS)
        models = await conn.fetch(
            f"WITH m AS (SELECT model, {sums} FROM usage_daily_model"
            " WHERE day >= $1 AND day <= $2 GROUP BY model)"
            " SELECT *, sum(overage) OVER () AS all_overage FROM m"
            " ORDER BY tokens DESC, requests DESC, model LIMIT $3",
            start, end, limit,
        )  # fmt: skip
    by_day = {r["day"]: r for r in days}
    day_items = []
    for n in range((end - start).days + 1):
        day = start + timedelta(days=n)
        r = by_day.get(day)
        day_items.append({
            "day": day.isoformat(),
            "requests": int(r["requests"]) if r else 0,
            "tokens": int(r["tokens"]) if r else 0,
        })  # fmt: skip
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "totals": {
            "requests": sum(d["requests"] for d in day_items),
            "tokens": sum(d["tokens"] for d in day_items),
            "orgs": int(active or 0),
        },
        "by_feature": [
            _usage_item("feature", r["feature"], r["requests"], r["tokens"]) for r in features
        ],
        "by_day": day_items,
        "by_org": [
            _usage_item("org", r["organization_id"], r["requests"], r["tokens"]) for r in orgs
        ],
        "by_user": [
            {
                "org": r["organization_id"],
                "user_id": r["user_id"] or None,
                "requests": int(r["requests"]),
                "tokens": int(r["tokens"]),
                "share": round(int(r["tokens"]) / int(r["org_tokens"]), 4)
                if int(r["org_tokens"]) > 0
                else 0.0,
            }
            for r in users
        ],
        "by_model": _by_model([_model_item(r["model"], r) for r in models]),
        "overage": int(models[0]["all_overage"]) if models else 0,
    }
