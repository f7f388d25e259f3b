"""Shared fixtures: the reference config (DESIGN A2) and gates on fakeredis or real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from gateway.config import Config, parse_config
from gateway.gate import CreditGate
from gateway.periods import FixedClock
from gateway.redisconn import connect_redis

# The sync tests' fixtures (redis, keyspace, pg_dsn, pool); modules that define their own
# fixtures of those names keep them.
pytest_plugins = ["tests.sync_fixtures"]

REFERENCE_YAML = """
redis_url: memory://
database_url: ""
upstream: http://127.0.0.1:9
identity:
  api_keys: true
  trusted_headers: true
features:
  lead_generation:   {cost: 5}
  goal_generation:   {cost: 3}
  strategy_analysis: {cost: 2}
  revenue_forecast:  {cost: 4}
  general_insights:  {cost: 1}
plans:
  starter: {allocations: {}}
  pro:
    allocations: {lead_generation: 60, goal_generation: 20, strategy_analysis: 40, revenue_forecast: 40, general_insights: 40}
    rate_limits: [{per: org, limit: 60/minute}, {per: user, limit: 20/minute}]
  enterprise:
    allocations: {lead_generation: 500, goal_generation: 300, strategy_analysis: 400, revenue_forecast: 400, general_insights: 300}
    rate_limits: [{per: org, limit: 600/minute}]
default_plan: starter
period: monthly
routes:
  - {method: POST, path: /api/v1/leads/generate, feature: lead_generation}
  - {method: POST, path: "/api/v1/goals/{goal_id}/quests", feature: goal_generation}
  - {method: POST, path: /api/v1/strategy/analyze, feature: strategy_analysis}
  - {method: POST, path: /api/v1/revenue/forecast, feature: revenue_forecast}
  - {method: GET,  path: "/api/v1/insights/{rest:path}", feature: general_insights}
"""

# 2026-11-15 12:00 UTC: mid-month, so tests can move to the next period deliberately.
MID_NOVEMBER_MS = int(datetime(2026, 11, 15, 12, tzinfo=UTC).timestamp() * 1000)


def reference_config(**overrides: Any) -> Config:
    """The reference config with top-level fields overridden (and fully validated)."""
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(overrides)
    return parse_config(yaml.safe_dump(data), "reference.yaml")


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
