"""The reads issues 8 and 9's loose ends added or changed, old vs new in one run.

    .venv/bin/python bench/ledger_reads.py [--events 200000] [--rows 1000000] [--orgs 3000]
        [--repeat 40]

A throwaway database (``creditgate_bench_<hex>``, dropped after) with every migration,
filled in SQL: ``--events`` delivered alert events (plus 50 pending and 20 failed), one
heavy org's ``--rows`` audit rows over 30 days (0.1% with overage), and ``--orgs`` orgs (half
anchored on a day of their own) with 30 days x 5 features of ``usage_daily_feature``.
Each pair of statements is then run alternately ``--repeat`` times; reported: the pages
each touches (shared buffers hit + read, from ``EXPLAIN (ANALYZE, BUFFERS)``: independent
of the machine's load) and the median server time of ``EXPLAIN ANALYZE`` (load-dependent).

- /metrics' alert counts: the old ``count(*) FILTER`` over the outbox vs ``_COUNTS``;
- ``GET /balance``'s new per-bucket overage (``_PERIOD_OVERAGE``; nothing before);
- ``GET /admin/orgs?sort=spend``: the calendar window (``_SPEND``) vs each org's own
  period (``_SPEND_PER_ORG``).

Uses ``$CREDITGATE_BENCH_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.alerts.deliveries import _COUNTS  # noqa: E402
from gateway.core.anchors import Calendar  # noqa: E402
from gateway.ledger.migrate import migrate  # noqa: E402
from gateway.ledger.org_listings import _SPEND, _SPEND_PER_ORG, OrgPeriods  # noqa: E402
from gateway.ledger.usage_log import _PERIOD_OVERAGE  # noqa: E402

ADMIN_DSN = os.environ.get("CREDITGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

OLD_COUNTS = """
SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'delivered'),
       count(*) FILTER (WHERE status = 'failed'),
       (SELECT count(*) FROM alert_endpoints WHERE disabled_at IS NOT NULL)
FROM alert_events
"""


def _dsn(db: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + db


async def fill(conn: asyncpg.Connection, args: argparse.Namespace, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO alert_events (id, organization_id, level, token_type, period, kind,"
        " threshold, payload, status, created_at)"
        " SELECT 'msg_' || g, 'o' || (g % 3000), 'org', 'b', '2026-11', 'threshold_crossed',"
        " g::text, '{}', CASE WHEN g <= 50 THEN 'pending' WHEN g <= 70 THEN 'failed'"
        " ELSE 'delivered' END, $1::timestamptz - (g % 60) * interval '1 day'"
        " FROM generate_series(1, $2) AS g", now, args.events + 70,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO organizations (id, plan, period_anchor_day, period_anchor_since)"
        " SELECT 'o' || g, 'pro', CASE WHEN g % 2 = 0 THEN 1 + g % 31 END,"
        " CASE WHEN g % 2 = 0 THEN date '2026-01-01' END FROM generate_series(0, $1 - 1) AS g",
        args.orgs,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO usage_daily_feature (organization_id, day, feature, token_type, requests,"
        " tokens) SELECT 'o' || o, $1::date - d, 'f' || f, 'f' || f, 10, 10 + o % 97"
        " FROM generate_series(0, $2 - 1) AS o, generate_series(0, 29) AS d,"
        " generate_series(1, 5) AS f", now.date(), args.orgs,
    )  # fmt: skip
    await conn.execute(
        "SELECT creditgate_usage_log_partition(($1::date - g)::date)"
        " FROM generate_series(0, 31, 28) AS g", now.date(),
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO ai_token_usage_log (event_id, kind, organization_id, user_id,"
        " feature_used, token_type, tokens_deducted, created_at, overage, seq)"
        " SELECT 'e' || g, 'charge', 'heavy', 'u' || (g % 200), 'f' || (g % 5), 'f' || (g % 5),"
        " 5, $1::timestamptz - (g % (30 * 24)) * interval '1 hour',"
        " CASE WHEN g % 1000 = 0 THEN 3 ELSE 0 END, g"
        " FROM generate_series(1, $2) AS g", now, args.rows,
    )  # fmt: skip
    await conn.execute("VACUUM ANALYZE")


async def explain(conn: asyncpg.Connection, sql: str, params: list[Any]) -> tuple[float, int]:
    """(server ms, pages touched) of one run of ``sql``."""
    row = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *params)
    plan = json.loads(row)[0]
    top = plan["Plan"]
    pages = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return float(plan["Execution Time"]), pages


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--orgs", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=40)
    args = p.parse_args()
    db = f"creditgate_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{db}"')
    try:
        await migrate(_dsn(db))
        conn = await asyncpg.connect(_dsn(db))
        now = datetime.now(UTC)
        started = time.monotonic()
        await fill(conn, args, now)
        print(f"filled in {time.monotonic() - started:.0f} s; load {os.getloadavg()}")
        now_ms = int(now.timestamp() * 1000)
        cal = OrgPeriods.at(Calendar(), now_ms)
        per_org = OrgPeriods.at(Calendar("month", "subscription", "UTC"), now_ms)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        pairs = [
            ("/metrics alert counts", (OLD_COUNTS, []), (_COUNTS, [])),
            ("/balance overage per bucket", None,
             (_PERIOD_OVERAGE, ["heavy", month, month + timedelta(days=32)])),
            ("/admin/orgs?sort=spend", (_SPEND, [cal.start, cal.today, 50]),
             (_SPEND_PER_ORG, [per_org.earliest, per_org.today, 50, *per_org.args()])),
            # The same, the calendar query over the per-org query's widest window (the
            # days an org's own period can reach back): the join's own cost.
            ("/admin/orgs?sort=spend, same days", (_SPEND, [per_org.earliest, cal.today, 50]),
             (_SPEND_PER_ORG, [per_org.earliest, per_org.today, 50, *per_org.args()])),
        ]  # fmt: skip
        for name, old, new in pairs:
            times: dict[str, list[float]] = {"old": [], "new": []}
            pages: dict[str, int] = {}
            for _ in range(args.repeat):
                for label, q in (("old", old), ("new", new)):
                    if q is None:
                        continue
                    ms, n = await explain(conn, q[0], q[1])
                    times[label].append(ms)
                    pages[label] = n
            cells = []
            for label in ("old", "new"):
                if times[label]:
                    med = statistics.median(times[label])
                    cells.append(f"{label}: {med:.3f} ms median, {pages[label]} pages")
                else:
                    cells.append(f"{label}: (no query)")
            print(f"{name}: " + "; ".join(cells))
        await conn.close()
        print(f"load {os.getloadavg()}")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
