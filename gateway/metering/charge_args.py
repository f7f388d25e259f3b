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
          then, once a charge reported them, the caller's levels ("<version> <plan>",
          team, caps of team, user and key: :meth:`ChargeArgs.learn_levels`); then, only when
          they apply: the request's fingerprint (an Idempotency-Key's request,
          :meth:`ChargeArgs.fingerprinted`), and for a reservation its result ttl, result
          key and cap (:meth:`ChargeArgs.reservation_call`)

With per-org periods (contract A12) the period id argument is ``"<period id> <anchor>"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config
from gateway.core.anchors import org_period
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
# (org, user, key id, team, feature): whose levels a charge reported (the feature names
# the bucket).
_CallerKey = tuple[str, str | None, str | None, str | None, str]


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

    Per-org periods (contract A12, a calendar with ``anchor: subscription`` or ``created``):
    each org's anchor is cached here (:attr:`anchors`, ``""`` = calendar periods until
    charge.lua says otherwise) with its period; its templates carry the anchor they were
    built from, charge.lua answers ``anchor`` when the org's hash holds another, and
    :meth:`set_anchor` re-templates. Calendar deployments never take these paths.
    """

    def __init__(self, config: Config, keys: KeySpace) -> None:
        self.config = config
        self.keys = keys
        self.features = {name: feature_args(config, name) for name in config.features}
        self._idem_ttl_ms = str(config.idempotency_ttl_seconds * 1000)
        self.calendar = config.calendar
        self.anchored = self.calendar.anchored
        self.anchors: dict[str, str] = {}
        """Per-org periods only: each org's anchor as last seen (see lua/charge.lua)."""
        self._org_periods: dict[str, tuple[str, int, int]] = {}
        self.current: tuple[str, int, int] = ("", 0, -1)
        """The period (id, start ms, end ms) of the last :meth:`period` call; the hot path
        reads it without a call while ``start <= now < end``."""
        self.plain: dict[_TemplateKey, ArgTemplate] = {}
        """The templates without an idempotency key, by (org, user, feature, method,
        route): the hot path looks its template up here first, without a call."""
        self._idempotent: dict[_TemplateKey, ArgTemplate] = {}
        self._fingerprinted: dict[_TemplateKey, ArgTemplate] = {}
        self._levels: dict[_CallerKey, tuple[str, ...]] = {}
        """Each caller's levels as charge.lua last resolved them in full (the arguments it
        takes them back as); charge.lua checks them against the org's levels version."""

    def period(self, now: int, org: str | None = None) -> tuple[str, int, int]:
        """The period (id, start ms, end ms) at ``now``, cached until it ends: ``org``'s
        own with per-org periods (the calendar's without an org)."""
        if self.anchored and org is not None:
            return self._org_period(org, now)
        current = self.current
        if not current[1] <= now < current[2]:
            start, end, pid = org_period(self.calendar, "", now)
            current = (pid, start, end)
            if not self.anchored:
                # Per-org deployments keep current empty: their hot path always asks
                # for the org's own period.
                self.current = current
                self._drop_templates()
        return current

    def _org_period(self, org: str, now: int) -> tuple[str, int, int]:
        cached = self._org_periods.get(org)
        if cached is not None and cached[1] <= now < cached[2]:
            return cached
        start, end, pid = org_period(self.calendar, self.anchors.get(org, ""), now)
        if cached is not None or len(self._org_periods) >= _CACHE_SIZE:
            # The org's templates embed its old period. Templates are not indexed by org,
            # so all go: orgs roll over together on the same anchor day, and a rebuild
            # costs microseconds.
            self._drop_templates()
            if len(self._org_periods) >= _CACHE_SIZE:
                self._org_periods.clear()
                self.anchors.clear()
        result = self._org_periods[org] = (pid, start, end)
        return result

    def set_anchor(self, org: str, anchor: str) -> None:
        """Record the org's anchor as charge.lua reported it; its period is recomputed."""
        self.anchors[org] = anchor
        if self._org_periods.pop(org, None) is not None:
            self._drop_templates()

    def _drop_templates(self) -> None:
        self.plain.clear()
        self._idempotent.clear()
        self._fingerprinted.clear()
        self._levels.clear()

    def learn_levels(self, key: _TemplateKey, group: tuple[str, ...]) -> None:
        """Cache a caller's levels as charge.lua reported them after reading them in full
        (the ``"ok"`` reply's values after the 5th: ``"<version> <plan>"``, team and the
        caps of team, user and key) for the template ``key``; its templates are rebuilt with them
        (those of the caller's other routes pick them up when they are built, or learn
        them at their own next charge).

        Not a cache to expire: charge.lua uses the group only while the org's levels
        version and plan are the ones it names, and otherwise reads the levels in full in
        the same call (and reports them again), so a change on any process applies to the
        very next charge without a round trip.
        """
        org, user, key_id, team, feature, _, _ = key
        if len(self._levels) >= _CACHE_SIZE:
            self._levels.clear()
        self._levels[(org, user, key_id, team, feature)] = group
        self.plain.pop(key, None)
        self._idempotent.pop(key, None)
        self._fingerprinted.pop(key, None)

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
        if self.anchored:
            pid, _, refresh_at = self._org_periods[org]
            period = f"{pid} {self.anchors.get(org, '')}"  # charge.lua compares the anchor
        else:
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
        group = self._levels.get((org, user, key_id, team, feature))
        if group is not None:
            argv += group
        return keys, argv
