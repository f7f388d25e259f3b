"""Latency of the token API's reads on a big ledger: GET /balance, /stats and /usage.

    .venv/bin/python bench/api_latency.py [--rows 10000000] [--orgs 3000] [--heavy-share 0.1]
        [--heavy-users 200] [--days 90] [--requests 400] [--concurrency 1 8]
        [--keep-db | --db NAME]

1. A throwaway database (``creditgate_bench_<hex>``, dropped after) gets ``--rows`` audit
   rows generated in SQL (``generate_series``, indexes built after the load): one heavy org
   with ``--heavy-share`` of the rows and ``--heavy-users`` users, the rest spread over
   ``--orgs`` orgs with 2 users each, over the last ``--days`` days; then the matching
   rollups (``creditgate_rebuild_usage_rollups()``: what the sync job would have written)
   and VACUUM ANALYZE.
2. The gateway runs in its own process (``uvicorn gateway.commands.server:create_app --factory``,
   sync off) on Redis under a unique key prefix (deleted after).
3. For the heavy org, each endpoint gets a warm-up, then ``--requests`` requests at each
   ``--concurrency`` (keep-alive connections, httpx); client-observed p50/p90/p99/max in ms.
   Also printed: EXPLAIN ANALYZE of the stats query, and the admin top-spenders query
   (scans the whole period's rollups; not on any org's path).

Uses ``$CREDITGATE_BENCH_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres) and
``$CREDITGATE_BENCH_REDIS`` (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import load_config  # noqa: E402
from gateway.ledger.migrate import migrate  # noqa: E402
from gateway.ledger.usage import BURN_DAYS, TOP_USERS  # noqa: E402
from gateway.metering.gate import CreditGate  # noqa: E402
from gateway.redisio.connect import connect_redis  # noqa: E402

ADMIN_DSN = os.environ.get("CREDITGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CREDITGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "bench-admin"
FEATURES = ["lead_generation", "goal_generation", "strategy_analysis", "revenue_forecast",
            "general_insights"]  # fmt: skip
COSTS = [5, 3, 2, 4, 1]

CONFIG = """
redis_url: {redis}
database_url: {dsn}
upstream: http://127.0.0.1:9
admin_token: {admin}
key_prefix: {prefix}
identity: {{api_keys: true}}
features:
  lead_generation:   {{cost: 5}}
  goal_generation:   {{cost: 3}}
  strategy_analysis: {{cost: 2}}
  revenue_forecast:  {{cost: 4}}
  general_insights:  {{cost: 1}}
plans:
  starter: {{allocations: {{}}}}
  enterprise:
    allocations: {{lead_generation: 500000, goal_generation: 300000, strategy_analysis: 400000,
                   revenue_forecast: 400000, general_insights: 300000}}
