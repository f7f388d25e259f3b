"""Threshold, depleted and recovered alerts written by the sync job (real Redis, Postgres)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import asyncpg

from gateway.alerts.evaluation import AlertDefaults
from gateway.core.redis_keys import KeySpace
from tests.support.alert_sim import Bucket
from tests.support.pg import requires_postgres
from tests.sync.test_sync import worker, xadd_all

pytestmark = requires_postgres

DEFAULTS = AlertDefaults(pct=(Decimal(80), Decimal(100)), abs=(), has_url=True, forecast=False)


async def fired(pool: asyncpg.Pool, org: str | None = None) -> list[tuple[Any, ...]]:
    """(kind, threshold, period, generation) of the outbox, oldest first."""
    rows = await pool.fetch(
        "SELECT kind, threshold, period, generation FROM alert_events"
        " WHERE $1::text IS NULL OR organization_id = $1 ORDER BY created_at, kind, threshold",
        org,
    )
    return [tuple(r) for r in rows]


async def sync(redis: Any, pool: asyncpg.Pool, ks: KeySpace, events: list[dict[str, str]],
               alerts: AlertDefaults | None = DEFAULTS) -> int:  # fmt: skip
    await xadd_all(redis, ks, events)
    w = worker(redis, pool, ks, alerts=alerts)
    result = await w.run_once()
    return result.alerts


async def test_crossing_80_fires_once_and_a_topup_or_reset_rearms(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    b = Bucket("acme")
    assert await sync(redis, pool, keyspace, [b.reset(100), *[b.charge(10) for _ in range(7)]]) == 0
    assert await fired(pool) == []  # 70%: nothing

    assert await sync(redis, pool, keyspace, [b.charge(5), b.charge(5)]) == 1  # 80%
    assert await fired(pool) == [("threshold_crossed", "80%", "2026-11", 1)]
    row = await pool.fetchrow("SELECT id, payload FROM alert_events")
    payload = json.loads(row["payload"])
    assert payload == {
        "id": row["id"], "type": "balance.threshold_crossed",
        "created_at": payload["created_at"],
        "data": {
            "org": "acme", "level": "org", "bucket": "lead_generation", "threshold": 80,
            "threshold_unit": "percent", "used": 80, "allocated": 100, "remaining": 20,
            "period": "2026-11", "refresh_at": "2026-12-01T00:00:00Z",
        },
    }  # fmt: skip
    assert row["id"].startswith("msg_")

    # Under 80% again (a repair gives tokens back) and over it again: no second alert.
    assert await sync(redis, pool, keyspace, [b.refund(5), b.charge(5)]) == 0

    # Depleted: 100% and depleted, once each.
    assert await sync(redis, pool, keyspace, [b.charge(10), b.charge(10)]) == 2
    kinds = [(k, t) for k, t, _, _ in await fired(pool)]
    assert kinds == [("threshold_crossed", "80%"), ("depleted", ""), ("threshold_crossed", "100%")]

    # A top-up re-arms: recovered (used 100 of 150 is under 80%), then 80% fires again.
    grant = b.grant(50)
    assert await sync(redis, pool, keyspace, [grant]) == 1
    gen = int(grant["s"])
    assert (await fired(pool))[-1] == ("recovered", "", "2026-11", gen)
    assert await sync(redis, pool, keyspace, [b.charge(20)]) == 1  # 120 of 150
    assert (await fired(pool))[-1] == ("threshold_crossed", "80%", "2026-11", gen)

    # A reset starts a new period: recovered there, and everything is armed again.
    reset = b.reset(100, "2026-12")
    # (30 purchased tokens survive it: used 80 of 130 stays under 80%.)
    assert await sync(redis, pool, keyspace, [reset, *[b.charge(10) for _ in range(8)]]) == 1
    assert (await fired(pool))[-1] == ("recovered", "", "2026-12", int(reset["s"]))
    assert await sync(redis, pool, keyspace, [b.charge(10) for _ in range(3)]) == 1
    assert (await fired(pool))[-1] == ("threshold_crossed", "80%", "2026-12", int(reset["s"]))
    assert len(await fired(pool)) == 7


async def test_a_replayed_batch_and_two_workers_write_each_alert_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    events = []
    for n in range(30):
        b = Bucket(f"org{n}")
        events += [b.reset(100), *[b.charge(9) for _ in range(11)]]  # 99%
    await xadd_all(redis, keyspace, events)
    # Two workers on the same streams at once, then the whole batch again as new entries.
    w1 = worker(redis, pool, keyspace, alerts=DEFAULTS, batch_size=7)
    w2 = worker(redis, pool, keyspace, alerts=DEFAULTS, batch_size=7)
    await asyncio.gather(w1.run_once(), w2.run_once())
    assert await sync(redis, pool, keyspace, events) == 0
    rows = await fired(pool)
    assert len(rows) == 30
    assert {r[:2] for r in rows} == {("threshold_crossed", "80%")}


async def test_org_overrides_thresholds_in_tokens_and_no_url_means_no_alerts(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    for org in ("acme", "globex", "initech"):
        await pool.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'pro')", org)
    await pool.execute(
        "INSERT INTO alert_rules (organization_id, pct, abs) VALUES ('acme', '{50}', '{30}')"
    )
    await pool.execute(
        "INSERT INTO alert_rules (organization_id, webhook_url) VALUES ('initech', 'http://x')"
    )
    a, g, i = Bucket("acme"), Bucket("globex"), Bucket("initech")
    events = [a.reset(100), g.reset(100), i.reset(100)]
    events += [a.charge(20), g.charge(60), i.charge(85)]
    no_url = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=False, forecast=False)
    assert await sync(redis, pool, keyspace, events, no_url) == 1
    assert await fired(pool, "initech") == [("threshold_crossed", "80%", "2026-11", 1)]
    assert await fired(pool, "acme") == []  # no webhook_url anywhere: nothing recorded

    await pool.execute(
        "UPDATE alert_rules SET webhook_url = 'http://a' WHERE organization_id = 'acme'"
    )
    # Crossings are moves of the snapshot: acme's from 20 to 60 crosses 30 tokens and 50%.
    assert await sync(redis, pool, keyspace, [a.charge(40)], no_url) == 2
    assert sorted(await fired(pool, "acme")) == [
        ("threshold_crossed", "30", "2026-11", 1),
        ("threshold_crossed", "50%", "2026-11", 1),
    ]


async def test_alerts_off_writes_nothing(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    b = Bucket("acme")
    assert await sync(redis, pool, keyspace, [b.reset(10), b.charge(10)], alerts=None) == 0
    assert await fired(pool) == []
    assert await pool.fetchval("SELECT alert_arm FROM ai_tokens") == 0
