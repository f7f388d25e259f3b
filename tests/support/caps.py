"""Helpers of the caps tests (contract A10): plans with and without default caps, and
levels written into Redis the way the admin API mirrors them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from gateway.core.caps import counters_period_field, parse_cap, used_field, used_of
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.support.actual_costs import actual_cost_gate, actual_cost_overrides

BUCKET = "goal_generation"  # cost 3


def caps_overrides() -> dict[str, Any]:
    """Plans ``teams`` (100 goal_generation and research tokens, no default caps) and
    ``capped`` (the same, with contract A10's example defaults)."""
    data = actual_cost_overrides()
    alloc = {BUCKET: 100, "research": 100}
    data["plans"]["teams"] = {"allocations": alloc}
    data["plans"]["capped"] = {
        "allocations": alloc,
        "caps": {"team": "60%", "user": "30%", "key": "30%"},
    }
    return data


@asynccontextmanager
async def caps_gate(
    kind: str, clock: FixedClock, redis_url: str | None = None, **overrides: Any
) -> AsyncIterator[CreditGate]:
    """A gate (see tests.support.actual_costs.actual_cost_gate) with the caps plans."""
    async with actual_cost_gate(kind, clock, redis_url, **caps_overrides(), **overrides) as g:
        yield g


async def put(
    gate: CreditGate,
    org: str,
    level: str,
    ident: str,
    caps: Mapping[str, int | str] | None = None,
    team: str | None = None,
) -> None:
    """Mirror a team, user or key into Redis as the admin API does after its commit."""
    stored = {b: parse_cap(v) for b, v in (caps or {}).items()}
    await gate.levels.write(
        org,
        gate.levels.entity(level, ident, stored, team=team),  # type: ignore[arg-type]
    )


async def level_used(
    gate: CreditGate, org: str, level: str, ident: str, bucket: str = BUCKET
) -> int:
    """What a level drew from ``bucket`` this period."""
    raw, counted = (
        v.decode() if isinstance(v, bytes) else v
        for v in await gate.redis.client.hmget(
            gate.keys.org(org),
            [used_field(bucket, level, ident), counters_period_field(bucket)],  # type: ignore[arg-type]
        )
    )
    pid = gate.meter.period(gate.clock.now_ms())[0]
    return used_of(raw, pid, counted)
