"""The writer's first rows of a key (BENCHMARKS.md section 11h): the rollup rows of an
(org, day) without any row yet go in by plain insertions (sync/sql.py FRESH_DAYS,
_ROLLUP_FRESH), a row met there after all redoes the batch with the upsert, and without
alerts a bucket's first ``ai_tokens`` row carries its snapshot at once (_INSERT_SNAPSHOTS):
every table as the upserts, placeholders and update wrote it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from gateway.alerts.evaluation import AlertDefaults
from sync import sql
from sync.records import Times, in_order, org_order
from sync.writer import BatchWriter
from tests.support.pg import requires_postgres
from tests.sync.test_partitioned_ledger import LAST_NOV, rows_of
from tests.sync.test_sync import event

pytestmark = requires_postgres

DAY = 86_400_000
ROLLUPS = ("usage_daily_user", "usage_daily_feature")
SNAPSHOT = (
    "organization_id, token_type, balance, extra, total_allocated, used, period, refresh_date, seq"
)


def charges(orgs: list[str], day: int, n: int, seq0: int = 0) -> list[dict[str, str]]:
    """``n`` charges per org on day ``day`` (0: the last of November), users and features
    repeating so that keys are met more than once in a batch."""
    out = []
    for i in range(n):
        for j, org in enumerate(orgs):
            s = seq0 + i + 1
            out.append(
                event(
                    org, "charge", t=i % 5 + 1, s=s, u=["", "ann", "bob"][(i + j) % 3],
                    f=["a", "b", ""][i % 3], b=["lead", "goal"][i % 2], bal=1000 - s,
                    x=0, a=1000, used=s, ts=LAST_NOV + day * DAY + i * 1000,
                )
            )  # fmt: skip
    return out


async def rollups(pool: asyncpg.Pool) -> dict[str, list[asyncpg.Record]]:
    return {t: await pool.fetch(f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in ROLLUPS}


async def assert_rollups_equal_a_rebuild(pool: asyncpg.Pool) -> None:
    written = await rollups(pool)
    assert all(written.values())
    await pool.execute("SELECT creditgate_rebuild_usage_rollups()")
    assert await rollups(pool) == written


@pytest.fixture(autouse=True)
def small_batches_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests' batches are small: let them ask about fresh days all the same."""
    monkeypatch.setattr(BatchWriter, "FRESH_MIN_ROWS", 1)


