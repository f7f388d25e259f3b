"""Migration 0006 (what the AI call cost) and the usage-by-model queries of
gateway/ledger/usage.py, against the real Postgres.

- 0006 applied to a ledger that already has rows keeps every row as it was (the new
  columns NULL, overage 0, usage_missing false) and the rows still satisfy the schema;
- ``usage_daily_model`` has row-level security like every per-org table;
- ``org_usage`` and ``window_usage`` read usage by model and the overage from it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import pytest

from gateway.core.resources import resource_dir
from gateway.ledger.migrate import migrate
from gateway.ledger.usage import org_reader, org_usage, window_usage
from tests.ledger.test_rls import pg_dsn, reader  # noqa: F401  (fixtures)
from tests.support.pg import requires_postgres, temp_database

pytestmark = requires_postgres

NEW_COLUMNS = (
    "model", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "reserved", "overage", "cost_source", "usage_missing",
)  # fmt: skip


def _migrations_up_to(dest: Path, last: int) -> Path:
    dest.mkdir()
    for entry in resource_dir("migrations").iterdir():
        if entry.name.endswith(".sql") and int(entry.name[:4]) <= last:
            (dest / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return dest


async def test_0006_keeps_the_rows_written_before_valid(tmp_path: Path) -> None:
    directory = _migrations_up_to(tmp_path / "migrations", 5)
    async with temp_database() as dsn:
        applied = await migrate(dsn, directory=directory)
        assert applied[-1] == "0005_org_ids_and_creation"
        conn = await asyncpg.connect(dsn)
        try:
            when = datetime(2026, 11, 3, 12, tzinfo=UTC)
            await conn.execute("INSERT INTO organizations (id, plan) VALUES ('acme', 'pro')")
            for i, (kind, tokens) in enumerate(
                [("reset", -100), ("charge", 5), ("refund", 0), ("grant", -50), ("charge", 3)]
            ):
                await conn.execute(
                    "INSERT INTO ai_token_usage_log (event_id, organization_id, user_id,"
                    " feature_used, token_type, tokens_deducted, kind, seq, created_at)"
                    " VALUES ($1, 'acme', 'u1', 'lead', 'lead', $2, $3, $4, $5)",
                    f"ev{i}", tokens, kind, i + 1, when,
                )  # fmt: skip
            await conn.execute(
                "INSERT INTO usage_daily (organization_id, day, feature, user_id, token_type,"
                " requests, tokens) VALUES ('acme', '2026-11-03', 'lead', 'u1', 'lead', 3, 8)"
            )
            before = [tuple(r) for r in await conn.fetch(
                "SELECT * FROM ai_token_usage_log ORDER BY id")]  # fmt: skip

            sql = (resource_dir("migrations") / "0006_usage_columns.sql").read_text("utf-8")
            (directory / "0006_usage_columns.sql").write_text(sql, encoding="utf-8")
            assert await migrate(dsn, directory=directory) == ["0006_usage_columns"]

            cols = ", ".join(NEW_COLUMNS)
            after = await conn.fetch(f"SELECT *, {cols} FROM ai_token_usage_log ORDER BY id")
            assert len(after) == len(before)
            for old, new in zip(before, after, strict=True):
                # The old columns (every column but the new ones) are untouched ...
                assert tuple(new[c] for c in range(len(old))) == old
                # ... and the new ones are NULL, overage 0, usage_missing false.
                assert tuple(new[c] for c in NEW_COLUMNS) == (None,) * 6 + (0, None, False)
            # Nothing to roll up from rows without a model or cost source.
            assert await conn.fetchval("SELECT count(*) FROM usage_daily_model") == 0
            assert await conn.fetchval("SELECT creditgate_rebuild_usage_daily_model()") == 0
            # The rows are still valid under the new schema (an update checks every
            # constraint of the row again) and the defaults hold for new rows.
            assert await conn.execute("UPDATE ai_token_usage_log SET seq = seq") == "UPDATE 5"
            await conn.execute(
                "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                " tokens_deducted, kind, seq, created_at) VALUES ('new', 'acme', 'lead', 1,"
                " 'charge', 6, $1)",
                when,
            )
            row = await conn.fetchrow(
                "SELECT overage, usage_missing FROM ai_token_usage_log WHERE event_id = 'new'"
            )
            assert row is not None and tuple(row) == (0, False)
            with pytest.raises(asyncpg.NotNullViolationError):
                await conn.execute("UPDATE ai_token_usage_log SET overage = NULL WHERE id = 1")
            # A row with usage: the rebuild rolls it up by its UTC day and model.
            await conn.execute(
                "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                " tokens_deducted, kind, seq, created_at, model, input_tokens, output_tokens,"
                " reserved, overage, cost_source) VALUES ('u', 'acme', 'lead', 9, 'charge', 7,"
                " $1, 'gpt-4o', 900, 300, 12, 2, 'usage')",
                datetime(2026, 11, 3, 23, 59, 59, tzinfo=UTC),
            )
            assert await conn.fetchval("SELECT creditgate_rebuild_usage_daily_model()") == 1
            got = await conn.fetchrow("SELECT * FROM usage_daily_model")
            assert got is not None
            assert tuple(got) == ("acme", date(2026, 11, 3), "gpt-4o", 1, 9, 900, 0, 300, 0, 2, 0)
        finally:
            await conn.close()


async def test_the_model_rollup_is_isolated_per_org(
    pg_dsn: str,  # noqa: F811
    reader: asyncpg.Connection,  # noqa: F811
) -> None:
    owner = await asyncpg.connect(pg_dsn)
    try:
        for org in ("a", "b"):
            for model in ("m1", ""):
                await owner.execute(
                    "INSERT INTO usage_daily_model (organization_id, day, model, requests)"
                    " VALUES ($1, '2026-11-03', $2, 1)",
                    org, model,
                )  # fmt: skip
        await owner.execute(
            "INSERT INTO usage_daily_model (organization_id, day, model) VALUES ('', $1, 'x')",
            date(2026, 11, 3),
        )
        rls = await owner.fetchval(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'usage_daily_model'::regclass"
        )
        assert rls
    finally:
        await owner.close()
    assert await reader.fetch("SELECT * FROM usage_daily_model") == []  # no org set
    for org in ("a", "b"):
        async with reader.transaction():
            await reader.execute("SELECT set_config('creditgate.org_id', $1, true)", org)
            rows = await reader.fetch("SELECT organization_id, model FROM usage_daily_model")
        assert sorted(tuple(r) for r in rows) == [(org, ""), (org, "m1")]
    async with reader.transaction():
        await reader.execute("SET LOCAL creditgate.org_id = ''")
        assert await reader.fetch("SELECT * FROM usage_daily_model") == []


async def test_usage_by_model_over_a_window(pg_dsn: str) -> None:  # noqa: F811
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        rows = [
            # org, day, model, requests, tokens, in, cached, out, reasoning, overage, missing
            ("acme", date(2026, 11, 14), "gpt-4o-mini", 3, 30, 3000, 500, 900, 0, 0, 0),
            ("acme", date(2026, 11, 15), "gpt-4o-mini", 2, 20, 2000, 0, 600, 0, 4, 0),
            ("acme", date(2026, 11, 15), "claude-3-5", 1, 45, 100, 0, 2000, 300, 5, 0),
            ("acme", date(2026, 11, 15), "", 2, 80, 0, 0, 0, 0, 0, 2),
            ("acme", date(2026, 11, 1), "gpt-4o-mini", 9, 999, 1, 1, 1, 1, 99, 0),  # before
            ("globex", date(2026, 11, 15), "claude-3-5", 4, 400, 10, 0, 40, 0, 7, 1),
        ]
        await pool.executemany(
            "INSERT INTO usage_daily_model VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            rows,
        )
        start, end = date(2026, 11, 14), date(2026, 11, 15)
        async with org_reader(pool, "acme") as conn:
            usage = await org_usage(conn, "acme", start, end, start)
        assert usage["by_model"] == [
            {"model": None, "requests": 2, "tokens": 80, "input_tokens": 0,
             "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0, "overage": 0,
             "usage_missing_requests": 2},
            {"model": "gpt-4o-mini", "requests": 5, "tokens": 50, "input_tokens": 5000,
             "cached_input_tokens": 500, "output_tokens": 1500, "reasoning_tokens": 0,
             "overage": 4, "usage_missing_requests": 0},
            {"model": "claude-3-5", "requests": 1, "tokens": 45, "input_tokens": 100,
             "cached_input_tokens": 0, "output_tokens": 2000, "reasoning_tokens": 300,
             "overage": 5, "usage_missing_requests": 0},
        ]  # fmt: skip
        assert usage["overage"] == 9
        assert usage["by_feature"] == [] and usage["by_user"] == []

        window = await window_usage(pool, start, end, 2)
        assert [(m["model"], m["requests"], m["tokens"], m["overage"])
                for m in window["by_model"]] == [
            ("claude-3-5", 5, 445, 12), (None, 2, 80, 0),
        ]  # fmt: skip
        assert window["overage"] == 16  # every model's, not only the top ones
        empty = await window_usage(pool, date(2026, 10, 1), date(2026, 10, 2), 5)
        assert (empty["by_model"], empty["overage"]) == ([], 0)
    finally:
        await pool.close()
