"""``PUT /admin/orgs/{org}`` says exactly whether it created the org.

The race this pins down: the gate changes the plan in Redis first (which queues a
``plan_change`` event), then in the organizations table. When the sync job moved that
event to Postgres in between, it had already inserted the org's row, and the PUT answered
200 ``created: false`` for an org that did not exist. The test makes the sync job run at
exactly that point, every time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.ledger.store import Store
from tests.support.api_support import ADMIN, Env, make_env
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


async def _sync_before_the_ledger_write(env: Env, monkeypatch: pytest.MonkeyPatch) -> Store:
    store = await env.gate.require_store()
    original = store.set_plan

    async def sync_first(org: str, plan: str) -> str | None:
        await env.sync()  # the sync job wins the race: it inserts the org from the event
        assert await store.get_org(org) is not None
        return await original(org, plan)

    monkeypatch.setattr(store, "set_plan", sync_first)
    return store


async def test_a_new_org_is_created_even_when_the_sync_job_wrote_it_first(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _sync_before_the_ledger_write(env, monkeypatch)
    r = await env.http.put("/admin/orgs/fresh", json={"plan": "pro"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "org": "fresh",
        "plan": "pro",
        "previous_plan": None,
        "created": True,
        "period_anchor": None,
    }
    # The next PUT changes an existing org.
    r = await env.http.put("/admin/orgs/fresh", json={"plan": "enterprise"}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {
        "org": "fresh", "plan": "enterprise", "previous_plan": "pro", "created": False,
        "period_anchor": None,
    }  # fmt: skip


async def test_an_org_known_only_from_its_usage_is_created_by_its_first_put() -> None:
    # With a default plan that has tokens, an org can be charged before anyone configured
    # it, and the sync job makes a row for it. That row is bookkeeping, not a configured
    # org: the first PUT creates it, so the answer does not depend on whether the sync job
    # ran before the PUT.
    async for env in make_env(default_plan="pro"):
        assert (await env.gate.charge("early", "general_insights")).ok
        await env.sync()
        store = await env.gate.require_store()
        assert (await store.get_org("early")) is not None
        r = await env.http.put("/admin/orgs/early", json={"plan": "enterprise"}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["created"] is True
        r = await env.http.put("/admin/orgs/early", json={"plan": "pro"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["previous_plan"] == "enterprise"


async def test_the_library_reports_creation_the_same_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _sync_before_the_ledger_write(env, monkeypatch)
    assert await env.gate.set_plan("lib", "pro") is None
    assert await env.gate.set_plan("lib", "enterprise") == "pro"
