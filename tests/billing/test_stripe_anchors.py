"""Stripe subscriptions set the org's period anchor (contract A12), with signed events on
the real Redis and a migrated throwaway Postgres database, on a simulated clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.billing.test_stripe_webhook import BILLING, Hook, org_id, subscription
from tests.support.pg import requires_postgres, temp_database
from tests.support.reference import reference_config
from tests.support.services import redis_url

NY = ZoneInfo("America/New_York")
ANCHORED = {"every": "month", "anchor": "subscription", "timezone": "America/New_York"}

pytestmark = requires_postgres


def ny(y: int, m: int, d: int, h: int = 0) -> int:
    """Milliseconds since the epoch of a New York wall-clock time."""
    return int(datetime(y, m, d, h, tzinfo=NY).timestamp() * 1000)


def cycle(
    ev: dict[str, Any], *, anchor_ms: int | None = None, start_ms: int | None = None,
    item_start_ms: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``ev`` with the subscription's billing-cycle fields (Unix seconds, as Stripe sends)."""
    obj = ev["data"]["object"]
    if anchor_ms is not None:
        obj["billing_cycle_anchor"] = anchor_ms // 1000
    if start_ms is not None:
        obj["current_period_start"] = start_ms // 1000
    if item_start_ms is not None:
        obj["items"]["data"][0]["current_period_start"] = item_start_ms // 1000
    return ev


class Env:
    """A gate on the real Redis (a key prefix of its own) and a migrated database."""

    def __init__(self, dsn: str, clock: FixedClock) -> None:
        self.dsn, self.clock = dsn, clock
        self.prefix = f"cgt{uuid.uuid4().hex[:10]}"
        self.hooks: list[Hook] = []

    def hook(self, period: Any = ANCHORED) -> Hook:
        config = reference_config(
            redis_url=redis_url(), key_prefix=self.prefix, billing=BILLING,
            database_url=self.dsn, period=period,
        )  # fmt: skip
        hook = Hook(CreditGate(config, clock=self.clock))
        self.hooks.append(hook)
        return hook

    async def row(self, org: str) -> tuple[Any, Any]:
        store = await self.hooks[0].gate.require_store()
        row = await store.pool.fetchrow(
            "SELECT period_anchor_day, period_anchor_since FROM organizations WHERE id = $1", org
        )
        assert row is not None
        return row["period_anchor_day"], row["period_anchor_since"]

    async def close(self) -> None:
        for hook in self.hooks:
            client = hook.gate.redis.client
            keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*")]
            if keys:
                await client.delete(*keys)
            await hook.client.aclose()
            await hook.gate.close()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with temp_database(migrated=True) as dsn:
        e = Env(dsn, FixedClock(ny(2027, 1, 31, 12)))
        try:
            yield e
        finally:
            await e.close()


async def test_subscription_sets_the_anchor_and_a_feb_28_renewal_keeps_the_31st(
    env: Env,
) -> None:
    hook, org = env.hook(), org_id()
    created = cycle(
        subscription("created", org, "price_pro_monthly"),
        anchor_ms=ny(2027, 1, 31, 9), start_ms=ny(2027, 1, 31, 9),
    )  # fmt: skip
    result = await hook.send(created)
    assert result["outcome"] == "applied" and "period anchor 31:2027-01-31" in result["detail"]
    bal = await hook.gate.balance(org)
    assert (bal.plan, bal.period) == ("pro", "2027-01-31..2027-02-28")
    assert bal.period_end_ms == ny(2027, 2, 28)
    assert await env.row(org) == (31, datetime(2027, 1, 31).date())

    # The renewal: Stripe's current period now starts on Feb 28 (clamped), the cycle's
    # anchor is still Jan 31. The org keeps its 31st: March's period ends on Mar 31.
    env.clock.set(ny(2027, 2, 28, 12))
    renewal = cycle(
        subscription("updated", org, "price_pro_monthly"),
        anchor_ms=ny(2027, 1, 31, 9), start_ms=ny(2027, 2, 28, 9),
    )  # fmt: skip
    assert (await hook.send(renewal))["outcome"] == "applied"
    bal = await hook.gate.balance(org)
    assert (bal.period, bal.period_end_ms) == ("2027-02-28..2027-03-31", ny(2027, 3, 31))
    assert await env.row(org) == (31, datetime(2027, 1, 31).date())
    assert await hook.gate.period_anchor(org) == "31:2027-01-31"


