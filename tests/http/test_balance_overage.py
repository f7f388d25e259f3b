"""``GET /balance`` (and the admin's ``GET /admin/orgs/{org}``) show each bucket's overage
this period (issue 8): the tokens calls cost beyond what the bucket could cover, summed
from the ledger's rows of the org's current period, per bucket, never another org's;
null when there is no ledger. Real Redis and a migrated throwaway Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from gateway.core.balances import Balance as BalanceState
from gateway.core.balances import BucketBalance
from gateway.http.token_api import balance_model
from tests.support.actual_costs import RESEARCH_ALLOCATION, actual_cost_overrides
from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(**actual_cost_overrides()):
        yield e


async def reserve(env: Env, key: str) -> str:
    """Reserve 10 of ``research``: the reservation's id."""
    r = await env.http.post(
        f"{PREFIX}/reservations", json={"feature": "research", "estimate": 10}, headers=auth(key)
    )
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    return rid


async def settle(env: Env, key: str, rid: str, actual: int) -> int:
    """Settle reservation ``rid`` at ``actual``: the overage the settle answered."""
    r = await env.http.post(
        f"{PREFIX}/reservations/{rid}/settle", json={"actual": actual}, headers=auth(key)
    )
    assert r.status_code == 200, r.text
    overage: int = r.json()["overage"]
    return overage


async def overspend(env: Env, key: str, actual: int) -> int:
    """Reserve 10 of ``research`` and settle ``actual``: the overage."""
    return await settle(env, key, await reserve(env, key), actual)


async def buckets(env: Env, key: str) -> dict[str, dict[str, object]]:
    r = await env.http.get(f"{PREFIX}/balance", headers=auth(key))
    assert r.status_code == 200, r.text
    got: dict[str, dict[str, object]] = r.json()["buckets"]
    return got


async def test_balance_shows_this_periods_overage_per_bucket(env: Env) -> None:
    key = await env.key("acme")
    other = await env.key("globex")  # another org's overage never shows
    assert (await buckets(env, key))["research"]["overage"] == 0
    first, second = await reserve(env, key), await reserve(env, key)  # 30 left
    assert await settle(env, key, first, 10 + 30 + 7) == 7  # 7 beyond the bucket
    assert await settle(env, key, second, 10 + 30) == 30  # it is empty: 30 beyond it
    await overspend(env, other, RESEARCH_ALLOCATION + 100)
    # A fixed-cost bucket's own charges never make overage.
    assert (await env.http.post(
        f"{PREFIX}/deduct", json={"feature": "goal_generation"}, headers=auth(key)
    )).status_code == 200  # fmt: skip
    # Read from the ledger: before the sync job wrote the rows, none is known yet.
    assert (await buckets(env, key))["research"]["overage"] == 0
    await env.sync()
    got = await buckets(env, key)
    assert got["research"]["overage"] == 37 and got["research"]["available"] == 0
    assert {b: v["overage"] for b, v in got.items() if b != "research"} == dict.fromkeys(
        (b for b in got if b != "research"), 0
    )
    assert (await buckets(env, other))["research"]["overage"] == 100
    r = await env.http.get("/admin/orgs/acme", headers=ADMIN)
    assert r.status_code == 200 and r.json()["buckets"]["research"]["overage"] == 37
    # The next period starts without it (the rows stay in the ledger, of their period).
    env.clock.set(int(datetime(2026, 12, 2, tzinfo=UTC).timestamp() * 1000))
    assert (await buckets(env, key))["research"]["overage"] == 0
    await overspend(env, key, RESEARCH_ALLOCATION + 1)
    await env.sync()
    assert (await buckets(env, key))["research"]["overage"] == 1


async def test_balance_follows_the_orgs_own_period() -> None:
    """An org on its own anchor (contract A12) sums its own period, not the month: anchored
    on the 20th on Nov 15, its first period ends Nov 20, and on Nov 21 its overage of
    Nov 15 is the last period's (a calendar month would still count it)."""
    anchored = {"every": "month", "anchor": "subscription", "timezone": "UTC"}
    async for env in make_env(**actual_cost_overrides(), period=anchored):
        key = await env.key("acme")
        r = await env.http.put("/admin/orgs/acme", json={"period_anchor": "2026-12-20"},
                               headers=ADMIN)  # fmt: skip
        assert r.status_code == 200, r.text
        await overspend(env, key, RESEARCH_ALLOCATION + 5)  # Nov 15
        await env.sync()
        assert (await buckets(env, key))["research"]["overage"] == 5
        env.clock.set(int(datetime(2026, 11, 21, tzinfo=UTC).timestamp() * 1000))
        r = await env.http.get(f"{PREFIX}/balance", headers=auth(key))
        assert r.json()["period_start"] == "2026-11-20T00:00:00Z"
        assert r.json()["buckets"]["research"]["overage"] == 0
        await overspend(env, key, RESEARCH_ALLOCATION + 2)
        await env.sync()
        assert (await buckets(env, key))["research"]["overage"] == 2


def test_without_a_ledger_each_buckets_overage_is_null() -> None:
    bal = BalanceState("acme", "pro", "2026-11", 0, 1)
    bal.buckets["research"] = BucketBalance("research", 50, 0, 0, 50, True)
    assert balance_model(bal).buckets["research"].overage is None
    assert balance_model(bal, {}).buckets["research"].overage == 0
    assert balance_model(bal, {"research": 4}).buckets["research"].overage == 4


async def test_the_openapi_document_describes_it(env: Env) -> None:
    doc = (await env.http.get(f"{PREFIX}/openapi.json")).json()
    prop = doc["components"]["schemas"]["Bucket"]["properties"]["overage"]
    assert "never owed" in prop["description"]
    assert {"type": "null"} in prop["anyOf"]