default_plan: starter
"""


def dsn_for(database: str) -> str:
    parts = urllib.parse.urlsplit(ADMIN_DSN)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def generate(dsn: str, args: argparse.Namespace) -> None:
    """Fill the ledger: audit rows, their daily rollups, organizations."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '512MB'")
        # The ledger is partitioned by month (migration 0010): the window's months first.
        await conn.execute(
            "SELECT creditgate_usage_log_partition(d::date) FROM generate_series("
            f"now() - {args.days + 1} * interval '1 day', now(), interval '1 day') AS d"
        )
        await conn.execute(
            "ALTER TABLE ai_token_usage_log DROP CONSTRAINT ai_token_usage_log_pkey;"
            " DROP INDEX usage_log_org_created"
        )
        every = max(1, round(1 / args.heavy_share))
        span_s = args.days * 86400
        chunk = 1_000_000
        started = time.perf_counter()
        for lo in range(1, args.rows + 1, chunk):
            hi = min(args.rows, lo + chunk - 1)
            # Row g: every `every`-th row is the heavy org's; times spread over the window
            # (a multiplicative hash scatters them so days and users mix).
            await conn.execute(
                f"""
                INSERT INTO ai_token_usage_log (event_id, organization_id, user_id, feature_used,
                    token_type, tokens_deducted, kind, request_id, method, route,
                    upstream_status, latency_ms, balance_after, extra_after, seq, plan,
                    created_at)
                SELECT 'b' || g,
                    CASE WHEN g % {every} = 0 THEN 'heavy'
                         ELSE 'org' || lpad((g % {args.orgs})::text, 5, '0') END,
                    CASE WHEN g % {every} = 0 THEN 'user' || ((g / {every}) % {args.heavy_users})
                         ELSE 'user' || (g / {args.orgs} % 2) END,
                    f.name, f.name, f.cost, 'charge', md5(g::text), 'POST', '/api/v1/ai',
                    200, 40 + g % 200, 1000, 0, g, 'enterprise',
                    now() - ((g::bigint * 2654435761) % {span_s}) * interval '1 second'
                FROM generate_series({lo}::bigint, {hi}::bigint) AS g
                CROSS JOIN LATERAL (SELECT ($1::text[])[1 + (g / 7) % 5] AS name,
                                           ($2::int[])[1 + (g / 7) % 5] AS cost) AS f
                """,
                FEATURES, COSTS,
            )  # fmt: skip
            log(f"  {hi:,} audit rows ({time.perf_counter() - started:.0f} s)")
        log("building the log's indexes")
        await conn.execute(
            "ALTER TABLE ai_token_usage_log ADD CONSTRAINT ai_token_usage_log_pkey"
            " PRIMARY KEY (event_id, created_at);"
            " CREATE INDEX usage_log_org_created ON ai_token_usage_log"
            " (organization_id, created_at DESC, id DESC)"
        )
        log("rollups (usage_daily_user/_feature/_model) from the log")
        await conn.execute("SELECT creditgate_rebuild_usage_rollups()")
        await conn.execute(
            "INSERT INTO organizations (id, plan) SELECT DISTINCT organization_id, 'enterprise'"
            " FROM usage_daily_user ON CONFLICT DO NOTHING"
        )
        log("VACUUM ANALYZE")
        await conn.execute("VACUUM ANALYZE")
        for table in (
            "ai_token_usage_log",
            "usage_daily_user",
            "usage_daily_feature",
        ):
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
            size = await conn.fetchval(f"SELECT pg_size_pretty(pg_total_relation_size('{table}'))")
            log(f"  {table}: {n:,} rows, {size}")
        heavy = await conn.fetchval(
            # usage_daily: a view of the ledger since 0015 (the finest breakdown)
            "SELECT count(*) FROM usage_daily WHERE organization_id = 'heavy'"
            " AND day > current_date - 30"
        )
        log(f"  heavy org: {heavy:,} rollup rows in the last 30 days")
    finally:
        await conn.close()


async def explain(dsn: str) -> None:
    """Plans and timings of the stats query and the admin top-spenders query."""
    from gateway.ledger.org_listings import _SPEND
    from gateway.ledger.usage_stats import _ORG_USAGE

    conn = await asyncpg.connect(dsn)
    try:
        today = datetime.now(UTC).date()
        for title, sql, params in [
            ("stats (days=30), heavy org", _ORG_USAGE,
             ["heavy", today - timedelta(days=29), today, today - timedelta(days=BURN_DAYS - 1),
              TOP_USERS]),
            ("admin top spenders this month", _SPEND, [today.replace(day=1), today, 50]),
        ]:  # fmt: skip
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
            lines = [r[0] for r in plan]
            log(f"EXPLAIN ANALYZE {title}: {lines[-1].strip()}")
            for line in lines[:12]:
                print("      " + line)
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(config_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CREDITGATE_CONFIG": str(config_path), "CREDITGATE_NO_SYNC": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "gateway.commands.server:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited at startup")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the gateway did not start listening")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], n: int, concurrency: int
) -> list[float]:
    """Latencies (ms) of ``n`` GETs of ``path`` issued by ``concurrency`` workers."""
    for _ in range(20):  # warm-up: connections, caches, prepared statements
        (await http.get(path, headers=headers)).raise_for_status()
    samples: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            r = await http.get(path, headers=headers)
            samples.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()

    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return samples