async def test_the_day_is_taken_in_the_period_time_zone(env: Env) -> None:
    hook, org = env.hook(), org_id()
    # No billing_cycle_anchor: current_period_start, Jan 15 02:00 UTC = Jan 14 in New York.
    utc_2am = ny(2027, 1, 14, 21)
    ev = cycle(subscription("created", org, "price_pro_monthly"), start_ms=utc_2am)
    assert (await hook.send(ev))["outcome"] == "applied"
    assert await hook.gate.period_anchor(org) == "14:2027-01-31"
    # Setting the anchor starts a period the day it is set, up to the next 14th.
    assert (await hook.gate.balance(org)).period == "2027-01-31..2027-02-14"

    # Newer API versions carry current_period_start on the items only.
    other = org_id()
    ev = cycle(subscription("created", other, "price_pro_monthly"), item_start_ms=ny(2027, 1, 3))
    assert (await hook.send(ev))["outcome"] == "applied"
    assert await hook.gate.period_anchor(other) == "3:2027-01-31"


async def test_downgrades_ignored_and_stale_events_leave_the_anchor_alone(env: Env) -> None:
    hook, org = env.hook(), org_id()
    ev = cycle(subscription("created", org, "price_pro_monthly"), anchor_ms=ny(2027, 1, 10, 9))
    await hook.send(ev)
    assert await hook.gate.period_anchor(org) == "10:2027-01-31"

    # A subscription status that changes no plan is ignored, anchor included.
    pending = cycle(
        subscription("updated", org, "price_pro_monthly", status="incomplete"),
        anchor_ms=ny(2027, 1, 20, 9),
    )  # fmt: skip
    assert (await hook.send(pending))["outcome"] == "ignored"
    # An event older than the one applied is stale.
    old = cycle(
        subscription("updated", org, "price_pro_monthly", created=ev["created"] - 60),
        anchor_ms=ny(2027, 1, 20, 9),
    )  # fmt: skip
    assert (await hook.send(old))["outcome"] == "stale"
    # A cancellation puts the org back on the default plan and keeps its periods.
    ended = cycle(
        subscription("deleted", org, "price_pro_monthly", status="canceled"),
        anchor_ms=ny(2027, 1, 20, 9),
    )  # fmt: skip
    result = await hook.send(ended)
    assert result["outcome"] == "applied" and "period anchor" not in result["detail"]
    assert await hook.plan(org) == "starter"
    assert await hook.gate.period_anchor(org) == "10:2027-01-31"
    assert await env.row(org) == (10, datetime(2027, 1, 31).date())

    # A downgrade of an org Stripe never anchored sets none.
    fresh = org_id()
    gone = cycle(
        subscription("updated", fresh, "price_pro_monthly", status="canceled"),
        anchor_ms=ny(2027, 1, 20, 9),
    )  # fmt: skip
    assert (await hook.send(gone))["outcome"] == "applied"
    assert await hook.gate.period_anchor(fresh) == ""
    assert (await hook.gate.balance(fresh)).period == "2027-01"


@pytest.mark.parametrize("anchor", ["calendar", "created"])
async def test_other_anchor_modes_take_no_anchor_from_stripe(env: Env, anchor: str) -> None:
    hook = env.hook(period={**ANCHORED, "anchor": anchor})
    org = org_id()
    ev = cycle(subscription("created", org, "price_pro_monthly"), anchor_ms=ny(2027, 1, 10, 9))
    result = await hook.send(ev)
    assert result["outcome"] == "applied" and "period anchor" not in result["detail"]
    assert await hook.plan(org) == "pro"
    if anchor == "calendar":
        assert (await hook.gate.balance(org)).period == "2027-01"
        assert await env.row(org) == (None, None)
    else:
        # `created`: the org's creation (by this very event) anchors it, on today's day.
        assert await hook.gate.period_anchor(org) == "31:2027-01-31"
