"""The token API (/api/v1/tokens) on the real Redis and a throwaway Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from gateway.core.periods import FixedClock
from gateway.http.app import build_ops_app
from gateway.metering.gate import CreditGate
from tests.support.api_support import PREFIX, REDIS, Env, auth, make_env, problem
from tests.support.pg import requires_postgres
from tests.support.reference import MID_NOVEMBER_MS, reference_config

pytestmark = requires_postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env():
        yield e


def at(day: int, hour: int = 12) -> int:
    return int(datetime(2026, 11, day, hour, tzinfo=UTC).timestamp() * 1000)


async def test_balance_and_the_seed_smoke_test(env: Env) -> None:
    key = await env.key("acme", user="alice")
    r = await env.http.get(f"{PREFIX}/balance", headers=auth(key))
    assert r.status_code == 200
    bal = r.json()
    assert bal["org"] == "acme" and bal["plan"] == "pro" and bal["period"] == "2026-11"
    assert bal["period_start"] == "2026-11-01T00:00:00Z"
    assert bal["period_end"] == bal["refresh_at"] == "2026-12-01T00:00:00Z"
    goal = bal["buckets"]["goal_generation"]
    assert goal == {
        "allocated": 20, "balance": 20, "extra": 0, "used": 0, "available": 20, "in_plan": True,
        "overage": 0,
    }  # fmt: skip
    assert bal["features"]["goal_generation"] == {
        "cost": 3, "bucket": "goal_generation", "allowed": True,
    }  # fmt: skip
    # The seed's smoke test, through /deduct: goal_generation 20 -> 17.
    r = await env.http.post(
        f"{PREFIX}/deduct", json={"feature": "goal_generation"}, headers=auth(key)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["charged"] == 3 and body["remaining"] == 17 and body["replayed"] is False
    assert body["feature"] == "goal_generation" and len(body["request_id"]) == 32
    assert r.headers["x-tokens-remaining"] == "17" and r.headers["ratelimit-limit"] == "20"
    r = await env.http.get(f"{PREFIX}/balance", headers=auth(key))
    goal = r.json()["buckets"]["goal_generation"]
    assert (goal["balance"], goal["used"], goal["available"]) == (17, 3, 17)


async def test_check(env: Env) -> None:
    key = await env.key("acme")
    starter = await env.key("tiny", plan="starter")
    r = await env.http.post(
        f"{PREFIX}/check", json={"feature": "lead_generation"}, headers=auth(key)
    )
    assert r.json() == {
        "allowed": True, "code": None, "feature": "lead_generation", "bucket": "lead_generation",
        "cost": 5, "balance": 60, "refresh_at": "2026-12-01T00:00:00Z",
    }  # fmt: skip
    r = await env.http.post(
        f"{PREFIX}/check", json={"feature": "goal_generation", "quantity": 7}, headers=auth(key)
    )
    assert r.json()["allowed"] is False and r.json()["code"] == "insufficient_tokens"
    assert r.json()["cost"] == 21
    r = await env.http.post(
        f"{PREFIX}/check", json={"feature": "goal_generation"}, headers=auth(starter)
    )
    assert r.json()["allowed"] is False and r.json()["code"] == "feature_not_in_plan"
    # /check only reads.
    bal = (await env.http.get(f"{PREFIX}/balance", headers=auth(key))).json()
    assert bal["buckets"]["lead_generation"]["available"] == 60
    body = problem(
        await env.http.post(f"{PREFIX}/check", json={"feature": "nope"}, headers=auth(key)),
        422, "unknown_feature",
    )  # fmt: skip
    assert body["feature"] == "nope"
    body = problem(
        await env.http.post(
            f"{PREFIX}/check", json={"feature": 5, "quantity": 0}, headers=auth(key)
        ),
        422, "invalid_request",
    )  # fmt: skip
    assert {e["field"] for e in body["errors"]} == {"feature", "quantity"}  # type: ignore[attr-defined]
    problem(
        await env.http.post(f"{PREFIX}/check", content=b"{not json", headers=auth(key)),
        400, "bad_request",
    )  # fmt: skip
    problem(
        await env.http.post(f"{PREFIX}/check", json=["lead_generation"], headers=auth(key)),
        400, "bad_request",
    )  # fmt: skip


async def test_deduct_refusals_match_the_proxy(env: Env) -> None:
    key = await env.key("acme")
    starter = await env.key("tiny", plan="starter")
    url = f"{PREFIX}/deduct"
    body = problem(
        await env.http.post(url, json={"feature": "goal_generation"}, headers=auth(starter)),
        403, "feature_not_in_plan",
    )  # fmt: skip
    assert body["plan"] == "starter" and body["title"] == "Feature not in plan"
    body = problem(
        await env.http.post(
            url, json={"feature": "goal_generation", "quantity": 7}, headers=auth(key)
        ),
        402, "insufficient_tokens",
    )  # fmt: skip
    assert body["balance"] == 20 and body["cost"] == 21
    assert body["refresh_at"] == "2026-12-01T00:00:00Z"
    # Rate limit: pro allows 20/minute per user.
    alice = await env.key("acme", user="alice", plan=None)
    for _ in range(20):
        r = await env.http.post(
            f"{PREFIX}/deduct", json={"feature": "general_insights"}, headers=auth(alice)
        )
        assert r.status_code == 200
    r = await env.http.post(
        f"{PREFIX}/deduct", json={"feature": "general_insights"}, headers=auth(alice)
    )
    body = problem(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1 and body["retry_after"] == int(
        r.headers["retry-after"]
    )
    assert r.headers["ratelimit-remaining"] == "0"
    bal = await env.gate.balance("acme")
    assert bal.buckets["general_insights"].available == 20  # the refused call took nothing


async def test_deduct_idempotency(env: Env) -> None:
    key = await env.key("acme")
    url = f"{PREFIX}/deduct"
    r = await env.http.post(url, json={"feature": "lead_generation"},
                            headers={**auth(key), "Idempotency-Key": "quest-42"})  # fmt: skip
    assert r.status_code == 200 and r.json()["charged"] == 5
    # The same key in the body replays: nothing is charged, success is reported.
    r = await env.http.post(
        url, json={"feature": "lead_generation", "idempotency_key": "quest-42"}, headers=auth(key)
    )
    assert r.status_code == 200
    assert r.json() == {
        "charged": 0, "replayed": True, "remaining": 55, "feature": "lead_generation",
        "bucket": "lead_generation", "request_id": None,
    }  # fmt: skip
    assert (await env.gate.balance("acme")).buckets["lead_generation"].available == 55
    # Header and body disagreeing is a client bug.
    problem(
        await env.http.post(
            url, json={"feature": "lead_generation", "idempotency_key": "a"},
            headers={**auth(key), "Idempotency-Key": "b"},
        ),
        422, "invalid_request",
    )  # fmt: skip
    # A key still in flight (admitted, not settled) is 409, as on the proxy.
    adm = await env.gate.meter.admit("acme", "lead_generation", idempotency_key="busy")
    assert adm.ok
    body = problem(
        await env.http.post(url, json={"feature": "lead_generation", "idempotency_key": "busy"},
                            headers=auth(key)),
        409, "idempotency_conflict",
    )  # fmt: skip
    assert body["title"] == "Request with this Idempotency-Key in progress"
    env.gate.meter.settle(adm, ok=True, status=200, latency_ms=1, idempotency_key="busy")


async def test_deduct_user_rules(env: Env) -> None:
    alice = await env.key("acme", user="alice")
    org_key = await env.key("acme", plan=None)
    url = f"{PREFIX}/deduct"
    body = problem(
        await env.http.post(url, json={"feature": "general_insights", "user_id": "bob"},
                            headers=auth(alice)),
        403, "user_mismatch",
    )  # fmt: skip
    assert "user" in str(body["detail"])
    r = await env.http.post(url, json={"feature": "general_insights", "user_id": "alice"},
                            headers=auth(alice))  # fmt: skip
    assert r.status_code == 200
    r = await env.http.post(url, json={"feature": "general_insights", "user_id": "bob"},
                            headers=auth(org_key))  # fmt: skip
    assert r.status_code == 200
    problem(
        await env.http.post(url, json={"feature": "general_insights", "user_id": "b o b"},
                            headers=auth(org_key)),
        422, "invalid_request",
    )  # fmt: skip
    await env.sync()
    stats = (await env.http.get(f"{PREFIX}/stats", headers=auth(org_key))).json()
    assert {u["user_id"]: u["tokens"] for u in stats["by_user"]} == {"alice": 1, "bob": 1}


async def test_an_org_sees_only_its_own_data(env: Env) -> None:
    key_a = await env.key("org-a")
    key_b = await env.key("org-b", user="bea")
    r = await env.http.post(
        f"{PREFIX}/deduct", json={"feature": "lead_generation"}, headers=auth(key_b)
    )
    assert r.status_code == 200
    # Org A tries to reach B by query, body and user id: it always gets A.
    r = await env.http.post(
        f"{PREFIX}/deduct?org=org-b",
        json={"feature": "goal_generation", "org": "org-b", "organization_id": "org-b",
              "user_id": "bea"},
        headers={**auth(key_a), "X-Org-Id": "org-b"},
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["remaining"] == 17
    await env.sync()
    for path in ("/balance?org=org-b", "/stats?org=org-b&organization_id=org-b",
                 "/usage?org=org-b"):  # fmt: skip
        r = await env.http.get(PREFIX + path, headers={**auth(key_a), "X-Org-Id": "org-b"})
        assert r.status_code == 200
        assert "org-b" not in r.text.replace('"bea"', "")  # B's id never appears
    bal_a = (await env.http.get(f"{PREFIX}/balance", headers=auth(key_a))).json()
    assert bal_a["org"] == "org-a"
    assert bal_a["buckets"]["goal_generation"]["available"] == 17
    assert bal_a["buckets"]["lead_generation"]["available"] == 60  # B's charge is not A's
    bal_b = await env.gate.balance("org-b")
    assert bal_b.buckets["goal_generation"].available == 20  # A's charge did not touch B
    assert bal_b.buckets["lead_generation"].available == 55
    usage_a = (await env.http.get(f"{PREFIX}/usage", headers=auth(key_a))).json()["items"]
    charges = [row for row in usage_a if row["kind"] == "charge"]
    assert [(c["feature"], c["user_id"]) for c in charges] == [("goal_generation", "bea")]
    stats_a = (await env.http.get(f"{PREFIX}/stats", headers=auth(key_a))).json()
    assert stats_a["org"] == "org-a"
    assert [f["feature"] for f in stats_a["by_feature"]] == ["goal_generation"]


async def test_authentication(env: Env) -> None:
    key = await env.key("acme")
    for headers in ({}, {"Authorization": "Bearer cg_nonsense"}, {"X-Org-Id": "acme"}):
        r = await env.http.get(f"{PREFIX}/balance", headers=headers)
        problem(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = await env.http.get(f"{PREFIX}/balance", headers={"X-API-Key": key})
    assert r.status_code == 200
    rows = await (await env.gate.require_store()).list_api_keys("acme")
    assert await env.gate.revoke_key(rows[0].id)
    await asyncio.sleep(0.3)  # > key_cache_seconds
    problem(await env.http.get(f"{PREFIX}/stats", headers=auth(key)), 401, "unauthenticated")


async def test_stats_and_forecast(env: Env) -> None:
    await env.gate.set_plan("acme", "pro")
    key = await env.key("acme", plan=None)
    for day, feature, user, n in [
        (1, "revenue_forecast", "carol", 1),  # outside the 7-day burn window
        (10, "goal_generation", "alice", 2),
        (14, "lead_generation", "bob", 2),
        (15, "general_insights", "alice", 3),
    ]:
        env.clock.set(at(day))
        for _ in range(n):
            assert (await env.gate.charge("acme", feature, user=user)).ok
    env.clock.set(MID_NOVEMBER_MS)
    await env.sync()
    r = await env.http.get(f"{PREFIX}/stats?days=30", headers=auth(key))
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["from"], s["to"], s["days"]) == ("2026-10-17", "2026-11-15", 30)
    assert s["refresh_at"] == "2026-12-01T00:00:00Z" and s["period"] == "2026-11"
    assert len(s["by_day"]) == 30 and s["by_day"][-1]["day"] == "2026-11-15"
    per_day = {d["day"]: (d["requests"], d["tokens"]) for d in s["by_day"] if d["requests"]}
    assert per_day == {
        "2026-11-01": (1, 4), "2026-11-10": (2, 6), "2026-11-14": (2, 10), "2026-11-15": (3, 3),
    }  # fmt: skip
    assert s["by_feature"] == [
        {"feature": "lead_generation", "requests": 2, "tokens": 10},
        {"feature": "goal_generation", "requests": 2, "tokens": 6},
        {"feature": "revenue_forecast", "requests": 1, "tokens": 4},
        {"feature": "general_insights", "requests": 3, "tokens": 3},
    ]
    assert [(u["user_id"], u["tokens"]) for u in s["by_user"]] == [
        ("bob", 10), ("alice", 9), ("carol", 4),
    ]  # fmt: skip
    f = s["forecast"]
    # Burn = tokens over Nov 9..15 / 7; days_left = available / burn.
    assert f["goal_generation"] == {
        "available": 14, "burn_per_day": 0.86, "days_left": 16.3, "empty_on": "2026-12-01",
        "empties_before_refresh": False,
    }  # fmt: skip
    assert f["lead_generation"]["days_left"] == 35.0
    assert f["general_insights"]["days_left"] == round(37 / (3 / 7), 1)
    assert f["revenue_forecast"]["days_left"] is None  # used, but not in the last 7 days
    assert f["strategy_analysis"] == {
        "available": 40, "burn_per_day": 0.0, "days_left": None, "empty_on": None,
        "empties_before_refresh": False,
    }  # fmt: skip
    one = (await env.http.get(f"{PREFIX}/stats?days=1", headers=auth(key))).json()
    assert one["by_day"] == [{"day": "2026-11-15", "requests": 3, "tokens": 3}]
    assert one["forecast"]["goal_generation"]["days_left"] == 16.3  # burn window is fixed
    for bad in ("0", "367", "abc", "1.5"):
        problem(
            await env.http.get(f"{PREFIX}/stats?days={bad}", headers=auth(key)), 400, "bad_request"
        )


async def test_usage_pagination(env: Env) -> None:
    key = await env.key("acme")
    for n in range(7):
        env.clock.set(at(15, 13) + n * 1000)
        assert (await env.gate.charge("acme", "general_insights", user=f"u{n}")).ok
    env.clock.set(MID_NOVEMBER_MS)
    await env.sync()
    store = await env.gate.require_store()
    expected = [
        r["id"] for r in await store.pool.fetch(
            "SELECT id FROM ai_token_usage_log WHERE organization_id = 'acme'"
            " ORDER BY created_at DESC, id DESC"
        )
    ]  # fmt: skip
    assert len(expected) >= 8  # 7 charges + the plan change
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        url = f"{PREFIX}/usage?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await env.http.get(url, headers=auth(key))).json()
        seen += [row["id"] for row in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected and pages == -(-len(expected) // 3)
    first = (await env.http.get(f"{PREFIX}/usage?limit=1", headers=auth(key))).json()["items"][0]
    assert first["kind"] == "charge" and first["user_id"] == "u6" and first["tokens"] == 1
    assert first["feature"] == "general_insights" and first["balance_after"] == 33
    for bad in ("zzz", "bm90LWEtY3Vyc29y", "MTIzLmFiYw"):
        problem(
            await env.http.get(f"{PREFIX}/usage?cursor={bad}", headers=auth(key)),
            400,
            "bad_request",
        )
    problem(await env.http.get(f"{PREFIX}/usage?limit=501", headers=auth(key)), 400, "bad_request")


async def test_pages_documents_and_unknown_paths(env: Env) -> None:
    r = await env.http.get(f"{PREFIX}/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert f'src="{PREFIX}/static/org.js"' in r.text and "?key=" not in r.text
    r = await env.http.get(f"{PREFIX}/static/common.js")
    assert r.status_code == 200 and "sessionStorage" in r.text
    problem(await env.http.get(f"{PREFIX}/static/../api.py"), 404, "not_found")
    problem(await env.http.get(f"{PREFIX}/static/secret.txt"), 404, "not_found")
    doc = (await env.http.get(f"{PREFIX}/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    assert {f"{PREFIX}/balance", f"{PREFIX}/deduct", "/admin/orgs/{org}"} <= doc["paths"].keys()
    problem(await env.http.get(f"{PREFIX}/nope"), 404, "not_found")
    problem(await env.http.get(f"{PREFIX}/deduct"), 405, "method_not_allowed")


async def test_outages_are_503_with_retry_after() -> None:
    config = reference_config(
        redis_url="redis://127.0.0.1:1/0", database_url="postgresql://postgres@127.0.0.1:1/x",
        identity={"api_keys": True, "trusted_headers": True},
    )  # fmt: skip
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    transport = httpx.ASGITransport(app=build_ops_app(gate))
    async with httpx.AsyncClient(transport=transport, base_url="http://cg.test") as http:
        for method, path in (("GET", "/balance"), ("GET", "/stats"), ("GET", "/usage")):
            r = await http.request(method, PREFIX + path, headers={"X-Org-Id": "acme"})
            body = problem(r, 503, "unavailable")
            assert r.headers["retry-after"] == "5" and body["retry_after"] == 5
        r = await http.get(f"{PREFIX}/balance", headers={"Authorization": "Bearer cg_" + "a" * 43})
        # The key cannot be checked (Redis and Postgres down): 503, never "bad key" (401).
        problem(r, 503, "unavailable")
    await gate.redis.close()


async def test_without_a_database_stats_are_not_configured() -> None:
    import uuid

    from tests.support.api_support import clean_prefix

    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    config = reference_config(
        redis_url=REDIS, key_prefix=prefix, identity={"api_keys": True, "trusted_headers": True}
    )
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    transport = httpx.ASGITransport(app=build_ops_app(gate))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cg.test") as http:
            r = await http.get(f"{PREFIX}/balance", headers={"X-Org-Id": "acme"})
            assert r.status_code == 200 and r.json()["plan"] == "starter"
            problem(
                await http.get(f"{PREFIX}/stats", headers={"X-Org-Id": "acme"}),
                501,
                "not_configured",
            )
    finally:
        await gate.close()
        await clean_prefix(prefix)


async def test_bad_keys_are_throttled_per_address() -> None:
    async for env in make_env(identity={"api_keys": True, "bad_credentials_per_minute": 2}):
        key = await env.key("acme")
        assert (await env.http.get(f"{PREFIX}/balance", headers=auth(key))).status_code == 200
        bad = {"Authorization": "Bearer cg_" + "b" * 43}
        for _ in range(2):
            problem(await env.http.get(f"{PREFIX}/balance", headers=bad), 401, "unauthenticated")
        r = await env.http.get(f"{PREFIX}/balance", headers=bad)
        body = problem(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) == body["retry_after"] >= 1
        # A key already known good in this process still works from that address.
        assert (await env.http.get(f"{PREFIX}/balance", headers=auth(key))).status_code == 200


async def test_quantity_and_nulls(env: Env) -> None:
    key = await env.key("acme")
    r = await env.http.post(
        f"{PREFIX}/deduct",
        json={"feature": "goal_generation", "quantity": 2.0, "idempotency_key": None,
              "user_id": None},
        headers=auth(key),
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["charged"] == 6 and r.json()["remaining"] == 14
    for path, quantity in (("/deduct", 1.5), ("/check", 1001), ("/check", 0)):
        body = {"feature": "goal_generation", "quantity": quantity}
        r = await env.http.post(PREFIX + path, json=body, headers=auth(key))
        problem(r, 422, "invalid_request")
