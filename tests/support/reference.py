"""The reference config of contract A2 (the Bright Audio plans, features and routes) and the
fixed instant the tests' clocks start at."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml

from gateway.config import Config, parse_config

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
