"""Middleware mode, as a user builds it: a Starlette app with CreditGateMiddleware, all of
creditgate's endpoints mounted with one line (``creditgate_routes``) and the sync job in
the app's lifespan (``creditgate_lifespan``), served by a real uvicorn.

Without the lifespan (and no ``creditgate sync`` running) the events wait in Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import CreditGate, CreditGateMiddleware
from gateway.http.app import creditgate_lifespan, creditgate_routes
from gateway.http.lifespan import sync_job
from gateway.ledger.migrate import migrate
from gateway.redisio.connect import connect_redis
from tests.billing.test_stripe_webhook import BILLING, sign, subscription
from tests.support.api_support import ADMIN, ADMIN_TOKEN, PREFIX, REDIS, auth, clean_prefix
from tests.support.pg import admin_execute, drop_database, dsn_for, requires_postgres, unique_name
from tests.support.reference import reference_config
from tests.support.upstream_app import serve_in_thread

pytestmark = requires_postgres


@dataclass
class Deployment:
    """A fresh database and Redis prefix, and the gate's config on them."""

    dsn: str
    prefix: str

    def gate(self) -> CreditGate:
        config = reference_config(
            redis_url=REDIS, key_prefix=self.prefix, database_url=self.dsn,
            admin_token=ADMIN_TOKEN, billing=BILLING,
            identity={"api_keys": True, "trusted_headers": False},
        )  # fmt: skip
        return CreditGate(config)

    def rows(self, kind: str) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(self.dsn)
            try:
                n: int = await conn.fetchval(
                    "SELECT count(*) FROM ai_token_usage_log WHERE kind = $1", kind
                )
                return n
            finally:
                await conn.close()

        return asyncio.run(count())

    def unsynced(self, gate: CreditGate) -> int:
        async def length() -> int:
            client = connect_redis(REDIS).client
            try:
                return sum([await client.xlen(s.events) for s in gate.keys.all_shards()])
            finally:
                await client.aclose()

        return asyncio.run(length())


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    name, prefix = unique_name(), f"cgt{uuid.uuid4().hex[:10]}"
    dsn = dsn_for(name)

    async def setup() -> None:
        await admin_execute(f'CREATE DATABASE "{name}"')
        await migrate(dsn)

    asyncio.run(setup())
    try:
        yield Deployment(dsn, prefix)
    finally:
        asyncio.run(drop_database(name))
        asyncio.run(clean_prefix(prefix))


async def generate_leads(request: Request) -> Response:
    """The host app's own metered endpoint."""
    return JSONResponse({"leads": ["a", "b"], "org": request.headers.get("x-creditgate-org")})


async def home(request: Request) -> Response:
    """The host app's own unmetered endpoint."""
    return JSONResponse({"app": "host"})


def host_app(gate: CreditGate, *, lifespan: bool) -> Starlette:
    """The app of the README's example."""
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/api/v1/leads/generate", generate_leads, methods=["POST"]),
        ],
        lifespan=creditgate_lifespan(gate) if lifespan else None,
    )
    app.add_middleware(CreditGateMiddleware, gate=gate)
    app.routes.extend(creditgate_routes(gate))  # the one line
    return app


def _until(check: object, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_the_whole_surface_in_a_host_app_and_the_sync_in_its_lifespan(
    deployment: Deployment,
) -> None:
    gate = deployment.gate()
    with serve_in_thread(host_app(gate, lifespan=True)) as url, httpx.Client(base_url=url) as http:
        # Ops endpoints.
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] in ("ready", "degraded")
        assert "creditgate_requests_total" in http.get("/metrics").text
        # Admin API: an org and a key.
        r = http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["created"] is True
        r = http.post("/admin/keys", json={"org": "acme", "user": "alice"}, headers=ADMIN)
        assert r.status_code == 201
        key = r.json()["key"]
        # The host app's metered route, through the middleware.
        r = http.post("/api/v1/leads/generate", headers=auth(key))
        assert r.status_code == 200 and r.json()["org"] == "acme"
        assert r.headers["x-tokens-cost"] == "5" and r.headers["x-tokens-remaining"] == "55"
        assert http.get("/").json() == {"app": "host"}  # the app's own routes still win
        # Token API, with the key the middleware keeps for it.
        r = http.post(f"{PREFIX}/deduct", json={"feature": "goal_generation"}, headers=auth(key))
        assert r.status_code == 200 and r.json()["remaining"] == 17
        bal = http.get(f"{PREFIX}/balance", headers=auth(key)).json()
        assert bal["buckets"]["lead_generation"]["available"] == 55
        assert http.get(f"{PREFIX}/openapi.json").json()["openapi"] == "3.1.0"
        for page in (f"{PREFIX}/dashboard", "/admin/dashboard", f"{PREFIX}/static/org.js"):
            assert http.get(page).status_code == 200, page
        r = http.get(f"{PREFIX}/nope")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        r = http.get("/admin/orgs/acme", headers=ADMIN)
        assert r.status_code == 200 and r.json()["plan"] == "pro"
        # Stripe: a subscription moves the org to enterprise.
        ev = subscription("created", "acme", "price_enterprise_monthly")
        payload = json.dumps(ev).encode()
        r = http.post(
            "/webhooks/stripe", content=payload,
            headers={"stripe-signature": sign(payload), "content-type": "application/json"},
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
        assert http.get(f"{PREFIX}/balance", headers=auth(key)).json()["plan"] == "enterprise"
        # The sync job of the lifespan moves the events to Postgres while the app runs.
        assert _until(lambda: deployment.rows("charge") == 2), deployment.rows("charge")
        assert _until(lambda: deployment.rows("plan_change") >= 2)
        assert _until(lambda: deployment.unsynced(gate) == 0 or deployment.rows("reset") > 0)


def test_without_the_lifespan_events_wait_in_redis(deployment: Deployment) -> None:
    gate = deployment.gate()
    with serve_in_thread(host_app(gate, lifespan=False)) as url, httpx.Client(base_url=url) as http:
        assert http.put("/admin/orgs/acme", json={"plan": "pro"}, headers=ADMIN).status_code == 201
        key = http.post("/admin/keys", json={"org": "acme"}, headers=ADMIN).json()["key"]
        assert http.post("/api/v1/leads/generate", headers=auth(key)).status_code == 200
        time.sleep(2.0)  # the lifespan's sync job needs well under a second for this
        assert deployment.rows("charge") == 0
        assert deployment.unsynced(gate) > 0


async def test_the_sync_job_starts_while_postgres_is_down_and_stops_cleanly() -> None:
    # A ledger outage must not keep the app from starting: the job retries meanwhile.
    config = reference_config(
        redis_url=REDIS, key_prefix=f"cgt{uuid.uuid4().hex[:10]}",
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
    )  # fmt: skip
    gate = CreditGate(config)
    try:
        async with sync_job(gate) as job:
            assert job.running
            await asyncio.sleep(0.3)
            assert job.running  # failing passes are retried, not fatal
        assert not job.running
        no_db = CreditGate(reference_config(redis_url=REDIS, database_url=""))
        async with sync_job(no_db) as job:
            assert not job.running  # nothing to sync to
        await no_db.close()
    finally:
        await gate.close()
