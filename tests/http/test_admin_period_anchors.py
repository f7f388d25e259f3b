"""``PUT /admin/orgs/{org} {period_anchor}`` (contract A12) on the real Redis and a throwaway
Postgres: setting, the no-op of the same day, a changed anchor that starts a new period,
and the 422s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.support.api_support import ADMIN, Env, make_env, problem
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

# The env's clock: 2026-11-15 12:00 UTC.
ANCHORED = {"every": "month", "anchor": "subscription", "timezone": "UTC"}


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(period=ANCHORED):
        yield e


async def put(env: Env, org: str, body: dict[str, Any]) -> Any:
    return await env.http.put(f"/admin/orgs/{org}", json=body, headers=ADMIN)


async def test_set_an_anchor_with_a_plan_then_alone(env: Env) -> None:
    r = await put(env, "acme", {"plan": "pro", "period_anchor": "2027-01-31"})
    assert r.status_code == 201
    assert r.json() == {
        "org": "acme", "plan": "pro", "previous_plan": None, "created": True,
        "period_anchor": "31:2026-11-15",  # only the date's day counts; since = today
    }  # fmt: skip
    detail = (await env.http.get("/admin/orgs/acme", headers=ADMIN)).json()
    assert detail["period"] == "2026-11-15..2026-11-30"  # November has no 31st
    assert detail["refresh_at"] == "2026-11-30T00:00:00Z"

    # The same day again changes nothing (a renewal, a retried call); plan is optional.
    r = await put(env, "acme", {"period_anchor": "2026-10-31"})
    assert r.status_code == 200
    assert r.json() == {
        "org": "acme", "plan": "pro", "previous_plan": "pro", "created": False,
        "period_anchor": "31:2026-11-15",
    }  # fmt: skip
    # A plan change alone reports the anchor it keeps.
    r = await put(env, "acme", {"plan": "enterprise"})
    assert r.json()["period_anchor"] == "31:2026-11-15"

    # The ledger has it (the seed's source).
    store = await env.gate.require_store()
    row = await store.pool.fetchrow(
        "SELECT plan, period_anchor_day, period_anchor_since FROM organizations WHERE id = $1",
        "acme",
    )
    assert row is not None
    assert tuple(row) == ("enterprise", 31, datetime(2026, 11, 15, tzinfo=UTC).date())


async def test_an_anchor_alone_creates_the_org_on_the_default_plan(env: Env) -> None:
    r = await put(env, "newco", {"period_anchor": "2026-11-03"})
    assert r.status_code == 201
    assert r.json() == {
        "org": "newco", "plan": "starter", "previous_plan": None, "created": True,
        "period_anchor": "3:2026-11-15",
    }  # fmt: skip
    org = await (await env.gate.require_store()).get_org("newco")
    assert org is not None and org.plan == "starter"


async def test_a_changed_anchor_starts_a_new_period_today(env: Env) -> None:
    await put(env, "acme", {"plan": "pro", "period_anchor": "2026-11-01"})
    assert (await env.gate.balance("acme")).period == "2026-11-15..2026-12-01"
    for _ in range(3):
        assert (await env.gate.charge("acme", "goal_generation")).ok  # 20 -> 11
    assert (await env.gate.balance("acme")).buckets["goal_generation"].balance == 11

    r = await put(env, "acme", {"period_anchor": "2026-11-20"})
    assert r.status_code == 200 and r.json()["period_anchor"] == "20:2026-11-15"
    # The next charge resets the bucket into the new period: the full allocation again.
    adm = await env.gate.charge("acme", "goal_generation")
    assert adm.ok and adm.remaining == 17
    bal = await env.gate.balance("acme")
    assert bal.period == "2026-11-15..2026-11-20"
    assert (
        adm.refresh_at_ms
        == bal.period_end_ms
        == int(datetime(2026, 11, 20, tzinfo=UTC).timestamp() * 1000)
    )


async def test_bad_requests_are_422(env: Env) -> None:
    problem(await put(env, "acme", {}), 422, "invalid_request")
    for bad in ("not a date", "2026-02-30", "2026-13-01", "31"):
        body = problem(await put(env, "acme", {"period_anchor": bad}), 422, "invalid_request")
        assert "period_anchor" in body["detail"], bad
    body = problem(await put(env, "acme", {"plan": "nope", "period_anchor": "2026-11-02"}),
                   422, "invalid_request")  # fmt: skip
    assert "plan" in body["detail"]
    # Nothing was created by any of them.
    assert await (await env.gate.require_store()).get_org("acme") is None


async def test_calendar_deployments_refuse_an_anchor() -> None:
    async for env in make_env():
        body = problem(
            await put(env, "acme", {"plan": "pro", "period_anchor": "2026-11-02"}),
            422, "invalid_request",
        )  # fmt: skip
        assert "period.anchor" in body["detail"]
        assert await (await env.gate.require_store()).get_org("acme") is None
