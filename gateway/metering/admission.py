"""Admission: one charge.lua call per metered request, and what it answered.

``Admitter.admit`` is the only network round trip on a request's latency path: one
EVALSHA that checks idempotency, rate limits, plan and balance, applies a lazy period
reset and takes the tokens as a hold (lua/charge.lua). Its arguments come pre-encoded
from :mod:`gateway.metering.charge_args`; settling the hold is
:mod:`gateway.metering.settlement`'s job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

from gateway.config import Config
from gateway.core.counters import HotMetrics
from gateway.core.errors import RedisUnavailable
from gateway.core.logs import REQUEST_ID
from gateway.core.redis_keys import KeySpace
from gateway.metering.charge_args import ChargeArgs
from gateway.metering.request_ids import new_request_id
from gateway.redisio.connect import RedisHandles
from gateway.redisio.link import ErrorReply
from gateway.redisio.lua_scripts import load
from gateway.redisio.pipelined import FastRedis
from gateway.redisio.resp import ArgTemplate

__all__ = [
    "DEFAULT_MAX_REPLAY_BODY",
    "UNSAFE_REPLAY_HEADERS",
    "Admission",
    "Admitter",
    "StoredResponse",
    "admission_of",
    "request_fingerprint",
]

DEFAULT_MAX_REPLAY_BODY = 64 * 1024
"""The largest response body kept for an Idempotency-Key replay unless the config says
otherwise (``idempotency_max_body_bytes``, contract A9)."""

UNSAFE_REPLAY_HEADERS = frozenset({
    # Hop-by-hop, or framing the replay recomputes.
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length",
    # Another client's session, or stale.
    b"set-cookie", b"date",
    # What creditgate itself says about this request: a replay says it anew.
    b"x-tokens-cost", b"x-tokens-remaining", b"x-tokens-cost-status",
    b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset", b"retry-after",
    b"idempotent-replayed",
})  # fmt: skip
"""Response headers never stored for a replay (besides every ``x-creditgate-*``): the one
list, which the README's Idempotency-Key section spells out. Every other header is
replayed as the first response had it."""

Unreplayable = Literal["too_large", "streamed"]


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests with one Idempotency-Key the same request (contract A9):
    sha256 (64 hex digits) over the method, the path and the body."""
    digest = hashlib.sha256()
    digest.update(method.upper().encode("latin-1", "replace"))
    digest.update(b"\0")
    digest.update(path.encode("utf-8", "surrogateescape"))
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A completed request's response as an Idempotency-Key replay gives it back: the
    status, the headers safe to replay (never :data:`UNSAFE_REPLAY_HEADERS` nor
    ``x-creditgate-*``), the body; or, with ``unreplayable`` set, only the status and why
    the response cannot be replayed (its body was larger than the limit, or streamed).

    Build one with :meth:`capture`; settle.lua keeps :meth:`encode`'s text under the key
    for the idempotency window and charge.lua hands it back to a repeat
    (``Admission.replay``).
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    unreplayable: Unreplayable | None = None

    @classmethod
    def capture(
        cls,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        max_body: int = DEFAULT_MAX_REPLAY_BODY,
        streamed: bool = False,
    ) -> StoredResponse:
        """The response to keep for ``status``, ``headers`` (ASGI form: lower-case names)
        and ``body``; a marker alone when it was ``streamed`` or ``body`` exceeds
        ``max_body`` bytes."""
        if streamed:
            return cls(status, unreplayable="streamed")
        if len(body) > max_body:
            return cls(status, unreplayable="too_large")
        kept = tuple(
            (name, value)
            for name, value in headers
            if name.lower() not in UNSAFE_REPLAY_HEADERS
            and not name.lower().startswith(b"x-creditgate-")
        )
        return cls(status, kept, bytes(body))

    @property
    def replayable(self) -> bool:
        """Whether a repeat gets this response (else 409 ``idempotency_conflict``)."""
        return self.unreplayable is None

    def encode(self) -> str:
        """The text settle.lua keeps: ``R<status> <u|b> <header JSON length>\\n<header JSON>
        <body>`` (the body as UTF-8 text, or base64 when it is not UTF-8), or
        ``X<status> <reason>`` for a response that cannot be replayed. Always valid UTF-8,
        so every Redis client returns it intact."""
        if self.unreplayable is not None:
            return f"X{self.status} {self.unreplayable}"
        head = json.dumps(
            [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            separators=(",", ":"),
        )
        try:
            text, form = self.body.decode("utf-8"), "u"
        except UnicodeDecodeError:
            text, form = base64.b64encode(self.body).decode("ascii"), "b"
        return f"R{self.status} {form} {len(head)}\n{head}{text}"

    @classmethod
    def decode(cls, text: str) -> StoredResponse | None:
        """The response :meth:`encode` wrote; None for anything else."""
        try:
            if text.startswith("X"):
                status, reason = text[1:].split(" ", 1)
                if reason not in ("too_large", "streamed"):
                    return None
                return cls(int(status), unreplayable=reason)  # type: ignore[arg-type]
            if not text.startswith("R"):
                return None
            line, rest = text[1:].split("\n", 1)
            status, form, size = line.split(" ")
            head, body_text = rest[: int(size)], rest[int(size) :]
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(head))
            raw = body_text.encode("utf-8", "surrogateescape")
            body = base64.b64decode(raw, validate=True) if form == "b" else raw
            return cls(int(status), headers, body)
        except (ValueError, TypeError, binascii.Error):
            return None


