"""Redis loses everything under traffic from several gateway processes (A5, issue 3).

Two gateway processes (uvicorn, --no-sync) in front of the sample app share a throwaway
redis-server; the test runs the sync job itself so it can pause it around the flush and
know exactly what the ledger held at that moment. After FLUSHALL the orgs' state must come
back from Postgres, seeded once (a second seed would repeat sequence numbers in the ledger),
and the tokens handed out beyond the allocation must not exceed the events that were not
yet synced when Redis lost them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.commands.sample_app import app as sample_app
from gateway.core.redis_keys import KeySpace
from gateway.ledger.migrate import migrate
from gateway.ledger.store import Store
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker
from tests.support.pg import temp_database
from tests.support.redis_servers import start_redis
from tests.support.upstream_app import serve_in_thread

ORGS = ("o1", "o2", "o3")
ALLOCATION = 300
COST = 5
CONCURRENCY = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gateways(config: Path, count: int) -> Iterator[list[str]]:
    procs, urls = [], []
    env = {**os.environ, "CREDITGATE_CONFIG": str(config), "CREDITGATE_NO_SYNC": "1"}
    try:
        for _ in range(count):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "gateway.commands.server:create_app",
                        "--factory",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    env=env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not start")
                time.sleep(0.1)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with temp_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.mark.slow
async def test_redis_flush_under_traffic_recovers_from_the_ledger(
    pg_dsn: str, tmp_path: Path
) -> None:
    with start_redis(7400) as redis_server, serve_in_thread(sample_app) as upstream:
        config = {
            "redis_url": redis_server.url,
            "database_url": pg_dsn,
            "upstream": upstream,
            "identity": {"api_keys": False, "trusted_headers": True},
            "features": {"lead_generation": {"cost": COST}},
            "plans": {"bulk": {"allocations": {"lead_generation": ALLOCATION}}},
            "default_plan": "bulk",
            "shards": 4,
            "routes": [
                {"method": "POST", "path": "/api/v1/leads/generate", "feature": "lead_generation"}
            ],
        }
        path = tmp_path / "creditgate.yaml"
        path.write_text(yaml.safe_dump(config))
        keyspace = KeySpace("cg", 4)
        redis = connect_redis(redis_server.url).client
        store = await Store.connect(pg_dsn)
        worker = SyncWorker(redis=redis, pool=store.pool, keyspace=keyspace, claim_idle_ms=500)
        ok: Counter[str] = Counter()
        codes: Counter[int] = Counter()
        stop = asyncio.Event()
        sync_paused = asyncio.Event()
        sync_idle = asyncio.Event()

        async def sync_loop() -> None:
            while not stop.is_set():
                if sync_paused.is_set():
                    sync_idle.set()
                    await asyncio.sleep(0.01)
                    continue
                sync_idle.clear()
                with contextlib.suppress(Exception):  # the flush may hit a pass mid-way
                    await worker.run_once()
                await asyncio.sleep(0.05)

        with gateways(path, 2) as urls:

            async def client(n: int) -> None:
                async with httpx.AsyncClient(timeout=10) as http:
                    i = n
                    while not stop.is_set():
                        org = ORGS[i % len(ORGS)]
                        url = urls[i % len(urls)] + "/api/v1/leads/generate"
                        i += 1
                        r = await http.post(url, headers={"X-Org-Id": org, "X-User-Id": f"u{n}"})
                        codes[r.status_code] += 1
                        if r.status_code == 200:
                            ok[org] += 1
                        elif r.status_code == 402:
                            await asyncio.sleep(0.01)

            syncer = asyncio.create_task(sync_loop())
            clients = [asyncio.create_task(client(n)) for n in range(CONCURRENCY)]
            await asyncio.sleep(1.0)

            # The flush: pause the sync job so the ledger is known at that instant.
            sync_paused.set()
            await sync_idle.wait()
            before_flush = dict(ok)
            synced = {
                r["organization_id"]: r["n"]
                for r in await store.pool.fetch(
                    "SELECT organization_id, count(*) AS n FROM ai_token_usage_log"
                    " WHERE kind = 'charge' GROUP BY organization_id"
                )
            }
            await redis.flushall()
            refused_at_flush = codes[402]
            sync_paused.clear()

            deadline = time.monotonic() + 15
            # Poll the shared counters until the re-seeded budgets are spent again.
            while (  # noqa: ASYNC110
                time.monotonic() < deadline and codes[402] < refused_at_flush + 200
            ):
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*clients, syncer)
        for _ in range(3):
            await worker.run_once()

        assert codes[503] == 0 and codes[500] == 0, codes
        for org in ORGS:
            # Events possibly unsynced at the flush: every success seen before it, plus
            # requests then in flight, minus what the ledger already held.
            unsynced = before_flush.get(org, 0) + CONCURRENCY - synced.get(org, 0)
            delivered = ok[org] * COST
            assert delivered >= ALLOCATION, (org, ok[org])  # the budget was really spent
            assert delivered - ALLOCATION <= unsynced * COST, (org, ok[org], unsynced)
        # Seeded once: a second seed would restart sequence numbers and repeat them.
        dupes = await store.pool.fetch(
            "SELECT organization_id, token_type, seq, count(*) FROM ai_token_usage_log"
            " WHERE seq IS NOT NULL GROUP BY 1, 2, 3 HAVING count(*) > 1"
        )
        assert dupes == []
        # Ledger and Redis agree at the end.
        for org in ORGS:
            state = await redis.hgetall(keyspace.org(org))
            row = await store.pool.fetchrow(
                "SELECT balance, extra FROM ai_tokens WHERE organization_id = $1"
                " AND token_type = 'lead_generation'",
                org,
            )
            assert int(state["b:lead_generation"]) == row["balance"]
        await store.close()
        await redis.aclose()
