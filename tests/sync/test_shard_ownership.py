"""Sync processes split the shards (sync/leases.py): real Redis and Postgres.

Each test checks what ownership is for: no shard read by two processes at once, every
event in the ledger exactly once, and shards changing hands when a process joins, stops
or dies (kill -9, in a process of its own).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.core.redis_keys import KeySpace
from sync.leases import MIN_LEASE_MS, assignment, check_lease_ms
from sync.worker import SyncWorker
from tests.support.pg import requires_postgres
from tests.support.services import redis_url
from tests.support.sync_fixtures import orgs_on_every_shard
from tests.sync.test_sync import (
    expected_daily,
    expected_snapshots,
    ledger,
    pending_count,
    scenario,
    xadd_all,
)

pytestmark = requires_postgres

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 12


@pytest.fixture
async def keyspace(redis: Any) -> AsyncIterator[KeySpace]:
    """More shards than the suite's default 4, so that 2 and 3 processes split them."""
    ks = KeySpace(f"cgo{uuid.uuid4().hex[:10]}", SHARDS)
    yield ks
    async for key in redis.scan_iter(match=f"{ks.prefix}:*", count=1000):
        await redis.delete(key)


async def lease_owners(redis: Any, ks: KeySpace) -> list[str | None]:
    """Who holds each shard's lease, as Redis says."""
    raw = [await redis.get(k.sync_lease) for k in ks.all_shards()]
    return [r.decode() if isinstance(r, bytes) else r for r in raw]


async def wait_balanced(redis: Any, ks: KeySpace, names: list[str], within: float = 15) -> None:
    """Until every shard's lease is held by the process the assignment gives it to."""
    want = sorted(names)
    expected = [want[i % len(want)] for i in range(ks.shards)]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await lease_owners(redis, ks) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not balanced over {want}: {await lease_owners(redis, ks)}")