@dataclass(slots=True)
class Admission:
    """The outcome of ``Meter.admit`` for one request."""

    # ok | not_in_plan | rate_limited | insufficient | in_flight | replay | reused
    status: str
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
    # A replay's kept state, as charge.lua returned it ("R..." / "X..." a response,
    # "V..." a reservation); None when only the status was kept.
    stored: str | None = None
    # An insufficient refusal's level (contract A10): "org", or the team, user or key
    # whose cap refused, with its id, cap and used tokens, and the org's remaining.
    level: str = "org"
    level_id: str | None = None
    level_cap: int | None = None
    level_used: int | None = None
    org_remaining: int | None = None

    @property
    def ok(self) -> bool:
        """True when the tokens are held and the request may proceed."""
        return self.status == "ok"

    @property
    def replay(self) -> StoredResponse | None:
        """A replay's stored response when it can be replayed (status ``replay``); None
        when only its status was kept or it cannot be replayed (:attr:`replay_refusal`)."""
        if self.stored is None or not self.stored.startswith("R"):
            return None
        return StoredResponse.decode(self.stored)

    @property
    def replay_refusal(self) -> Unreplayable | None:
        """Why a replay's response cannot be given back (too large, streamed), if so."""
        if self.stored is None or not self.stored.startswith("X"):
            return None
        stored = StoredResponse.decode(self.stored)
        return None if stored is None else stored.unreplayable


