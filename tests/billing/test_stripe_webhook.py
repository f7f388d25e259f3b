"""POST /webhooks/stripe: signed payloads built here with a test secret (the v1 HMAC).

Every mapping runs twice: with the Postgres event record (a throwaway migrated database)
and without a database (the Redis record), both on a fresh in-process Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.billing.stripe_webhook import StripeWebhook
from gateway.metering.gate import CreditGate
from tests.support.pg import postgres_missing, requires_postgres, temp_database
from tests.support.reference import reference_config

SECRET = "whsec_test_0123456789"
BILLING = {
    "stripe": {
        "webhook_secret": SECRET,
        "plans": {"price_pro_monthly": "pro", "price_enterprise_monthly": "enterprise"},
        "topups": {
            "price_tokens_100": {"bucket": "lead_generation", "amount": 100},
            "price_quests_30": {"bucket": "goal_generation", "amount": 30, "expires_in_days": 30},
        },
        "tolerance_seconds": 300,
    }
}


def sign(payload: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> str:
    """A Stripe-Signature header: t=<ts>,v1=hex(HMAC-SHA256(secret, "<ts>.<payload>"))."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def event(etype: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": etype,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
    }


def subscription(
    etype: str, org: str | None, price: str, *, status: str = "active", sub: str = "sub_1",
    created: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    obj = {
        "id": sub, "object": "subscription", "status": status,
        "metadata": {} if org is None else {"org_id": org},
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": price}}]},
    }  # fmt: skip
    return event(f"customer.subscription.{etype}", obj, created=created)


def checkout(
    org: str | None, price: str | None, *, session: str = "cs_1", paid: str = "paid",
    etype: str = "checkout.session.completed", line_items: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    obj: dict[str, Any] = {
        "id": session, "object": "checkout.session", "mode": "payment",
        "payment_status": paid, "client_reference_id": org,
        "metadata": {} if price is None else {"price_id": price},
    }  # fmt: skip
    if line_items is not None:
        obj["line_items"] = {"data": [{"price": {"id": p}, "quantity": q} for p, q in line_items]}
    return event(etype, obj)


class Hook:
    """A gate with only the webhook route mounted, and a client to post events."""

    def __init__(self, gate: CreditGate) -> None:
        self.gate = gate
        app = Starlette(
            routes=[Route("/webhooks/stripe", StripeWebhook(gate).endpoint, methods=["POST"])]
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw"
        )

    async def post(
        self, ev: dict[str, Any], *, body: bytes | None = None, signature: str | None = None,
        timestamp: int | None = None,
    ) -> httpx.Response:  # fmt: skip
        payload = json.dumps(ev).encode() if body is None else body
        sig = sign(json.dumps(ev).encode(), timestamp=timestamp) if signature is None else signature
        headers = {"content-type": "application/json"}
        if sig:
            headers["stripe-signature"] = sig
        return await self.client.post("/webhooks/stripe", content=payload, headers=headers)

    async def send(self, ev: dict[str, Any]) -> dict[str, Any]:
        resp = await self.post(ev)
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result

    async def plan(self, org: str) -> str:
        return (await self.gate.balance(org)).plan

    async def extra(self, org: str, bucket: str) -> int:
        return (await self.gate.balance(org)).buckets[bucket].extra

    async def events_written(self, org: str) -> int:
        length: int = await self.gate.redis.client.xlen(self.gate.keys.shard(org).events)
        return length


@pytest.fixture(params=["postgres", "no_database"])
async def hook(request: pytest.FixtureRequest) -> AsyncIterator[Hook]:
    redis_url = f"memory://{uuid.uuid4().hex}"
    if request.param == "no_database":
        gate = CreditGate(reference_config(redis_url=redis_url, billing=BILLING, database_url=""))
        h = Hook(gate)
        yield h
        await h.client.aclose()
        await gate.close()
        return
    if postgres_missing():
        pytest.skip("no PostgreSQL")
    async with temp_database(migrated=True) as dsn:
        gate = CreditGate(reference_config(redis_url=redis_url, billing=BILLING, database_url=dsn))
        h = Hook(gate)
        yield h
        await h.client.aclose()
        await gate.close()


def org_id() -> str:
    return f"org_{uuid.uuid4().hex[:8]}"


async def test_subscription_created_updated_deleted_map_to_plans(hook: Hook) -> None:
    org = org_id()
    result = await hook.send(subscription("created", org, "price_pro_monthly"))
    assert result["outcome"] == "applied"
    assert await hook.plan(org) == "pro"
    assert (await hook.gate.balance(org)).buckets["goal_generation"].balance == 20
    await hook.send(subscription("updated", org, "price_enterprise_monthly"))
    assert await hook.plan(org) == "enterprise"
    assert (await hook.gate.balance(org)).buckets["goal_generation"].balance == 300
    await hook.send(subscription("deleted", org, "price_enterprise_monthly", status="canceled"))
    assert await hook.plan(org) == "starter"


async def test_subscription_statuses(hook: Hook) -> None:
    org = org_id()
    result = await hook.send(subscription("created", org, "price_pro_monthly", status="incomplete"))
    assert result["outcome"] == "ignored"
    assert await hook.plan(org) == "starter"
    await hook.send(subscription("updated", org, "price_pro_monthly", status="trialing"))
    assert await hook.plan(org) == "pro"
    await hook.send(subscription("updated", org, "price_pro_monthly", status="unpaid"))
    assert await hook.plan(org) == "starter"


async def test_checkout_grants_top_up(hook: Hook) -> None:
    org = org_id()
    result = await hook.send(checkout(org, "price_tokens_100"))
    assert result["outcome"] == "applied"
    assert await hook.extra(org, "lead_generation") == 100
    # Expanded line items win over metadata; the quantity multiplies the amount.
    await hook.send(checkout(org, None, session="cs_2", line_items=[("price_quests_30", 2)]))
    assert await hook.extra(org, "goal_generation") == 60
    store = await hook.gate.store()
    if store is not None:
        grants = await store.active_grants(org, datetime.now(UTC))
        by_ref = {g.reference: g for g in grants}
        assert by_ref["stripe:cs_1:price_tokens_100"].expires_at is None
        quests = by_ref["stripe:cs_2:price_quests_30"]
        assert quests.amount == 60 and quests.expires_at is not None


async def test_replay_changes_nothing(hook: Hook) -> None:
    org = org_id()
    grant = checkout(org, "price_tokens_100")
    plan = subscription("created", org, "price_pro_monthly")
    assert (await hook.send(grant))["outcome"] == "applied"
    assert (await hook.send(plan))["outcome"] == "applied"
    before = (await hook.extra(org, "lead_generation"), await hook.events_written(org))
    for ev in (grant, plan, grant):
        assert (await hook.send(ev))["outcome"] == "duplicate"
    assert (await hook.extra(org, "lead_generation"), await hook.events_written(org)) == before
    # The same session announced again by its other event type grants nothing more.
    again = checkout(org, "price_tokens_100", etype="checkout.session.async_payment_succeeded")
    await hook.send(again)
    assert await hook.extra(org, "lead_generation") == 100


async def test_async_payment_waits_for_success(hook: Hook) -> None:
    org = org_id()
    result = await hook.send(checkout(org, "price_tokens_100", session="cs_a", paid="unpaid"))
    assert result["outcome"] == "ignored"
    assert await hook.extra(org, "lead_generation") == 0
    await hook.send(
        checkout(org, "price_tokens_100", session="cs_a",
                 etype="checkout.session.async_payment_succeeded")
    )  # fmt: skip
    assert await hook.extra(org, "lead_generation") == 100


async def test_out_of_order_and_foreign_subscriptions(hook: Hook) -> None:
    org = org_id()
    now = int(time.time())
    await hook.send(subscription("updated", org, "price_enterprise_monthly", created=now))
    late = await hook.send(subscription("created", org, "price_pro_monthly", created=now - 5))
    assert late["outcome"] == "stale"
    assert await hook.plan(org) == "enterprise"
    # Ending a subscription that is not the one that set the plan leaves the plan alone.
    other = subscription("deleted", org, "price_pro_monthly", sub="sub_old", status="canceled")
    assert (await hook.send(other))["outcome"] == "ignored"
    assert await hook.plan(org) == "enterprise"


async def test_bad_signatures_are_rejected(hook: Hook) -> None:
    org = org_id()
    ev = subscription("created", org, "price_pro_monthly")
    good = json.dumps(ev).encode()
    tampered = good.replace(b"price_pro_monthly", b"price_enterprise_monthly")
    cases = {
        "tampered": await hook.post(ev, body=tampered, signature=sign(good)),
        "expired": await hook.post(ev, timestamp=int(time.time()) - 301),
        "missing": await hook.post(ev, signature=""),
        "wrong secret": await hook.post(ev, signature=sign(good, secret="whsec_other")),
        "garbage": await hook.post(ev, signature="t=abc,v1=zz"),
    }
    for name, resp in cases.items():
        assert resp.status_code == 400, name
        assert resp.headers["content-type"] == "application/problem+json", name
        assert resp.json()["code"] == "invalid_signature", name
    assert "tolerance" in cases["expired"].json()["detail"].lower()
    assert await hook.plan(org) == "starter"
    # A signature inside the tolerance window is accepted.
    assert (await hook.post(ev, timestamp=int(time.time()) - 200)).status_code == 200


async def test_ignored_events_answer_200(hook: Hook) -> None:
    org = org_id()
    unknown_type = await hook.send(event("invoice.paid", {"id": "in_1"}))
    assert unknown_type["outcome"] == "ignored"
    unknown_price = await hook.send(subscription("created", org, "price_mystery"))
    assert unknown_price["outcome"] == "ignored" and "price_mystery" in unknown_price["detail"]
    assert (await hook.send(checkout(org, "price_mystery")))["outcome"] == "ignored"
    no_org = await hook.send(subscription("created", None, "price_pro_monthly"))
    assert no_org["outcome"] == "ignored" and "org" in no_org["detail"]
    assert (await hook.send(checkout(None, "price_tokens_100")))["outcome"] == "ignored"
    sub_checkout = checkout(org, "price_pro_monthly")
    sub_checkout["data"]["object"]["mode"] = "subscription"
    assert (await hook.send(sub_checkout))["outcome"] == "ignored"
    assert await hook.plan(org) == "starter"
    assert await hook.extra(org, "lead_generation") == 0


@pytest.mark.parametrize("bad", ["", "x" * 300, "nul\x00byte", "has space", "caf\u00e9"])
async def test_an_org_id_the_id_rule_refuses_is_ignored(hook: Hook, bad: str) -> None:
    # The one id rule (gateway.core.ids): such an org would be charged in Redis and then
    # refused by the ledger. The event is answered 200 (Stripe must not retry for days)
    # and changes nothing.
    for ev in (
        subscription("created", bad, "price_pro_monthly"),
        checkout(bad, "price_tokens_100"),
    ):
        result = await hook.send(ev)
        assert result["outcome"] == "ignored" and "no usable org" in result["detail"]
    for shard in hook.gate.keys.all_shards():
        assert await hook.gate.redis.client.xlen(shard.events) == 0


async def test_unreadable_body_is_400() -> None:
    gate = CreditGate(
        reference_config(redis_url=f"memory://{uuid.uuid4().hex}", billing=BILLING, database_url="")
    )
    hook = Hook(gate)
    try:
        body = b"\xff\xfe not json"
        resp = await hook.post({}, body=body, signature=sign(body))
        assert resp.status_code == 400
        resp = await hook.post({}, body=b"[1, 2]", signature=sign(b"[1, 2]"))
        assert resp.status_code == 400 and resp.json()["code"] == "bad_request"
    finally:
        await hook.client.aclose()
        await gate.close()


async def test_not_configured_is_404() -> None:
    gate = CreditGate(reference_config(redis_url=f"memory://{uuid.uuid4().hex}"))
    hook = Hook(gate)
    try:
        resp = await hook.post(subscription("created", org_id(), "price_pro_monthly"))
        assert resp.status_code == 404
    finally:
        await hook.client.aclose()
        await gate.close()


async def test_ledger_down_is_503_so_stripe_retries() -> None:
    config = reference_config(
        redis_url=f"memory://{uuid.uuid4().hex}", billing=BILLING,
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
    )  # fmt: skip
    gate = CreditGate(config)
    hook = Hook(gate)
    try:
        resp = await hook.post(subscription("created", org_id(), "price_pro_monthly"))
        assert resp.status_code == 503
        assert resp.json()["code"] == "unavailable" and resp.headers["retry-after"] == "30"
    finally:
        await hook.client.aclose()
        await gate.close()


@requires_postgres
async def test_ignored_event_applies_when_resent_after_config_fix() -> None:
    redis_url = f"memory://{uuid.uuid4().hex}"
    async with temp_database(migrated=True) as dsn:
        org = org_id()
        ev = checkout(org, "price_new_pack")
        gate = CreditGate(reference_config(redis_url=redis_url, billing=BILLING, database_url=dsn))
        hook = Hook(gate)
        assert (await hook.send(ev))["outcome"] == "ignored"
        await hook.client.aclose()
        await gate.close()
        fixed = json.loads(json.dumps(BILLING))
        fixed["stripe"]["topups"]["price_new_pack"] = {"bucket": "lead_generation", "amount": 7}
        gate = CreditGate(reference_config(redis_url=redis_url, billing=fixed, database_url=dsn))
        hook = Hook(gate)
        try:
            assert (await hook.send(ev))["outcome"] == "applied"
            assert await hook.extra(org, "lead_generation") == 7
            store = await gate.require_store()
            row = await store.pool.fetchrow(
                "SELECT outcome, organization_id FROM stripe_events WHERE event_id = $1", ev["id"]
            )
            assert row is not None and tuple(row) == ("applied", org)
        finally:
            await hook.client.aclose()
            await gate.close()
