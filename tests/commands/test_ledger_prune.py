"""`creditgate ledger prune --before YYYY-MM` as a user runs it (a real process)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import yaml

from tests.commands.test_cli import cli, config_file  # noqa: F401  (fixture)
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


async def test_prune_drops_old_months_says_what_and_refuses_the_current_one(
    config_file: Path,  # noqa: F811
) -> None:
    cli("migrate", config=config_file)
    dsn = yaml.safe_load(await asyncio.to_thread(config_file.read_text))["database_url"]
    conn = await asyncpg.connect(dsn)
    try:
        for i, when in enumerate(
            (datetime(2020, 1, 5, tzinfo=UTC), datetime(2020, 2, 5, tzinfo=UTC))
        ):
            await conn.execute("SELECT creditgate_usage_log_partition($1)", when.date())
            await conn.execute(
                "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                " tokens_deducted, kind, seq, created_at) VALUES ($1, 'acme', 'b', 1, 'charge',"
                " 1, $2)",
                f"ev{i}", when,
            )  # fmt: skip
        now = datetime.now(UTC)
        nxt = f"{now.year + 1}-01" if now.month == 12 else f"{now.year}-{now.month + 1:02d}"
        refused = cli("ledger", "prune", "--before", nxt, config=config_file, check=False)
        assert refused.returncode == 1
        assert f"{now:%Y-%m}, which is not complete yet" in refused.stderr
        bad = cli("ledger", "prune", "--before", "2020-13", config=config_file, check=False)
        assert bad.returncode == 2 and "not a month" in bad.stderr
        assert await conn.fetchval("SELECT count(*) FROM ai_token_usage_log") == 2

        out = cli("ledger", "prune", "--before", "2020-02", config=config_file).stdout
        assert "dropped 2020-01 (ai_token_usage_log_p202001): 1 row" in out
        assert "kept: 2020-02 to " in out
        assert await conn.fetchval("SELECT array_agg(event_id) FROM ai_token_usage_log") == ["ev1"]
        again = cli("ledger", "prune", "--before", "2020-02", config=config_file).stdout
        assert "nothing to drop: no month before 2020-02" in again
    finally:
        await conn.close()
