"""The reservation endpoints (contract A9) and the Idempotency-Key rules of ``/deduct``, over
HTTP on the real Redis and a throwaway Postgres: 201/200 bodies, the refusals of A3, 404
for another org's reservation, 409 for an expired one, the same body for a repeat, and the
events the sync job turns into ledger rows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from gateway.core.timefmt import iso_ms
from gateway.http.openapi import openapi_document
from tests.support.actual_costs import actual_cost_overrides, events_of, sweep
from tests.support.api_support import PREFIX, Env, auth, make_env, problem
from tests.support.pg import requires_postgres

pytestmark = requires_postgres

URL = f"{PREFIX}/reservations"


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in make_env(**actual_cost_overrides()):
        yield e


async def test_reserve_settle_release_over_http(env: Env) -> None:
    key = await env.key("acme", user="alice")
    r = await env.http.post(URL, json={"feature": "research"}, headers=auth(key))
    assert r.status_code == 201, r.text
    made = r.json()
    assert list(made) == ["id", "feature", "reserved", "expires_at", "remaining"]
    assert re.fullmatch(r"[0-9a-f]{32}", made["id"])
    assert (made["feature"], made["reserved"], made["remaining"]) == ("research", 10, 40)
    assert made["expires_at"] == iso_ms(env.clock.now_ms() + 900_000)
    assert "idempotent-replayed" not in r.headers
    settle = f"{URL}/{made['id']}/settle"
    r = await env.http.post(settle, json={"actual": 14}, headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": made["id"], "reserved": 10, "charged": 14, "refunded": 0, "overage": 0,
        "remaining": 36, "outcome": "settled",
    }  # fmt: skip
    again = await env.http.post(settle, json={"actual": 2}, headers=auth(key))
    assert (again.status_code, again.text) == (200, r.text)  # a repeat: the same body
    # Release of another one.
    r = await env.http.post(URL, json={"feature": "research", "estimate": 20, "ttl_seconds": 60},
                            headers=auth(key))  # fmt: skip
    assert r.status_code == 201 and r.json()["expires_at"] == iso_ms(env.clock.now_ms() + 60_000)
    rid = r.json()["id"]
    r = await env.http.post(f"{URL}/{rid}/release", headers=auth(key))
    assert r.status_code == 200
    assert r.json() == {
        "id": rid, "reserved": 20, "charged": 0, "refunded": 20, "overage": 0, "remaining": 36,
        "outcome": "released",
    }  # fmt: skip
    assert (await env.gate.balance("acme")).buckets["research"].available == 36
    # The ledger gets one row each, with the reserve.
    await env.sync()
    store = await env.gate.require_store()
    rows = await store.pool.fetch(
        "SELECT kind, tokens_deducted, user_id FROM ai_token_usage_log"
        " WHERE organization_id = 'acme' AND feature_used = 'research' ORDER BY id"
    )
    assert [(row["kind"], row["tokens_deducted"], row["user_id"]) for row in rows] == [
        ("charge", 14, "alice"), ("refund", 0, "alice"),
    ]  # fmt: skip


async def test_overage_over_http(env: Env) -> None:
    key = await env.key("acme")
    rid = (await env.http.post(URL, json={"feature": "research", "estimate": 45},
                               headers=auth(key))).json()["id"]  # fmt: skip
    r = await env.http.post(f"{URL}/{rid}/settle", json={"actual": 60}, headers=auth(key))
    assert r.json() == {
        "id": rid, "reserved": 45, "charged": 50, "refunded": 0, "overage": 10, "remaining": 0,
        "outcome": "settled",
    }  # fmt: skip


async def test_refusals_are_those_of_a3(env: Env) -> None:
    key = await env.key("acme", user="alice")
    body = problem(
        await env.http.post(URL, json={"feature": "research", "estimate": 51}, headers=auth(key)),
        402, "insufficient_tokens",
    )  # fmt: skip
    assert (body["cost"], body["balance"], body["feature"]) == (51, 50, "research")
    starter = await env.key("tiny", plan="starter")
    problem(await env.http.post(URL, json={"feature": "research"}, headers=auth(starter)),
            403, "feature_not_in_plan")  # fmt: skip
    problem(await env.http.post(URL, json={"feature": "research", "user_id": "bob"},
                                headers=auth(key)), 403, "user_mismatch")  # fmt: skip
    problem(await env.http.post(URL, json={"feature": "nope"}, headers=auth(key)),
            422, "unknown_feature")  # fmt: skip
    problem(await env.http.post(URL, json={"feature": "research", "ttl_seconds": 0},
                                headers=auth(key)), 422, "invalid_request")  # fmt: skip
    problem(await env.http.post(URL, json={"feature": "research"}), 401, "unauthenticated")
    rid = (await env.http.post(URL, json={"feature": "research"}, headers=auth(key))).json()["id"]
    problem(await env.http.post(f"{URL}/{rid}/settle", json={"actual": -1}, headers=auth(key)),
            422, "invalid_request")  # fmt: skip
    problem(await env.http.post(f"{URL}/{rid}/settle", json={}, headers=auth(key)),
            422, "invalid_request")  # fmt: skip


async def test_another_orgs_reservation_is_404(env: Env) -> None:
    acme = await env.key("acme")
    globex = await env.key("globex")
    rid = (await env.http.post(URL, json={"feature": "research"}, headers=auth(acme))).json()["id"]
    for path in (f"{URL}/{rid}/settle", f"{URL}/{rid}/release"):
        problem(await env.http.post(path, json={"actual": 1}, headers=auth(globex)),
                404, "reservation_not_found")  # fmt: skip
    for bad in ("0" * 32, "nope", "%20"):
        problem(await env.http.post(f"{URL}/{bad}/settle", json={"actual": 1}, headers=auth(acme)),
                404, "reservation_not_found")  # fmt: skip
    r = await env.http.post(f"{URL}/{rid}/settle", json={"actual": 1}, headers=auth(acme))
    assert r.status_code == 200 and r.json()["charged"] == 1


async def test_an_expired_reservation_is_409_and_charged_its_reserve(env: Env) -> None:
    key = await env.key("acme")
    r = await env.http.post(URL, json={"feature": "research", "estimate": 12, "ttl_seconds": 5},
                            headers=auth(key))  # fmt: skip
    rid = r.json()["id"]
    env.clock.advance(6_000)
    assert await sweep(env.gate, "acme", env.clock.now_ms()) == (1, 1)
    for path in (f"{URL}/{rid}/settle", f"{URL}/{rid}/release"):
        body = problem(await env.http.post(path, json={"actual": 1}, headers=auth(key)),
                       409, "reservation_expired")  # fmt: skip
        assert (body["reserved"], body["charged"]) == (12, 12)
    evs = [e for e in await events_of(env.gate, "acme") if e.event_id == rid]
    assert [(e.kind, e.tokens) for e in evs] == [("expired_hold", 12)]


async def test_idempotent_reserve_over_http(env: Env) -> None:
    key = await env.key("acme")
    headers = {**auth(key), "Idempotency-Key": "job-7"}
    first = await env.http.post(URL, json={"feature": "research", "estimate": 5}, headers=headers)
    again = await env.http.post(URL, json={"feature": "research", "estimate": 5}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    problem(await env.http.post(URL, json={"feature": "research", "estimate": 6}, headers=headers),
            422, "idempotency_key_reused")  # fmt: skip
    assert (await env.gate.balance("acme")).buckets["research"].available == 45


async def test_deduct_idempotency_key_rules(env: Env) -> None:
    key = await env.key("acme")
    url = f"{PREFIX}/deduct"
    headers = {**auth(key), "Idempotency-Key": "q-1"}
    r = await env.http.post(url, json={"feature": "lead_generation"}, headers=headers)
    assert r.status_code == 200 and r.json()["charged"] == 5
    assert "idempotent-replayed" not in r.headers
    r = await env.http.post(url, json={"feature": "lead_generation"}, headers=headers)
    assert r.status_code == 200 and r.json()["replayed"] is True
    assert r.headers["idempotent-replayed"] == "true"
    body = problem(
        await env.http.post(url, json={"feature": "lead_generation", "quantity": 2},
                            headers=headers),
        422, "idempotency_key_reused",
    )  # fmt: skip
    assert "another method, path or body" in body["detail"]
    # In flight: 409 with Retry-After.
    adm = await env.gate.meter.admit("acme", "lead_generation", idempotency_key="busy")
    r = await env.http.post(url, json={"feature": "lead_generation"},
                            headers={**auth(key), "Idempotency-Key": "busy"})  # fmt: skip
    problem(r, 409, "idempotency_conflict")
    assert r.headers["retry-after"] == "1" and r.json()["retry_after"] == 1
    await env.gate.meter.settle(adm, ok=True, status=200, latency_ms=1, idempotency_key="busy")
    assert (await env.gate.balance("acme")).buckets["lead_generation"].available == 50


async def test_the_document_lists_the_reservation_operations(env: Env) -> None:
    doc = openapi_document(env.gate.config)
    paths = doc["paths"]
    assert paths[URL]["post"]["operationId"] == "reserve"
    assert set(paths[URL]["post"]["responses"]) >= {"201", "402", "409", "422"}
    settle = paths[f"{URL}/{{reservation_id}}/settle"]["post"]
    assert settle["operationId"] == "settleReservation"
    assert set(settle["responses"]) >= {"200", "404", "409"}
    assert paths[f"{URL}/{{reservation_id}}/release"]["post"]["operationId"] == "releaseReservation"
    served = await env.http.get(f"{PREFIX}/openapi.json")
    assert served.json()["paths"][URL] == paths[URL]
