"""Per-org periods through the gate (contract A12), on the simulated clock: an org anchored
on the 31st in New York resets on Feb 28 at local midnight, refresh_at follows it, another
process learns a new anchor from its next charge, and a plan change still prorates."""

from __future__ import annotations

import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.support.actual_costs import RESEARCH_ALLOCATION, actual_cost_config, events_of

NY = ZoneInfo("America/New_York")
PERIOD = {"every": "month", "anchor": "subscription", "timezone": "America/New_York"}


def ny(y: int, m: int, d: int, h: int = 0, mi: int = 0) -> int:
    """Milliseconds since the epoch of a New York wall-clock time."""
    return int(datetime(y, m, d, h, mi, tzinfo=NY).timestamp() * 1000)


async def test_anchor_31_resets_on_feb_28_local_midnight_in_every_process() -> None:
    clock = FixedClock(ny(2027, 1, 31, 12))
    config = actual_cost_config(redis_url=f"memory://{uuid.uuid4().hex}", period=PERIOD)
    a, b = CreditGate(config, clock=clock), CreditGate(config, clock=clock)
    org = "acme"
    try:
        await a.set_plan(org, "small")
        # Process b charges first on calendar periods (it knows no anchor yet).
        assert (await b.meter.admit(org, "research", cost=5)).ok
        assert await a.set_period_anchor(org, 31) == "31:2027-01-31"
        assert await a.set_period_anchor(org, 31) == "31:2027-01-31"  # same day: no-op

        adm = await a.meter.admit(org, "research", cost=5)
        # A new period started today: the lazy reset gave the full allocation back.
        assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 5
        assert adm.refresh_at_ms == ny(2027, 2, 28)  # Feb has no 31st: its last day
        bal = await a.balance(org)
        assert bal.period == "2027-01-31..2027-02-28"
        assert (bal.period_start_ms, bal.period_end_ms) == (ny(2027, 1, 31), ny(2027, 2, 28))

        # b still assumes calendar periods: charge.lua answers "anchor", b re-templates
        # and charges in the org's own period (no second reset).
        adm = await b.meter.admit(org, "research", cost=5)
        assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 10
        assert adm.refresh_at_ms == ny(2027, 2, 28)
        assert b.meter.admission.args.anchors[org] == "31:2027-01-31"

        clock.set(ny(2027, 2, 27, 23, 59))
        adm = await b.meter.admit(org, "research", cost=5)
        assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - 15

        # A plan change mid-period prorates within the org's own period.
        await a.set_plan(org, "enterprise")
        bal = await a.balance(org)
        assert bal.buckets["research"].balance == 1000 - 15

        clock.set(ny(2027, 2, 28))  # local midnight: 05:00 UTC
        adm = await b.meter.admit(org, "research", cost=5)
        assert adm.ok and adm.remaining == 1000 - 5
        assert adm.refresh_at_ms == ny(2027, 3, 31)  # back to the 31st
        assert (await a.balance(org)).period == "2027-02-28..2027-03-31"

        events = await events_of(a, org)
        resets = [e.period for e in events if e.kind == "reset"]
        assert resets == ["2027-01", "2027-01-31..2027-02-28", "2027-02-28..2027-03-31"]
        changes = [e.period for e in events if e.kind == "plan_change" and e.bucket == "research"]
        assert changes[-1] == "2027-01-31..2027-02-28"
    finally:
        await a.close()
        await b.close()


async def test_calendar_deployments_refuse_anchors_and_keep_utc_months() -> None:
    clock = FixedClock(ny(2027, 1, 31, 22))  # Feb 1, 03:00 UTC
    config = actual_cost_config(redis_url=f"memory://{uuid.uuid4().hex}")
    gate = CreditGate(config, clock=clock)
    try:
        await gate.set_plan("acme", "small")
        adm = await gate.meter.admit("acme", "research", cost=5)
        assert adm.ok and (await gate.balance("acme")).period == "2027-02"
        try:
            await gate.set_period_anchor("acme", 15)
        except ValueError as exc:
            assert "period.anchor" in str(exc)
        else:
            raise AssertionError("an anchor was accepted on a calendar deployment")
    finally:
        await gate.close()
