"""The meter: admission (charge.lua) and settlement (settle.lua) of metered requests.

A thin facade over the three parts, each in its own module:

- :mod:`gateway.metering.admission`: ``admit`` runs charge.lua, the one round trip on a
  request's latency path, with arguments pre-encoded by
  :mod:`gateway.metering.charge_args`;
- :mod:`gateway.metering.settlement`: ``settle`` / ``settle_nowait`` queue the hold for
  charge or refund, or for the call's :class:`Actual` cost (contract A8); the settles of one
  shard go to settle.lua in one call per batch;
- :mod:`gateway.metering.seeding`: an org's Redis state created from the ledger when
  charge.lua finds none.

Idempotency-Key replay (contract A9): ``admit(..., idempotency_key=K, fingerprint=F)``
answers a repeat of a completed request with status ``replay`` and, when its settle kept
one (``settle(..., response=StoredResponse.capture(...))``), ``adm.replay``: the response
to give back; a repeat with another fingerprint (:func:`request_fingerprint`) is
``reused``; one while the first is in flight ``in_flight``.

Measured with bench/middleware_cpu.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, overload

from gateway.config import Config
from gateway.core.anchors import org_period
from gateway.core.counters import METRICS, HotMetrics
from gateway.core.redis_keys import KeySpace
from gateway.metering.admission import (
    Admission,
    Admitter,
    StoredResponse,
    request_fingerprint,
)
from gateway.metering.request_ids import new_request_id
from gateway.metering.seeding import Seeding
from gateway.metering.settlement import (
    SETTLE_WINDOW_S,
    Actual,
    Settled,
    Settlement,
    extension,
    quiet_extension,
    settled_of,
)
from gateway.redisio.connect import RedisHandles

__all__ = [
    "SETTLE_WINDOW_S",
    "Actual",
    "Admission",
    "Meter",
    "Settled",
    "StoredResponse",
    "new_request_id",
    "request_fingerprint",
]


async def _settled(raw: asyncio.Future[Any]) -> Settled:
    return settled_of(await raw)


async def _charged(raw: asyncio.Future[Any]) -> int:
    reply = await raw
    return int(reply[0]) if isinstance(reply, list) else -1


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
        self.settlement = Settlement(
            redis, self.keys, now_ms=now_ms,
            wait_replicas=config.settle_wait_replicas,
            wait_timeout_ms=config.settle_wait_timeout_ms,
            redis_url=config.redis_url, redis_timeout=config.redis_timeout_seconds,
        )  # fmt: skip
        self.max_replay_body: int = config.idempotency_max_body_bytes
        """The largest response body kept for an Idempotency-Key replay (contract A9)."""

    def period(self, now: int) -> tuple[str, int, int]:
        """The calendar's current period (id, start ms, end ms), cached until it ends."""
        return self.admission.args.period(now)

    def period_of(self, anchor: str, now: int) -> tuple[str, int, int]:
        """The period (id, start ms, end ms) of an org whose anchor is ``anchor`` (its
        hash's ``pa``: contract A12); the calendar's when periods are not per org."""
        args = self.admission.args
        if not args.anchored:
            return args.period(now)
        start, end, pid = org_period(args.calendar, anchor, now)
        return pid, start, end

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
        fingerprint: str | None = None,
        key_id: str | None = None,
        team: str | None = None,
    ) -> Coroutine[Any, Any, Admission]:
        """Run charge.lua for one request (await the result); see ``Admitter.admit``.

        With an ``idempotency_key``, ``fingerprint`` (:func:`request_fingerprint` of the
        method, path and body) tells a repeat of the same request (``replay``, or
        ``in_flight``) from another request reusing the key (``reused``: 422).

        Raises ``RedisUnavailable`` when Redis cannot be reached or timed out. Never
        retried: a timed-out debit may have committed (its hold then expires into a charge).
        """
        # Not a coroutine itself: handing out Admitter's saves a frame on the hot path.
        return self.admission.admit(
            org, feature, user=user, quantity=quantity, cost=cost,
            idempotency_key=idempotency_key, request_id=request_id, method=method, route=route,
            fingerprint=fingerprint, key_id=key_id, team=team,
        )  # fmt: skip

    @overload
    def settle(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
        actual: None = None,
        response: StoredResponse | None = None,
    ) -> asyncio.Future[int]: ...

    @overload
    def settle(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
        actual: Actual,
        response: StoredResponse | None = None,
    ) -> asyncio.Future[Settled]: ...

    def settle(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
        actual: Actual | None = None,
        response: StoredResponse | None = None,
    ) -> asyncio.Future[int] | asyncio.Future[Settled]:
        """Queue the hold of an admitted request for charge (ok) or refund.

        Without ``actual``: a future with the tokens charged (-1 if the hold was already
        gone). With ``actual`` (the call's real cost, contract A8) and ``ok``, that is
        charged instead of the hold (see :mod:`gateway.metering.settlement`); the future
        gets a :class:`Settled` (``gone`` if the hold was already gone: a retried settle
        never charges twice). ``response`` (with an ``idempotency_key``, ``ok``) is what
        a repeat of the key gets back. The middleware, which never waits, uses
        ``settle_nowait`` instead.
        """
        loop = asyncio.get_running_loop()
        if actual is None and response is None:
            done: asyncio.Future[int] = loop.create_future()
            self.settlement.queue(adm, ok, status, latency_ms, idempotency_key, done)
            return done
        raw: asyncio.Future[Any] = loop.create_future()
        self.settlement.queue(
            adm, ok, status, latency_ms, idempotency_key, raw, extension(actual, response)
        )
        if actual is None:
            return loop.create_task(_charged(raw))
        return loop.create_task(_settled(raw))

    def settle_nowait(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
        actual: Actual | None = None,
        response: StoredResponse | None = None,
    ) -> None:
        """``settle`` without a future to wait on (the proxy path: fire and forget).

        Must be called from a coroutine on the event loop the meter runs on.
        """
        if actual is None and response is None:
            self.settlement.queue(adm, ok, status, latency_ms, idempotency_key, None)
        elif ok and response is None and actual is not None:
            # The middleware's usual variable-cost settle: nobody reads the reply.
            self.settlement.queue(
                adm, ok, status, latency_ms, idempotency_key, None, quiet_extension(actual)
            )
        else:
            self.settlement.queue(
                adm, ok, status, latency_ms, idempotency_key, None, extension(actual, response)
            )

    async def drain(self) -> None:
        """Wait until every queued settle has reached Redis (shutdown, tests)."""
        await self.settlement.drain()

    async def seed(self, org: str) -> None:
        """Create the org's Redis state (once per process at a time; seed.lua is set-if-absent)."""
        await self.seeding.seed(org)

    async def seed_state(
        self,
        org: str,
        plan: str,
        seq: int,
        buckets: Sequence[Sequence[str | int]],
        levels: Mapping[str, str] | None = None,
        anchor: str = "",
    ) -> bool:
        """Run seed.lua with explicit state: buckets are 7-tuples (see lua/seed.lua),
        ``levels`` the org's level fields (gateway.core.caps), ``anchor`` its period
        anchor (contract A12)."""
        return await self.seeding.seed_state(org, plan, seq, buckets, levels, anchor)
