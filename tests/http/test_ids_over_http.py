"""The id rule (gateway.core.ids) at the HTTP entry points: a path or body id is 422
``invalid_request``, a query id 400 ``bad_request``; nothing is created or charged."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator

import pytest

from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env, problem
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

BAD = ["", "x" * 300, "nul\x00byte", "has space", "caf\u00e9", "tab\there"]
# In a path the id is percent-encoded: an encoded slash must not split the segment (it
# did: 404 "No such endpoint", or 405 for a lone "/", found by the OpenAPI fuzz test).
PATH_BAD = [*BAD[1:], "a/b", "/", "acme/grants"]  # "" is no path segment


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


async def _nothing_created(env: Env) -> None:
    store = await env.gate.require_store()
    assert await store.pool.fetchval("SELECT count(*) FROM organizations") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM api_keys") == 0


@pytest.mark.parametrize("bad", PATH_BAD, ids=lambda v: repr(v)[:12])
async def test_an_org_id_in_an_admin_path(env: Env, bad: str) -> None:
    org = urllib.parse.quote(bad, safe="")
    grant = {"bucket": "goal_generation", "amount": 5, "reference": "r"}
    for method, path, body in [("PUT", f"/admin/orgs/{org}", {"plan": "pro"}),
                               ("GET", f"/admin/orgs/{org}", None),
                               ("POST", f"/admin/orgs/{org}/grants", grant)]:  # fmt: skip
        r = await env.http.request(method, path, json=body, headers=ADMIN)
        assert problem(r, 422, "invalid_request")["errors"][0]["field"] == "org"
    await _nothing_created(env)


@pytest.mark.parametrize("bad", BAD, ids=lambda v: repr(v)[:12])
async def test_an_id_in_an_admin_body_or_query(env: Env, bad: str) -> None:
    for body in ({"org": bad}, {"org": "acme", "user": bad}):
        problem(await env.http.post("/admin/keys", json=body, headers=ADMIN), 422,
                "invalid_request")  # fmt: skip
    query = urllib.parse.urlencode({"org": bad})
    problem(await env.http.get(f"/admin/keys?{query}", headers=ADMIN), 400, "bad_request")
    await _nothing_created(env)


@pytest.mark.parametrize("bad", BAD, ids=lambda v: repr(v)[:12])
async def test_a_user_id_in_a_deduct(env: Env, bad: str) -> None:
    key = await env.key("acme")
    body = {"feature": "goal_generation", "user_id": bad}  # "" is a value, not absent
    r = await env.http.post(f"{PREFIX}/deduct", json=body, headers=auth(key))
    assert problem(r, 422, "invalid_request")["errors"][0]["field"] == "user_id"
    assert (await env.gate.balance("acme")).buckets["goal_generation"].available == 20
