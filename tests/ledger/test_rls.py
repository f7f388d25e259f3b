"""Row-level security: a role without BYPASSRLS sees only the org it sets per transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import asyncpg
import pytest

from tests.support.pg import (
    admin_execute,
    dsn_for,
    migrated_database,
    requires_postgres,
    unique_name,
)

pytestmark = requires_postgres

pg_dsn = pytest.fixture(migrated_database)

# Per-org table -> its organization column.
ORG_COLUMN = {
    "organizations": "id",
    "api_keys": "organization_id",
    "ai_tokens": "organization_id",
    "ai_token_usage_log": "organization_id",
    "token_grants": "organization_id",
    "usage_daily": "organization_id",  # a view since 0015 of the two below: 4 rows per org
    "usage_daily_pruned": "organization_id",
}
# Views over org tables: security_invoker, so the tables' policies hold their readers.
VIEWS = {"usage_daily"}
ORGS = ("a", "b")


async def _seed(conn: asyncpg.Connection) -> None:
    """Two rows per table for each org (one in organizations), inserted as the owner."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    # The ledger is partitioned by month (0010): a hand-written row needs its month's.
    await conn.execute("SELECT creditgate_usage_log_partition($1)", now.date())
    for org in ORGS:
        await conn.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'pro')", org)
        for i in range(2):
            await conn.execute(
                "INSERT INTO api_keys (id, organization_id, key_hash, prefix)"
                " VALUES ($1, $2, $3, 'cg_x')",
                f"key_{org}{i}",
                org,
                f"{org}{i}".encode(),
            )
            await conn.execute(
                "INSERT INTO ai_tokens (organization_id, token_type) VALUES ($1, $2)",
                org,
                f"bucket{i}",
            )
            await conn.execute(
                "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
                " tokens_deducted, kind, seq, created_at, feature_used)"
                " VALUES ($1, $2, 'b', 1, 'charge', $3, $4, $5)",
                f"ev_{org}{i}",
                org,
                i,
                now,
                f"f{i}",
            )
            await conn.execute(
                "INSERT INTO token_grants (organization_id, token_type, amount, reference)"
                " VALUES ($1, 'b', 5, $2)",
                org,
                f"ref{i}",
            )
            await conn.execute(
                "INSERT INTO usage_daily_pruned (organization_id, day, feature, token_type)"
                " VALUES ($1, $2, 'f', 'b')",
                org,
                date(2025, 6, 1 + i),
            )
    # A row with an empty org id must not show up for a session with no org set.
    await conn.execute(
        "INSERT INTO ai_token_usage_log (event_id, organization_id, token_type,"
        " tokens_deducted, kind, seq, created_at) VALUES ('ev_empty', '', 'b', 1, 'charge', 0, $1)",
        now,
    )


@pytest.fixture
async def reader(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as a fresh LOGIN role: no BYPASSRLS, not an owner, SELECT only."""
    role = unique_name("cgt_rls_")
    owner = await asyncpg.connect(pg_dsn)
    conn: asyncpg.Connection | None = None
    try:
        await _seed(owner)
        await owner.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS")
        await owner.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        database = pg_dsn.rsplit("/", 1)[1]
        conn = await asyncpg.connect(dsn_for(database, user=role))
        yield conn
    finally:
        if conn is not None:
            await conn.close()
        await owner.execute(
            f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN"
            f" EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}'; END IF; END $$"
        )
        await owner.close()
        await admin_execute(f"DROP ROLE IF EXISTS {role}")


async def test_every_org_table_has_rls_and_a_policy(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        with_org_column = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND column_name = 'organization_id'"
            )
        }
        assert set(ORG_COLUMN) - {"organizations"} <= with_org_column
        for view in VIEWS:
            options = await conn.fetchval(
                "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", view
            )
            assert "security_invoker=true" in options, view
        for table in with_org_column - VIEWS | {"organizations"}:
            rls = await conn.fetchval(
                "SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", table
            )
            policies = await conn.fetchval(
                "SELECT count(*) FROM pg_policies WHERE schemaname = 'public' AND tablename = $1",
                table,
            )
            assert rls and policies >= 1, table
    finally:
        await conn.close()


async def _visible(conn: asyncpg.Connection) -> dict[str, list[str]]:
    result = {}
    for table, column in ORG_COLUMN.items():
        rows = await conn.fetch(f"SELECT {column} AS org FROM {table}")
        result[table] = sorted(r["org"] for r in rows)
    return result


async def test_role_sees_only_the_org_it_sets(reader: asyncpg.Connection) -> None:
    assert not await reader.fetchval(
        "SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    for org in ORGS:
        async with reader.transaction():
            await reader.execute(f"SET LOCAL creditgate.org_id = '{org}'")
            seen = await _visible(reader)
        assert seen["organizations"] == [org]
        for table in ORG_COLUMN.keys() - {"organizations"}:
            assert seen[table] == [org] * (4 if table == "usage_daily" else 2), table


async def test_role_without_setting_sees_nothing(reader: asyncpg.Connection) -> None:
    # Never set in this session (the setting does not exist: NULL).
    assert all(rows == [] for rows in (await _visible(reader)).values())
    # Set and then gone with its transaction (the setting now reads '').
    async with reader.transaction():
        await reader.execute("SET LOCAL creditgate.org_id = 'a'")
    assert await reader.fetchval("SELECT current_setting('creditgate.org_id', true)") == ""
    assert all(rows == [] for rows in (await _visible(reader)).values())
    # An empty setting does not reveal rows with an empty org id either.
    async with reader.transaction():
        await reader.execute("SET LOCAL creditgate.org_id = ''")
        assert all(rows == [] for rows in (await _visible(reader)).values())
