"""charge.lua's keys and arguments: built once, filled in per request.

Everything about a charge that does not depend on the request itself is turned into
script arguments ahead of time: per feature, each plan's allocation and limiters
(:class:`FeatureArgs`, at construction); per org, user, feature, method and route, the keys
and every argument but the per-request values, encoded once (an
:class:`~gateway.redisio.resp.ArgTemplate`, cached for the current period). A request
then fills in its time, cost, request id and hold expiry (and its idempotency key).

The layout (lua/charge.lua's header is the reference)::

    KEYS  org state, shard holds, shard hold expiries, shard events, idempotency key
          (or the shard's never-written placeholder), then the per-user limiters
    ARGV  now, period id, refresh_at, bucket, cost, request id, hold expiry,
          idempotency ttl (0 = none), org, user, feature, method, route, API key id,
          the request's team, number of plans, then per plan: name, allocation (-1 = not
          in the plan), default caps ("" = none, else "team,user,key" tokens), limiter
          count, then per limiter: KEYS index (0 = per org), count, period ms;
          then, only when they apply: the request's fingerprint (an Idempotency-Key's
          request, :meth:`ChargeArgs.fingerprinted`), and for a reservation its result
          ttl, result key and cap (:meth:`ChargeArgs.reservation_call`)
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config
from gateway.core.periods import period_bounds, period_id
from gateway.core.redis_keys import KeySpace
from gateway.redisio.resp import SLOT, ArgTemplate, ScriptArg

__all__ = ["ChargeArgs", "FeatureArgs", "feature_args"]

# Cached templates; the caches are emptied when full (rebuilding one costs a few
# microseconds, so nothing smarter is worth its own overhead).
_CACHE_SIZE = 20_000
# KEYS before the per-user limiters (Lua is 1-based: the first limiter is KEYS[6]).
_FIXED_KEYS = 5

# (org, user, key id, team, feature, method, route): what a template is cached by.
_TemplateKey = tuple[str, str | None, str | None, str | None, str, str, str]


@dataclass(frozen=True, slots=True)
class FeatureArgs:
    """A feature's script arguments that no request changes."""

    bucket: str
    cost: int
    tail_user: tuple[str, ...]  # ARGV[16..] of a request with a user
    tail_anon: tuple[str, ...]  # ARGV[16..] without one: per-org limiters only
    user_limiters: tuple[tuple[int, int], ...]  # (count, period ms) of KEYS[6..]


def feature_args(config: Config, feature: str) -> FeatureArgs:
    """``feature``'s plans and limiters as charge.lua arguments."""
    bucket = config.bucket_of(feature)
    user_limiters: list[tuple[int, int]] = []

    def plans_tail(with_user: bool) -> tuple[str, ...]:
        tail: list[int | str] = [len(config.plans)]
        for plan in config.plans:
            alloc = config.allocation(plan, bucket)
            limits = [rl for rl in config.rate_limits_of(plan) if with_user or rl.per != "user"]
            caps = config.default_caps(plan, bucket)
            caps_arg = "" if caps is None else ",".join(map(str, caps))
            tail += [plan, -1 if alloc is None else alloc, caps_arg, len(limits)]
            for rl in limits:
                if rl.per == "org":
                    # KEYS index 0: charge.lua keeps per-org limiters in the org's hash.
                    tail += [0, rl.count, rl.period_ms]
                    continue
                spec = (rl.count, rl.period_ms)
                if spec not in user_limiters:
                    user_limiters.append(spec)
                tail += [_FIXED_KEYS + 1 + user_limiters.index(spec), rl.count, rl.period_ms]
        # As strings: they are encoded once, into every template of the feature.
        return tuple(map(str, tail))

    tail_user = plans_tail(with_user=True)
    tail_anon = plans_tail(with_user=False)  # without a user: no limiter keys
    return FeatureArgs(
        bucket, config.features[feature].cost, tail_user, tail_anon, tuple(user_limiters)
    )


