"""The sync writer's two paths and the worker's options, against the real Redis and Postgres.

- New entries are COPYed straight into the ledger; a batch holding an event the ledger
  has already (a redelivery) fails that COPY and is redone on the safe path, doubling
  nothing; re-read entries go to the safe path at once.
- Values the fast COPY rendering or the packed rollup columns cannot carry (tabs,
  backslashes, newlines, the column separator) still land exactly.
- ``now_ms`` is the clock holds are swept by; the pipelined client is derived from a plain
  redis-py client and not from fakeredis.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import asyncpg
import pytest

from gateway.core.redis_keys import KeySpace
from gateway.redisio.connect import connect_redis
from gateway.redisio.pipelined import FastRedis
from sync.sql import SEP
from sync.streams import fast_client_for
from tests.support.pg import requires_postgres
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


async def test_a_redelivered_batch_takes_the_safe_path_and_doubles_nothing(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    orgs = ["acme", "globex", "initech"]
    first = scenario(orgs, 40)
    await xadd_all(redis, keyspace, first)
    w = worker(redis, pool, keyspace, batch_size=10_000)
    result = await w.run_once()
    assert (result.inserted, result.fallbacks) == (len(first), 0)  # all new: fast path

    # The same events again (as after a crash between commit and ack, from another
    # worker's point of view: new stream entries), mixed with new ones.
    second = scenario(orgs, 30, seed=8)
    await xadd_all(redis, keyspace, first[::3] + second)
    result = await w.run_once()
    assert result.inserted == len(second)
    assert result.duplicates == len(first[::3])
    # These small reads of every shard are folded into one transaction (sync/worker.py):
    # it met the duplicates and was redone the safe way, once.
    assert result.fallbacks == 1
    got = await ledger(pool)
    assert len(got["rows"]) == len(first) + len(second)
    assert got["daily"] == expected_daily(first + second)  # not doubled
    assert got["snapshots"] == expected_snapshots(first + second)
    assert await pending_count(redis, keyspace) == 0
    await w.close()


async def test_reread_entries_go_to_the_safe_path_at_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = scenario(["acme", "globex"], 50)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace, claim_idle_ms=3_600_000)
    real_write = w._writer.write

    async def commit_then_fail(rows: Any, **kw: Any) -> Any:
        await real_write(rows, **kw)
        raise ConnectionResetError("lost before the ack (simulated)")

    monkeypatch.setattr(w._writer, "write", commit_then_fail)
    with pytest.raises(ConnectionResetError):
        await w.run_once()
    assert len((await ledger(pool))["rows"]) > 0
    assert await pending_count(redis, keyspace) > 0
    monkeypatch.setattr(w._writer, "write", real_write)
    while True:  # re-reads its own pending entries: committed already, so safe path only
        result = await w.run_once()
        assert result.fallbacks == 0
        if result.read == 0:
            break
    got = await ledger(pool)
    assert len(got["rows"]) == len(events)
    assert got["daily"] == expected_daily(events)
    assert got["snapshots"] == expected_snapshots(events)
    assert w.totals.duplicates > 0
    await w.close()


async def test_values_the_fast_renderings_cannot_carry_land_exactly(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    odd_users = ["tab\there", "back\\slash", "new\nline", "cr\rlf", f"sep{SEP}arated", "\\N"]
    events = []
    for i, user in enumerate(odd_users):
        rid = uuid.uuid4().hex
        events.append(
            event(
                "acme", "charge", id=rid, rq=rid, u=user, f="lead_generation", t=5,
                bal=100 - 5 * i, x=0, a=100, used=5 * (i + 1), s=i + 1, st=200, lat=3,
                r=f"/x{SEP}y\t",
            )
        )  # fmt: skip
    # A batch of its own with one rollup key whose feature and user are empty.
    lone = event("globex", "charge", t=2, bal=8, x=0, a=10, used=2, s=1)
    await xadd_all(redis, keyspace, events)
    w = worker(redis, pool, keyspace)
    assert (await w.run_once()).inserted == len(events)
    await xadd_all(redis, keyspace, [lone])
    assert (await w.run_once()).inserted == 1
    got = await ledger(pool)
    assert got["daily"] == expected_daily([*events, lone])
    assert got["snapshots"] == expected_snapshots([*events, lone])
    async with pool.acquire() as c:
        stored = await c.fetch(
            "SELECT user_id, route FROM ai_token_usage_log WHERE organization_id = 'acme'"
        )
    assert sorted(r["user_id"] for r in stored) == sorted(odd_users)
    assert {r["route"] for r in stored} == {f"/x{SEP}y\t"}
    await w.close()


async def test_holds_are_swept_by_the_given_clock(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    org, rid = "acme", uuid.uuid4().hex
    shard = keyspace.shard(org)
    now = int(time.time() * 1000)
    hold = {
        "o": org, "u": "alice", "f": "lead_generation", "b": "lead_generation", "c": 5,
        "pp": 5, "lt": [], "per": "2026-11", "rq": rid, "t0": now, "m": "POST", "r": "/x",
        "ik": "", "p": "pro",
    }  # fmt: skip
    await redis.hset(shard.holds, rid, json.dumps(hold))
    await redis.zadd(shard.holdexp, {rid: now + 3_600_000})  # expires in an hour
    wall = worker(redis, pool, keyspace, sweep_every_s=3600)
    assert (await wall.run_once()).swept == 0  # not yet, by the wall clock
    simulated = worker(redis, pool, keyspace, now_ms=lambda: now + 7_200_000)
    result = await simulated.run_once()
    assert (result.swept, result.inserted) == (1, 1)
    async with pool.acquire() as c:
        row = await c.fetchrow("SELECT kind, latency_ms FROM ai_token_usage_log")
    assert row is not None
    assert (row["kind"], row["latency_ms"]) == ("expired_hold", 7_200_000)
    await wall.close()
    await simulated.close()


async def test_the_pipelined_client_is_derived_when_it_can_be(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    derived = fast_client_for(redis)
    assert isinstance(derived, FastRedis)
    assert derived.settings.timeout >= 5
    await derived.close()
    assert fast_client_for(connect_redis(f"memory://{uuid.uuid4().hex}").client) is None
    assert worker(redis, pool, keyspace)._shards[0].stream.fast is not None
    assert worker(redis, pool, keyspace, fast_redis=False)._shards[0].stream.fast is None


async def test_a_pass_after_redis_lost_the_streams_recreates_the_groups(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    before = scenario(["acme", "globex"], 20)
    await xadd_all(redis, keyspace, before)
    w = worker(redis, pool, keyspace)
    assert (await w.run_once()).inserted == len(before)
    for shard in keyspace.all_shards():  # as after a FLUSHALL: streams and groups are gone
        await redis.delete(shard.events)
    after = scenario(["acme", "globex"], 10, seed=4)
    await xadd_all(redis, keyspace, after)
    result = await w.run_once()  # no NOGROUP error: the groups are made again at once
    assert result.inserted == len(after)
    assert len((await ledger(pool))["rows"]) == len(before) + len(after)
