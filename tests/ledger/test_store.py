"""gateway.ledger.store against the real Postgres (a migrated throwaway database per test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from gateway.core.errors import DatabaseUnavailable
from gateway.ledger.store import (
    GrantConflict,
    GrantRow,
    Lot,
    Store,
    UnknownOrg,
    hash_api_key,
    looks_like_api_key,
)
from gateway.ledger.store import allocate_lots as _allocate_lots
from tests.support.pg import migrated_database, requires_postgres

pytestmark = requires_postgres

pg_dsn = pytest.fixture(migrated_database)


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[Store]:
    s = await Store.connect(pg_dsn, max_size=4)
    try:
        yield s
    finally:
        await s.close()


def _ms(d: datetime) -> int:
    return int(d.timestamp() * 1000)


# --- pure helpers ---------------------------------------------------------------------


def test_api_key_syntax() -> None:
    assert looks_like_api_key("cg_" + "A" * 43)
    assert looks_like_api_key("cg_" + "a-_9" * 10 + "xyz")
    assert not looks_like_api_key("cg_" + "A" * 42)
    assert not looks_like_api_key("cg_" + "A" * 44)
    assert not looks_like_api_key("xx_" + "A" * 43)
    assert not looks_like_api_key("cg_" + "A" * 42 + "+")
    assert not looks_like_api_key("cg_" + "A" * 42 + "=")
    assert hash_api_key("abc") == bytes.fromhex(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def _grant(gid: int, amount: int, created: datetime, expires: datetime | None) -> GrantRow:
    return GrantRow(gid, "o", "b", amount, expires, f"r{gid}", created)


def test_lots_take_the_newest_grants_first_and_sum_to_extra() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    old = _grant(1, 100, t0, t0 + timedelta(days=90))
    mid = _grant(2, 50, t0 + timedelta(days=1), None)
    new = _grant(3, 30, t0 + timedelta(days=2), t0 + timedelta(days=30))
    grants = [old, mid, new]
    # 60 left: all of the newest (30), then 30 of the next newest (50, never expires).
    assert _allocate_lots(60, grants) == [
        Lot(_ms(t0 + timedelta(days=30)), 30, "r3"),
        Lot(0, 30, "r2"),
    ]
    assert _allocate_lots(0, grants) == []
    assert sum(lot.amount for lot in _allocate_lots(180, grants)) == 180
    # More extra than unexpired grants explain: the rest never expires, unattributed.
    lots = _allocate_lots(200, grants)
    assert sum(lot.amount for lot in lots) == 200
    assert Lot(0, 20, "") in lots
    assert [lot.expires_ms for lot in lots][:2] == [
        _ms(t0 + timedelta(days=30)),
        _ms(t0 + timedelta(days=90)),
    ]


# --- organizations --------------------------------------------------------------------


async def test_set_plan_creates_then_returns_previous_plan(store: Store) -> None:
    assert await store.get_org("acme") is None
    assert await store.set_plan("acme", "pro") is None
    org = await store.get_org("acme")
    assert org is not None and org.id == "acme" and org.plan == "pro"
    assert org.created_at.tzinfo is not None
    assert await store.set_plan("acme", "enterprise") == "pro"
    assert await store.set_plan("acme", "enterprise") == "enterprise"
    await store.set_plan("beta", "starter")
    assert [(o.id, o.plan) for o in await store.list_orgs()] == [
        ("acme", "enterprise"),
        ("beta", "starter"),
    ]


async def test_concurrent_set_plan_each_sees_a_distinct_previous(store: Store) -> None:
    plans = [f"p{i}" for i in range(8)]
    previous = await asyncio.gather(*(store.set_plan("race", p) for p in plans))
    # Serialised: exactly one creator, and the previous plans form one chain.
    assert previous.count(None) == 1
    final = await store.get_org("race")
    assert final is not None
    assert sorted(p for p in previous if p is not None) == sorted(set(plans) - {final.plan})


# --- API keys -------------------------------------------------------------------------


async def test_api_key_lifecycle(store: Store, pg_dsn: str) -> None:
    await store.set_plan("acme", "pro")
    row, key = await store.create_api_key("acme", user="u1", name="ci")
    assert looks_like_api_key(key)
    assert row.id.startswith("key_") and len(row.id) == 20
    int(row.id[4:], 16)
    assert (row.org, row.user, row.name, row.prefix) == ("acme", "u1", "ci", key[:10])
    assert row.revoked_at is None

    found = await store.lookup_api_key(hash_api_key(key))
    assert found == row
    assert await store.lookup_api_key(hash_api_key(key + "x")) is None

    row2, key2 = await store.create_api_key("acme")
    assert key2 != key and row2.user is None and row2.name == ""
    assert [k.id for k in await store.list_api_keys("acme")] == [row.id, row2.id]

    revoked = await store.revoke_api_key(row.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.lookup_api_key(hash_api_key(key)) is None
    again = await store.revoke_api_key(row.id)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert await store.revoke_api_key("key_0000000000000000") is None
    assert await store.lookup_api_key(hash_api_key(key2)) == row2
    assert len(await store.list_api_keys("acme")) == 2  # revoked keys stay listed

    # The plaintext appears in no column of any table (only its hash is stored).
    conn = await asyncpg.connect(pg_dsn)
    try:
        for table in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ):
            name = table["tablename"]
            hits = await conn.fetchval(
                f'SELECT count(*) FROM "{name}" t WHERE strpos(t::text, $1) > 0'
                " OR strpos(t::text, $2) > 0",
                key,
                key[10:],
            )
            assert hits == 0, name
        stored = await conn.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", row.id)
        assert stored == hash_api_key(key)
    finally:
        await conn.close()


async def test_api_key_for_unknown_org_is_a_clear_error(store: Store) -> None:
    with pytest.raises(UnknownOrg, match="ghost"):
        await store.create_api_key("ghost")


# --- grants ---------------------------------------------------------------------------


async def test_grant_is_idempotent_by_reference(store: Store, pg_dsn: str) -> None:
    await store.set_plan("acme", "pro")
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    g, created = await store.record_grant("acme", "lead_generation", 100, expires, "cs_1")
    assert created and (g.org, g.bucket, g.amount, g.expires_at, g.reference) == (
        "acme",
        "lead_generation",
        100,
        expires,
        "cs_1",
    )
    again, created2 = await store.record_grant(
        "acme", "lead_generation", 100, expires + timedelta(seconds=3), "cs_1"
    )
    assert not created2 and again == g
    with pytest.raises(GrantConflict, match="cs_1"):
        await store.record_grant("acme", "lead_generation", 200, expires, "cs_1")
    with pytest.raises(GrantConflict):
        await store.record_grant("acme", "goal_generation", 100, expires, "cs_1")
    # A reference is per org.
    await store.set_plan("beta", "pro")
    _, created3 = await store.record_grant("beta", "lead_generation", 100, None, "cs_1")
    assert created3
    conn = await asyncpg.connect(pg_dsn)
    try:
        count = await conn.fetchval("SELECT count(*) FROM token_grants WHERE reference = 'cs_1'")
    finally:
        await conn.close()
    assert count == 2


async def test_concurrent_identical_grants_create_one_row(store: Store) -> None:
    await store.set_plan("acme", "pro")
    results = await asyncio.gather(
        *(store.record_grant("acme", "b", 10, None, "same") for _ in range(6))
    )
    assert [created for _, created in results].count(True) == 1
    assert len({row.id for row, _ in results}) == 1


async def test_grant_validation(store: Store) -> None:
    await store.set_plan("acme", "pro")
    with pytest.raises(UnknownOrg):
        await store.record_grant("ghost", "b", 10, None, "r")
    with pytest.raises(ValueError):
        await store.record_grant("acme", "b", 0, None, "r")
    with pytest.raises(ValueError):
        await store.record_grant("acme", "b", 10, datetime(2030, 1, 1), "r")
    with pytest.raises(ValueError):
        await store.record_grant("acme", "b", 10, None, "")


async def test_active_grants(store: Store) -> None:
    await store.set_plan("acme", "pro")
    now = datetime(2026, 6, 1, tzinfo=UTC)
    await store.record_grant("acme", "b", 10, now - timedelta(days=1), "expired")
    await store.record_grant("acme", "b", 20, now + timedelta(days=1), "soon")
    await store.record_grant("acme", "b", 30, None, "never")
    await store.record_grant("acme", "b", 40, now, "at_now")  # expires exactly now: gone
    assert [g.reference for g in await store.active_grants("acme", now)] == ["soon", "never"]
    assert await store.active_grants("other", now) == []


# --- snapshots ------------------------------------------------------------------------


async def test_snapshot_of_unknown_org(store: Store) -> None:
    snap = await store.org_snapshot("nobody")
    assert (snap.org, snap.plan, snap.seq, snap.buckets) == ("nobody", None, 0, {})


async def test_snapshot_of_org_with_rows_and_lots(store: Store) -> None:
    await store.set_plan("acme", "pro")
    await store.set_plan("other", "pro")
    now = datetime(2026, 6, 1, tzinfo=UTC)
    soon = now + timedelta(days=10)
    await store.record_grant("acme", "lead_generation", 100, soon, "g_old")
    await store.record_grant("acme", "lead_generation", 50, None, "g_new")
    await store.record_grant("acme", "lead_generation", 70, now - timedelta(days=1), "g_exp")
    await store.record_grant("acme", "revenue_forecast", 5, None, "g_rf")  # no ai_tokens row
    await store.pool.executemany(
        "INSERT INTO ai_tokens (organization_id, token_type, balance, extra, total_allocated,"
        " used, period, seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            ("acme", "lead_generation", 40, 80, 60, 20, "2026-06", 17),
            ("acme", "goal_generation", 17, 0, 20, 3, "2026-06", 21),
            ("other", "goal_generation", 1, 0, 20, 19, "2026-06", 99),
        ],
    )
    snap = await store.org_snapshot("acme", now=now)
    assert snap.plan == "pro" and snap.seq == 21
    assert set(snap.buckets) == {"lead_generation", "goal_generation"}
    lead = snap.buckets["lead_generation"]
    assert (lead.balance, lead.extra, lead.allocated, lead.used, lead.period) == (
        40,
        80,
        60,
        20,
        "2026-06",
    )
    # 80 extra: the newest grant (50, never expires) whole, then 30 of the older one.
    assert lead.lots == [Lot(_ms(soon), 30, "g_old"), Lot(0, 50, "g_new")]
    goal = snap.buckets["goal_generation"]
    assert (goal.balance, goal.extra, goal.lots) == (17, 0, [])
    # Without `now`, the database clock decides what is expired (nothing here yet).
    live = await store.org_snapshot("acme")
    assert sum(lot.amount for lot in live.buckets["lead_generation"].lots) == 80


async def test_connect_to_missing_database_is_a_clear_error(pg_dsn: str) -> None:
    dsn = pg_dsn.rsplit("/", 1)[0] + "/creditgate_t_does_not_exist"
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        await Store.connect(dsn)
