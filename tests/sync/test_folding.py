"""Folding: the new entries of several shards without a backlog are written in one
transaction (sync/worker.py ``SyncWorker._sync_shards``), against the real Redis and
Postgres. Rows stay exactly once, rollups equal a rebuild from the ledger, an event Postgres
rejects is dead-lettered in its own shard, and a backlogged shard still drains in full
batches of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from gateway.core.redis_keys import KeySpace
from sync.worker import fold, fold_limit
from tests.support.pg import requires_postgres
from tests.support.sync_fixtures import orgs_on_every_shard
from tests.sync.test_sync import (
    event,
    expected_daily,
    expected_snapshots,
    ledger,
    pending_count,
    scenario,
    worker,
    xadd_all,
)

pytestmark = requires_postgres


def test_fold_packs_reads_in_order_up_to_the_limit() -> None:
    assert fold([], 10) == []
    assert fold([(0, 5), (1, 3), (2, 4), (3, 6)], 8) == [[0, 1], [2], [3]]
    assert fold([(7, 20), (8, 1)], 8) == [[7], [8]]  # too large: a group of its own
    assert fold([(i, 1) for i in range(16)], 1000) == [list(range(16))]


def test_fold_limit_takes_all_of_a_small_total_and_spreads_a_large_one() -> None:
    assert fold_limit(300, 20_000, 4) == 1000  # a steady trickle: one transaction
    assert fold_limit(8000, 20_000, 4) == 2000  # a backlog: one per connection
    assert fold_limit(8000, 1500, 4) == 1500  # never above the batch size
    assert fold_limit(5, 64, 4) == 64


def spy(w: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, int]]:
    """Record each batch transaction of ``w``'s writer: (its shard argument, rows)."""
    calls: list[tuple[Any, int]] = []
    real = w._writer.write

    async def write(rows: Any, **kw: Any) -> Any:
        calls.append((kw["shard"], len(rows)))
        return await real(rows, **kw)

    monkeypatch.setattr(w._writer, "write", write)
    return calls


async def test_small_reads_of_every_shard_share_one_transaction(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    orgs = orgs_on_every_shard(keyspace)
    events = scenario(orgs, 6)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, batch_size=5000)
    calls = spy(w, monkeypatch)
    result = await w.run_once()
    assert len(calls) == 1
    shards, rows = calls[0]
    assert sorted(shards) == list(range(keyspace.shards)) and rows == len(events)
    assert (result.inserted, result.acked, result.duplicates) == (len(events), len(events), 0)
    assert not any(s.own_pending for s in w._shards)  # all acked: no re-read next pass
    got = await ledger(pool)
    assert len(got["rows"]) == len(events)
    assert got["daily"] == expected_daily(events)
    assert got["snapshots"] == expected_snapshots(events)
    assert await pending_count(redis, keyspace) == 0

    # The rollups the folded batch wrote are what a rebuild from the ledger gives.
    tables = ("usage_daily", "usage_daily_user", "usage_daily_feature")
    written = {t: await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4") for t in tables}
    await pool.execute("SELECT creditgate_rebuild_usage_rollups()")
    for t in tables:
        assert await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4") == written[t], t
    await w.close()


async def test_a_folded_batch_redelivered_doubles_nothing(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """As after a crash between the folded commit and the acks: the same events come again
    as new entries on every shard; the folded batch meets them, takes the safe path once,
    and writes only the new ones."""
    orgs = orgs_on_every_shard(keyspace)
    first = scenario(orgs, 5)
    await xadd_all(redis, keyspace, first)
    w = worker(redis, pool, keyspace, batch_size=5000)
    await w.run_once()
    second = scenario(orgs, 4, seed=3)
    await xadd_all(redis, keyspace, first + second)
    result = await w.run_once()
    assert (result.inserted, result.duplicates, result.fallbacks) == (len(second), len(first), 1)
    got = await ledger(pool)
    assert len(got["rows"]) == len(first) + len(second)
    assert got["daily"] == expected_daily(first + second)
    assert got["snapshots"] == expected_snapshots(first + second)
    assert await pending_count(redis, keyspace) == 0
    await w.close()


async def test_an_event_postgres_rejects_is_dead_lettered_in_its_own_shard(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    orgs = orgs_on_every_shard(keyspace)
    good = scenario(orgs, 5)
    victim = orgs[0]
    bad = event(victim, "charge", t=1, bal=-5, x=0, a=0, used=0, s=999)  # CHECK violation
    await xadd_all(redis, keyspace, [*good[:10], bad, *good[10:]])
    w = worker(redis, pool, keyspace, batch_size=5000)
    calls = spy(w, monkeypatch)
    result = await w.run_once()
    # The folded batch failed as a whole (nothing of it written), then each shard's
    # entries were written on their own and the culprit isolated there.
    assert not isinstance(calls[0][0], int) and len(calls) > 1
    assert (result.dead_lettered, result.acked) == (1, len(good) + 1)
    got = await ledger(pool)
    assert len(got["rows"]) == len(good)
    assert got["daily"] == expected_daily(good)
    assert got["snapshots"] == expected_snapshots(good)
    for shard in keyspace.all_shards():
        dead = await redis.xrange(shard.events + ":dead")
        assert len(dead) == (1 if shard.shard == keyspace.shard(victim).shard else 0)
    assert await pending_count(redis, keyspace) == 0
    await w.close()


async def test_a_backlogged_shard_drains_in_full_batches_while_the_rest_fold(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    orgs = orgs_on_every_shard(keyspace, per_shard=1)
    busy = orgs[0]
    backlog = scenario([busy], 150)
    events = backlog + scenario(orgs[1:], 5, seed=4)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, batch_size=64)
    calls = spy(w, monkeypatch)
    result = await w.run_once()
    busy_shard = keyspace.shard(busy).shard
    alone = [rows for shard, rows in calls if shard == busy_shard]
    folded = [(shard, rows) for shard, rows in calls if not isinstance(shard, int)]
    assert alone == [64, 64, len(backlog) - 128]
    assert len(folded) == 1 and sorted(folded[0][0]) == sorted(
        {keyspace.shard(o).shard for o in orgs[1:]}
    )
    assert result.inserted == len(events)
    got = await ledger(pool)
    assert got["daily"] == expected_daily(events)
    assert got["snapshots"] == expected_snapshots(events)
    assert await pending_count(redis, keyspace) == 0
    await w.close()


async def test_a_trickle_is_written_in_few_transactions(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run`` at a steady trickle: after a pass that found a little, it lingers, so an event
    every 10 ms for 1.5 s lands in a handful of transactions (with ``linger_ms=0``: one or
    more per pass, dozens), each exactly once."""
    orgs = orgs_on_every_shard(keyspace)
    events = scenario(orgs, 20)
    w = worker(redis, pool, keyspace, batch_size=5000, linger_ms=300)
    calls = spy(w, monkeypatch)
    task = asyncio.create_task(w.run())
    for e in events[:150]:
        await xadd_all(redis, keyspace, [e])
        await asyncio.sleep(0.01)
    for _ in range(300):  # up to 15 s
        if sum(rows for _, rows in calls) >= 150:
            break
        await asyncio.sleep(0.05)
    w.stop()
    await task
    assert sum(rows for _, rows in calls) == 150
    assert len(calls) <= 12, calls
    got = await ledger(pool)
    assert len(got["rows"]) == 150
    assert await pending_count(redis, keyspace) == 0