async def run(args: argparse.Namespace) -> None:
    name = args.db or f"creditgate_bench_{uuid.uuid4().hex[:12]}"
    prefix = f"cgb{uuid.uuid4().hex[:8]}"
    dsn = dsn_for(name)
    admin = await asyncpg.connect(ADMIN_DSN)
    if not args.db:
        await admin.execute(f'CREATE DATABASE "{name}"')
    proc: subprocess.Popen[bytes] | None = None
    tmp = tempfile.TemporaryDirectory()
    try:
        if not args.db:
            await migrate(dsn)
            log(f"generating {args.rows:,} audit rows in {name}")
            await generate(dsn, args)
        await explain(dsn)
        config_path = Path(tmp.name) / "bench.yaml"
        config_path.write_text(
            CONFIG.format(redis=REDIS_URL, dsn=dsn, admin=ADMIN_TOKEN, prefix=prefix)
        )
        gate = CreditGate(load_config(config_path))
        await gate.set_plan("heavy", "enterprise")
        _, key = await gate.create_key("heavy")
        for feature in FEATURES:
            assert (await gate.charge("heavy", feature, user="user1")).ok
        await gate.close()
        port = free_port()
        proc = start_server(config_path, port)
        headers = {"Authorization": f"Bearer {key}"}
        admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30,
            limits=httpx.Limits(max_connections=max(args.concurrency)),
        ) as http:  # fmt: skip
            first = await http.get("/api/v1/tokens/usage?limit=500", headers=headers)
            assert first.status_code == 200, first.text
            page = first.json()
            deep = page["next_cursor"]
            for _ in range(40):  # ~20,000 rows in (or the last page)
                page = (await http.get(f"/api/v1/tokens/usage?limit=500&cursor={deep}",
                                       headers=headers)).json()  # fmt: skip
                if page["next_cursor"] is None:
                    break
                deep = page["next_cursor"]
            cases = [
                ("GET /balance", "/api/v1/tokens/balance", headers),
                ("GET /stats?days=30", "/api/v1/tokens/stats?days=30", headers),
                ("GET /stats?days=366", "/api/v1/tokens/stats?days=366", headers),
                ("GET /usage (first page, 50)", "/api/v1/tokens/usage", headers),
                ("GET /usage (cursor 20k rows in)", f"/api/v1/tokens/usage?cursor={deep}", headers),
                ("GET /admin/orgs?sort=spend", "/admin/orgs?sort=spend&limit=20", admin_headers),
            ]
            print()
            print("| endpoint (heavy org) | concurrency | n | p50 ms | p90 ms | p99 ms | max ms |")
            print("|---|---|---|---|---|---|---|")
            for title, path, hdrs in cases:
                for c in args.concurrency:
                    n = args.requests if "admin" not in path else min(args.requests, 50)
                    s = await measure(http, path, hdrs, n, c)
                    cells = [statistics.median(s), pct(s, 90), pct(s, 99), max(s)]
                    row = " | ".join(f"{v:.2f}" for v in cells)
                    print(f"| {title} | {c} | {len(s)} | {row} |", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        tmp.cleanup()
        if not (args.keep_db or args.db):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            log(f"kept database {name}")
        await admin.close()
        client = connect_redis(REDIS_URL).client
        async for k in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(k)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--orgs", type=int, default=3000)
    parser.add_argument("--heavy-share", type=float, default=0.1)
    parser.add_argument("--heavy-users", type=int, default=200)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    parser.add_argument("--db", help="reuse a database kept by --keep-db (no generation)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
