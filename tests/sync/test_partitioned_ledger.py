"""The sync writer on the month-partitioned ledger (migration 0010): exactly-once rows when
an event is redelivered across a month boundary, partitions created on demand and ahead,
and rollups written by the writer equal to a rebuild from the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from sync.batch import decode_entries
from sync.records import Times
from sync.writer import BatchWriter, months_of
from tests.support.pg import requires_postgres
from tests.sync.test_sync import event

pytestmark = requires_postgres

# The last millisecond of November and the first of December (UTC).
LAST_NOV = int(datetime(2026, 11, 30, 23, 59, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
FIRST_DEC = LAST_NOV + 1


def rows_of(events: list[dict[str, str]]) -> Any:
    flat = [[x for kv in e.items() for x in kv] for e in events]
    return decode_entries([(f"1-{i}", f) for i, f in enumerate(flat)], Times()).rows


async def placed(pool: asyncpg.Pool) -> dict[str, tuple[str, int]]:
    """event id -> (partition holding its row, how many rows it has)."""
    got = await pool.fetch(
        "SELECT event_id, tableoid::regclass::text AS part, count(*) OVER (PARTITION BY"
        " event_id) AS n FROM ai_token_usage_log"
    )
    return {r["event_id"]: (r["part"], r["n"]) for r in got}


def test_months_of_adds_the_month_after_each() -> None:
    assert months_of(["2026-11-30", "2026-11-01", "2026-12-01"]) == {
        "2026-11", "2026-12", "2027-01",
    }  # fmt: skip
    assert months_of([]) == set()


async def test_an_event_redelivered_across_a_month_boundary_lands_once(
    pool: asyncpg.Pool,
) -> None:
    nov = event("acme", "charge", id="req-nov", t=3, s=1, u="al", f="lead", ts=LAST_NOV)
    dec = event("acme", "charge", id="req-dec", t=5, s=2, u="al", f="lead", ts=FIRST_DEC)
    writer = BatchWriter(pool, times=Times())
    first = await writer.write(rows_of([nov, dec]), shard=0)
    assert (first.inserted, first.direct, first.fallback) == (2, True, False)
    # Redelivered after a crash between commit and ack, next to a new December event: the
    # fast path meets the duplicates and the safe path inserts only the new one ...
    later = event("acme", "charge", id="req-dec2", t=7, s=3, u="al", f="lead", ts=FIRST_DEC + 9)
    again = await writer.write(rows_of([dec, nov, later]), shard=0)
    assert (again.inserted, again.fallback) == (1, True)
    # ... and a claimed redelivery (the safe path at once) inserts nothing, by another writer.
    other = BatchWriter(pool, times=Times())
    assert (await other.write(rows_of([nov, dec, later]), shard=0, direct=False)).inserted == 0
    assert await placed(pool) == {
        "req-nov": ("ai_token_usage_log_p202611", 1),
        "req-dec": ("ai_token_usage_log_p202612", 1),
        "req-dec2": ("ai_token_usage_log_p202612", 1),
    }
    # Each request counted once, on its own UTC day, in all three rollups.
    daily = await pool.fetch(
        "SELECT day::text, requests, tokens FROM usage_daily WHERE organization_id = 'acme'"
        " ORDER BY day"
    )
    assert [tuple(r) for r in daily] == [("2026-11-30", 1, 3), ("2026-12-01", 2, 12)]
    for table in ("usage_daily_user", "usage_daily_feature"):
        sums = await pool.fetch(f"SELECT day::text, requests, tokens FROM {table} ORDER BY day")
        assert [tuple(r) for r in sums] == [("2026-11-30", 1, 3), ("2026-12-01", 2, 12)]
    # The month after the newest one was created ahead.
    assert await pool.fetchval("SELECT to_regclass('ai_token_usage_log_p202701')") is not None


async def test_a_month_without_a_partition_gets_one_before_its_rows(pool: asyncpg.Pool) -> None:
    when = int(datetime(2023, 2, 10, tzinfo=UTC).timestamp() * 1000)
    assert await pool.fetchval("SELECT to_regclass('ai_token_usage_log_p202302')") is None
    writer = BatchWriter(pool, times=Times())
    result = await writer.write(rows_of([event("acme", "charge", t=2, s=1, ts=when)]), shard=1)
    assert result.inserted == 1
    assert set((await placed(pool)).values()) == {("ai_token_usage_log_p202302", 1)}
    # Row-level security on the new partition too (a role granted every table reads none).
    assert await pool.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'ai_token_usage_log_p202302'::regclass"
    )


async def test_the_writers_rollups_equal_a_rebuild_from_the_ledger(pool: asyncpg.Pool) -> None:
    writer = BatchWriter(pool, times=Times())
    events = []
    for i in range(300):
        org, user, feature = f"org{i % 7}", ["", "ann", "bob"][i % 3], ["a", "b", ""][i % 5 % 3]
        kind = ["charge", "refund", "expired_hold", "grant"][i % 4]
        ts = LAST_NOV - 40 * 3_600_000 + i * 500_000  # across three days and the month end
        events.append(event(org, kind, t=i % 11, s=i + 1, u=user, f=feature, ts=ts))
    for start in range(0, 300, 64):
        await writer.write(rows_of(events[start : start + 64]), shard=start % 3)
    await writer.write(rows_of(events[:100]), shard=0, direct=False)  # redelivered: nothing
    tables = ("usage_daily", "usage_daily_user", "usage_daily_feature")
    written = {t: await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4") for t in tables}
    assert sum(r["requests"] for r in written["usage_daily"]) == 225  # the request events
    await pool.execute("SELECT creditgate_rebuild_usage_rollups()")
    for t in tables:
        assert await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4") == written[t], t
