"""Admission: one charge.lua call per metered request, and what it answered.

``Admitter.admit`` is the only network round trip on a request's latency path: one
EVALSHA that checks idempotency, rate limits, plan and balance, applies a lazy period
reset and takes the tokens as a hold (lua/charge.lua). Its arguments come pre-encoded
from :mod:`gateway.metering.charge_args`; settling the hold is
:mod:`gateway.metering.settlement`'s job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from gateway.config import Config
from gateway.core.counters import HotMetrics
from gateway.core.errors import RedisUnavailable
from gateway.core.redis_keys import KeySpace
from gateway.metering.charge_args import ChargeArgs
from gateway.metering.request_ids import new_request_id
from gateway.redisio.connect import RedisHandles
from gateway.redisio.lua_scripts import load

__all__ = ["Admission", "Admitter", "admission_of"]


@dataclass(slots=True)
class Admission:
    """The outcome of ``Meter.admit`` for one request."""

    status: str  # ok | not_in_plan | rate_limited | insufficient | in_flight | replay
    request_id: str
    org: str
    feature: str
    bucket: str
    cost: int
    plan: str | None = None
    remaining: int | None = None
    limit: int | None = None
    limit_remaining: int | None = None
    limit_reset_ms: int | None = None
    retry_after_ms: int | None = None
    replay_status: str | None = None
    refresh_at_ms: int = 0

    @property
    def ok(self) -> bool:
        """True when the tokens are held and the request may proceed."""
        return self.status == "ok"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def admission_of(reply: list[Any], adm: Admission) -> Admission:
    """Fill ``adm`` (status already set) from the rest of charge.lua's ``reply``."""
    status = adm.status
    if status == "ok":
        adm.remaining = int(reply[1])
        limit = int(reply[2])
        if limit >= 0:  # -1: no limiter applies
            adm.limit, adm.limit_remaining = limit, int(reply[3])
            adm.limit_reset_ms = int(reply[4])
    elif status == "rate_limited":
        adm.retry_after_ms, adm.limit = int(reply[1]), int(reply[2])
        adm.limit_remaining, adm.limit_reset_ms = 0, int(reply[3])
    elif status == "insufficient":
        adm.remaining, adm.plan = int(reply[1]), _text(reply[2])
    elif status == "not_in_plan":
        adm.plan = _text(reply[1])
    elif status == "replay":
        adm.replay_status = _text(reply[1])
    return adm


class Admitter:
    """Runs charge.lua for metered requests.

    ``seed(org)`` is awaited when Redis has no state for the org (charge.lua answers
    ``missing``); it must run seed.lua. ``counters`` get each round trip's latency.
    """

    def __init__(
        self,
        config: Config,
        redis: RedisHandles,
        keys: KeySpace,
        *,
        now_ms: Callable[[], int],
        seed: Callable[[str], Awaitable[None]],
        counters: HotMetrics,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.args = ChargeArgs(config, keys)
        self._features = self.args.features
        self.script = load("charge")
        self.counters = counters
        self._now_ms = now_ms
        self._seed = seed
        self._hold_ms = config.hold_ttl_seconds * 1000

    async def admit(
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
    ) -> Admission:
        """Run charge.lua for one request; seeds the org's state first if Redis has none.

        Raises ``RedisUnavailable`` when Redis cannot be reached or timed out. Never
        retried: a timed-out debit may have committed (its hold then expires into a charge).
        """
        fa = self._features[feature]
        total = (fa.cost if cost is None else cost) * quantity
        rid = request_id or new_request_id()
        now = self._now_ms()
        refresh_at = self.args.period(now)[2]
        template = self.args.template(org, user, feature, method, route, bool(idempotency_key))
        now_s, total_s, hold_s = str(now), str(total), str(now + self._hold_ms)
        if idempotency_key:
            idem_key = self.keys.idempotency(org, idempotency_key)
            encoded = template.fill((idem_key, now_s, total_s, rid, hold_s))
        else:
            encoded = template.fill((now_s, total_s, rid, hold_s))

        started = perf_counter()
        reply = await self.redis.runner.run_encoded(self.script, template.count, encoded)
        self.counters.observe_admit(perf_counter() - started)
        status = reply[0]
        if status.__class__ is not str:
            status = _text(status)
        if status == "missing":
            # First use of the org in this Redis (or Redis lost it): seed, then once more.
            await self._seed(org)
            reply = await self.redis.runner.run_encoded(self.script, template.count, encoded)
            status = _text(reply[0])
            if status == "missing":
                raise RedisUnavailable(f"state of org {org!r} vanished while seeding")
        adm = Admission(status, rid, org, feature, fa.bucket, total, refresh_at_ms=refresh_at)
        return admission_of(reply, adm)
