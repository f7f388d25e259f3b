"""Gates for the settle-by-actual, reservation and Idempotency-Key replay tests: the
reference config plus a feature whose cost is known only after the call (``research``:
header cost, reserve 10, max 500; 50 tokens a month on pro and on ``small``, a plan
without rate limits), on fakeredis or on the tests'
Redis (under a unique key prefix, cleaned up after)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import yaml

from gateway.config import Config, parse_config
from gateway.core.events import Event, decode, unpacked
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from gateway.redisio.lua_scripts import load
from tests.support import services
from tests.support.reference import REFERENCE_YAML

RESEARCH_ALLOCATION = 50
RESEARCH_RESERVE = 10
RESEARCH_MAX = 500


def actual_cost_overrides() -> dict[str, Any]:
    """The reference config's ``features`` and ``plans`` with ``research`` added (for
    helpers that take top-level overrides of the reference config)."""
    data = yaml.safe_load(REFERENCE_YAML)
    data["features"]["research"] = {
        "cost": {"header": "X-Creditgate-Cost", "reserve": RESEARCH_RESERVE, "max": RESEARCH_MAX}
    }
    data["plans"]["pro"]["allocations"]["research"] = RESEARCH_ALLOCATION
    data["plans"]["enterprise"]["allocations"]["research"] = 1000
    # No rate limits: for many requests at once against a small balance.
    data["plans"]["small"] = {"allocations": {"research": RESEARCH_ALLOCATION}}
    return {"features": data["features"], "plans": data["plans"]}


def actual_cost_config(**overrides: Any) -> Config:
    """The reference config with the ``research`` feature (see the module docstring)."""
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(actual_cost_overrides())
    data.update(overrides)
    return parse_config(yaml.safe_dump(data), "actual_costs.yaml")


@asynccontextmanager
async def actual_cost_gate(
    kind: str,
    clock: FixedClock,
    redis_url: str | None = None,
    *,
    fast: bool = True,
    **overrides: Any,
) -> AsyncIterator[CreditGate]:
    """A gate on ``kind`` = "memory" (fakeredis) or "redis" (the tests' Redis, or
    ``redis_url``, e.g. a cluster's; through the pipelined runners, or redis-py's with
    ``fast=False``), no database."""
    if kind == "memory":
        config = actual_cost_config(redis_url=f"memory://{uuid.uuid4().hex}", **overrides)
        gate = CreditGate(config, clock=clock)
        try:
            yield gate
        finally:
            await gate.close()
        return
    url = redis_url or services.redis_url()
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    # (The config names one seed node of a cluster; the gate's client gets all of them.)
    config = actual_cost_config(redis_url=url.split(",")[0], key_prefix=prefix, **overrides)
    gate = CreditGate(config, clock=clock, redis=connect_redis(url, fast=fast))
    try:
        yield gate
    finally:
        await gate.meter.drain()
        if not gate.redis.cluster:  # (a test's private cluster goes away with its data)
            client = gate.redis.client
            async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                await client.delete(key)
        await gate.close()


async def bucket_state(gate: CreditGate, org: str, bucket: str) -> dict[str, Any]:
    """The org hash's fields of ``bucket``: plan balance, extra, used, period, lots."""
    raw = await gate.redis.client.hgetall(gate.keys.org(org))
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    return {
        "bal": int(text.get(f"b:{bucket}", 0)),
        "extra": int(text.get(f"x:{bucket}", 0)),
        "used": int(text.get(f"u:{bucket}", 0)),
        "period": text.get(f"p:{bucket}"),
        "lots": json.loads(text.get(f"l:{bucket}") or "[]"),
    }


async def events_of(gate: CreditGate, org: str) -> list[Event]:
    """Every audit event of ``org`` in its shard's stream, in order."""
    entries = await gate.redis.client.xrange(gate.keys.shard(org).events)
    return [ev for _, fields in entries if (ev := decode(fields)).org == org]


async def raw_events_of(gate: CreditGate, org: str) -> list[dict[str, str]]:
    """The same events as field dicts (to see which fields an entry has)."""
    entries = await gate.redis.client.xrange(gate.keys.shard(org).events)
    out = []
    for _, fields in entries:
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in unpacked(fields).items()
        }
        if text.get("o") == org:
            out.append(text)
    return out


async def sweep(
    gate: CreditGate, org: str, now_ms: int, *, features: Iterable[str] | None = None
) -> tuple[int, int]:
    """Run the sync job's hold sweep on ``org``'s shard at ``now_ms``, naming ``features``
    (default: the config's variable-cost features) as the sync job does; returns (holds
    swept, of which with their usage missing)."""
    shard = gate.keys.shard(org)
    names = gate.config.variable_features if features is None else tuple(features)
    swept, missing = await gate.redis.runner.run(
        load("sweep_holds"), [shard.holds, shard.holdexp, shard.events], [now_ms, 1000, *names]
    )
    return int(swept), int(missing)
