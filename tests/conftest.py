"""Shared fixtures: the reference config (DESIGN A2) and gates on fakeredis or real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support.reference import MID_NOVEMBER_MS, reference_config

# The sync tests' fixtures (redis, keyspace, pg_dsn, pool); modules that define their own
# fixtures of those names keep them.
pytest_plugins = ["tests.support.sync_fixtures"]


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(MID_NOVEMBER_MS)


@pytest.fixture
async def memgate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    """A gate on a fresh in-process fakeredis server, no database."""
    config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}")
    gate = CreditGate(config, clock=clock)
    yield gate
    await gate.close()


@pytest.fixture
async def redisgate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    """A gate on the real Redis (127.0.0.1:6379) under a unique key prefix, no database."""
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    config = reference_config(redis_url="redis://127.0.0.1:6379/0", key_prefix=prefix)
    gate = CreditGate(config, clock=clock)
    yield gate
    await gate.meter.drain()
    client = connect_redis("redis://127.0.0.1:6379/0").client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
    await gate.close()
