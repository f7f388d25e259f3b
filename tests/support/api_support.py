"""Shared setup for the token/admin API tests: a gate on the tests' Redis (unique prefix) and
a throwaway migrated Postgres, its ops app over httpx's ASGI transport, and a sync pass."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.core.periods import FixedClock
from gateway.http.app import build_ops_app
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from sync.worker import SyncWorker
from tests.support.pg import temp_database
from tests.support.reference import MID_NOVEMBER_MS, reference_config
from tests.support.services import redis_url

# The tests' Redis, resolved when the module is imported: a module that imports it is
# skipped as a whole when there is no Redis (see tests/support/services.py).
REDIS = redis_url()
ADMIN_TOKEN = "admin-secret-0123456789"
PREFIX = "/api/v1/tokens"


@dataclass
class Env:
    """A gate, its HTTP client and its clock."""

    gate: CreditGate
    http: httpx.AsyncClient
    clock: FixedClock
    dsn: str

    async def key(self, org: str, user: str | None = None, plan: str | None = "pro") -> str:
        """An API key of ``org`` (set to ``plan`` first unless None)."""
        if plan is not None:
            await self.gate.set_plan(org, plan)
        _, key = await self.gate.create_key(org, user=user)
        return key

    async def sync(self) -> None:
        """Settle what is queued and move every event to Postgres (one sync pass)."""
        await self.gate.meter.drain()
        store = await self.gate.require_store()
        worker = SyncWorker(redis=self.gate.redis.client, pool=store.pool, keyspace=self.gate.keys)
        await worker.run_once()


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``r`` is a problem+json answer with this status and code; return its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


def auth(key: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"Authorization": f"Bearer {key}"}


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def clean_prefix(prefix: str) -> None:
    """Delete every Redis key under ``prefix``."""
    client = connect_redis(REDIS).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def make_env(**overrides: Any) -> AsyncIterator[Env]:
    """Fixture body: the reference config on real Redis + a fresh database."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        settings: dict[str, Any] = {
            "redis_url": REDIS, "key_prefix": prefix, "database_url": dsn,
            "admin_token": ADMIN_TOKEN,
            "identity": {"api_keys": True, "trusted_headers": False, "key_cache_seconds": 0.2},
        }  # fmt: skip
        settings.update(overrides)
        clock = FixedClock(MID_NOVEMBER_MS)
        gate = CreditGate(reference_config(**settings), clock=clock)
        transport = httpx.ASGITransport(app=build_ops_app(gate))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://cg.test") as http:
                yield Env(gate, http, clock, dsn)
        finally:
            await gate.close()
            await clean_prefix(prefix)