def spy_kinds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the statements the writer builds, in order."""
    kinds: list[str] = []
    real = sql.statement

    def statement(kind: str, columns: Any) -> Any:
        kinds.append(kind)
        return real(kind, columns)

    monkeypatch.setattr(sql, "statement", statement)
    return kinds


async def test_fresh_days_are_inserted_plainly_and_equal_a_rebuild(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = spy_kinds(monkeypatch)
    writer = BatchWriter(pool, times=Times())
    # A first start: every (org, day) fresh.
    await writer.write(rows_of(charges(["o1", "o2"], 0, 6)), shard=0)
    assert [k for k in kinds if k.startswith("rollup")] == ["rollup_fresh"]
    # The same day again (known to the writer: upserted without asking) and a new day
    # (fresh), in one batch: both statements.
    kinds.clear()
    batch = charges(["o1", "o2"], 0, 4, seq0=6) + charges(["o1"], 1, 4, seq0=10)
    await writer.write(rows_of(batch), shard=0)
    assert sorted(k for k in kinds if k.startswith("rollup")) == ["rollup", "rollup_fresh"]
    # A writer that remembers nothing (a restart) asks, finds the rows and upserts them;
    # a third org's day is fresh.
    kinds.clear()
    other = BatchWriter(pool, times=Times())
    batch = charges(["o1", "o2", "o3"], 1, 3, seq0=20)
    await other.write(rows_of(batch), shard=0)
    assert sorted(k for k in kinds if k.startswith("rollup")) == ["rollup", "rollup_fresh"]
    # The safe path (a redelivery next to new events) too.
    kinds.clear()
    redelivered = charges(["o1", "o2", "o3"], 1, 3, seq0=20)[:4]
    await other.write(rows_of(redelivered + charges(["o4"], 1, 2)), shard=0, direct=False)
    assert sorted(k for k in kinds if k.startswith("rollup")) == ["rollup", "rollup_fresh"]
    await assert_rollups_equal_a_rebuild(pool)


async def test_a_small_batch_upserts_without_asking(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BatchWriter, "FRESH_MIN_ROWS", 7)
    kinds = spy_kinds(monkeypatch)
    writer = BatchWriter(pool, times=Times())
    await writer.write(rows_of(charges(["o1", "o2"], 0, 3)), shard=0)  # 6 user rows
    await writer.write(rows_of(charges(["o3", "o4"], 0, 4)), shard=0)  # 8 user rows
    assert [k for k in kinds if k.startswith("rollup")] == ["rollup", "rollup_fresh"]
    await assert_rollups_equal_a_rebuild(pool)


async def test_a_row_met_by_the_plain_insertion_redoes_the_batch_with_the_upsert(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = BatchWriter(pool, times=Times())
    first = charges(["o1", "o2"], 0, 5)
    await writer.write(rows_of(first), shard=0)
    # A row appearing between the question and the insertion (another writer outside the
    # shard's lock) is what this stands for: every pair answered fresh.
    monkeypatch.setattr(
        sql,
        "FRESH_DAYS",
        "SELECT i FROM unnest($1::text[], $2::date[]) WITH ORDINALITY AS p(o, d, i)",
    )
    kinds = spy_kinds(monkeypatch)
    other = BatchWriter(pool, times=Times())
    result = await other.write(rows_of(charges(["o1", "o2"], 0, 5, seq0=5)), shard=0)
    assert (result.inserted, result.fallback) == (10, False)
    assert [k for k in kinds if k.startswith("rollup")] == ["rollup_fresh", "rollup"]
    assert await pool.fetchval("SELECT count(*) FROM ai_token_usage_log") == 20
    assert await pool.fetchval("SELECT sum(requests) FROM usage_daily_user") == 20
    await assert_rollups_equal_a_rebuild(pool)


async def test_an_org_or_bucket_inserted_meanwhile_redoes_the_batch_with_the_upsert(
    pool: asyncpg.Pool, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new orgs and buckets go in by plain insertions (sql._INSERT_SNAPSHOTS_PLAIN);
    another transaction inserting one of them meanwhile (an org created through the API,
    not under the shard's lock) makes the insertion wait for it, then fail: the batch is
    written again with the ON CONFLICT form, nothing doubled or lost."""
    kinds = spy_kinds(monkeypatch)
    writer = BatchWriter(pool, times=Times())
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO organizations (id, plan) VALUES ('o2', 'pro')")
        await other.execute(
            "INSERT INTO ai_tokens (organization_id, token_type, seq) VALUES ('o2', 'lead', 0)"
        )
        write = asyncio.ensure_future(writer.write(rows_of(charges(["o1", "o2"], 0, 4)), shard=0))
        # Until the writer's insertion waits for the other transaction's rows.
        for _ in range(500):
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            if waiting or write.done():
                break
            await asyncio.sleep(0.01)
        assert waiting and not write.done()
        await tx.commit()
        result = await write
    finally:
        await other.close()
    assert (result.inserted, result.fallback) == (8, False)
    snap_kinds = [k for k in kinds if k.startswith("insert_snapshots")]
    assert snap_kinds == ["insert_snapshots_plain", "insert_snapshots"]
    assert await pool.fetchval("SELECT plan FROM organizations WHERE id = 'o2'") == "pro"
    assert await pool.fetchval("SELECT count(*) FROM ai_token_usage_log") == 8
    # Every bucket's snapshot is its newest event's, the one inserted meanwhile included.
    snaps = await pool.fetch("SELECT organization_id, token_type, seq, used FROM ai_tokens")
    assert sorted(tuple(r) for r in snaps) == [
        ("o1", "goal", 4, 4), ("o1", "lead", 3, 3), ("o2", "goal", 4, 4), ("o2", "lead", 3, 3),
    ]  # fmt: skip
    await assert_rollups_equal_a_rebuild(pool)


