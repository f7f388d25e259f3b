"""Expired holds of calls whose cost is decided after the call (issue 8): a gateway that
dies mid-request leaves its hold to the sync job's sweep (lua/sweep_holds.lua), which
charges it at its reserve. Its ledger row must say so the way a normal settle whose usage
never came does: the reserve, the charge, ``usage_missing`` and a cost source, with
``kind = 'expired_hold'`` telling that the expiry (not the feature's on_missing_usage
policy) decided. An expired app reservation (contract A9) likewise. A fixed-cost hold's
row stays as it was (no usage fields: nothing was missing). The sync worker counts the
usage-missing expiries (``creditgate_sync_events{result="swept_usage_missing"}``).

Real Redis (the tests' server, unique key prefix) and a migrated throwaway Postgres.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from sync.worker import SyncWorker
from tests.support.actual_costs import RESEARCH_RESERVE, actual_cost_gate, raw_events_of, sweep
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

HOLD_MS = 900_000  # hold_ttl_seconds (default): when a crashed gateway's hold expires


@pytest.fixture
async def gate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with actual_cost_gate("redis", clock) as g:
        await g.set_plan("acme", "pro")
        yield g


def sync_worker(gate: CreditGate, pool: asyncpg.Pool, clock: FixedClock) -> SyncWorker:
    """A sync worker for ``gate`` configured as ``creditgate sync`` / ``serve`` do it."""
    return SyncWorker(
        redis=gate.redis.client,
        pool=pool,
        keyspace=gate.keys,
        now_ms=clock.now_ms,
        variable_features=gate.config.variable_features,
    )


async def request_rows(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    async with pool.acquire() as c:
        rows = await c.fetch(
            "SELECT event_id, kind, feature_used, tokens_deducted, reserved, overage,"
            " cost_source, usage_missing, model FROM ai_token_usage_log"
            " WHERE kind IN ('charge', 'refund', 'expired_hold')"
        )
    return {r["event_id"]: r for r in rows}


def usage_columns(row: asyncpg.Record) -> tuple[Any, ...]:
    return (
        row["kind"], row["tokens_deducted"], row["reserved"], row["overage"],
        row["cost_source"], row["usage_missing"], row["model"],
    )  # fmt: skip


async def test_the_config_names_the_features_decided_after_the_call(gate: CreditGate) -> None:
    assert "research" in gate.config.variable_features
    assert "lead_generation" not in gate.config.variable_features  # cost: 5
    assert list(gate.config.variable_features) == sorted(gate.config.variable_features)


async def test_an_expired_usage_hold_row_carries_the_reserve_and_usage_missing(
    gate: CreditGate, pool: asyncpg.Pool, clock: FixedClock
) -> None:
    # A header-cost call whose gateway died before its settle: the hold stays open.
    lost = await gate.meter.admit("acme", "research", user="u1", method="POST", route="/r")
    fixed = await gate.meter.admit("acme", "lead_generation", user="u1", method="POST", route="/l")
    assert lost.ok and fixed.ok
    clock.advance(HOLD_MS + 1)
    w = sync_worker(gate, pool, clock)
    result = await w.run_once()
    assert (result.swept, result.swept_usage_missing) == (2, 1)
    rows = await request_rows(pool)
    assert usage_columns(rows[lost.request_id]) == (
        "expired_hold", RESEARCH_RESERVE, RESEARCH_RESERVE, 0, "policy", True, None,
    )  # fmt: skip
    # Fixed cost: nothing was to be read from the call, so nothing is missing.
    assert usage_columns(rows[fixed.request_id]) == (
        "expired_hold", 5, None, 0, None, False, None,
    )  # fmt: skip
    # The per-model rollup (what /stats' usage_missing_requests reads) counts it once.
    async with pool.acquire() as c:
        missing = await c.fetchval(
            "SELECT sum(usage_missing) FROM usage_daily_model WHERE organization_id = 'acme'"
        )
    assert missing == 1
    assert w.totals.swept_usage_missing == 1


async def test_an_expired_reservation_row_carries_usage_missing(
    gate: CreditGate, pool: asyncpg.Pool, clock: FixedClock
) -> None:
    r = await gate.reserve("acme", "research", estimate=12, ttl_seconds=30)
    clock.advance(31_000)
    result = await sync_worker(gate, pool, clock).run_once()
    assert (result.swept, result.swept_usage_missing) == (1, 1)
    rows = await request_rows(pool)
    assert usage_columns(rows[r.id]) == (
        "expired_hold", 12, 12, 0, "reservation", True, None,
    )  # fmt: skip


async def test_a_reservation_settled_after_its_expiry_says_usage_missing_too(
    gate: CreditGate, pool: asyncpg.Pool, clock: FixedClock
) -> None:
    """The settle that finds the reservation expired before the sweep did writes the same
    row as the sweep (lua/settle.lua): the app's actual came too late to count."""
    r = await gate.reserve("acme", "research", estimate=12, ttl_seconds=30)
    clock.advance(31_000)
    got = await gate.settle(r, 3)
    assert (got.outcome, got.charged) == ("expired", 12)
    result = await sync_worker(gate, pool, clock).run_once()
    assert result.swept == 0
    rows = await request_rows(pool)
    assert usage_columns(rows[r.id]) == (
        "expired_hold", 12, 12, 0, "reservation", True, None,
    )  # fmt: skip


async def test_without_variable_features_the_sweep_marks_only_reservations(
    gate: CreditGate, clock: FixedClock
) -> None:
    """The script's own contract: the features passed are the ones whose holds expire with
    usage missing; a reservation always is (its app never reported)."""
    lost = await gate.meter.admit("acme", "research", user="u1", method="POST", route="/r")
    await gate.reserve("acme", "research", estimate=4, ttl_seconds=30)
    clock.advance(HOLD_MS + 1)
    swept, missing = await sweep(gate, "acme", clock.now_ms(), features=())
    assert (swept, missing) == (2, 1)
    by_id = {e["id"]: e for e in await raw_events_of(gate, "acme")}
    assert "um" not in by_id[lost.request_id]  # not named: written as a fixed-cost hold