class ChargeArgs:
    """charge.lua's keys and arguments for one deployment, as templates to fill in.

    A template without an idempotency key is filled with ``(now, cost, request id, hold
    expiry)``; one with, with ``(idempotency key, now, cost, request id, hold expiry)``
    (see :meth:`template`). Templates embed the period: :meth:`period` drops them when
    it ends.
    """

    def __init__(self, config: Config, keys: KeySpace) -> None:
        self.config = config
        self.keys = keys
        self.features = {name: feature_args(config, name) for name in config.features}
        self._idem_ttl_ms = str(config.idempotency_ttl_seconds * 1000)
        self.current: tuple[str, int, int] = ("", 0, -1)
        """The period (id, start ms, end ms) of the last :meth:`period` call; the hot path
        reads it without a call while ``start <= now < end``."""
        self.plain: dict[_TemplateKey, ArgTemplate] = {}
        """The templates without an idempotency key, by (org, user, feature, method,
        route): the hot path looks its template up here first, without a call."""
        self._idempotent: dict[_TemplateKey, ArgTemplate] = {}
        self._fingerprinted: dict[_TemplateKey, ArgTemplate] = {}

    def period(self, now: int) -> tuple[str, int, int]:
        """The period (id, start ms, end ms) at ``now``, cached until it ends."""
        current = self.current
        if not current[1] <= now < current[2]:
            start, end = period_bounds(self.config.period, now)
            current = self.current = (period_id(self.config.period, now), start, end)
            self.plain.clear()
            self._idempotent.clear()
            self._fingerprinted.clear()
        return current

    def template(
        self,
        org: str,
        user: str | None,
        feature: str,
        method: str,
        route: str,
        idempotent: bool,
        key_id: str | None = None,
        team: str | None = None,
    ) -> ArgTemplate:
        """The request's template (cached); call :meth:`period` first in each request."""
        key = (org, user, key_id, team, feature, method, route)
        cache = self._idempotent if idempotent else self.plain
        template = cache.get(key)
        if template is None:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            template = cache[key] = self._build(key, idempotent)
        return template

    def fingerprinted(
        self,
        org: str,
        user: str | None,
        feature: str,
        method: str,
        route: str,
        key_id: str | None = None,
        team: str | None = None,
    ) -> ArgTemplate:
        """The template of a request with an Idempotency-Key and a fingerprint (cached),
        filled with ``(idempotency key, now, cost, request id, hold expiry, fingerprint)``."""
        key = (org, user, key_id, team, feature, method, route)
        cache = self._fingerprinted
        template = cache.get(key)
        if template is None:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            template = cache[key] = ArgTemplate([*self._parts(key, True), SLOT])
        return template

    def reservation_call(
        self,
        org: str,
        user: str | None,
        feature: str,
        idempotency_key: str | None,
        *,
        now: int,
        cost: int,
        request_id: str,
        expires_ms: int,
        fingerprint: str,
        result_ttl_ms: int,
        result_key: str,
        cap: int,
        key_id: str | None = None,
        team: str | None = None,
    ) -> tuple[list[str], list[ScriptArg]]:
        """charge.lua's keys and arguments for a reservation (not cached: not the hot
        path); call :meth:`period` first."""
        keys, argv = self._keys_argv(
            (org, user, key_id, team, feature, "", "reservation"), idempotency_key is not None
        )
        if idempotency_key is not None:
            keys[4] = idempotency_key
        argv[0], argv[4], argv[5], argv[6] = now, cost, request_id, expires_ms
        argv += [fingerprint, result_ttl_ms, result_key, cap]
        return [str(k) for k in keys], [a for a in argv if a is not None]

    def _build(self, key: _TemplateKey, idempotent: bool) -> ArgTemplate:
        return ArgTemplate(self._parts(key, idempotent))

    def _parts(self, key: _TemplateKey, idempotent: bool) -> list[ScriptArg | None]:
        """The EVALSHA's arguments after the SHA (numkeys, keys, argv), SLOT where a
        request fills in a value."""
        keys, argv = self._keys_argv(key, idempotent)
        return [str(len(keys)), *keys, *argv]

    def _keys_argv(
        self, key: _TemplateKey, idempotent: bool
    ) -> tuple[list[str | None], list[ScriptArg | None]]:
        """charge.lua's KEYS and ARGV, SLOT where a request fills in a value."""
        org, user, key_id, team, feature, method, route = key
        fa = self.features[feature]
        period, _, refresh_at = self.current
        org_keys = self.keys.of_org(org)
        shard = org_keys.shard
        # Per-user limiters are keyed by the user inside the org; without a user there are
        # none (per-org limiters are fields of the org's hash).
        limiter_keys = (
            [shard.user_limiter(org, user, count, per_ms) for count, per_ms in fa.user_limiters]
            if user
            else []
        )
        keys: list[str | None] = [
            org_keys.state, shard.holds, shard.holdexp, shard.events,
            SLOT if idempotent else shard.no_idempotency, *limiter_keys,
        ]  # fmt: skip
        argv: list[ScriptArg | None] = [
            SLOT, period, str(refresh_at), fa.bucket,  # now, period, refresh_at, bucket
            SLOT, SLOT, SLOT,  # cost, request id, hold expiry
            self._idem_ttl_ms if idempotent else "0",
            org, user or "", feature, method, route, key_id or "", team or "",
            *(fa.tail_user if user else fa.tail_anon),
        ]  # fmt: skip
        return keys, argv
