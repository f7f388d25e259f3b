"""creditgate reconcile: Redis balances vs the ledger (snapshot + unsynced events)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.commands.reconcile import reconcile
from gateway.core.periods import FixedClock
from gateway.ledger.migrate import migrate
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker
from tests.support.pg import temp_database
from tests.support.reference import reference_config
from tests.support.services import redis_url

REDIS = redis_url()  # the tests' Redis; the module is skipped without one


@pytest.fixture
async def gate() -> AsyncIterator[CreditGate]:
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database() as dsn:
        await migrate(dsn)
        config = reference_config(redis_url=REDIS, key_prefix=prefix, database_url=dsn, shards=4)
        # The sync job sweeps expired holds by wall-clock time: keep the gate's clock near it.
        g = CreditGate(config, clock=FixedClock(int(time.time() * 1000)))
        yield g
        await g.close()
    client = connect_redis(REDIS).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def sync_once(gate: CreditGate) -> None:
    store = await gate.require_store()
    worker = SyncWorker(redis=gate.redis.client, pool=store.pool, keyspace=gate.keys)
    await worker.run_once()


async def traffic(gate: CreditGate) -> None:
    for org in ("a", "b", "c"):
        await gate.set_plan(org, "pro")
        await gate.grant(org, "goal_generation", 7, reference=f"g-{org}")
        for _ in range(9):
            await gate.charge(org, "goal_generation", user="u")
        adm = await gate.meter.admit(org, "lead_generation")
        await gate.meter.settle(adm, ok=False, status=500, latency_ms=3)


async def test_clean_after_sync_and_with_open_holds(gate: CreditGate) -> None:
    await traffic(gate)
    report = await reconcile(gate)  # nothing synced yet: the stream is the ledger's tail
    assert report.clean, report
    await sync_once(gate)
    # Holds opened before and after the last synced event, still open during reconcile.
    early = await gate.meter.admit("a", "lead_generation")
    assert (await gate.charge("a", "lead_generation")).ok
    await sync_once(gate)
    late = await gate.meter.admit("a", "lead_generation")
    assert early.ok and late.ok
    report = await reconcile(gate)
    assert report.clean, report
    assert report.orgs_checked == 3 and report.buckets_checked >= 6
    for adm in (early, late):
        await gate.meter.settle(adm, ok=True, status=200, latency_ms=1)
    await sync_once(gate)
    assert (await reconcile(gate)).clean


async def test_drift_is_reported_and_repaired_with_a_ledger_row(gate: CreditGate) -> None:
    await traffic(gate)
    await sync_once(gate)
    key = gate.keys.org("b")
    await gate.redis.client.hincrby(key, "b:goal_generation", 5)  # tokens out of nowhere
    report = await reconcile(gate)
    assert [(d.org, d.bucket, d.tokens) for d in report.drifts] == [("b", "goal_generation", 5)]
    assert not report.drifts[0].repaired
    before = (await gate.balance("b")).buckets["goal_generation"].available
    report = await reconcile(gate, repair=True)
    assert report.drifts[0].repaired
    assert (await gate.balance("b")).buckets["goal_generation"].available == before - 5
    await sync_once(gate)
    store = await gate.require_store()
    rows = await store.pool.fetch(
        "SELECT kind, tokens_deducted FROM ai_token_usage_log"
        " WHERE organization_id = 'b' AND kind = 'repair'"
    )
    assert [(r["kind"], r["tokens_deducted"]) for r in rows] == [("repair", 5)]
    assert (await reconcile(gate)).clean


async def test_lost_events_are_reported(gate: CreditGate) -> None:
    await traffic(gate)
    await sync_once(gate)
    await gate.redis.client.hincrby(gate.keys.org("c"), "seq", 3)
    report = await reconcile(gate)
    assert report.missing_events == {"c": 3}


async def test_clean_after_an_expired_hold_is_swept(gate: CreditGate) -> None:
    """A hold nobody settles (its gateway died) is swept into an expired_hold charge; the
    ledger's snapshot follows it, so reconcile finds no drift (a --repair would otherwise
    hand the expired hold's tokens back)."""
    await gate.set_plan("a", "pro")
    await sync_once(gate)
    adm = await gate.meter.admit("a", "lead_generation")  # taken, never settled
    assert adm.ok
    store = await gate.require_store()
    later = int(time.time() * 1000) + (gate.config.hold_ttl_seconds + 1) * 1000
    worker = SyncWorker(
        redis=gate.redis.client, pool=store.pool, keyspace=gate.keys, now_ms=lambda: later
    )
    assert (await worker.run_once()).swept == 1
    await sync_once(gate)  # the sweep's event, into the ledger
    kinds = await store.pool.fetch(
        "SELECT kind, tokens_deducted FROM ai_token_usage_log WHERE request_id = $1"
        " AND kind = 'expired_hold'",
        adm.request_id,
    )
    assert [(r["kind"], r["tokens_deducted"]) for r in kinds] == [("expired_hold", adm.cost)]
    report = await reconcile(gate)
    assert report.clean, report
    snapshot = await store.pool.fetchval(
        "SELECT balance FROM ai_tokens WHERE organization_id = 'a'"
        " AND token_type = 'lead_generation'"
    )
    assert snapshot == (await gate.balance("a")).buckets["lead_generation"].balance


async def test_redis_behind_the_ledger_is_reported_as_lost_writes_and_repaired(
    gate: CreditGate,
) -> None:
    """Redis rolled back (a failover to a replica that lacked the last writes, or an old
    snapshot restored) while the ledger kept them: reported as lost writes with exactly
    their tokens; the repair's event is newer than the ledger, so what follows syncs on."""
    await traffic(gate)
    await gate.grant("b", "goal_generation", 30, reference="more")  # traffic() spent it all
    await sync_once(gate)
    client = gate.redis.client
    key, stream = gate.keys.org("b"), gate.keys.shard("b").events
    before = await client.dump(key)  # the org as a stale replica would have it
    kept = {i for i, _ in await client.xrange(stream)}  # (the sync job trims what it wrote)
    for _ in range(4):  # acknowledged, then synced to the ledger ...
        assert (await gate.charge("b", "goal_generation", user="u")).ok
    await sync_once(gate)
    # ... and lost by Redis: the org hash and the stream go back to before them.
    await client.restore(key, 0, before, replace=True)
    newer = [i for i, _ in await client.xrange(stream) if i not in kept]
    if newer:
        await client.xdel(stream, *newer)

    report = await reconcile(gate)
    assert set(report.lost_writes) == {"b"} and not report.unstable, report
    assert [(d.org, d.bucket, d.tokens) for d in report.drifts] == [("b", "goal_generation", 12)]
    repaired = await reconcile(gate, repair=True)
    assert [d.repaired for d in repaired.drifts] == [True]
    assert int(await client.hget(key, "seq")) > report.drifts[0].ledger_seq
    assert (await reconcile(gate)).clean
    # Later events are newer than the ledger's snapshot again: they move it.
    assert (await gate.charge("b", "goal_generation", user="u")).ok
    await sync_once(gate)
    assert (await reconcile(gate)).clean
    store = await gate.require_store()
    snapshot = await store.pool.fetchval(
        "SELECT balance + extra FROM ai_tokens WHERE organization_id = 'b'"
        " AND token_type = 'goal_generation'"
    )
    assert snapshot == (await gate.balance("b")).buckets["goal_generation"].available
