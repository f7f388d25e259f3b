"""Usage of every org over a window of days (``GET /admin/usage``), from the daily
rollups (gateway.ledger.usage_stats says which) in one read-only transaction."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import asyncpg

from gateway.ledger.usage_items import MODEL_SUMS, by_model, model_item, usage_item

__all__ = ["window_usage"]


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
        sums = ", ".join(f"sum({c}) AS {c}" for c in MODEL_SUMS)
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
            usage_item("feature", r["feature"], r["requests"], r["tokens"]) for r in features
        ],
        "by_day": day_items,
        "by_org": [
            usage_item("org", r["organization_id"], r["requests"], r["tokens"]) for r in orgs
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
        "by_model": by_model([model_item(r["model"], r) for r in models]),
        "overage": int(models[0]["all_overage"]) if models else 0,
    }
