"""The sync job under failure: kill -9 at chosen and random points, SIGTERM, Postgres and
Redis going away, and a Redis Cluster. Each destructive test owns its servers: a
``redis-server`` on ports 7300-7349 and a second PostgreSQL on a free port
(tests.support.pg_server).

The worker runs as a subprocess (``python -m sync``) where a real kill is needed. The crash
points come from the writer's test hook ``CREDITGATE_SYNC_CRASH`` (see sync/writer.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.core.redis_keys import KeySpace
from gateway.ledger.migrate import migrate
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker
from tests.support.needs import redis_server_binary
from tests.support.pg import requires_postgres
from tests.support.pg_server import own_postgres
from tests.support.redis_servers import free_ports, start_cluster
from tests.support.services import redis_url
from tests.sync.test_sync import expected_daily, expected_snapshots, ledger, pending_count, scenario

pytestmark = requires_postgres


REPO = Path(__file__).resolve().parents[2]
GROUP = "creditgate-sync"


# -- helpers ----------------------------------------------------------------------------

_SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap_workers() -> Iterator[None]:
    """Kill every worker process a test started and left running (a failed assertion
    must not leave a sync worker polling the shared Redis after the test)."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def fill(redis: Any, ks: KeySpace, events: list[dict[str, str]]) -> None:
    for start in range(0, len(events), 2000):
        pipe = redis.pipeline(transaction=False)
        for e in events[start : start + 2000]:
            pipe.xadd(ks.shard(e["o"]).events, e)
        await pipe.execute()


