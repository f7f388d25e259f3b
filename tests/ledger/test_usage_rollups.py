"""usage_daily_user / usage_daily_feature (0002) stay equal to sums of usage_daily through the
sync job's upserts (insert and update paths; the writer upserts them since 0010, and
usage_daily is a view of the ledger since 0015), and creditgate_derive_usage_rollups() /
creditgate_rebuild_usage_rollups() (0010, 0015) recompute them from the ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from sync import sql
from tests.support.api_support import Env, make_env
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


async def _consistent(pool: asyncpg.Pool) -> tuple[int, int]:
    """Assert both derived tables equal usage_daily's sums; return their row counts."""
    users = await pool.fetch(
        "SELECT organization_id, day, user_id, requests, tokens FROM usage_daily_user"
        " WHERE requests <> 0 OR tokens <> 0 ORDER BY 1, 2, 3"
    )
    expected_users = await pool.fetch(
        "SELECT organization_id, day, user_id, sum(requests) AS requests, sum(tokens) AS tokens"
        " FROM usage_daily GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    assert [tuple(r) for r in users] == [tuple(r) for r in expected_users]
    features = await pool.fetch(
        "SELECT organization_id, day, feature, token_type, requests, tokens"
        " FROM usage_daily_feature WHERE requests <> 0 OR tokens <> 0 ORDER BY 1, 2, 3"
    )
    expected_features = await pool.fetch(
        "SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)"
        " FROM usage_daily GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    assert [tuple(r) for r in features] == [tuple(r) for r in expected_features]
    return len(users), len(features)


async def test_derived_rollups_follow_usage_daily(env: Env) -> None:
    gate = env.gate
    for org in ("acme", "globex"):
        await gate.set_plan(org, "enterprise")
    pool = (await gate.require_store()).pool

    async def charge(org: str, feature: str, user: str | None, day: int, n: int = 1) -> None:
        env.clock.set(int(datetime(2026, 11, day, 10, tzinfo=UTC).timestamp() * 1000))
        for _ in range(n):
            assert (await gate.charge(org, feature, user=user)).ok

    await charge("acme", "lead_generation", "alice", 14, 2)
    await charge("acme", "goal_generation", "alice", 14)
    await charge("acme", "goal_generation", None, 14)
    await charge("globex", "lead_generation", "gus", 14, 3)
    await env.sync()
    assert await _consistent(pool) == (3, 3)
    # Second pass over the same keys: the sync job's upsert takes its UPDATE path.
    await charge("acme", "lead_generation", "alice", 14, 3)
    await charge("acme", "lead_generation", "bob", 14)
    env.clock.set(int(datetime(2026, 11, 15, 10, tzinfo=UTC).timestamp() * 1000))
    adm = await gate.meter.admit("acme", "general_insights", user="alice")
    gate.meter.settle(adm, ok=False, status=502, latency_ms=5)  # a refund: 1 request, 0 tokens
    await env.sync()
    assert await _consistent(pool) == (5, 4)
    alice = await pool.fetchrow(
        "SELECT requests, tokens FROM usage_daily_user WHERE organization_id = 'acme'"
        " AND day = '2026-11-14' AND user_id = 'alice'"
    )
    assert tuple(alice) == (6, 28)  # 5 lead (25 tokens) + 1 goal (3); the refund is on the 15th

    # The writer's rollups are exactly what a rebuild from the ledger computes.
    async def table(name: str) -> list[tuple[object, ...]]:
        return [tuple(r) for r in await pool.fetch(f"SELECT * FROM {name} ORDER BY 1, 2, 3, 4")]

    before = {t: await table(t) for t in ("usage_daily", "usage_daily_user", "usage_daily_feature")}
    assert await pool.fetchval("SELECT creditgate_rebuild_usage_rollups()") == 5 + 4
    for t, rows in before.items():
        assert await table(t) == rows
    # usage_daily is a view (0015): nothing writes it, and the rollups it would feed come
    # back from the ledger whatever happened to them.
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
        await pool.execute("DELETE FROM usage_daily WHERE organization_id = 'globex'")
    await pool.execute("DELETE FROM usage_daily_user WHERE organization_id = 'globex'")
    await pool.execute("UPDATE usage_daily_feature SET tokens = 0")
    assert await pool.fetchval("SELECT creditgate_derive_usage_rollups()") == 5 + 4
    assert await _consistent(pool) == (5, 4)
    await pool.execute("DELETE FROM usage_daily_feature WHERE organization_id = 'globex'")
    assert await pool.fetchval("SELECT creditgate_rebuild_usage_rollups()") == 5 + 4
    for t, rows in before.items():
        assert await table(t) == rows


async def test_rollup_increments_are_hot_updates(env: Env) -> None:
    """Migration 0014: no index holds a sum, and the pages have room, so the writer's
    rollup statement increments existing rows of both tables as HOT updates (on its page,
    no new index entry): the steady state's cheap case. With 0002's INCLUDE (sums) keys,
    not one increment of usage_daily_user or usage_daily_feature was HOT. (usage_daily, a
    view since 0015, is not written.)"""
    pool = (await env.gate.require_store()).pool
    users = [f"u{i}" for i in range(40)]
    columns = (
        ["hot-org"] * 40, ["2026-11-14"] * 40, users, ["1"] * 40, ["5"] * 40,  # users
        ["hot-org"] * 2, ["2026-11-14"] * 2, ["f1", "f2"], ["b"] * 2, ["20"] * 2,  # features
        ["100"] * 2,
    )  # fmt: skip
    text, params = sql.statement("rollup", columns)
    await pool.execute(text, *params)  # the keys' first rows: insertions
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(text, *params)  # the same keys again: increments
        rows = await conn.fetch(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('usage_daily_user', 'usage_daily_feature')"
        )
    updates = {r["relname"]: (r["n_tup_upd"], r["n_tup_hot_upd"]) for r in rows}
    assert updates == {"usage_daily_user": (40, 40), "usage_daily_feature": (2, 2)}
    got = await pool.fetch(
        "SELECT feature, requests, tokens FROM usage_daily_feature"
        " WHERE organization_id = 'hot-org' ORDER BY 1"
    )
    assert [tuple(r) for r in got] == [("f1", 40, 200), ("f2", 40, 200)]
    got = await pool.fetch(
        "SELECT DISTINCT requests, tokens FROM usage_daily_user WHERE organization_id = 'hot-org'"
    )
    assert [tuple(r) for r in got] == [(2, 10)]
    assert await pool.fetchval("SELECT count(*) FROM usage_daily_user") == 40
