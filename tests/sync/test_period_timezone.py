"""The sync job's refresh dates in the config's period time zone (contract A12): events of
a real gate (anchored and calendar orgs in New York) moved by the real sync job into
ai_tokens and the alert outbox, on the real Redis and Postgres."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from gateway.alerts.evaluation import AlertDefaults
from gateway.core.periods import FixedClock
from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from sync.records import refresh_of
from sync.worker import SyncWorker
from tests.support.pg import requires_postgres
from tests.support.reference import reference_config
from tests.support.services import redis_url

pytestmark = requires_postgres

NY = ZoneInfo("America/New_York")
PERIOD = {"every": "month", "anchor": "subscription", "timezone": "America/New_York"}
ALERTS = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=True, forecast=False)


def ny(y: int, m: int, d: int, h: int = 0) -> int:
    """Milliseconds since the epoch of a New York wall-clock time."""
    return int(datetime(y, m, d, h, tzinfo=NY).timestamp() * 1000)


@pytest.fixture
async def gate(keyspace: KeySpace, pg_dsn: str) -> AsyncIterator[CreditGate]:
    config = reference_config(
        redis_url=redis_url(), key_prefix=keyspace.prefix, shards=keyspace.shards,
        database_url=pg_dsn, period=PERIOD,
    )  # fmt: skip
    g = CreditGate(config, clock=FixedClock(ny(2027, 1, 31, 12)))
    yield g
    await g.close()


async def sync_once(gate: CreditGate, redis: Any, pool: asyncpg.Pool, ks: KeySpace) -> None:
    """One pass of the sync job as `creditgate sync` builds it from the gate's config."""
    worker = SyncWorker(
        redis=redis, pool=pool, keyspace=ks, alerts=ALERTS,
        timezone=gate.config.period.timezone, now_ms=gate.clock.now_ms,
    )  # fmt: skip
    result = await worker.run_once()
    assert result.read > 0


async def refresh_date(pool: asyncpg.Pool, org: str) -> tuple[str, datetime]:
    row = await pool.fetchrow(
        "SELECT period, refresh_date FROM ai_tokens"
        " WHERE organization_id = $1 AND token_type = 'lead_generation'",
        org,
    )
    assert row is not None
    return row["period"], row["refresh_date"]


async def test_refresh_date_and_alert_refresh_at_are_local_midnight_of_the_orgs_period(
    gate: CreditGate, redis: Any, keyspace: KeySpace, pool: asyncpg.Pool
) -> None:
    clock = gate.clock
    assert isinstance(clock, FixedClock)
    for org in ("anchored", "calendar"):
        await gate.set_plan(org, "pro")  # lead_generation: 60 tokens, 5 a call
    assert await gate.set_period_anchor("anchored", 31) == "31:2027-01-31"
    for org in ("anchored", "calendar"):
        for _ in range(10):  # 50 of 60: past 80%
            assert (await gate.charge(org, "lead_generation")).ok
    await sync_once(gate, redis, pool, keyspace)

    # Feb 28 and Feb 1 at midnight in New York (EST, UTC-5), not midnight UTC.
    assert await refresh_date(pool, "anchored") == (
        "2027-01-31..2027-02-28",
        datetime(2027, 2, 28, 5, tzinfo=UTC),
    )
    assert await refresh_date(pool, "calendar") == ("2027-01", datetime(2027, 2, 1, 5, tzinfo=UTC))

    rows = await pool.fetch(
        "SELECT organization_id, period, payload FROM alert_events ORDER BY organization_id"
    )
    data = {r["organization_id"]: json.loads(r["payload"])["data"] for r in rows}
    assert data["anchored"]["period"] == "2027-01-31..2027-02-28"
    assert data["anchored"]["refresh_at"] == "2027-02-28T05:00:00Z"
    # The gate tells clients the same instant.
    assert (await gate.balance("anchored")).period_end_ms == ny(2027, 2, 28)
    assert data["calendar"]["refresh_at"] == "2027-02-01T05:00:00Z"

    # The next anchored period ends on Mar 31, after the DST change: midnight is 04:00 UTC.
    clock.set(ny(2027, 2, 28, 9))
    assert (await gate.charge("anchored", "lead_generation")).ok
    await sync_once(gate, redis, pool, keyspace)
    assert await refresh_date(pool, "anchored") == (
        "2027-02-28..2027-03-31",
        datetime(2027, 3, 31, 4, tzinfo=UTC),
    )


def test_refresh_of_takes_the_time_zone() -> None:
    assert refresh_of("2027-01-31..2027-02-28") == datetime(2027, 2, 28, tzinfo=UTC)
    assert refresh_of("2027-01-31..2027-02-28", "Europe/Paris") == datetime(
        2027, 2, 27, 23, tzinfo=UTC
    )
    assert refresh_of("2027-W09", "Asia/Tokyo") == datetime(2027, 3, 7, 15, tzinfo=UTC)
    assert refresh_of("not a period", "Asia/Tokyo") is None