async def wait_synced(
    redis: Any, ks: KeySpace, pool: asyncpg.Pool, n: int, within: float = 30
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = len((await ledger(pool))["rows"])
        if rows >= n and await pending_count(redis, ks) == 0:
            return
        await asyncio.sleep(0.1)
    pending = await pending_count(redis, ks)
    raise AssertionError(f"{await row_count(pool)} rows of {n}, {pending} pending after {within} s")


async def pending_of(redis: Any, ks: KeySpace, consumer: str) -> int:
    """Entries ``consumer`` read and has not acked yet, over every shard."""
    total = 0
    for keys in ks.all_shards():
        for c in await redis.xinfo_consumers(keys.events, "creditgate-sync"):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == consumer:
                total += int(c["pending"])
    return total


async def row_count(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as c:
        return int(await c.fetchval("SELECT count(*) FROM ai_token_usage_log"))


async def readers_since(redis: Any, ks: KeySpace, since: float) -> dict[int, set[str]]:
    """Per shard, the consumers that touched its stream since ``since`` (time.time())."""
    now_ms = time.time() * 1000
    out: dict[int, set[str]] = {}
    for keys in ks.all_shards():
        consumers = await redis.xinfo_consumers(keys.events, "creditgate-sync")
        out[keys.shard] = {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            for c in consumers
            if c["idle"] < now_ms - since * 1000
        }
    return out


def sync_worker(redis: Any, pool: asyncpg.Pool, ks: KeySpace, name: str, **kw: Any) -> SyncWorker:
    kw.setdefault("lease_ms", 1000)
    kw.setdefault("block_ms", 50)
    return SyncWorker(redis=redis, pool=pool, keyspace=ks, consumer=name, batch_size=200, **kw)


# -- options and the assignment -------------------------------------------------------


def test_assignment_splits_every_shard_once_and_evenly() -> None:
    for n in (1, 2, 3, 5):
        members = sorted(f"p{i}" for i in range(n))
        parts = [assignment(members, m, 16) for m in members]
        assert sorted(s for p in parts for s in p) == list(range(16))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert assignment(["a", "b"], "c", 16) == frozenset()  # not (yet) a member


@pytest.mark.parametrize("bad", [1, MIN_LEASE_MS - 1, -5, 2.5, True])
def test_lease_ms_is_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        check_lease_ms(bad)
    assert check_lease_ms(0) == 0 and check_lease_ms(MIN_LEASE_MS) == MIN_LEASE_MS


def test_cli_rejects_a_bad_lease(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sync", "--redis-url", "redis://x", "--database-url", "pg://x",
         "--lease-ms", "100"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "lease_ms must be 0 (no shard ownership" in done.stderr


# -- processes (workers) splitting the shards -----------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_processes_split_the_shards_and_write_every_event_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, count: int
) -> None:
    names = [f"w{i}" for i in range(count)]
    workers = [sync_worker(redis, pool, keyspace, name) for name in names]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_balanced(redis, keyspace, names)
        since = time.time()
        events = scenario(orgs_on_every_shard(keyspace), 30)
        n = await xadd_all(redis, keyspace, events)
        await wait_synced(redis, keyspace, pool, n)
        readers = await readers_since(redis, keyspace, since)
        owners = await lease_owners(redis, keyspace)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
    # No shard was read by two processes: only its owner touched its stream.
    assert readers == {s: {owners[s]} for s in range(keyspace.shards)}
    # Every entry was read once (no redelivery, no takeover) and is in the ledger once.
    assert sum(w.totals.read for w in workers) == n
    rows = (await ledger(pool))["rows"]
    assert sorted(r[0] for r in rows) == sorted(e["id"] for e in events)
    assert all(w.totals.read > 0 for w in workers)


async def test_a_joining_process_takes_its_share(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    first = sync_worker(redis, pool, keyspace, "a")
    tasks = [asyncio.create_task(first.run())]
    second = sync_worker(redis, pool, keyspace, "b")
    try:
        await wait_balanced(redis, keyspace, ["a"])  # alone: it owns every shard, as before
        before = scenario(orgs_on_every_shard(keyspace), 5)
        n = await xadd_all(redis, keyspace, before)
        await wait_synced(redis, keyspace, pool, n)
        joined = time.monotonic()
        tasks.append(asyncio.create_task(second.run()))
        await wait_balanced(redis, keyspace, ["a", "b"])
        assert time.monotonic() - joined < 3  # a few heartbeats (lease 1 s: every 0.2 s)
        since = time.time()
        after = scenario(orgs_on_every_shard(keyspace, 3), 10, seed=3)
        n += await xadd_all(redis, keyspace, after)
        await wait_synced(redis, keyspace, pool, n)
        readers = await readers_since(redis, keyspace, since)
    finally:
        for w in (first, second):
            w.stop()
        await asyncio.gather(*tasks)
    assert readers == {s: {"ab"[s % 2]} for s in range(keyspace.shards)}
    assert second.totals.read > 0
    assert len((await ledger(pool))["rows"]) == n


async def test_a_clean_stop_hands_the_shards_over_before_the_lease_expires(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    # A long lease: taking over only at its expiry would miss the deadline below.
    a, b = (sync_worker(redis, pool, keyspace, name, lease_ms=10_000) for name in "ab")
    ta, tb = asyncio.create_task(a.run()), asyncio.create_task(b.run())
    try:
        await wait_balanced(redis, keyspace, ["a", "b"], within=30)
        events = scenario(orgs_on_every_shard(keyspace), 10)
        n = await xadd_all(redis, keyspace, events)
        await asyncio.sleep(0.05)  # b stops in the middle of its work
        stopped = time.monotonic()
        b.stop()
        await tb
        assert set(await lease_owners(redis, keyspace)) <= {"a", None}  # b gave its back
        await wait_balanced(redis, keyspace, ["a"], within=5)
        assert time.monotonic() - stopped < 5  # a heartbeat (2 s), not the lease's 10 s
        more = scenario(orgs_on_every_shard(keyspace), 5, seed=9)
        n += await xadd_all(redis, keyspace, more)
        await wait_synced(redis, keyspace, pool, n)
    finally:
        a.stop()
        b.stop()
        await asyncio.gather(ta, tb)
    rows = (await ledger(pool))["rows"]
    assert sorted(r[0] for r in rows) == sorted(e["id"] for e in events + more)


async def test_run_once_still_reads_every_shard(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    """A one-off pass (tests, tools) needs no lease; it only makes nothing pending."""
    events = scenario(orgs_on_every_shard(keyspace), 3)
    n = await xadd_all(redis, keyspace, events)
    result = await sync_worker(redis, pool, keyspace, "once").run_once()
    assert result.inserted == n
    assert await lease_owners(redis, keyspace) == [None] * keyspace.shards


# -- kill -9 --------------------------------------------------------------------------


def spawn(dsn: str, ks: KeySpace, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sync", "--redis-url", redis_url(), "--database-url", dsn,
         "--prefix", ks.prefix, "--shards", str(ks.shards), "--consumer", name,
         "--lease-ms", "1000", "--batch-size", "200", "--claim-idle-ms", "60000",
         "--log-level", "WARNING"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.mark.slow
async def test_kill_9_mid_run_its_shards_are_taken_over_nothing_lost_or_doubled(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, pg_dsn: str
) -> None:
    procs = {name: spawn(pg_dsn, keyspace, name) for name in ("p0", "p1")}
    try:
        await wait_balanced(redis, keyspace, ["p0", "p1"], within=30)
        orgs = orgs_on_every_shard(keyspace, 4)
        events = scenario(orgs, 400)
        # The kill must land while p1 holds entries it read but did not commit. A backlog
        # alone did not make sure of it (a fast worker wrote it all before the test saw the
        # first row): the ledger is locked so that no batch can commit, p1 is killed once
        # it holds pending entries, then the lock goes.
        async with pool.acquire() as blocker:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE ai_token_usage_log IN EXCLUSIVE MODE")
            n = await xadd_all(redis, keyspace, events)
            deadline = time.monotonic() + 30
            while not await pending_of(redis, keyspace, "p1"):
                assert time.monotonic() < deadline, "p1 read nothing within 30 s"
                await asyncio.sleep(0.01)
            procs["p1"].send_signal(signal.SIGKILL)
            procs["p1"].wait()
            await lock.rollback()
        assert await pending_of(redis, keyspace, "p1")  # it died mid-run, holding entries
        assert await row_count(pool) < n
        more = scenario(orgs, 20, seed=11)  # and events keep coming
        n += await xadd_all(redis, keyspace, more)
        # Its leases and membership expire (1 s); p0 takes every shard and claims the
        # entries p1 held un-acked at once, not after --claim-idle-ms (60 s).
        await wait_balanced(redis, keyspace, ["p0"], within=10)
        await wait_synced(redis, keyspace, pool, n, within=40)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
    assert procs["p0"].returncode == 0
    rows = (await ledger(pool))["rows"]
    assert sorted(r[0] for r in rows) == sorted(e["id"] for e in events + more)
    got = await ledger(pool)
    assert got["daily"] == expected_daily(events + more)  # no rollup counted twice
    assert got["snapshots"] == expected_snapshots(events + more)
