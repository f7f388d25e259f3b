"""One org's usage statistics and forecast (``GET /stats``), read from the daily rollups.

Aggregates come from the daily rollups, never from scanning ``ai_token_usage_log``: the
sync job maintains ``usage_daily_feature`` (org, day, feature) and ``usage_daily_user``
(org, day, user) in one statement (tables of migration 0002; triggers kept them until 0010;
the finer ``usage_daily``, which nothing here reads, is a view of the ledger since 0015).
A window of one org is then
an index scan of at most days x features plus days x users rows, whatever its request
volume or its number of features x users (the sums are read from the heap: migration
0014 took them out of the keys so that the sync job's increments are HOT updates).
Usage by model (requests whose cost came from the call, contract A8) is read from
``usage_daily_model`` (org, day, model; migration 0006, kept by the sync job in the same
transaction too): at most days x models rows.

"Today" is the gate's clock (UTC), so stats agree with the balances' periods in tests and
simulations too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from gateway.core.balances import Balance
from gateway.core.timefmt import iso_ms, utc_date
from gateway.ledger.org_scope import org_reader
from gateway.ledger.usage_groups import Group, group_usage
from gateway.ledger.usage_items import by_model, model_item, usage_item

if TYPE_CHECKING:
    from gateway.ledger.org_scope import Conn

__all__ = ["BURN_DAYS", "TOP_USERS", "forecast", "org_stats", "org_usage"]

BURN_DAYS = 7  # the "recent" in the forecast's recent burn rate
TOP_USERS = 50

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
            by_user.append(usage_item("user_id", r["user_id"] or None, r["requests"], r["tokens"]))
            continue
        if part == 2:
            models.append(model_item(r["feature"], r))
            continue
        day, requests, tokens = r["day"], int(r["requests"]), int(r["tokens"])
        if day >= burn_start:
            burn[r["token_type"]] = burn.get(r["token_type"], 0) + tokens
        if day >= start:
            for acc in (features.setdefault(r["feature"], [0, 0]), days.setdefault(day, [0, 0])):
                acc[0] += requests
                acc[1] += tokens
    by_feature = [usage_item("feature", f, n, t) for f, (n, t) in features.items() if n]
    by_feature.sort(key=lambda i: (-i["tokens"], -i["requests"], i["feature"]))
    by_day = []
    for n in range((end - start).days + 1):
        day = start + timedelta(days=n)
        requests, tokens = days.get(day, (0, 0))
        by_day.append(usage_item("day", day.isoformat(), requests, tokens))
    return {
        "by_feature": by_feature,
        "by_user": by_user,
        "by_day": by_day,
        "by_model": by_model(models),
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
