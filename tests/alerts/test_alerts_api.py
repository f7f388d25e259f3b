"""Alerts through the gate: metered usage -> sync -> outbox -> signed webhook, and the
admin API (rules, deliveries with attempts, resend) and /metrics around them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.alerts.deliverer import Deliverer
from gateway.alerts.evaluation import AlertDefaults
from sync.worker import SyncWorker
from tests.alerts.test_deliverer import SECRET, free_port
from tests.support.api_support import ADMIN, Env, make_env, problem
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


async def sync(env: Env) -> int:
    await env.gate.meter.drain()
    store = await env.gate.require_store()
    assert env.gate.config.alerts is not None
    worker = SyncWorker(
        redis=env.gate.redis.client, pool=store.pool, keyspace=env.gate.keys,
        alerts=AlertDefaults.of(env.gate.config.alerts),
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
        "org": "acme", "webhook_url": None, "thresholds": [80, 100], "forecast": False,
        "overrides": [], "endpoint_disabled_at": None, "endpoint_failing_since": None,
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
