"""Migration 0010 on a ledger with rows (every row, the rollups and the usage reads survive),
and retention by month (gateway/ledger/partitions.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.core.resources import resource_dir
from gateway.ledger.migrate import migrate
from gateway.ledger.partitions import parse_month, partitions, prune
from gateway.ledger.usage import org_usage, usage_page
from tests.support.pg import requires_postgres, temp_database

pytestmark = requires_postgres

ROLLUPS = ("usage_daily", "usage_daily_user", "usage_daily_feature", "usage_daily_model")
# Rows on both sides of two month boundaries, UTC.
TIMES = [
    datetime(2026, 9, 30, 23, 59, 59, 999_000, tzinfo=UTC),
    datetime(2026, 10, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 10, 17, 12, 30, tzinfo=UTC),
    datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 0, 0, 1, tzinfo=UTC),
]
KINDS = ["charge", "refund", "expired_hold", "grant", "charge", "reset", "charge"]


def _up_to(dest: Path, last: int) -> Path:
    """A migrations directory holding the shipped files up to number ``last``."""
    dest.mkdir()
    for entry in resource_dir("migrations").iterdir():
        if entry.name.endswith(".sql") and int(entry.name[:4]) <= last:
            (dest / entry.name).write_text(entry.read_text("utf-8"), encoding="utf-8")
    return dest


async def _seed_old_ledger(conn: asyncpg.Connection) -> None:
    """Rows in today's (0008) table and rollups derived from them as the sync job would."""
    for i in range(70):
        when, kind = TIMES[i % len(TIMES)], KINDS[i % len(KINDS)]
        usage = i % 3 == 0 and kind == "charge"
        await conn.execute(
            "INSERT INTO ai_token_usage_log (event_id, organization_id, user_id, feature_used,"
            " token_type, tokens_deducted, kind, request_id, seq, created_at, model,"
            " input_tokens, output_tokens, cost_source, overage, usage_missing, team_id)"
            " VALUES ($1, $2, $3, $4, 'lead', $5, $6, $1, $7, $8, $9, $10, $11, $12, $13, $14,"
            " $15)",
            f"ev{i}", f"org{i % 3}", [None, "ann", "bob"][i % 3], ["lead", None][i % 2],
            i % 9 - (50 if kind == "grant" else 0), kind, i + 1, when,
            "gpt-4o" if usage else None, 10 * i if usage else None, i if usage else None,
            "usage" if usage else None, i % 2 if usage else 0, usage and i % 2 == 0,
            "red" if i % 4 == 0 else None,
        )  # fmt: skip
    # usage_daily as the sync job writes it (the 0002 triggers derive the other two), and
    # the model rollup by its 0006 rebuild.
    await conn.execute(
        "INSERT INTO usage_daily (organization_id, day, feature, user_id, token_type,"
        " requests, tokens) SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date,"
        " coalesce(feature_used, ''), coalesce(user_id, ''), min(token_type), count(*),"
        " sum(tokens_deducted) FROM ai_token_usage_log"
        " WHERE kind IN ('charge', 'refund', 'expired_hold') GROUP BY 1, 2, 3, 4"
    )
    await conn.execute("SELECT creditgate_rebuild_usage_daily_model()")


async def _snapshot(conn: asyncpg.Connection) -> dict[str, Any]:
    out: dict[str, Any] = {
        "log": [tuple(r) for r in await conn.fetch("SELECT * FROM ai_token_usage_log ORDER BY id")]
    }
    for table in ROLLUPS:
        out[table] = [
            tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4")
        ]
    for org in ("org0", "org1", "org2"):
        out[f"usage:{org}"] = await org_usage(
            conn, org, date(2026, 9, 1), date(2026, 11, 30), date(2026, 11, 1)
        )
    return out


async def test_migration_0010_keeps_every_row_the_rollups_and_the_reads(tmp_path: Path) -> None:
    async with temp_database(create=False) as dsn:
        directory = _up_to(tmp_path / "migrations", 8)
        assert (await migrate(dsn, directory=directory))[-1] == "0008_alerts"
        conn = await asyncpg.connect(dsn)
        try:
            await _seed_old_ledger(conn)
            before = await _snapshot(conn)
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
            try:
                pages_before = [await usage_page(pool, o, None, 100) for o in ("org0", "org2")]
                # (migrations numbered after 0008 other than 0010 may come along)
                assert "0010_partitioned_usage_log" in await migrate(dsn)
                assert await _snapshot(conn) == before
                assert [await usage_page(pool, o, None, 100) for o in ("org0", "org2")] == (
                    pages_before
                )
            finally:
                await pool.close()
            assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1",
                                       "ai_token_usage_log") == "p"  # fmt: skip
            # Each row sits in its UTC month's partition.
            placed = await conn.fetch(
                "SELECT tableoid::regclass::text AS part, to_char(created_at AT TIME ZONE 'UTC',"
                " 'YYYYMM') AS month FROM ai_token_usage_log"
            )
            assert {r["part"] for r in placed} == {
                f"ai_token_usage_log_p{m}" for m in ("202609", "202610", "202611")
            }
            assert all(r["part"].endswith(r["month"]) for r in placed)
            # A rebuild from the migrated ledger gives the rollups the sync job had written.
            await conn.execute("SELECT creditgate_rebuild_usage_rollups()")
            for table in ROLLUPS:
                got = await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4")
                assert [tuple(r) for r in got] == before[table], table
            # The id sequence goes on past the copied rows; the key refuses a duplicate.
            await conn.execute(
                "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                " tokens_deducted, kind, seq, created_at) VALUES ('new', 'org0', 'lead', 1,"
                " 'charge', 99, $1)",
                TIMES[2],
            )
            assert await conn.fetchval(
                "SELECT id FROM ai_token_usage_log WHERE event_id = 'new'"
            ) > max(r[0] for r in before["log"])
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(
                    "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                    " tokens_deducted, kind, seq, created_at) SELECT event_id, organization_id,"
                    " token_type, tokens_deducted, kind, seq, created_at FROM ai_token_usage_log"
                    " WHERE event_id = 'ev3'"
                )
        finally:
            await conn.close()


