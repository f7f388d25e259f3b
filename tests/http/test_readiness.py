"""``GET /readyz`` tells anyone whether the gateway is ready, and only the admin why not.

Load balancers call it without credentials, so its status and per-check verdicts stay
public; the error texts (hostnames, ports, driver messages) are internal and shown only
with ``Authorization: Bearer <admin_token>``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.http.app import build_ops_app
from gateway.metering.gate import CreditGate
from tests.support.api_support import ADMIN, ADMIN_TOKEN
from tests.support.reference import reference_config

DOWN_REDIS = "redis://127.0.0.1:1/0"
DOWN_PG = "postgresql://postgres@127.0.0.1:1/nowhere"
# What an error text gives away: the addresses and the drivers' words.
SECRETS = ("127.0.0.1", ":1", "nowhere", "onnect", "rror ")


async def _readyz(gate: CreditGate, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=build_ops_app(gate))
    async with httpx.AsyncClient(transport=transport, base_url="http://cg.test") as http:
        return await http.get("/readyz", headers=headers or {})


@pytest.fixture
async def broken() -> AsyncIterator[CreditGate]:
    """A gate whose Redis and Postgres are both unreachable, with an admin token."""
    gate = CreditGate(
        reference_config(redis_url=DOWN_REDIS, database_url=DOWN_PG, admin_token=ADMIN_TOKEN)
    )
    yield gate
    await gate.redis.close()


async def test_without_credentials_the_verdicts_but_no_error_texts(broken: CreditGate) -> None:
    for headers in (None, {"Authorization": "Bearer wrong"}, {"X-API-Key": ADMIN_TOKEN}):
        r = await _readyz(broken, headers)
        assert r.status_code == 503
        assert r.json() == {
            "status": "not ready",
            "checks": {"redis": "error", "postgres": "error"},
        }
        assert not [s for s in SECRETS if s in r.text], r.text


async def test_the_admin_token_shows_the_details(broken: CreditGate) -> None:
    r = await _readyz(broken, ADMIN)
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["redis"].startswith("error: ") and len(checks["redis"]) > len("error: ")
    assert checks["postgres"].startswith("error: ") and "1" in checks["postgres"]


async def test_no_admin_token_configured_means_no_details_for_anyone() -> None:
    gate = CreditGate(
        reference_config(redis_url=f"memory://{uuid.uuid4().hex}", database_url=DOWN_PG)
    )
    try:
        for headers in (None, ADMIN, {"Authorization": "Bearer "}):
            r = await _readyz(gate, headers)
            assert r.status_code == 200
            body = r.json()
            assert body["status"] == "degraded" and body["checks"]["redis"] == "ok"
            assert body["checks"]["postgres"] == "error"
            assert not [s for s in SECRETS if s in r.text], r.text
    finally:
        await gate.close()
