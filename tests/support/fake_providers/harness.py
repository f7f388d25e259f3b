"""creditgate's reverse proxy in front of the fake providers, built from a config dict.

:func:`provider_config` is the reference config (contract A2) with one feature per provider
API, each on its route, fixed costs by default (:data:`FIXED_COSTS`); pass ``costs`` to give
a feature another ``cost:`` (e.g. ``{"chat": {"usage": "auto", "max": 2000}}``) and top-level
keys (e.g. ``models={...}``) as keyword arguments. :func:`serve_gateway` serves it over TCP
and yields a :class:`Gateway` whose :meth:`Gateway.spent` measures what one block of calls
cost an org::

    async with serve_gateway(provider_config(fake.url)) as gw:
        async with gw.spent("chat") as spend:
            ...  # one SDK call through gw.url
        assert spend.amount == FIXED_COSTS["chat"]  # later: price(usage.expected(...))
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.commands.server import GatewayApp
from gateway.config import Config, parse_config
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support.reference import MID_NOVEMBER_MS, REFERENCE_YAML
from tests.support.served_gateway import served
from tests.support.services import redis_url
from tests.support.upstream_app import serve_in_thread

ORG = "acme"
USER = "u1"
PLAN = "pro"
ALLOCATION = 10_000

FIXED_COSTS = {"chat": 2, "responses": 3, "messages": 5, "gemini": 7}
"""The features (bucket = feature name) and their fixed costs: distinct, so a charge to the
wrong feature shows."""

ROUTES = [
    {"method": "POST", "path": "/v1/chat/completions", "feature": "chat"},
    {"method": "POST", "path": "/v1/responses", "feature": "responses"},
    {"method": "POST", "path": "/v1/messages", "feature": "messages"},
    {"method": "POST", "path": "/v1beta/models/{target}", "feature": "gemini"},
]

FEATURE_OF_PATH = {"/v1/chat/completions": "chat", "/v1/responses": "responses"}
FEATURE_OF_PATH |= {"/v1/messages": "messages"}


def identity_headers(org: str = ORG, user: str = USER) -> dict[str, str]:
    """Trusted identity headers (the config turns ``identity.trusted_headers`` on). The SDKs'
    own ``Authorization: Bearer sk-...`` / ``X-Api-Key`` are not creditgate keys, so creditgate
    leaves them for the upstream."""
    return {"X-Org-Id": org, "X-User-Id": user}


def provider_config(
    upstream: str,
    *,
    costs: dict[str, Any] | None = None,
    allocations: dict[str, int] | None = None,
    key_prefix: str | None = None,
    **top_level: Any,
) -> dict[str, Any]:
    """The config, as a dict, of a proxy in front of ``upstream`` (see the module docstring)."""
    data: dict[str, Any] = yaml.safe_load(REFERENCE_YAML)
    features = {name: {"cost": cost} for name, cost in FIXED_COSTS.items()}
    for name, cost in (costs or {}).items():
        features[name] = {**features.get(name, {}), "cost": cost}
    data.update(
        redis_url=redis_url(),  # the tests' Redis (skips the test without one)
        key_prefix=key_prefix or f"cgt{uuid.uuid4().hex[:10]}",
        upstream=upstream,
        identity={"api_keys": True, "trusted_headers": True},
        features=features,
        plans={
            "starter": {"allocations": {}},
            PLAN: {"allocations": {name: ALLOCATION for name in features} | (allocations or {})},
        },
        default_plan="starter",
        routes=ROUTES,
    )
    data.update(top_level)
    return data


@dataclass
class Spend:
    """What a block of calls cost one bucket of one org (filled in when the block ends)."""

    before: int
    after: int | None = None

    @property
    def amount(self) -> int:
        assert self.after is not None, "read the spend after its block"
        return self.before - self.after


@dataclass
class Gateway:
    url: str
    gate: CreditGate  # an inspection gate on the same Redis and config
    config: Config

    async def balance(self, bucket: str, org: str = ORG) -> int:
        await self.gate.meter.drain()
        return (await self.gate.balance(org)).buckets[bucket].balance

    @asynccontextmanager
    async def spent(
        self, bucket: str, org: str = ORG, *, expect: int | None = None, within: float = 3.0
    ) -> AsyncIterator[Spend]:
        """What the block cost ``bucket``. With ``expect``, wait (at most ``within`` seconds)
        for the amount to reach it: refunds and settles may land after the client's last byte."""
        spend = Spend(await self.balance(bucket, org))
        yield spend
        deadline = time.monotonic() + within
        after = await self.balance(bucket, org)
        while expect is not None and spend.before - after != expect:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
            after = await self.balance(bucket, org)
        spend.after = after


SERVE_PROTOCOL = True
"""Whether :func:`serve_gateway` serves with ``creditgate serve``'s HTTP protocol (which
offers the response splice: gateway/core/splice.py), else with uvicorn's own (every body
piece through ASGI ``send``). Tests that cover both paths flip it (monkeypatch)."""


@asynccontextmanager
async def serve_gateway(
    data: dict[str, Any], *, clock: FixedClock | None = None, plan: str | None = PLAN
) -> AsyncIterator[Gateway]:
    """Serve GatewayApp for the config ``data`` over TCP, org :data:`ORG` on ``plan``; on exit
    stop it and delete its Redis keys. The HTTP protocol is ``creditgate serve``'s (see
    :data:`SERVE_PROTOCOL`)."""
    clock = clock or FixedClock(MID_NOVEMBER_MS)
    config = parse_config(yaml.safe_dump(data), "provider-sdks.yaml")
    inspect = CreditGate(config, clock=clock)
    try:
        if plan is not None:
            await inspect.set_plan(ORG, plan)
        app = GatewayApp(CreditGate(config, clock=clock), sync=False)
        if SERVE_PROTOCOL:
            with served(app, config) as port:
                yield Gateway(f"http://127.0.0.1:{port}", inspect, config)
        else:
            with serve_in_thread(app) as url:
                yield Gateway(url, inspect, config)
    finally:
        await inspect.close()
        client = connect_redis(config.redis_url).client
        async for key in client.scan_iter(match=f"{config.key_prefix}:*", count=1000):
            await client.delete(key)
        await client.aclose()