def spawn(
    redis_url: str,
    dsn: str,
    ks: KeySpace,
    *,
    crash: str | None = None,
    batch_size: int = 500,
    claim_idle_ms: int = 300,
    consumer: str | None = None,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CREDITGATE_SYNC_CRASH", None)
    if crash:
        env["CREDITGATE_SYNC_CRASH"] = crash
    cmd = [
        sys.executable,
        "-m",
        "sync",
        "--redis-url",
        redis_url,
        "--database-url",
        dsn,
        "--prefix",
        ks.prefix,
        "--shards",
        str(ks.shards),
        "--consumer",
        consumer or f"proc-{uuid.uuid4().hex[:6]}",
        "--batch-size",
        str(batch_size),
        "--claim-idle-ms",
        str(claim_idle_ms),
        "--concurrency",
        "2",
        "--log-level",
        "WARNING",
    ]
    # stderr goes to a file: a pipe nobody reads could fill up and stall the worker.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process object
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    _SPAWNED.append(proc)
    return proc


async def wait_exit(proc: subprocess.Popen[bytes], within: float = 30) -> int:
    deadline = time.monotonic() + within
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker process did not exit")
        await asyncio.sleep(0.02)
    return proc.returncode


async def wait_joined(redis: Any, ks: KeySpace, consumer: str) -> None:
    """Wait until a worker process has read from a stream (its signal handlers are set)."""
    stream = ks.all_shards()[0].events
    for _ in range(1000):
        if consumer in [c["name"] for c in await redis.xinfo_consumers(stream, GROUP)]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{consumer} never read")


async def row_count(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as c:
        return int(await c.fetchval("SELECT count(*) FROM ai_token_usage_log"))


async def wait_synced(
    pool: asyncpg.Pool, redis: Any, ks: KeySpace, n: int, within: float = 60
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await row_count(pool) >= n and await pending_count(redis, ks) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {await row_count(pool)} of {n} rows after {within} s")


async def wait_progress(
    proc: subprocess.Popen[bytes],
    pool: asyncpg.Pool,
    redis: Any,
    ks: KeySpace,
    within: float = 30,
) -> None:
    """Wait until a worker process has moved the ledger forward: new rows committed, or
    pending entries acknowledged. A process that only re-delivers rows an earlier process
    committed but never acked adds no rows, so row count alone can wait forever. Bounded:
    killing a worker at any point is a valid crash, so the deadline only ends the wait."""
    rows, pending = await row_count(pool), await pending_count(redis, ks)
    deadline = time.monotonic() + within
    while proc.poll() is None and time.monotonic() < deadline:
        if await row_count(pool) > rows or await pending_count(redis, ks) < pending:
            return
        await asyncio.sleep(0.005)


async def assert_exact(pool: asyncpg.Pool, events: list[dict[str, str]]) -> None:
    got = await ledger(pool)
    assert len(got["rows"]) == len(events)
    assert {r[0] for r in got["rows"]} == {e["id"] for e in events}
    assert got["daily"] == expected_daily(events)  # not doubled by redelivery
    assert got["snapshots"] == expected_snapshots(events)


# -- kill -9 ----------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["before_commit:3", "after_commit:3"])
async def test_kill_at_commit_then_restart_writes_each_row_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, pg_dsn: str, point: str
) -> None:
    events = scenario([f"org{i}" for i in range(8)], 400)
    await fill(redis, keyspace, events)
    url = redis_url()
    crashed = spawn(url, pg_dsn, keyspace, crash=point)
    assert await wait_exit(crashed) == -signal.SIGKILL
    committed = await row_count(pool)
    assert 0 < committed < len(events)
    assert await pending_count(redis, keyspace) > 0  # the dead worker's batch is unacked

    survivor = spawn(url, pg_dsn, keyspace, consumer="survivor")
    try:
        await wait_joined(redis, keyspace, "survivor")
        await wait_synced(pool, redis, keyspace, len(events))
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert await wait_exit(survivor) == 0
    await assert_exact(pool, events)


@pytest.mark.parametrize("point", ["before_commit:1", "after_commit:1"])
async def test_kill_at_the_commit_of_a_folded_batch_then_restart_writes_each_row_once(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, pg_dsn: str, point: str
) -> None:
    """A few events on every shard: the first pass writes all shards' reads in one
    transaction (sync/worker.py, folding). Killed just before or just after its commit, so
    that no shard's entries were acked, a new worker writes each row once."""
    events = scenario([f"org{i}" for i in range(12)], 5)
    assert len({keyspace.shard(e["o"]).shard for e in events}) > 1
    await fill(redis, keyspace, events)
    url = redis_url()
    crashed = spawn(url, pg_dsn, keyspace, crash=point)
    assert await wait_exit(crashed) == -signal.SIGKILL
    assert await row_count(pool) == (len(events) if point.startswith("after") else 0)
    assert await pending_count(redis, keyspace) == len(events)  # nothing acked

    survivor = spawn(url, pg_dsn, keyspace, consumer="survivor")
    try:
        await wait_joined(redis, keyspace, "survivor")
        await wait_synced(pool, redis, keyspace, len(events))
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert await wait_exit(survivor) == 0
    await assert_exact(pool, events)


async def test_random_sigkills_during_big_batches(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, pg_dsn: str
) -> None:
    rng = random.Random()
    events = scenario([f"org{i}" for i in range(20)], 3000)
    await fill(redis, keyspace, events)
    url = redis_url()
    killed_mid_work = 0
    for _ in range(3):
        proc = spawn(url, pg_dsn, keyspace, batch_size=4000)
        await wait_progress(proc, pool, redis, keyspace)
        await asyncio.sleep(rng.uniform(0, 0.5))
        proc.kill()
        await wait_exit(proc)
        killed_mid_work += await pending_count(redis, keyspace) > 0
    assert killed_mid_work > 0
    survivor = spawn(url, pg_dsn, keyspace, batch_size=4000, consumer="survivor")
    try:
        await wait_joined(redis, keyspace, "survivor")
        await wait_synced(pool, redis, keyspace, len(events))
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert await wait_exit(survivor) == 0
    await assert_exact(pool, events)


async def test_sigterm_finishes_the_batch_in_flight_and_exits_0(
    redis: Any, keyspace: KeySpace, pool: asyncpg.Pool, pg_dsn: str
) -> None:
    events = scenario([f"org{i}" for i in range(20)], 1500)
    await fill(redis, keyspace, events)
    proc = spawn(redis_url(), pg_dsn, keyspace, batch_size=3000)
    while await row_count(pool) == 0:
        assert proc.poll() is None
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0
    rows = await row_count(pool)
    assert rows < len(events)  # it stopped early...
    assert await pending_count(redis, keyspace) == 0  # ...with every read batch committed
    for shard in keyspace.all_shards():
        assert await redis.xinfo_consumers(shard.events, GROUP) == []
    pool_dsn_worker = SyncWorker(redis=redis, pool=pool, keyspace=keyspace, batch_size=5000)
    while (await pool_dsn_worker.run_once()).read:
        pass
    await assert_exact(pool, events)


# -- Postgres down ------------------------------------------------------------------------


async def test_postgres_down_fails_the_pass_loses_nothing_and_resumes(
    redis: Any, keyspace: KeySpace, caplog: pytest.LogCaptureFixture
) -> None:
    with own_postgres() as pg:
        await migrate(pg.dsn("creditgate"))
        pool = await asyncpg.create_pool(pg.dsn("creditgate"), min_size=0, max_size=3)
        try:
            events = scenario(["acme", "globex", "initech"], 200)
            worker = SyncWorker(redis=redis, pool=pool, keyspace=keyspace, batch_size=100)
            await fill(redis, keyspace, events[:300])
            await worker.run_once()
            assert await row_count(pool) == 300

            await fill(redis, keyspace, events[300:])
            pg.stop()
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await worker.run_once()
            assert await pending_count(redis, keyspace) > 0  # read, not acked, not lost

            # run() keeps backing off (one log line per attempt) until Postgres is back.
            caplog.set_level(logging.WARNING, logger="creditgate.sync")
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(1.5)
            failures = [r for r in caplog.records if "sync pass failed" in r.getMessage()]
            assert 3 <= len(failures) <= 6  # 0.1, 0.2, 0.4, 0.8 s ...
            pg.start()
            await wait_synced(pool, redis, keyspace, len(events), within=30)
            worker.stop()
            await task
            await assert_exact(pool, events)
        finally:
            await pool.close()


# -- Redis down ---------------------------------------------------------------------------


class AofRedis:
    """A redis-server with an fsync-always AOF, killable and restartable on one port.

    (Not tests.support.redis_servers: its start() refuses a port that still has TIME_WAIT
    sockets right after a kill, while redis-server itself binds with SO_REUSEADDR.)
    """

    def __init__(self, port: int) -> None:
        self.port, self.dir = port, Path(tempfile.mkdtemp(prefix=f"cg-sync-redis-{port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),  # skips (fails under CI) without redis-server
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline and self.proc.poll() is None, "no redis-server"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def test_redis_restart_is_survived(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="creditgate.sync")
    server = AofRedis(free_ports(1, 7300, 7349)[0])
    server.start()
    client = connect_redis(f"redis://127.0.0.1:{server.port}/0", timeout=1.0).client
    ks = KeySpace("cgt", 4)
    try:
        events = scenario(["acme", "globex"], 200)
        worker = SyncWorker(redis=client, pool=pool, keyspace=ks, batch_size=50)
        task = asyncio.create_task(worker.run())
        await fill(client, ks, events[:200])
        await wait_synced(pool, client, ks, 200, within=20)
        server.kill()  # the AOF keeps what was acknowledged to clients
        await asyncio.sleep(0.8)
        assert not task.done()
        assert any("sync pass failed" in r.getMessage() for r in caplog.records)
        server.start()
        await fill(client, ks, events[200:])
        await wait_synced(pool, client, ks, len(events), within=20)
        worker.stop()
        await task
        await assert_exact(pool, events)
    finally:
        await client.aclose()
        server.close()


# -- Redis Cluster ------------------------------------------------------------------------


async def test_cluster_sync_and_sweep(pool: asyncpg.Pool) -> None:
    ports = free_ports(3, 7310, 7349, cluster=True)
    with start_cluster(ports) as cluster:
        client = connect_redis(cluster.url).client
        ks = KeySpace("cgt", 8)
        try:
            events = scenario([f"org{i}" for i in range(10)], 60)
            await fill(client, ks, events)
            shard, now = ks.shard("org3"), int(time.time() * 1000)
            hold = {
                "o": "org3",
                "u": "",
                "f": "general_insights",
                "b": "general_insights",
                "c": 1,
                "pp": 1,
                "lt": [],
                "per": "2026-11",
                "rq": "h1",
                "t0": now,
                "m": "GET",
                "r": "/i",
                "ik": "",
                "p": "pro",
            }
            await client.hset(shard.holds, "h1", json.dumps(hold))
            await client.zadd(shard.holdexp, {"h1": now - 1})
            worker = SyncWorker(redis=client, pool=pool, keyspace=ks, batch_size=100, block_ms=50)
            task = asyncio.create_task(worker.run())
            await wait_synced(pool, client, ks, len(events) + 1, within=30)
            worker.stop()
            await task
            got = await ledger(pool)
            assert {r[0] for r in got["rows"]} == {e["id"] for e in events} | {"h1"}
            assert [r[3] for r in got["rows"] if r[0] == "h1"] == ["expired_hold"]
            assert got["snapshots"] == expected_snapshots(events)
        finally:
            await client.aclose()
