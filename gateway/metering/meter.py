"""The meter: admission (charge.lua) and settlement (settle.lua) of metered requests.

A thin facade over the three parts, each in its own module:

- :mod:`gateway.metering.admission`: ``admit`` runs charge.lua, the one round trip on a
  request's latency path, with arguments pre-encoded by
  :mod:`gateway.metering.charge_args`;
- :mod:`gateway.metering.settlement`: ``settle`` / ``settle_nowait`` queue the hold for
  charge or refund; the settles of one shard go to settle.lua in one call per batch;
- :mod:`gateway.metering.seeding`: an org's Redis state created from the ledger when
  charge.lua finds none.

Measured with bench/middleware_cpu.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from gateway.config import Config
from gateway.core.counters import METRICS, HotMetrics
from gateway.core.redis_keys import KeySpace
from gateway.metering.admission import Admission, Admitter
from gateway.metering.request_ids import new_request_id
from gateway.metering.seeding import Seeding
from gateway.metering.settlement import SETTLE_WINDOW_S, Settlement
from gateway.redisio.connect import RedisHandles

__all__ = ["SETTLE_WINDOW_S", "Admission", "Meter", "new_request_id"]


class Meter:
    """Admits and settles metered requests against Redis.

    ``seeder(org)`` is called for an org whose state is missing in Redis and must run
    ``seed_state`` (the gate wires it to the ledger); without one, new orgs start on the
    default plan. ``counters`` get the admission latencies (default: the process's).
    ``keys``: the deployment's key layout (default: built from the config).
    """

    def __init__(
        self,
        config: Config,
        redis: RedisHandles,
        *,
        now_ms: Callable[[], int],
        seeder: Callable[[str], Awaitable[None]] | None = None,
        counters: HotMetrics | None = None,
        keys: KeySpace | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys or KeySpace(config.key_prefix, config.shards)
        self.seeding = Seeding(
            redis, self.keys, default_plan=config.default_plan, from_ledger=seeder
        )
        self.admission = Admitter(
            config, redis, self.keys,
            now_ms=now_ms, seed=self.seeding.seed, counters=counters or METRICS,
        )  # fmt: skip
        self.settlement = Settlement(redis, self.keys, now_ms=now_ms)

    def period(self, now: int) -> tuple[str, int, int]:
        """The current period (id, start ms, end ms), cached until it ends."""
        return self.admission.args.period(now)

    def admit(
        self,
        org: str,
        feature: str,
        *,
        user: str | None = None,
        quantity: int = 1,
        cost: int | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        method: str = "",
        route: str = "",
    ) -> Coroutine[Any, Any, Admission]:
        """Run charge.lua for one request (await the result); see ``Admitter.admit``.

        Raises ``RedisUnavailable`` when Redis cannot be reached or timed out. Never
        retried: a timed-out debit may have committed (its hold then expires into a charge).
        """
        # Not a coroutine itself: handing out Admitter's saves a frame on the hot path.
        return self.admission.admit(
            org, feature, user=user, quantity=quantity, cost=cost,
            idempotency_key=idempotency_key, request_id=request_id, method=method, route=route,
        )  # fmt: skip

    def settle(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[int]:
        """Queue the hold of an admitted request for charge (ok) or refund.

        Returns a future with the tokens charged (-1 if the hold was already gone). The
        middleware, which never waits for it, uses ``settle_nowait`` instead.
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.settlement.queue(adm, ok, status, latency_ms, idempotency_key, done)
        return done

    def settle_nowait(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
    ) -> None:
        """``settle`` without a future to wait on (the proxy path: fire and forget).

        Must be called from a coroutine on the event loop the meter runs on.
        """
        self.settlement.queue(adm, ok, status, latency_ms, idempotency_key, None)

    async def drain(self) -> None:
        """Wait until every queued settle has reached Redis (shutdown, tests)."""
        await self.settlement.drain()

    async def seed(self, org: str) -> None:
        """Create the org's Redis state (once per process at a time; seed.lua is set-if-absent)."""
        await self.seeding.seed(org)

    async def seed_state(
        self, org: str, plan: str, seq: int, buckets: Sequence[Sequence[str | int]]
    ) -> bool:
        """Run seed.lua with explicit state: buckets are 7-tuples (see lua/seed.lua)."""
        return await self.seeding.seed_state(org, plan, seq, buckets)