def varied_snapshots() -> list[list[dict[str, str]]]:
    """Batches touching new and known buckets, with whole and partial snapshot columns,
    events without a seq and a seq of 0."""
    return [
        [
            event("o1", "charge", s=1, b="lead", bal=90, x=0, a=100, used=10, t=10),
            event("o1", "grant", s=2, b="lead", x=50),  # partial: extra only
            event("o2", "charge", s=1, b="lead", bal=5, x=0, a=10, used=5, t=5),
            event("o2", "reset", s=2, b="goal", per="2026-12"),  # partial: period only
            event("o3", "charge", b="lead", t=1),  # no seq: no snapshot, an org row
            event("o4", "grant", s=0, b="lead", bal=7, x=0, a=7, used=0),  # seq 0
        ],
        [
            event("o1", "charge", s=3, b="lead", bal=80, x=50, a=100, used=20, t=10),
            event("o1", "charge", s=1, b="goal", bal=9, x=0, a=10, used=1, t=1),  # new bucket
            event("o2", "grant", s=3, b="lead", a=20, bal=15),  # partial, known bucket
            event("o5", "charge", s=4, b="lead", bal=1, x=2, a=3, used=2, t=2, per=""),
        ],
    ]


async def test_new_buckets_get_the_rows_the_placeholder_and_the_update_gave(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = ("organizations", "ai_tokens")

    async def state() -> list[Any]:
        orgs = await pool.fetch("SELECT id, plan FROM organizations ORDER BY id")
        snaps = await pool.fetch(f"SELECT {SNAPSHOT} FROM ai_tokens ORDER BY 1, 2")
        return [orgs, snaps]

    results = {}
    # With alerts (no rule, no threshold): the placeholders and the alerting update, as
    # every bucket was written before; without: the rows inserted with their snapshot.
    quiet = AlertDefaults(pct=(), abs=(), has_url=False, forecast=False)
    for name, alerts in (("placeholders", quiet), ("inserted", None)):
        kinds = spy_kinds(monkeypatch)
        writer = BatchWriter(pool, times=Times(), alerts=alerts)
        moved = [(await writer.write(rows_of(b), shard=0)).snapshots for b in varied_snapshots()]
        # A writer that remembers nothing: buckets it takes for new are there.
        again = BatchWriter(pool, times=Times(), alerts=alerts)
        batch = [event("o1", "charge", s=9, b="lead", bal=1, x=1, a=1, used=1, t=1)]
        moved.append((await again.write(rows_of(batch), shard=0)).snapshots)
        results[name] = (await state(), moved)
        assert ("insert_snapshots_plain" in kinds) == (alerts is None)
        monkeypatch.undo()
        await pool.execute(f"TRUNCATE ai_token_usage_log, {', '.join(tables)} CASCADE")
    assert results["inserted"] == results["placeholders"]
    assert results["inserted"][1] == [3, 4, 1]


def test_org_order_keeps_each_orgs_stream_order() -> None:
    flats = [["id", "charge", org] for org in ("b", "a", "b", "c", "a", "b")]
    order = org_order(flats)
    assert order == [0, 2, 5, 1, 4, 3]
    assert in_order(list("uvwxyz"), order) == list("uwzvyx")
    # Together already: nothing to reorder.
    assert org_order([["id", "charge", org] for org in "aabbbc"]) is None
    assert org_order(flats[:1]) is None
    assert org_order([]) is None
    assert in_order(["x"], None) == ["x"]
    # One position (an itemgetter of one answers the item itself) and none.
    assert in_order(["x", "y"], [1]) == ["y"]
    assert in_order([], []) == []
