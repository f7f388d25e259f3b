"""Per-org periods with the ledger (contract A12), on the real Redis and a throwaway
Postgres, two gate processes, New York time, a simulated clock: the anchor survives a Redis
flush (seeded from Postgres), ``anchor: created`` anchors orgs created on purpose only, and
a reservation on a process that knew the old anchor charges in the org's new period."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from sync.worker import SyncWorker
from tests.support.actual_costs import (
    RESEARCH_ALLOCATION,
    RESEARCH_RESERVE,
    actual_cost_config,
    events_of,
)
from tests.support.api_support import clean_prefix
from tests.support.pg import requires_postgres, temp_database
from tests.support.services import redis_url

pytestmark = requires_postgres

NY = ZoneInfo("America/New_York")


def ny(y: int, m: int, d: int, h: int = 0) -> int:
    """Milliseconds since the epoch of a New York wall-clock time."""
    return int(datetime(y, m, d, h, tzinfo=NY).timestamp() * 1000)


def period(anchor: str) -> dict[str, str]:
    return {"every": "month", "anchor": anchor, "timezone": "America/New_York"}


@dataclass
class Procs:
    """Two gate processes on one Redis prefix and one ledger, sharing a clock."""

    a: CreditGate
    b: CreditGate
    clock: FixedClock
    prefix: str
    config: Any

    def another(self) -> CreditGate:
        """A fresh process (nothing cached), closed by the fixture."""
        gate = CreditGate(self.config, clock=self.clock)
        self.extra.append(gate)
        return gate

    def __post_init__(self) -> None:
        self.extra: list[CreditGate] = []

    async def sync(self) -> None:
        await self.a.meter.drain()
        await self.b.meter.drain()
        store = await self.a.require_store()
        worker = SyncWorker(
            redis=self.a.redis.client, pool=store.pool, keyspace=self.a.keys,
            timezone=self.config.period.timezone, now_ms=self.clock.now_ms,
        )  # fmt: skip
        await worker.run_once()


async def _procs(anchor: str) -> AsyncIterator[Procs]:
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    clock = FixedClock(ny(2027, 1, 31, 12))
    async with temp_database(migrated=True) as dsn:
        config = actual_cost_config(
            redis_url=redis_url(), key_prefix=prefix, database_url=dsn, period=period(anchor)
        )
        p = Procs(CreditGate(config, clock=clock), CreditGate(config, clock=clock), clock,
                  prefix, config)  # fmt: skip
        try:
            yield p
        finally:
            for gate in (p.a, p.b, *p.extra):
                await gate.close()
            await clean_prefix(prefix)


@pytest.fixture
async def subscription() -> AsyncIterator[Procs]:
    async for p in _procs("subscription"):
        yield p


@pytest.fixture
async def created() -> AsyncIterator[Procs]:
    async for p in _procs("created"):
        yield p


async def test_the_anchor_is_seeded_from_the_ledger_after_redis_is_flushed(
    subscription: Procs,
) -> None:
    p, org = subscription, "acme"
    await p.a.set_plan(org, "small")
    assert await p.a.set_period_anchor(org, 31) == "31:2027-01-31"
    for gate in (p.a, p.b):  # two charged requests: their settles write the ledger rows
        adm = await gate.meter.admit(org, "research", cost=5)
        assert adm.ok
        await gate.meter.settle(adm, ok=True, status=None, latency_ms=None)
    await p.sync()

    # Redis loses everything of the deployment (as a FLUSHALL would, on our prefix only).
    await clean_prefix(p.prefix)
    assert not await p.a.redis.client.exists(p.a.keys.org(org))

    # A fresh process seeds the org from Postgres, anchor included: same period, and the
    # balance carried on (no reset into a new period).
    fresh = p.another()
    bal = await fresh.balance(org)
    assert bal.period == "2027-01-31..2027-02-28"
    assert bal.period_end_ms == ny(2027, 2, 28)
    assert await fresh.period_anchor(org) == "31:2027-01-31"
    adm = await fresh.meter.admit(org, "research", cost=5)
    assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 15
    assert adm.refresh_at_ms == ny(2027, 2, 28)
    # The processes that knew the anchor before the flush go on as before.
    adm = await p.b.meter.admit(org, "research", cost=5)
    assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 20

    # Next month, the seeded anchor still clamps and comes back to the 31st.
    p.clock.set(ny(2027, 2, 28, 1))
    adm = await fresh.meter.admit(org, "research", cost=5)
    assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 5
    assert adm.refresh_at_ms == ny(2027, 3, 31)


async def test_a_reservation_after_a_changed_anchor_is_held_in_the_new_period(
    subscription: Procs,
) -> None:
    p, org = subscription, "acme"
    await p.a.set_plan(org, "small")
    assert await p.a.set_period_anchor(org, 10) == "10:2027-01-31"
    first = await p.b.reserve(org, "research")  # b learns anchor 10 here
    assert first.remaining == RESEARCH_ALLOCATION - RESEARCH_RESERVE
    assert (await p.b.settle(first, 4)).charged == 4

    # Another process changes the anchor: a new period starts today, up to the 20th.
    assert await p.a.set_period_anchor(org, 20) == "20:2027-01-31"
    assert p.b.meter.admission.args.anchors[org] == "10:2027-01-31"  # b does not know yet
    res = await p.b.reserve(org, "research")
    # charge.lua answered "anchor"; b re-templated and held in the new period: reset first.
    assert p.b.meter.admission.args.anchors[org] == "20:2027-01-31"
    assert res.remaining == RESEARCH_ALLOCATION - RESEARCH_RESERVE
    settled = await p.b.settle(res, 7)
    assert (settled.charged, settled.refunded, settled.remaining) == (7, 3, RESEARCH_ALLOCATION - 7)

    bal = await p.a.balance(org)
    assert bal.period == "2027-01-31..2027-02-20"
    assert bal.buckets["research"].balance == RESEARCH_ALLOCATION - 7
    events = await events_of(p.a, org)
    resets = [e.period for e in events if e.kind == "reset" and e.bucket == "research"]
    assert resets == ["2027-01-31..2027-02-10", "2027-01-31..2027-02-20"]
    charges = [e for e in events if e.kind == "charge" and e.bucket == "research"]
    assert [(e.tokens, e.period) for e in charges] == [
        (4, "2027-01-31..2027-02-10"),
        (7, "2027-01-31..2027-02-20"),
    ]


async def test_anchor_created_anchors_orgs_created_on_purpose_only(created: Procs) -> None:
    p = created
    assert await p.a.set_plan("acme", "small") is None  # created today, Jan 31 in New York
    assert await p.a.period_anchor("acme") == "31:2027-01-31"
    assert (await p.b.balance("acme")).period == "2027-01-31..2027-02-28"

    # A plan change later keeps the anchor of the creation.
    p.clock.set(ny(2027, 2, 5, 12))
    assert await p.a.set_plan("acme", "enterprise") == "small"
    assert await p.a.period_anchor("acme") == "31:2027-01-31"
    assert (await p.a.balance("acme")).period == "2027-01-31..2027-02-28"

    # An org first met in traffic stays on calendar months (New York) until one is set.
    # (Its state is made on the default plan, which has no research: refused, but met.)
    adm = await p.b.meter.admit("walkin", "research", cost=1)
    assert adm.status == "not_in_plan"
    assert await p.a.redis.client.exists(p.a.keys.org("walkin"))
    assert await p.a.period_anchor("walkin") == ""
    bal = await p.a.balance("walkin")
    assert (bal.period, bal.period_end_ms) == ("2027-02", ny(2027, 3, 1))
    store = await p.a.require_store()
    row = await store.pool.fetchrow(
        "SELECT period_anchor_day FROM organizations WHERE id = 'walkin'"
    )
    assert row is None or row["period_anchor_day"] is None
    # Set through the API like any other mode: from then on its own periods.
    assert await p.a.set_period_anchor("walkin", 15) == "15:2027-02-05"
    assert (await p.b.balance("walkin")).period == "2027-02-05..2027-02-15"