# An Admission without its __init__ (Admitter.admitted sets every slot itself).
_new = object.__new__


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
        if len(reply) > 3:  # a team, user or key cap refused (lua/charge.lua)
            adm.level, adm.level_cap, adm.level_used = _text(reply[3]), int(reply[4]), int(reply[5])
            adm.org_remaining, adm.level_id = int(reply[6]), _text(reply[7])
        else:
            adm.org_remaining = adm.remaining
    elif status == "not_in_plan":
        adm.plan = _text(reply[1])
    elif status == "replay":
        adm.replay_status = _text(reply[1])
        if len(reply) > 2:
            stored = adm.stored = _text(reply[2])
            if stored[:1] in ("R", "X"):
                adm.replay_status = stored[1:].split(" ", 1)[0]
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
        self._totals: dict[int, str] = {}  # cost -> its text (bounded)

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
        fingerprint: str | None = None,
        key_id: str | None = None,
        team: str | None = None,
    ) -> Admission:
        """Run charge.lua for one request; seeds the org's state first if Redis has none.

        ``key_id`` (the API key the request came with) and ``team`` (a JWT claim's or the
        scope's) name its levels (contract A10): an API key's own team comes first.
        ``fingerprint`` (with an ``idempotency_key``): what makes a repeat the same request
        (:func:`request_fingerprint`); a repeat with another one is refused (``reused``).

        Raises ``RedisUnavailable`` when Redis cannot be reached or timed out. Never
        retried: a timed-out debit may have committed (its hold then expires into a charge).
        """
        fa = self._features[feature]
        total = (fa.cost if cost is None else cost) * quantity
        rid = request_id or new_request_id()
        now = self._now_ms()
        args = self.args
        # The period and the template are read without a call when they are at hand:
        # this is every metered request (each Python call costs ~0.1 µs here).
        period = args.current
        if not period[1] <= now < period[2]:
            period = args.period(now, org)  # per-org periods always come here
        refresh_at = period[2]
        # A request's cost is one of a few numbers: its text is kept (str() of an int is
        # a call and a conversion, ~0.3k instructions, on every metered request).
        total_s = self._totals.get(total)
        if total_s is None:
            total_s = str(total)
            if len(self._totals) < 1024:
                self._totals[total] = total_s
        now_s, hold_s = str(now), str(now + self._hold_ms)
        if idempotency_key:
            idem_key = self.keys.idempotency(org, idempotency_key)
            if fingerprint:
                template = args.fingerprinted(org, user, feature, method, route, key_id, team)
                encoded = template.fill(
                    (idem_key, now_s, total_s, rid, hold_s, _fingerprint(fingerprint))
                )
            else:
                template = args.template(org, user, feature, method, route, True, key_id, team)
                encoded = template.fill((idem_key, now_s, total_s, rid, hold_s))
        else:
            template = args.plain.get(
                (org, user, key_id, team, feature, method, route)
            ) or args.template(org, user, feature, method, route, False, key_id, team)
            encoded = template.fill((now_s, total_s, rid, hold_s))

        started = perf_counter()
        runner = self.redis.runner
        if type(runner) is FastRedis:
            # run_encoded's two steps, awaited from here: the task resumes at the reply
            # through one coroutine level fewer (FastRedis.send_encoded).
            reply = await runner.send_encoded(self.script, template.count, encoded)
            if reply.__class__ is ErrorReply:
                reply = await runner.recover_encoded(self.script, template.count, encoded, reply)
        else:
            reply = await runner.run_encoded(self.script, template.count, encoded)
        self.counters.observe_admit(perf_counter() - started)
        if len(reply) > 5 or reply[0] != "ok":
            return await self._answered(
                reply, org, feature, rid, total, refresh_at, template.count, encoded,
                user, quantity, cost, idempotency_key, method, route, fingerprint, key_id, team,
            )  # fmt: skip
        # admission_of's "ok" branch, inlined: this is every admitted request.
        adm = Admission("ok", rid, org, feature, fa.bucket, total, refresh_at_ms=refresh_at)
        adm.remaining = int(reply[1])
        limit = int(reply[2])
        if limit >= 0:  # -1: no limiter applies
            adm.limit, adm.limit_remaining, adm.limit_reset_ms = limit, int(reply[3]), int(reply[4])
        return adm

    def send_plain(
        self,
        org: str,
        feature: str,
        user: str | None,
        cost: int | None,
        rid: str,
        method: str,
        route: str,
        key_id: str | None,
        team: str | None,
    ) -> tuple[Awaitable[Any], ArgTemplate, bytes, int, int, float]:
        """:meth:`admit` of a request without an Idempotency-Key, in three steps that leave
        the caller's own coroutine the only one waiting for the reply: this plain method
        sends the charge and returns ``(what awaits its reply, the template, the encoded
        arguments, the cost, the period's end, the send's perf_counter)``; the caller
        awaits the first and hands the reply with the rest to :meth:`admitted`, then, when
        that answers None, to :meth:`answer`. The middleware's fixed-cost request does:
        the charge's own coroutine was one more object alive across the wait for the
        collector's young passes to count, and one more level for the task to resume
        through at the reply (BENCHMARKS.md section 1, round 11). The same bytes go to
        Redis as :meth:`admit` sends."""
        fa = self._features[feature]
        total = fa.cost if cost is None else cost
        now = self._now_ms()
        args = self.args
        period = args.current
        if not period[1] <= now < period[2]:
            period = args.period(now, org)  # per-org periods always come here
        total_s = self._totals.get(total)
        if total_s is None:
            total_s = str(total)
            if len(self._totals) < 1024:
                self._totals[total] = total_s
        template = args.plain.get(
            (org, user, key_id, team, feature, method, route)
        ) or args.template(org, user, feature, method, route, False, key_id, team)
        encoded = template.fill((str(now), total_s, rid, str(now + self._hold_ms)))
        runner = self.redis.runner
        started = perf_counter()
        if type(runner) is FastRedis:
            # On a live socket the reply's future itself: an error reply is its result.
            sent = runner.send_encoded(self.script, template.count, encoded)
        else:
            sent = runner.run_encoded(self.script, template.count, encoded)
        return sent, template, encoded, total, period[2], started

    def admitted(
        self, reply: Any, org: str, feature: str, rid: str, total: int, refresh_at: int,
        started: float,
    ) -> Admission | None:  # fmt: skip
        """The Admission of :meth:`send_plain`'s ``reply`` when it is the usual one: the
        tokens held, nothing to learn. None for anything else (an error reply, a refusal,
        an org to seed, the caller's levels read in full, a moved anchor): :meth:`answer`
        then answers what :meth:`admit` would."""
        if reply.__class__ is ErrorReply:
            return None  # (its round trip is observed once recovered, as admit does)
        self.counters.observe_admit(perf_counter() - started)
        if len(reply) > 5 or reply[0] != "ok":
            return None
        # Every field stored here on an object made by object.__new__: the dataclass's
        # __init__, called through the type, runs in a new interpreter loop (~800
        # instructions more; BENCHMARKS.md section 1, round 12). Every slot is set (the
        # tests compare each with admit's Admission).
        adm = _new(Admission)
        adm.status = "ok"
        adm.request_id = rid
        adm.org = org
        adm.feature = feature
        adm.bucket = self._features[feature].bucket
        adm.cost = total
        adm.remaining = int(reply[1])
        limit = int(reply[2])
        if limit < 0:  # no limiter applies
            adm.limit = adm.limit_remaining = adm.limit_reset_ms = None
        else:
            adm.limit, adm.limit_remaining, adm.limit_reset_ms = limit, int(reply[3]), int(reply[4])
        adm.refresh_at_ms = refresh_at
        adm.level = "org"
        adm.plan = adm.retry_after_ms = adm.replay_status = adm.stored = adm.level_id = None
        adm.level_cap = adm.level_used = adm.org_remaining = None
        return adm

    async def answer(
        self,
        reply: Any,
        org: str,
        feature: str,
        rid: str,
        total: int,
        refresh_at: int,
        started: float,
        template: ArgTemplate,
        encoded: bytes,
        *,
        user: str | None,
        cost: int | None,
        method: str,
        route: str,
        key_id: str | None,
        team: str | None,
    ) -> Admission:
        """What :meth:`admit` answers for :meth:`send_plain`'s ``reply`` when
        :meth:`admitted` answered None: an error reply recovered (NOSCRIPT loaded once and
        sent again; any other error raised), an org seeded and charged again, the caller's
        levels learned, a moved anchor learned and charged again, a refusal."""
        if reply.__class__ is ErrorReply:
            runner = self.redis.runner
            assert isinstance(runner, FastRedis)  # only its send_encoded answers one
            reply = await runner.recover_encoded(self.script, template.count, encoded, reply)
            self.counters.observe_admit(perf_counter() - started)
        return await self._answered(
            reply, org, feature, rid, total, refresh_at, template.count, encoded,
            user, 1, cost, None, method, route, None, key_id, team,
        )  # fmt: skip

    async def _answered(
        self,
        reply: Any,
        org: str,
        feature: str,
        rid: str,
        total: int,
        refresh_at: int,
        count: int,
        encoded: bytes,
        user: str | None,
        quantity: int,
        cost: int | None,
        idempotency_key: str | None,
        method: str,
        route: str,
        fingerprint: str | None,
        key_id: str | None,
        team: str | None,
    ) -> Admission:
        """The Admission of charge.lua's ``reply`` (not an error reply) to the call of
        ``count`` arguments ``encoded``, on every path but the usual "ok" (which
        :meth:`admit` and :meth:`admitted` build themselves)."""
        bucket = self._features[feature].bucket
        status = reply[0]
        if status.__class__ is not str:
            status = _text(status)
        if status == "missing":
            # First use of the org in this Redis (or Redis lost it): seed, then once more.
            # The seeding's log line carries the request's id (the middleware's fixed-cost
            # path sets it only once the charge answered).
            REQUEST_ID.set(rid)
            await self._seed(org)
            reply = await self.redis.runner.run_encoded(self.script, count, encoded)
            status = _text(reply[0])
            if status == "missing":
                raise RedisUnavailable(f"state of org {org!r} vanished while seeding")
        if status != "ok":
            if status == "anchor":
                # Per-org periods (off the admitted path): the org's anchor moved (admin
                # API, Stripe, another process): charge.lua changed nothing; learn it and
                # charge again.
                self.args.set_anchor(org, _text(reply[1]))
                return await self.admit(
                    org, feature, user=user, quantity=quantity, cost=cost,
                    idempotency_key=idempotency_key, request_id=rid, method=method,
                    route=route, fingerprint=fingerprint, key_id=key_id, team=team,
                )  # fmt: skip
            adm = Admission(status, rid, org, feature, bucket, total, refresh_at_ms=refresh_at)
            return admission_of(reply, adm)
        adm = Admission(status, rid, org, feature, bucket, total, refresh_at_ms=refresh_at)
        if len(reply) > 5:
            # charge.lua read the caller's levels in full (contract A10): cache them in
            # the template for the next charge (charge_args.ChargeArgs.learn_levels).
            self.args.learn_levels(
                (org, user, key_id, team, feature, method, route),
                tuple(_text(v) for v in reply[5:]),
            )
        return admission_of(reply, adm)

    async def reserve(
        self,
        org: str,
        feature: str,
        *,
        user: str | None,
        cost: int,
        cap: int,
        ttl_ms: int,
        result_ttl_ms: int,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        request_id: str | None = None,
        key_id: str | None = None,
        team: str | None = None,
    ) -> tuple[Admission, int]:
        """Run charge.lua for a reservation (contract A9): hold ``cost`` tokens for
        ``ttl_ms``, settled later at most at ``cap``; its settle result is kept for
        ``result_ttl_ms``. An ``idempotency_key`` completes at once: a repeat is a
        ``replay`` whose ``stored`` text is the reservation (``V...``: lua/charge.lua).
        Returns the admission and the reservation's expiry (ms).

        Not the hot path: the arguments are built for the call, not from a template.
        """
        fa = self._features[feature]
        rid = request_id or new_request_id()
        now = self._now_ms()
        refresh_at = self.args.period(now, org)[2]
        idem_key = self.keys.idempotency(org, idempotency_key) if idempotency_key else None
        keys, args = self.args.reservation_call(
            org, user, feature, idem_key,
            now=now, cost=cost, request_id=rid, expires_ms=now + ttl_ms,
            fingerprint=_fingerprint(fingerprint) if fingerprint else "",
            result_ttl_ms=result_ttl_ms, result_key=self.keys.reservation(org, rid), cap=cap,
            key_id=key_id, team=team,
        )  # fmt: skip
        reply = await self.redis.runner.run(self.script, keys, args)
        status = _text(reply[0])
        if status == "missing":
            await self._seed(org)
            reply = await self.redis.runner.run(self.script, keys, args)
            status = _text(reply[0])
            if status == "missing":
                raise RedisUnavailable(f"state of org {org!r} vanished while seeding")
        if status == "anchor":  # as in admit: learn the org's anchor, then once more
            self.args.set_anchor(org, _text(reply[1]))
            return await self.reserve(
                org, feature, user=user, cost=cost, cap=cap, ttl_ms=ttl_ms,
                result_ttl_ms=result_ttl_ms, idempotency_key=idempotency_key,
                fingerprint=fingerprint, request_id=rid, key_id=key_id, team=team,
            )  # fmt: skip
        if status == "ok" and len(reply) > 5:  # as in admit: the caller's levels
            self.args.learn_levels(
                (org, user, key_id, team, feature, "", "reservation"),
                tuple(_text(v) for v in reply[5:]),
            )
        adm = Admission(status, rid, org, feature, fa.bucket, cost, refresh_at_ms=refresh_at)
        return admission_of(reply, adm), now + ttl_ms


def _fingerprint(value: str) -> str:
    """``value`` as charge.lua compares fingerprints: 64 characters (a sha256 hex digest
    is kept as it is; anything else is hashed to one)."""
    if len(value) == 64:
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
