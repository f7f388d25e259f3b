"""The sync job's throughput with alert evaluation on, against the same job with it off.

    .venv/bin/python bench/sync_alerts.py [--events 200000] [--orgs 5000] [--repeats 3]
        [--crossing 0.2] [--shards 16] [--batch-size 20000] [--concurrency 4]

Each repeat pre-fills the streams with ``--events`` charge events (bench/sync_throughput.py's
producer) and times one worker draining them into a fresh ledger, once with
``alerts=None`` and once with the alert evaluation (thresholds 80 and 100, a default
webhook URL), in alternating order so drift on a shared machine falls on both, after one
uncounted warm-up round of each. A share ``--crossing`` of the orgs has small allocations,
so their buckets cross 80%, 100% and deplete during the run (alerts are inserted, and
buckets over a threshold read their before state every batch), after which they are
refused (no more events), as the gateway would; the rest have a million tokens (crossing
nothing: the common case). Reports events/s per mode and
repeat, and the ratio on/off: median and spread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync_throughput import ADMIN_DSN, REDIS_URL, Producer, cleanup_redis, drain, dsn_for
from gateway.alerts.evaluation import AlertDefaults
from gateway.core.redis_keys import KeySpace
from gateway.ledger.migrate import migrate
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker, tune_gc

ALERTS = AlertDefaults(pct=(Decimal(80), Decimal(100)), abs=(), has_url=True, forecast=False)


class SmallBudgets(Producer):
    """The producer, with a share of the orgs on allocations they use up during the run."""

    def __init__(self, orgs: int, events: int, crossing: float) -> None:
        super().__init__(orgs)
        small = int(orgs * crossing)
        # Per (org, bucket) a run spends about events / orgs / 5 * 3 tokens: give the small
        # orgs about that much, so each crosses its thresholds somewhere in the run.
        budget = max(10, events // orgs // 5 * 3)
        self.alloc = {org: (budget if i < small else 1_000_000) for i, org in enumerate(self.orgs)}

    def event(self, ts_ms: int) -> dict[str, str]:
        # A depleted bucket is refused at admission, which writes no event: draw again.
        while True:
            e = super().event(ts_ms)
            alloc = self.alloc[e["o"]]
            used = 1_000_000 - int(e["bal"])  # the parent's running total
            if used <= alloc:
                e["a"], e["used"], e["bal"] = str(alloc), str(used), str(alloc - used)
                return e


async def prefill(redis: Any, ks: KeySpace, events: list[dict[str, str]]) -> None:
    for first in range(0, len(events), 10_000):
        pipe = redis.pipeline(transaction=False)
        for e in events[first : first + 10_000]:
            pipe.xadd(ks.shard(e["o"]).events, e)
        await pipe.execute()


async def one_round(
    redis: Any, pool: asyncpg.Pool, events: list[dict[str, str]], alerts: AlertDefaults | None,
    args: argparse.Namespace,
) -> tuple[float, int]:  # fmt: skip
    async with pool.acquire() as c:
        await c.execute(
            "TRUNCATE ai_token_usage_log, usage_daily, usage_daily_model, ai_tokens,"
            " organizations, alert_events CASCADE"
        )
    ks = KeySpace(f"cgbench{uuid.uuid4().hex[:8]}", args.shards)
    try:
        await prefill(redis, ks, events)
        worker = SyncWorker(
            redis=redis, pool=pool, keyspace=ks, batch_size=args.batch_size,
            concurrency=args.concurrency, max_batches_per_pass=1000, alerts=alerts,
        )  # fmt: skip
        started = time.perf_counter()
        await drain(worker)
        elapsed = time.perf_counter() - started
        await worker.close()
        async with pool.acquire() as c:
            rows = await c.fetchval("SELECT count(*) FROM ai_token_usage_log")
            fired = await c.fetchval("SELECT count(*) FROM alert_events")
        assert rows == len(events), f"{rows} rows for {len(events)} events"
        return len(events) / elapsed, fired
    finally:
        await cleanup_redis(redis, ks.prefix)


async def main(args: argparse.Namespace) -> None:
    database = f"creditgate_bench_{uuid.uuid4().hex[:10]}"
    dsn = dsn_for(database)
    handles = connect_redis(REDIS_URL, timeout=30)
    admin = await asyncpg.connect(ADMIN_DSN)
    pool: asyncpg.Pool | None = None
    try:
        await migrate(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=args.concurrency + 1)
        producer = SmallBudgets(args.orgs, args.events, args.crossing)
        start = int(time.time() * 1000) - args.events // 100
        events = [producer.event(start + i // 100) for i in range(args.events)]
        tune_gc()
        print(
            f"{args.events:,} events, {args.orgs} orgs ({args.crossing:.0%} crossing), "
            f"{args.shards} shards, batch {args.batch_size}, concurrency {args.concurrency};"
            f" load average {os.getloadavg()[0]:.2f}"
        )
        # A warm-up round of each (caches, the database's first touches), not counted.
        for alerts in (None, ALERTS):
            await one_round(handles.client, pool, events, alerts, args)
        ratios = []
        for n in range(args.repeats):
            order = [None, ALERTS] if n % 2 == 0 else [ALERTS, None]
            rates: dict[bool, float] = {}
            fired = 0
            for alerts in order:
                rate, count = await one_round(handles.client, pool, events, alerts, args)
                rates[alerts is not None] = rate
                fired = max(fired, count)
            ratios.append(rates[True] / rates[False])
            print(
                f"  repeat {n + 1}: off {rates[False]:,.0f} events/s, on {rates[True]:,.0f}"
                f" events/s ({fired} alerts), on/off {ratios[-1]:.3f}"
            )
        print(
            f"on/off ratio: median {statistics.median(ratios):.3f},"
            f" spread {min(ratios):.3f} to {max(ratios):.3f}"
        )
    finally:
        if pool is not None:
            await pool.close()
        await handles.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--orgs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crossing", type=float, default=0.2)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
