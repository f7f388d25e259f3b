"""The gateway with its ledger store: API keys end to end, revocation, seeding from Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.commands.sample_app import app as sample_app
from gateway.commands.server import GatewayApp
from gateway.core.periods import FixedClock
from gateway.ledger.migrate import migrate
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support.pg import temp_database
from tests.support.reference import MID_NOVEMBER_MS, reference_config
from tests.support.services import redis_url
from tests.support.upstream_app import serve_in_thread

REDIS = redis_url()  # the tests' Redis; the module is skipped without one


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with temp_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"cgt{uuid.uuid4().hex[:10]}"
    yield p
    client = connect_redis(REDIS).client
    async for key in client.scan_iter(match=f"{p}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def test_api_key_end_to_end_and_revocation(pg_dsn: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(sample_app) as upstream:
        config = reference_config(
            redis_url=REDIS, key_prefix=prefix, upstream=upstream, database_url=pg_dsn,
            identity={"api_keys": True, "trusted_headers": False, "key_cache_seconds": 0.2},
        )  # fmt: skip
        admin = CreditGate(config, clock=clock)
        await admin.set_plan("acme", "pro")
        row, key = await admin.create_key("acme", user="alice", name="ci")
        assert key.startswith("cg_") and row.org == "acme"
        with serve_in_thread(GatewayApp(CreditGate(config, clock=clock), sync=False)) as url:
            async with httpx.AsyncClient(base_url=url) as http:
                r = await http.post(
                    "/api/v1/leads/generate", headers={"Authorization": f"Bearer {key}"}
                )
                assert r.status_code == 200 and r.json()["user"] == "alice"
                r = await http.post("/api/v1/leads/generate", headers={"X-API-Key": key})
                assert r.status_code == 200
                r = await http.post("/api/v1/leads/generate", headers={"X-Org-Id": "acme"})
                assert r.status_code == 401  # trusted headers are off
                # The key's last character carries 4 bits, so it is one of 16 ("A" included):
                # "B" is never one of them, so this spelling always differs from the key.
                wrong = key[:-1] + "B"
                assert wrong != key
                r = await http.post("/api/v1/leads/generate", headers={"X-API-Key": wrong})
                assert r.status_code == 401
                assert await admin.revoke_key(row.id)
                await asyncio.sleep(0.5)  # > key_cache_seconds
                r = await http.post("/api/v1/leads/generate", headers={"X-API-Key": key})
                assert r.status_code == 401
        assert (await admin.balance("acme")).buckets["lead_generation"].balance == 50
        await admin.close()


async def test_flushed_org_state_is_seeded_from_the_ledger(pg_dsn: str, prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(redis_url=REDIS, key_prefix=prefix, database_url=pg_dsn)
    gate = CreditGate(config, clock=clock)
    await gate.set_plan("acme", "pro")
    store = await gate.require_store()
    # The ledger says: 11 goal tokens left, 4 purchased, seq 40 (as the sync job leaves it).
    await store.pool.execute(
        """INSERT INTO ai_tokens (organization_id, token_type, balance, extra, total_allocated,
               used, period, seq) VALUES ('acme', 'goal_generation', 11, 0, 20, 9, '2026-11', 40)"""
    )
    await gate.redis.client.delete(gate.keys.org("acme"))
    # Many concurrent first uses: exactly one seeds; nobody gets a fresh allocation.
    results = await asyncio.gather(*(gate.charge("acme", "goal_generation") for _ in range(5)))
    assert sum(a.ok for a in results) == 3  # 11 tokens at cost 3
    assert (await gate.balance("acme")).buckets["goal_generation"].balance == 2
    assert int(await gate.redis.client.hget(gate.keys.org("acme"), "seq")) > 40
    await gate.close()


async def test_postgres_down_refuses_unknown_org_state(prefix: str) -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    config = reference_config(
        redis_url=REDIS, key_prefix=prefix, database_url="postgresql://postgres@127.0.0.1:1/x"
    )
    gate = CreditGate(config, clock=clock)
    from gateway.core.errors import LedgerUnavailable

    with pytest.raises(LedgerUnavailable):
        await gate.charge("acme", "goal_generation")
    await gate.redis.close()