def test_parse_month() -> None:
    assert parse_month("2026-01") == date(2026, 1, 1)
    for bad in ("2026-13", "2026-1", "26-01", "2026-01-01", ""):
        with pytest.raises(ValueError, match="not a month"):
            parse_month(bad)


async def test_prune_drops_whole_months_keeps_rollups_and_refuses_an_incomplete_one() -> None:
    async with temp_database(migrated=True) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            for i, when in enumerate(TIMES):
                await conn.execute("SELECT creditgate_usage_log_partition($1)", when.date())
                await conn.execute(
                    "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                    " tokens_deducted, kind, seq, created_at) VALUES ($1, 'acme', 'b', 2,"
                    " 'charge', $2, $1::text::timestamptz)",
                    when.isoformat(), i + 1,
                )  # fmt: skip
            await conn.execute("SELECT creditgate_rebuild_usage_rollups()")
            rollups = await conn.fetch("SELECT * FROM usage_daily ORDER BY day")
            assert sum(r["requests"] for r in rollups) == 5
            today = date(2026, 11, 20)
            with pytest.raises(ValueError, match="2026-11, which is not complete"):
                await prune(conn, date(2026, 12, 1), today)
            assert [p.label for p in await partitions(conn)][:3] == [
                "2026-09", "2026-10", "2026-11",
            ]  # fmt: skip
            dropped = await prune(conn, date(2026, 11, 1), today)
            assert [(p.label, p.name, p.rows) for p in dropped] == [
                ("2026-09", "ai_token_usage_log_p202609", 1),
                ("2026-10", "ai_token_usage_log_p202610", 3),
            ]
            assert await conn.fetchval("SELECT count(*) FROM ai_token_usage_log") == 1
            assert (await partitions(conn))[0].label == "2026-11"
            # The rollups keep the dropped months; a rebuild starts at the oldest month left.
            assert await conn.fetch("SELECT * FROM usage_daily ORDER BY day") == rollups
            assert await conn.fetchval("SELECT creditgate_usage_log_first_day()") == date(
                2026, 11, 1
            )
            await conn.execute("SELECT creditgate_rebuild_usage_rollups()")
            assert await conn.fetch("SELECT * FROM usage_daily ORDER BY day") == rollups
            assert await prune(conn, date(2026, 11, 1), today) == []
        finally:
            await conn.close()


async def test_migration_0015_turns_usage_daily_into_a_view_with_rows_in_place(
    tmp_path: Path,
) -> None:
    """0015 on a ledger at 0014 holding rows, and rollups of a month pruned before it: the
    view gives the rows the table had (the pruned month's from usage_daily_pruned), the
    other rollups and /stats are untouched, and a rebuild and a later prune keep all of it
    exact."""
    async with temp_database(create=False) as dsn:
        directory = _up_to(tmp_path / "migrations", 14)
        assert (await migrate(dsn, directory=directory))[-1] == "0014_rollup_hot_updates"
        conn = await asyncpg.connect(dsn)
        try:
            for when in TIMES:
                await conn.execute("SELECT creditgate_usage_log_partition($1)", when.date())
            await _seed_old_ledger(conn)
            # A month pruned before 0015: only usage_daily (and what derives from it) has it.
            for user, feature, tokens in (("ann", "lead", 7), ("", "lead", 2), ("bob", "", 4)):
                await conn.execute(
                    "INSERT INTO usage_daily (organization_id, day, feature, user_id,"
                    " token_type, requests, tokens) VALUES ('org1', '2026-05-20', $1, $2,"
                    " 'lead', 3, $3)",
                    feature, user, tokens,
                )  # fmt: skip
            await conn.execute("SELECT creditgate_derive_usage_rollups()")
            before = await _snapshot(conn)
            assert len(before["usage_daily"]) > 3
            assert "0015_usage_daily_view" in await migrate(dsn)
            assert await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE relname = 'usage_daily'"
            ) == "v"  # fmt: skip
            assert await _snapshot(conn) == before
            pruned = await conn.fetch("SELECT DISTINCT day FROM usage_daily_pruned")
            assert [r["day"] for r in pruned] == [date(2026, 5, 20)]
            # A rebuild from the ledger gives the same rollups, history included.
            assert await conn.fetchval("SELECT creditgate_rebuild_usage_rollups()") > 0
            assert await _snapshot(conn) == before
            # A prune archives each month's finest sums before dropping it.
            dropped = await prune(conn, date(2026, 11, 1), date(2026, 11, 20))
            assert [p.label for p in dropped] == ["2026-09", "2026-10"]
            after = await _snapshot(conn)
            assert after.pop("log") != before.pop("log")
            assert after == before
            assert await conn.fetchval("SELECT creditgate_rebuild_usage_rollups()") > 0
            assert (await _snapshot(conn)) | {"log": None} == before | {"log": None}
        finally:
            await conn.close()
