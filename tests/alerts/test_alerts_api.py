"""Alerts through the gate: metered usage -> sync -> outbox -> signed webhook, and the
admin API (rules, deliveries with attempts, resend) and /metrics around them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.alerts.deliverer import Deliverer
from gateway.alerts.evaluation import AlertDefaults
from sync.worker import SyncWorker
from tests.alerts.test_deliverer import SECRET, free_port
from tests.support.api_support import ADMIN, PREFIX, Env, make_env, problem
from tests.support.pg import requires_postgres
from tests.support.webhook_receiver import Receiver

pytestmark = requires_postgres


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    r = Receiver(free_port(), SECRET, tmp_path / "received")
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def env(receiver: Receiver) -> AsyncIterator[Env]:
    alerts = {
        "webhook_url": receiver.url, "webhook_secret": SECRET, "thresholds": [80, 100],
        "forecast": False, "retry_first_seconds": 0.05, "retry_max_seconds": 0.1,
    }  # fmt: skip
    async for e in make_env(alerts=alerts):
        yield e


async def sync(env: Env, levels: frozenset[str] | None = None) -> int:
    """One sync pass with the env's alerts config (its default ``levels`` replaced if
    given); returns the alerts written."""
    await env.gate.meter.drain()
    store = await env.gate.require_store()
    assert env.gate.config.alerts is not None
    defaults = AlertDefaults.of(env.gate.config.alerts)
    if levels is not None:
        defaults = dataclasses.replace(defaults, levels=levels)
    worker = SyncWorker(
        redis=env.gate.redis.client, pool=store.pool, keyspace=env.gate.keys, alerts=defaults,
    )  # fmt: skip
    return (await worker.run_once()).alerts


async def deliver(env: Env) -> None:
    store = await env.gate.require_store()
    assert env.gate.config.alerts is not None
    await Deliverer(store.pool, env.gate.config.alerts).run_once()


async def test_usage_crossing_80_percent_is_one_signed_webhook(
    env: Env, receiver: Receiver
) -> None:
    await env.gate.set_plan("acme", "pro")  # lead_generation: 60 tokens, cost 5
    for _ in range(9):
        assert (await env.gate.charge("acme", "lead_generation")).ok
    assert await sync(env) == 0  # 45 of 60: 75%
    assert (await env.gate.charge("acme", "lead_generation")).ok
    assert await sync(env) == 1  # 50 of 60
    await deliver(env)
    await deliver(env)
    got = receiver.received()
    assert len(got) == 1 and got[0]["verified"]
    payload = got[0]["payload"]
    assert payload["id"] == got[0]["id"]
    assert payload["type"] == "balance.threshold_crossed"
    assert payload["data"] | {"refresh_at": None} == {
        "org": "acme", "level": "org", "bucket": "lead_generation", "threshold": 80,
        "threshold_unit": "percent", "used": 50, "allocated": 60, "remaining": 10,
        "period": "2026-11", "refresh_at": None,
    }  # fmt: skip

    # The admin API lists it with its attempt; a resend sends it again, same webhook-id.
    r = await env.http.get("/admin/webhooks/deliveries", params={"org": "acme"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert (item["id"], item["status"], item["type"]) == (
        got[0]["id"], "delivered", "balance.threshold_crossed"
    )  # fmt: skip
    assert [(a["outcome"], a["response_code"]) for a in item["attempts"]] == [("delivered", 204)]
    r = await env.http.post(f"/admin/webhooks/deliveries/{item['id']}/resend", headers=ADMIN)
    assert r.status_code == 202, r.text
    await deliver(env)
    assert [g["id"] for g in receiver.received()] == [item["id"], item["id"]]
    problem(
        await env.http.post("/admin/webhooks/deliveries/msg_nope/resend", headers=ADMIN),
        404, "unknown_delivery",
    )  # fmt: skip

    r = await env.http.get("/metrics")
    # Outcomes are counters (delivered twice: the resend too), the outbox's states gauges.
    assert 'creditgate_alert_deliveries_completed_total{outcome="delivered"} 2.0' in r.text
    assert 'creditgate_alert_deliveries_completed_total{outcome="failed"} 0.0' in r.text
    assert "# TYPE creditgate_alert_deliveries_completed_total counter" in r.text
    assert 'creditgate_alert_deliveries{status="pending"} 0.0' in r.text
    assert 'creditgate_alert_deliveries{status="failed"} 0.0' in r.text
    assert 'creditgate_alert_deliveries{status="delivered"}' not in r.text
    assert "creditgate_alert_endpoints_disabled 0.0" in r.text


async def test_org_rules_override_the_defaults(env: Env, receiver: Receiver) -> None:
    problem(
        await env.http.put("/admin/orgs/ghost/alerts", json={"forecast": True}, headers=ADMIN),
        404, "unknown_org",
    )  # fmt: skip
    await env.gate.set_plan("acme", "pro")
    await sync(env)  # the org row
    r = await env.http.get("/admin/orgs/acme/alerts", headers=ADMIN)
    assert r.json() | {"webhook_url": None} == {
        "org": "acme", "webhook_url": None, "thresholds": [80, 100],
        "levels": ["org", "team", "user", "key"], "forecast": False, "overrides": [],
        "endpoint_disabled_at": None, "endpoint_failing_since": None,
    }  # fmt: skip
    bad = await env.http.put(
        "/admin/orgs/acme/alerts", json={"thresholds": [50, "120%", {"tokens": 0}]}, headers=ADMIN
    )
    body = problem(bad, 422, "invalid_request")
    assert [e["field"] for e in body["errors"]] == ["thresholds[1]", "thresholds[2]"]
    r = await env.http.put(
        "/admin/orgs/acme/alerts", json={"thresholds": ["50%", {"tokens": 20}]}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert r.json()["thresholds"] == [50, {"tokens": 20}]
    assert r.json()["overrides"] == ["thresholds"]
    for _ in range(4):
        assert (await env.gate.charge("acme", "lead_generation")).ok
    assert await sync(env) == 1  # 20 tokens (absolute)
    for _ in range(2):
        assert (await env.gate.charge("acme", "lead_generation")).ok
    assert await sync(env) == 1  # 30 of 60: 50%
    await deliver(env)
    thresholds = sorted(g["payload"]["data"]["threshold"] for g in receiver.received())
    assert thresholds == [20, 50]


async def test_org_rules_levels_round_trip_validate_and_clear_with_null(env: Env) -> None:
    await env.gate.set_plan("acme", "pro")
    await sync(env)  # the org row

    async def put(body: object) -> httpx.Response:
        return await env.http.put("/admin/orgs/acme/alerts", json=body, headers=ADMIN)

    for bad, fields in (
        ({"levels": ["org", "teams", "org", 3]}, ["levels[1]", "levels[2]", "levels[3]"]),
        ({"levels": []}, ["levels"]),
        ({"levels": "org"}, ["levels"]),
        ({"levels": ["key"], "webhook_url": "ftp://x"}, ["webhook_url"]),
    ):
        body = problem(await put(bad), 422, "invalid_request")
        assert [e["field"] for e in body["errors"]] == fields, body
    # Nothing refused was stored.
    assert (await env.http.get("/admin/orgs/acme/alerts", headers=ADMIN)).json()["overrides"] == []

    r = await put({"levels": ["user", "org"]})
    assert r.status_code == 200, r.text
    assert (r.json()["levels"], r.json()["overrides"]) == (["user", "org"], ["levels"])
    # Absent leaves it; GET shows the same.
    assert (await put({"forecast": True})).status_code == 200
    got = (await env.http.get("/admin/orgs/acme/alerts", headers=ADMIN)).json()
    assert (got["levels"], got["overrides"]) == (["user", "org"], ["forecast", "levels"])
    # null: the config's levels again.
    r = await put({"levels": None})
    assert r.status_code == 200, r.text
    assert (r.json()["levels"], r.json()["overrides"]) == (
        ["org", "team", "user", "key"], ["forecast"]
    )  # fmt: skip

    # The OpenAPI document shows the member, with what it accepts, and the answer's.
    doc = (await env.http.get(f"{PREFIX}/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    asked = schemas["AlertRulesRequest"]["properties"]["levels"]
    assert {
        "type": "array",
        "items": {"type": "string", "enum": ["org", "team", "user", "key"]},
    } in asked["anyOf"]
    assert "null: the config's default" in asked["description"]
    assert schemas["AlertRules"]["properties"]["levels"]["type"] == "array"
    assert "levels" in schemas["AlertRules"]["required"]


async def test_org_levels_decide_the_org_buckets_alerts(env: Env) -> None:
    for org in ("acme", "beta"):
        await env.gate.set_plan(org, "pro")  # lead_generation: 60 tokens, cost 5
    await sync(env)
    # acme watches its team caps only: its buckets fire nothing while beta's (the
    # config's levels, all) do.
    r = await env.http.put("/admin/orgs/acme/alerts", json={"levels": ["team"]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    for org in ("acme", "beta"):
        for _ in range(10):  # 50 of 60
            assert (await env.gate.charge(org, "lead_generation")).ok
    assert await sync(env) == 1
    store = await env.gate.require_store()
    orgs = "SELECT organization_id, kind, threshold FROM alert_events ORDER BY 1, 2, 3"
    assert [tuple(x) for x in await store.pool.fetch(orgs)] == [
        ("beta", "threshold_crossed", "80%")
    ]
    # Cleared: acme is on the config's levels again and its next crossings fire.
    r = await env.http.put("/admin/orgs/acme/alerts", json={"levels": None}, headers=ADMIN)
    assert r.status_code == 200, r.text
    for _ in range(2):  # 60 of 60
        assert (await env.gate.charge("acme", "lead_generation")).ok
    assert await sync(env) == 2
    assert [tuple(x) for x in await store.pool.fetch(orgs)] == [
        ("acme", "depleted", ""), ("acme", "threshold_crossed", "100%"),
        ("beta", "threshold_crossed", "80%"),
    ]  # fmt: skip
    # A config whose levels leave the buckets out still evaluates an org whose own
    # levels name them (and not the others).
    r = await env.http.put("/admin/orgs/beta/alerts", json={"levels": ["org"]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await env.gate.set_plan("gamma", "pro")
    for org in ("beta", "gamma"):
        for _ in range(12):  # beta: the 2 it has left (60 of 60); gamma: 60 of 60
            await env.gate.charge(org, "lead_generation")
    assert await sync(env, levels=frozenset({"team"})) == 2
    rows = await store.pool.fetch(orgs)
    assert [tuple(x) for x in rows if x[0] != "acme"] == [
        ("beta", "depleted", ""), ("beta", "threshold_crossed", "100%"),
        ("beta", "threshold_crossed", "80%"),
    ]  # fmt: skip
