"""The sync job's throughput with alert evaluation on, against the same job with it off.

    .venv/bin/python bench/sync_alerts.py [--events 200000] [--orgs 5000] [--repeats 3]
        [--crossing 0.2] [--capped 0.0] [--cap-scale 1] [--shards 16] [--batch-size 20000]
        [--concurrency 4]

Each repeat pre-fills the streams with ``--events`` charge events (bench/sync_throughput.py's
producer) and times one worker draining them into a fresh ledger, once with
``alerts=None`` and once with the alert evaluation (thresholds 80 and 100, a default
webhook URL), in alternating order so drift on a shared machine falls on both, after one
uncounted warm-up round of each. A share ``--crossing`` of the orgs has small allocations,
so their buckets cross 80%, 100% and deplete during the run (alerts are inserted, and
buckets over a threshold read their before state every batch), after which they are
refused (no more events), as the gateway would; the rest have a million tokens (crossing
nothing: the common case). A share ``--capped`` of the orgs (the last ones, apart from the
crossing ones) has team and user caps (contract A10): 4 teams of 5 users, caps small
enough that most teams and users cross 80% and 100% of them during the run (a level at
its cap is refused, as charge.lua does); their events carry the team and the levels'
figures (``tm``, ``lv``: sync/levels.py), which the "on" rounds evaluate
(gateway/alerts/levels.py). ``--cap-scale`` multiplies those caps: 1 is the worst case
(most levels cross 80% and 100%, and keep being charged over 80% every batch), 20 leaves
every level far under its thresholds (capped orgs that fire nothing). Reports events/s
per mode and repeat, the ratio on/off: median and spread, and the CPU time per event of
the worker's process and of its Postgres backends (from /proc: less sensitive to the
other load on the machine than wall time).
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

    def __init__(
        self, orgs: int, events: int, crossing: float, capped: float = 0.0, cap_scale: int = 1
    ) -> None:
        super().__init__(orgs)
        small = int(orgs * crossing)
        # Per (org, bucket) a run spends about events / orgs / 5 * 3 tokens: give the small
        # orgs about that much, so each crosses its thresholds somewhere in the run.
        budget = max(10, events // orgs // 5 * 3)
        self.alloc = {org: (budget if i < small else 1_000_000) for i, org in enumerate(self.orgs)}
        # Capped orgs: a team's share of the org's spend is about a quarter, a user's a
        # twentieth; caps a little under that make most levels cross 80% and reach 100%.
        self.capped = set(self.orgs[len(self.orgs) - int(orgs * capped) :])
        self.team_cap = max(6, budget // 5) * cap_scale
        self.user_cap = max(3, budget // 25) * cap_scale
        self.level_used: dict[tuple[str, str, str], int] = {}
        self.refused = 0

    def event(self, ts_ms: int) -> dict[str, str]:
        # A depleted bucket (or a level at its cap) is refused at admission, which writes
        # no event: draw again.
        while True:
            e = super().event(ts_ms)
            alloc = self.alloc[e["o"]]
            used = 1_000_000 - int(e["bal"])  # the parent's running total
            if used > alloc:
                continue
            if e["o"] in self.capped and not self._levels(e):
                self.refused += 1
                continue
            e["a"], e["used"], e["bal"] = str(alloc), str(used), str(alloc - used)
            return e

    def _levels(self, e: dict[str, str]) -> bool:
        """Charge the event's team and user against their caps (False: refused) and add
        the fields settle.lua writes for them."""
        org, bucket, cost = e["o"], e["b"], int(e["t"])
        team = f"team{int(e['u'].removeprefix('user')) % 4}"
        tkey, ukey = (org, bucket, "t:" + team), (org, bucket, "u:" + e["u"])
        tused = self.level_used.get(tkey, 0) + cost
        uused = self.level_used.get(ukey, 0) + cost
        if tused > self.team_cap or uused > self.user_cap:
            # The parent already counted it: give it back (the gateway never charged it).
            self.bal[(org, bucket)] += cost
            return False
        self.level_used[tkey], self.level_used[ukey] = tused, uused
        e["tm"] = team
        e["lv"] = f"{tused:x} {uused:x} - {self.team_cap:x} {self.user_cap:x} -"
        return True


async def prefill(redis: Any, ks: KeySpace, events: list[dict[str, str]]) -> None:
    for first in range(0, len(events), 10_000):
        pipe = redis.pipeline(transaction=False)
        for e in events[first : first + 10_000]:
            pipe.xadd(ks.shard(e["o"]).events, e)
        await pipe.execute()


def backend_ticks(pids: list[int]) -> int:
    """User + system CPU clock ticks of these processes so far (/proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a backend gone: the pool reconnected (rare; shows as less CPU)
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total


async def backend_pids(pool: asyncpg.Pool) -> list[int]:
    """The Postgres backends of the benchmark's database (the pool's connections)."""
    rows = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return [r["pid"] for r in rows]


async def one_round(
    redis: Any, pool: asyncpg.Pool, events: list[dict[str, str]], alerts: AlertDefaults | None,
    args: argparse.Namespace,
) -> tuple[float, int, float, float]:  # fmt: skip
    async with pool.acquire() as c:
        await c.execute(
            "TRUNCATE ai_token_usage_log, usage_daily_user, usage_daily_feature,"
            " usage_daily_model, ai_tokens,"
            " organizations, alert_events CASCADE"
        )
    ks = KeySpace(f"cgbench{uuid.uuid4().hex[:8]}", args.shards)
    try:
        await prefill(redis, ks, events)
        worker = SyncWorker(
            redis=redis, pool=pool, keyspace=ks, batch_size=args.batch_size,
            concurrency=args.concurrency, max_batches_per_pass=1000, alerts=alerts,
        )  # fmt: skip
        pids = await backend_pids(pool)
        ticks, cpu = backend_ticks(pids), time.process_time()
        started = time.perf_counter()
        await drain(worker)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        pg_cpu = (backend_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK")
        await worker.close()
        async with pool.acquire() as c:
            rows = await c.fetchval("SELECT count(*) FROM ai_token_usage_log")
            fired = await c.fetchval("SELECT count(*) FROM alert_events")
        assert rows == len(events), f"{rows} rows for {len(events)} events"
        n = len(events)
        return n / elapsed, fired, cpu / n * 1e6, pg_cpu / n * 1e6
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
        # A fixed set of connections, so that /proc sees the same backends all round.
        size = args.concurrency + 1
        pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
        producer = SmallBudgets(args.orgs, args.events, args.crossing, args.capped, args.cap_scale)
        start = int(time.time() * 1000) - args.events // 100
        events = [producer.event(start + i // 100) for i in range(args.events)]
        tune_gc()
        print(
            f"{args.events:,} events, {args.orgs} orgs ({args.crossing:.0%} crossing,"
            f" {args.capped:.0%} with team/user caps x{args.cap_scale},"
            f" {producer.refused} refused by a cap), "
            f"{args.shards} shards, batch {args.batch_size}, concurrency {args.concurrency};"
            f" load average {os.getloadavg()[0]:.2f}"
        )
        # A warm-up round of each (caches, the database's first touches), not counted.
        for alerts in (None, ALERTS):
            await one_round(handles.client, pool, events, alerts, args)
        ratios, cpu_ratios = [], []
        for n in range(args.repeats):
            order = [None, ALERTS] if n % 2 == 0 else [ALERTS, None]
            rates: dict[bool, float] = {}
            cpus: dict[bool, tuple[float, float]] = {}
            fired = 0
            for alerts in order:
                rate, count, cpu, pg_cpu = await one_round(
                    handles.client, pool, events, alerts, args
                )
                rates[alerts is not None] = rate
                cpus[alerts is not None] = (cpu, pg_cpu)
                fired = max(fired, count)
            ratios.append(rates[True] / rates[False])
            # Throughput ratio from CPU: (worker + Postgres CPU per event) off / on.
            cpu_ratios.append(sum(cpus[False]) / sum(cpus[True]))
            print(
                f"  repeat {n + 1}: off {rates[False]:,.0f} events/s, on {rates[True]:,.0f}"
                f" events/s ({fired} alerts), on/off {ratios[-1]:.3f};"
                f" CPU us/event worker+postgres off {cpus[False][0]:.1f}+{cpus[False][1]:.1f},"
                f" on {cpus[True][0]:.1f}+{cpus[True][1]:.1f}, off/on {cpu_ratios[-1]:.3f}"
            )
        print(
            f"on/off ratio: median {statistics.median(ratios):.3f},"
            f" spread {min(ratios):.3f} to {max(ratios):.3f};"
            f" CPU off/on median {statistics.median(cpu_ratios):.3f},"
            f" spread {min(cpu_ratios):.3f} to {max(cpu_ratios):.3f};"
            f" load average now {os.getloadavg()[0]:.2f}"
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
    parser.add_argument("--capped", type=float, default=0.0)
    parser.add_argument("--cap-scale", type=int, default=1)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
