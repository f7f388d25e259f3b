"""The admin API (/admin) on the real Redis and a throwaway Postgres."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.support.api_support import ADMIN, PREFIX, Env, auth, make_env, problem
from tests.support.pg import requires_postgres

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


@pytest.fixture
async def closed_env() -> AsyncIterator[Env]:
    async for e in make_env(admin_token=None):
        yield e


async def test_no_admin_token_means_no_admin_api(closed_env: Env) -> None:
    http = closed_env.http
    for method, path in [("GET", "/admin/orgs"), ("PUT", "/admin/orgs/acme"),
                         ("GET", "/admin/dashboard"), ("POST", "/admin/keys"),
                         ("GET", "/admin/static/app.css")]:  # fmt: skip
        r = await http.request(method, path, headers=ADMIN, json={"plan": "pro", "org": "acme"})
        problem(r, 404, "not_found")
    assert await (await closed_env.gate.require_store()).get_org("acme") is None
    doc = (await http.get(f"{PREFIX}/openapi.json")).json()
    assert not [p for p in doc["paths"] if p.startswith("/admin")]


async def test_admin_token_is_required(env: Env) -> None:
    token = ADMIN["Authorization"][7:]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                    {"X-API-Key": token}):  # fmt: skip
        r = await env.http.get("/admin/orgs", headers=headers)
        problem(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"].startswith("Bearer")
    # An API key of an org is no admin token.
    key = await env.key("acme")
    problem(await env.http.get("/admin/orgs", headers=auth(key)), 401, "unauthenticated")
    assert (await env.http.get("/admin/orgs", headers=ADMIN)).status_code == 200


async def test_wrong_admin_tokens_are_throttled() -> None:
    async for env in make_env(identity={"api_keys": True, "bad_credentials_per_minute": 3}):
        for _ in range(3):
            problem(await env.http.get("/admin/orgs", headers={"Authorization": "Bearer x"}),
                    401, "unauthenticated")  # fmt: skip
        r = await env.http.get("/admin/orgs", headers={"Authorization": "Bearer x"})
        problem(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1


async def test_orgs_and_plans(env: Env) -> None:
    r = await env.http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    assert r.status_code == 201
    assert r.json() == {
        "org": "acme", "plan": "pro", "previous_plan": None, "created": True,
        "period_anchor": None,  # calendar periods (contract A12)
    }  # fmt: skip
    await env.gate.charge("acme", "goal_generation")  # 20 -> 17
    r = await env.http.put("/admin/orgs/acme", json={"plan": "enterprise"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["previous_plan"] == "pro"
    r = await env.http.get("/admin/orgs/acme", headers=ADMIN)
    org = r.json()
    assert org["plan"] == "enterprise" and org["keys"] == [] and org["created_at"]
    # A5: the period's balance moves by the allocation difference (300 - 20).
    goal = org["buckets"]["goal_generation"]
    assert (goal["allocated"], goal["balance"]) == (300, 297)
    problem(await env.http.get("/admin/orgs/nobody", headers=ADMIN), 404, "unknown_org")
    body = problem(
        await env.http.put("/admin/orgs/acme", json={"plan": "platinum"}, headers=ADMIN),
        422, "invalid_request",
    )  # fmt: skip
    assert "starter" in str(body["detail"])
    problem(await env.http.put("/admin/orgs/a%20b", json={"plan": "pro"}, headers=ADMIN),
            422, "invalid_request")  # fmt: skip
    problem(
        await env.http.put("/admin/orgs/acme", content=b"pro", headers=ADMIN), 400, "bad_request"
    )
    # Every change leaves a ledger row once synced: the creation and the change.
    await env.sync()
    store = await env.gate.require_store()
    rows = await store.pool.fetch(
        "SELECT plan, tokens_deducted FROM ai_token_usage_log WHERE organization_id = 'acme'"
        " AND kind = 'plan_change' ORDER BY seq"
    )
    plans = [r["plan"] for r in rows]
    assert "enterprise" in plans and plans[-1] == "enterprise"
    assert sum(-r["tokens_deducted"] for r in rows if r["plan"] == "enterprise") > 0


async def test_keys(env: Env) -> None:
    problem(
        await env.http.post("/admin/keys", json={"org": "acme"}, headers=ADMIN), 404, "unknown_org"
    )
    await env.http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    r = await env.http.post("/admin/keys", json={"org": "acme", "user": "alice", "name": "ci"},
                            headers=ADMIN)  # fmt: skip
    assert r.status_code == 201
    created = r.json()
    assert created["key"].startswith("cg_") and created["id"].startswith("key_")
    assert (created["org"], created["user"], created["name"]) == ("acme", "alice", "ci")
    key = created["key"]
    assert (await env.http.get(f"{PREFIX}/balance", headers=auth(key))).json()["org"] == "acme"
    listed = (await env.http.get("/admin/keys?org=acme", headers=ADMIN)).json()["items"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert listed[0]["revoked_at"] is None
    org = (await env.http.get("/admin/orgs/acme", headers=ADMIN)).json()
    assert org["keys"] == [created["id"]]
    r = await env.http.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert r.status_code == 204
    await asyncio.sleep(0.3)  # > key_cache_seconds
    problem(await env.http.get(f"{PREFIX}/balance", headers=auth(key)), 401, "unauthenticated")
    assert (await env.http.get("/admin/orgs/acme", headers=ADMIN)).json()["keys"] == []
    listed = (await env.http.get("/admin/keys?org=acme", headers=ADMIN)).json()["items"]
    assert listed[0]["revoked_at"] is not None
    problem(await env.http.delete("/admin/keys/key_nope", headers=ADMIN), 404, "unknown_key")
    problem(await env.http.get("/admin/keys", headers=ADMIN), 400, "bad_request")
    problem(await env.http.post("/admin/keys", json={"org": "acme", "user": ""}, headers=ADMIN),
            422, "invalid_request")  # fmt: skip


async def test_grants(env: Env) -> None:
    url = "/admin/orgs/acme/grants"
    grant = {"bucket": "goal_generation", "amount": 100, "reference": "stripe-cs-1"}
    problem(await env.http.post(url, json=grant, headers=ADMIN), 404, "unknown_org")
    await env.http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    r = await env.http.post(url, json={**grant, "expires_at": "2027-01-01T00:00:00+01:00"},
                            headers=ADMIN)  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["created"] is True and body["expires_at"] == "2026-12-31T23:00:00Z"
    r = await env.http.post(url, json=grant, headers=ADMIN)  # same reference: idempotent
    assert r.status_code == 200 and r.json()["created"] is False and r.json()["id"] == body["id"]
    bal = await env.gate.balance("acme")
    assert (bal.buckets["goal_generation"].extra, bal.buckets["goal_generation"].available) == (
        100,
        120,
    )
    problem(
        await env.http.post(url, json={**grant, "amount": 5}, headers=ADMIN), 409, "grant_conflict"
    )
    for bad in ({**grant, "bucket": "gold"}, {**grant, "amount": 0}, {**grant, "amount": "5"},
                {**grant, "reference": ""}, {**grant, "expires_at": "2026-11-01T00:00:00Z"},
                {**grant, "expires_at": "2027-01-01T00:00:00"}, {"amount": 5}):  # fmt: skip
        problem(await env.http.post(url, json=bad, headers=ADMIN), 422, "invalid_request")
    await env.sync()
    store = await env.gate.require_store()
    rows = await store.pool.fetch(
        "SELECT reference, tokens_deducted, extra_after FROM ai_token_usage_log"
        " WHERE organization_id = 'acme' AND kind = 'grant'"
    )
    assert [(r["reference"], r["tokens_deducted"], r["extra_after"]) for r in rows] == [
        ("stripe-cs-1", -100, 100)
    ]


async def test_top_spenders_and_usage_window(env: Env) -> None:
    for org, plan, charges in [("big", "enterprise", 6), ("mid", "pro", 3), ("small", "pro", 1)]:
        await env.gate.set_plan(org, plan)
        for n in range(charges):
            assert (await env.gate.charge(org, "lead_generation", user=f"{org}-u{n % 2}")).ok
    await env.gate.set_plan("idle", "pro")
    await env.gate.charge("small", "general_insights", user="small-u0")
    await env.sync()
    r = await env.http.get("/admin/orgs?sort=spend", headers=ADMIN)
    body = r.json()
    assert (body["sort"], body["from"], body["to"]) == ("spend", "2026-11-01", "2026-11-15")
    assert [(o["org"], o["plan"], o["tokens"]) for o in body["items"]] == [
        ("big", "enterprise", 30), ("mid", "pro", 15), ("small", "pro", 6),
    ]  # fmt: skip
    r = await env.http.get("/admin/orgs?limit=2", headers=ADMIN)
    assert [o["org"] for o in r.json()["items"]] == ["big", "mid"]
    r = await env.http.get("/admin/orgs?sort=id&limit=2&after=idle", headers=ADMIN)
    assert [(o["org"], o["tokens"]) for o in r.json()["items"]] == [("mid", 15), ("small", 6)]
    problem(await env.http.get("/admin/orgs?sort=name", headers=ADMIN), 400, "bad_request")
    u = (await env.http.get("/admin/usage?from=2026-11-15&to=2026-11-15", headers=ADMIN)).json()
    assert u["totals"] == {"requests": 11, "tokens": 51, "orgs": 3}
    assert u["by_feature"] == [
        {"feature": "lead_generation", "requests": 10, "tokens": 50},
        {"feature": "general_insights", "requests": 1, "tokens": 1},
    ]
    assert [(o["org"], o["tokens"]) for o in u["by_org"]] == [
        ("big", 30),
        ("mid", 15),
        ("small", 6),
    ]
    top = u["by_user"][0]
    assert (top["org"], top["user_id"], top["tokens"], top["share"]) == ("big", "big-u0", 15, 0.5)
    small = [x for x in u["by_user"] if x["org"] == "small"]
    assert [(x["user_id"], x["tokens"], x["share"]) for x in small] == [("small-u0", 6, 1.0)]
    # Defaults: from the period start to today; days=N counts back from `to`.
    d = (await env.http.get("/admin/usage", headers=ADMIN)).json()
    assert (d["from"], d["to"], len(d["by_day"])) == ("2026-11-01", "2026-11-15", 15)
    d = (await env.http.get("/admin/usage?days=30&limit=1", headers=ADMIN)).json()
    assert d["from"] == "2026-10-17" and len(d["by_org"]) == 1 and d["totals"]["tokens"] == 51
    for bad in ("from=2026-11-16&to=2026-11-15", "from=2025-01-01&to=2026-11-15", "from=nov",
                "days=0", "to=0001-01-01&days=3"):  # fmt: skip
        problem(await env.http.get(f"/admin/usage?{bad}", headers=ADMIN), 400, "bad_request")


async def test_admin_dashboard_page(env: Env) -> None:
    r = await env.http.get("/admin/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="/admin/static/admin.js"' in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert (await env.http.get("/admin/static/admin.js")).status_code == 200


async def test_text_postgres_cannot_store_is_refused_not_a_500(env: Env) -> None:
    # JSON can carry NUL and lone surrogates; Postgres text cannot: 422, never a 500.
    def body(doc: dict[str, object]) -> bytes:
        return json.dumps(doc).encode()  # ensure_ascii: "\\ud800" stays an escape

    await env.http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
    grant = {"bucket": "goal_generation", "amount": 1}
    for text in ("a\u0000b", "\ud800"):
        r = await env.http.post(
            "/admin/orgs/acme/grants", content=body({**grant, "reference": text}), headers=ADMIN
        )
        problem(r, 422, "invalid_request")
        r = await env.http.post(
            "/admin/keys", content=body({"org": "acme", "name": text}), headers=ADMIN
        )
        problem(r, 422, "invalid_request")
    problem(await env.http.get("/admin/orgs?sort=id&after=%00", headers=ADMIN), 400, "bad_request")
    problem(await env.http.delete("/admin/keys/key%00x", headers=ADMIN), 404, "unknown_key")
    key = await env.key("acme", plan=None)
    r = await env.http.post(
        f"{PREFIX}/deduct",
        content=body({"feature": "goal_generation", "idempotency_key": "\ud800"}),
        headers=auth(key),
    )
    problem(r, 422, "invalid_request")
    r = await env.http.post(
        f"{PREFIX}/check", content=body({"feature": "\ud800"}), headers=auth(key)
    )
    problem(r, 422, "invalid_request")


async def test_behind_a_trusted_proxy_bad_admin_tokens_throttle_the_client_not_the_proxy() -> None:
    # httpx's ASGI transport connects from 127.0.0.1: the load balancer here. The limiter
    # must key on the client it names, or one guesser would lock every admin out.
    identity = {
        "api_keys": True,
        "bad_credentials_per_minute": 2,
        "trusted_proxies": ["127.0.0.1/32"],
    }
    async for env in make_env(identity=identity):
        guesser = {"Authorization": "Bearer x", "X-Forwarded-For": "203.0.113.7"}
        for _ in range(2):
            problem(await env.http.get("/admin/orgs", headers=guesser), 401, "unauthenticated")
        problem(await env.http.get("/admin/orgs", headers=guesser), 429, "rate_limited")
        admin = {**ADMIN, "X-Forwarded-For": "198.51.100.9"}
        assert (await env.http.get("/admin/orgs", headers=admin)).status_code == 200
