"""Threshold alerts of team, user and API-key caps (contracts A10, A11): a real gate on the
tests' Redis charges capped levels, real sync workers write the outbox in Postgres, and
the deliverer posts to a real HTTP receiver that verifies with ``standardwebhooks``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.alerts.deliverer import Deliverer
from gateway.alerts.deliveries import put_rules
from gateway.alerts.evaluation import AlertDefaults
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Actual
from sync.worker import SyncWorker
from tests.alerts.test_deliverer import free_port, settings
from tests.support.actual_costs import raw_events_of, sweep
from tests.support.caps import BUCKET, caps_gate, put
from tests.support.pg import requires_postgres
from tests.support.webhook_receiver import Receiver

pytestmark = requires_postgres

DEFAULTS = AlertDefaults(pct=(Decimal(80), Decimal(100)), abs=(), has_url=True, forecast=False)
DECEMBER_MS = int(datetime(2026, 12, 10, 12, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
async def gate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with caps_gate("redis", clock) as g:
        yield g


async def spend(gate: CreditGate, org: str, n: int, **who: Any) -> None:
    """``n`` requests of cost 3 admitted and settled as charges."""
    for _ in range(n):
        adm = await gate.meter.admit(org, BUCKET, **who)
        assert adm.ok, adm
        assert await gate.meter.settle(adm, ok=True, status=200, latency_ms=1) == 3


async def sync(
    redis: Any, pool: asyncpg.Pool, gate: CreditGate, alerts: AlertDefaults = DEFAULTS,
    workers: int = 1, batch_size: int = 64, group: str = "creditgate-sync",
) -> int:  # fmt: skip
    """Drain the gate's streams with ``workers`` sync workers running at once (consumer
    group ``group``); returns the alerts they wrote."""
    fired = 0
    while True:
        crew = [
            SyncWorker(
                redis=redis,
                pool=pool,
                keyspace=gate.keys,
                batch_size=batch_size,
                alerts=alerts,
                consumer=f"w{i}",
                group=group,
            )
            for i in range(workers)
        ]
        try:
            results = await asyncio.gather(*(w.run_once() for w in crew))
        finally:
            for w in crew:
                await w.close()
        fired += sum(r.alerts for r in results)
        if not any(r.read for r in results):
            return fired


async def outbox(pool: asyncpg.Pool, org: str | None = None) -> list[tuple[Any, ...]]:
    """(org, level, scope, period, threshold, generation) of each cap alert, sorted."""
    rows = await pool.fetch(
        "SELECT organization_id, level, scope_id, period, threshold, generation FROM"
        " alert_events WHERE level <> 'org' AND ($1::text IS NULL OR organization_id = $1)",
        org,
    )
    return sorted(tuple(r) for r in rows)


async def test_team_crossing_80_fires_one_signed_webhook_with_several_workers(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    for user in ("u1", "u2", "u3", "u4", "u5"):
        await put(gate, "acme", "user", user, team="red")
    # 7 requests of 3: 21 of 30 (70%): nothing yet.
    for i in range(7):
        await spend(gate, "acme", 1, user=f"u{i % 5 + 1}")
    assert await sync(redis, pool, gate, workers=3, batch_size=1) == 0
    # 24, 27 and 30 of 30: each event over 80%, each read by another of three workers
    # (batches of one), which commit one after the other: one alert.
    eighty = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=True, forecast=False)
    for i in range(3):
        await spend(gate, "acme", 1, user=f"u{i + 1}")
    assert await sync(redis, pool, gate, eighty, workers=3, batch_size=1) == 1
    assert await outbox(pool) == [("acme", "team", "red", "2026-11", "80%", 30)]

    row = await pool.fetchrow("SELECT id, payload FROM alert_events WHERE level = 'team'")
    receiver = Receiver(free_port(), settings("http://unused").webhook_secret, tmp_path / "log")
    await receiver.start()
    try:
        result = await Deliverer(pool, settings(receiver.url)).run_once()
        assert result.delivered == 1
        got = receiver.received()
        assert [(r["id"], r["verified"]) for r in got] == [(row["id"], True)]
        assert got[0]["payload"] == json.loads(row["payload"])
        data = got[0]["payload"]["data"]
        # The batch that fired it: whichever worker committed first (24, 27 or 30 used).
        used = data["used"]
        assert used in (24, 27, 30)
        assert data == {
            "org": "acme", "level": "team", "team": "red", "bucket": BUCKET,
            "threshold": 80, "threshold_unit": "percent", "cap": 30, "used": used,
            "allocated": 30, "remaining": 30 - used, "period": "2026-11",
            "refresh_at": "2026-12-01T00:00:00Z",
        }  # fmt: skip
        assert got[0]["payload"]["type"] == "balance.threshold_crossed"
    finally:
        await receiver.stop()


async def test_once_per_period_refunds_and_replays_do_not_refire_next_period_does(
    gate: CreditGate, clock: FixedClock, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    await spend(gate, "acme", 8, user="u1", team="red")  # 24 of 30
    stream = gate.keys.shard("acme").events
    crossing = await redis.xrange(stream)
    assert await sync(redis, pool, gate) == 1
    # A refunded request dips under 80% and the next crosses it again: no second alert.
    adm = await gate.meter.admit("acme", BUCKET, user="u1", team="red")
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    await spend(gate, "acme", 1, user="u1", team="red")
    assert await sync(redis, pool, gate, workers=2, batch_size=1) == 0
    # The crossing events delivered again (as after a crash before the ack).
    for _, fields in crossing:
        await redis.xadd(stream, fields)
    assert await sync(redis, pool, gate) == 0
    await spend(gate, "acme", 1, user="u1", team="red")  # 30 of 30: 100%
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [
        ("acme", "team", "red", "2026-11", "100%", 30),
        ("acme", "team", "red", "2026-11", "80%", 30),
    ]
    # The next period starts at 0: armed again, and 80% fires once more.
    clock.set(DECEMBER_MS)
    await spend(gate, "acme", 7, user="u1", team="red")  # 21 of 30
    assert await sync(redis, pool, gate) == 0
    await spend(gate, "acme", 1, user="u1", team="red")
    assert await sync(redis, pool, gate) == 1
    assert (await outbox(pool))[-1] == ("acme", "team", "red", "2026-12", "80%", 30)


async def test_user_and_key_caps_fire_with_their_own_ids(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "user", "ann", {BUCKET: 10})
    await put(gate, "acme", "key", "key_k", {BUCKET: "15%"})  # 15 of the 100 allocated
    await spend(gate, "acme", 3, user="ann", key_id="key_k")  # ann 9/10, key_k 9/15 (60%)
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [("acme", "user", "ann", "2026-11", "80%", 10)]
    await spend(gate, "acme", 1, user="bob", key_id="key_k")  # key_k 12/15
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [
        ("acme", "key", "key_k", "2026-11", "80%", 15),
        ("acme", "user", "ann", "2026-11", "80%", 10),
    ]
    data = json.loads(await pool.fetchval("SELECT payload FROM alert_events WHERE level = 'key'"))[
        "data"
    ]
    assert (data["level"], data["key"], data["cap"], data["used"], data["remaining"]) == (
        "key", "key_k", 15, 12, 3,
    )  # fmt: skip
    assert "user" not in data and "team" not in data


async def test_plan_default_caps_apply_to_levels_without_overrides(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("acme", "capped")  # user 30% of 100: 30
    await spend(gate, "acme", 8, user="zed")  # 24 of 30
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [("acme", "user", "zed", "2026-11", "80%", 30)]


async def test_a_raised_cap_rearms_its_percent_thresholds(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    await spend(gate, "acme", 8, team="red")  # 24 of 30
    assert await sync(redis, pool, gate) == 1
    await put(gate, "acme", "team", "red", {BUCKET: 60})
    await spend(gate, "acme", 1, team="red")  # 27 of 60: under 80% of the new cap
    assert await sync(redis, pool, gate) == 0
    await spend(gate, "acme", 7, team="red")  # 48 of 60
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [
        ("acme", "team", "red", "2026-11", "80%", 30),
        ("acme", "team", "red", "2026-11", "80%", 60),
    ]


async def test_an_org_without_caps_writes_no_level_figures_and_no_cap_alerts(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("plain", "teams")
    await put(gate, "plain", "team", "blue")  # a team, but no cap anywhere
    await spend(gate, "plain", 10, user="u1", team="blue", key_id="key_p")
    assert all("lv" not in e for e in await raw_events_of(gate, "plain"))
    assert await sync(redis, pool, gate) == 0
    assert await outbox(pool) == []
    # The ledger rows are as always: the team named, nothing else.
    teams = await pool.fetch(
        "SELECT DISTINCT team_id, reference FROM ai_token_usage_log WHERE kind = 'charge'"
    )
    assert [tuple(r) for r in teams] == [("blue", None)]


async def test_an_orgs_rule_never_evaluates_another_org(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    # No default URL: only an org with its own rule gets alerts. acme's rule says 50%.
    alerts = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=False, forecast=False)
    await pool.execute("INSERT INTO organizations (id, plan) VALUES ('acme', 'teams')")
    await pool.execute(
        "INSERT INTO alert_rules (organization_id, webhook_url, pct) VALUES"
        " ('acme', 'http://127.0.0.1:9/hook', '{50}')"
    )
    for org in ("acme", "other"):
        await gate.set_plan(org, "teams")
        await put(gate, org, "team", "red", {BUCKET: 30})
        await spend(gate, org, 9, team="red")  # 27 of 30: 90%
    assert await sync(redis, pool, gate, alerts) == 1
    assert await outbox(pool) == [("acme", "team", "red", "2026-11", "50%", 30)]
    # With a default URL, other gets the default threshold (80%), never acme's 50%.
    await spend(gate, "other", 1, team="red")
    default_url = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=True, forecast=False)
    assert await sync(redis, pool, gate, default_url) == 1
    assert await outbox(pool, "other") == [("other", "team", "red", "2026-11", "80%", 30)]


async def test_token_thresholds_and_levels_left_out_of_the_config(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    await put(gate, "acme", "user", "ann", {BUCKET: 30})
    # Only users are watched, at 12 tokens used.
    users_only = AlertDefaults(
        pct=(), abs=(12,), has_url=True, forecast=False, levels=frozenset({"user"})
    )
    await spend(gate, "acme", 4, user="ann", team="red")  # 12 each
    assert await sync(redis, pool, gate, users_only) == 1
    assert await outbox(pool) == [("acme", "user", "ann", "2026-11", "12", 0)]


async def test_an_orgs_levels_override_the_configs_and_null_returns_to_them(
    gate: CreditGate, redis: Any, pool: asyncpg.Pool
) -> None:
    for org in ("acme", "other", "solo"):
        await pool.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'teams')", org)
        await gate.set_plan(org, "teams")
        await put(gate, org, "team", "red", {BUCKET: 30})
    # acme watches its buckets only; other is on the config's levels (all).
    await put_rules(pool, "acme", levels=["org"])
    for org in ("acme", "other"):
        await spend(gate, org, 9, team="red")  # 27 of 30: 90%
    assert await sync(redis, pool, gate) == 1
    assert await outbox(pool) == [("other", "team", "red", "2026-11", "80%", 30)]
    # Cleared (NULL): acme is on the config's levels again; its team has reached both.
    await put_rules(pool, "acme", levels=None)
    await spend(gate, "acme", 1, team="red")  # 30 of 30
    assert await sync(redis, pool, gate) == 2
    assert await outbox(pool, "acme") == [
        ("acme", "team", "red", "2026-11", "100%", 30),
        ("acme", "team", "red", "2026-11", "80%", 30),
    ]
    # A config that watches no cap still evaluates the caps an org's own levels name.
    await put_rules(pool, "solo", levels=["team"])
    buckets_only = dataclasses.replace(DEFAULTS, levels=frozenset({"org"}))
    for org in ("other", "solo"):
        await spend(gate, org, 1, team="red")  # other: 30 of 30; solo: 3 of 30
    await spend(gate, "solo", 8, team="red")  # 27 of 30
    assert await sync(redis, pool, gate, buckets_only) == 1
    assert await outbox(pool, "solo") == [("solo", "team", "red", "2026-11", "80%", 30)]
    assert len(await outbox(pool, "other")) == 1  # its 100% is not watched


async def test_request_events_carry_the_capped_levels_figures_after_them(
    gate: CreditGate, clock: FixedClock
) -> None:
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    await put(gate, "acme", "key", "key_k", {BUCKET: 12})
    await spend(gate, "acme", 2, user="ann", team="red", key_id="key_k")
    refused = await gate.meter.admit("acme", BUCKET, user="ann", team="red", key_id="key_k")
    assert await gate.meter.settle(refused, ok=False, status=500, latency_ms=1) == 0
    # Charged by the sweep at expiry: the counters keep its tokens.
    await gate.meter.admit("acme", BUCKET, user="ann", team="red", key_id="key_k")
    clock.advance(gate.config.hold_ttl_seconds * 1000 + 1)
    assert await sweep(gate, "acme", clock.now_ms()) == (1, 0)
    got = [(e["k"], e.get("tm"), e.get("lv")) for e in await raw_events_of(gate, "acme")]
    # Counters then caps (30 = 1e, 12 = c), hexadecimal; a charge passes on what its
    # charge.lua left (the hold's lf: "-" where not capped), a refund reads them after it
    # moved them (the uncapped user's counter does not exist: "0").
    assert got[1:] == [
        ("reset", None, None),
        ("charge", "red", "3 - 3 1e - c key_k"),
        ("charge", "red", "6 - 6 1e - c key_k"),
        ("refund", "red", "6 0 6 1e - c key_k"),
        ("expired_hold", "red", "9 - 9 1e - c key_k"),
    ]
    # A user cap without a team: tm is empty, the user's figures are there.
    await put(gate, "acme", "user", "bob", {BUCKET: 9})
    await spend(gate, "acme", 1, user="bob")
    last = (await raw_events_of(gate, "acme"))[-1]
    assert (last["tm"], last["lv"]) == ("", "- 3 - - 9 -")


async def test_figures_of_moved_counters_are_read_again_and_expired_usage_holds_keep_them(
    gate: CreditGate, clock: FixedClock
) -> None:
    # research: a cost read after the call, reserve 10 (tests/support/actual_costs.py).
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {"research": 40})  # 28 in hexadecimal
    await put(gate, "acme", "key", "key_a", {"research": 25})  # 19
    who = {"user": "u1", "team": "red", "key_id": "key_a"}
    adm = await gate.meter.admit("acme", "research", **who)
    settled = await gate.meter.settle(adm, ok=True, status=200, latency_ms=1, actual=Actual(4))
    assert settled.charged == 4
    # The hold's charge left 10 (a); the settle gave 6 back, so the figures are read
    # again after that (the uncapped user's counter does not exist: "0").
    last = (await raw_events_of(gate, "acme"))[-1]
    assert (last["k"], last["lv"]) == ("charge", "4 0 4 28 - 19 key_a")
    # A usage hold that expires: the sweep flags its usage missing and keeps its figures.
    await gate.meter.admit("acme", "research", **who)
    clock.advance(gate.config.hold_ttl_seconds * 1000 + 1)
    assert await sweep(gate, "acme", clock.now_ms()) == (1, 1)
    last = (await raw_events_of(gate, "acme"))[-1]
    assert (last["k"], last["cs"], last["um"], last["lv"]) == (
        "expired_hold", "policy", "1", "e - e 28 - 19 key_a",
    )  # fmt: skip


async def test_a_hold_settled_in_a_later_period_carries_no_figures(
    gate: CreditGate, clock: FixedClock
) -> None:
    """Its counters were reset since and its caps were the old period's: nothing to say."""
    await gate.set_plan("acme", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    late = await gate.meter.admit("acme", BUCKET, user="ann", team="red")
    clock.set(DECEMBER_MS)
    await spend(gate, "acme", 1, user="ann", team="red")  # resets the bucket
    assert await gate.meter.settle(late, ok=True, status=200, latency_ms=1) == 3
    events = [e for e in await raw_events_of(gate, "acme") if e["k"] == "charge"]
    assert [(e["per"], e.get("lv")) for e in events] == [
        ("2026-12", "3 - - 1e - -"),
        ("2026-12", None),
    ]
