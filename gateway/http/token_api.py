"""The token API (contract A4), under ``config.api_prefix`` (default ``/api/v1/tokens``).

Authenticated like metered requests (API key, JWT, or whatever the identity config
accepts); the organization ALWAYS comes from the credentials. Nothing in a path, query or
body can name another org: there is no org parameter at all, and the only user a caller
may name is covered by the rule below.

``POST /deduct`` and ``user_id``: a key (or token) bound to a user charges as that user;
naming another user is **403** ``user_mismatch`` (a user cannot spend as, or shift usage
onto, a colleague). An org-level credential (no user) may attribute the charge to any user
id of its own org, which is how a backend that holds one org key reports its users.

A replayed ``Idempotency-Key`` of a completed deduct answers **200** with ``charged: 0``
and ``replayed: true``: no upstream response is attached to a deduct (the proxy and the
middleware give back the stored response instead), so telling the client "done" is safe
and lets it retry blindly. A key still in flight is **409**, as on the proxy.

A replayed deduct also carries ``Idempotent-Replayed: true``; the same key with another
feature, quantity or user is **422** ``idempotency_key_reused`` (contract A9).

Reservations (contract A9): ``POST /reservations`` holds an estimate (**201**; the refusals of
A3, **402** when it does not fit); ``POST /reservations/{id}/settle {actual}`` charges the
actual and ``.../release`` gives it all back (**200**, a repeat answers the same body);
an id that is not one of the caller's org's reservations is **404**
``reservation_not_found``; one that expired before it was settled was charged its reserve
and answers **409** ``reservation_expired`` with that result. An ``Idempotency-Key`` on
``POST /reservations`` returns the same reservation for a repeat (**201** with
``Idempotent-Replayed: true``).

Each handler is a module-level function of one :class:`~gateway.http.endpoint.Call`;
:data:`OPERATIONS` declares them with their models (gateway.http.models.token), and is
both their route table and their part of the OpenAPI document. The dashboard page and the
document itself are declared in gateway.http.dashboard and gateway.http.openapi.

``GET /balance`` shows each bucket's ``overage`` this period (contract A8: what calls cost
beyond what the balance could cover; recorded, never owed). Redis does not keep it: it is
summed from the ledger's rows (:func:`bucket_overage`), so it follows the sync lag, and is
null when there is no ledger or the ledger did not answer (the rest of the balance, read
from Redis, is still served).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from gateway.core.balances import Balance as BalanceState
from gateway.core.timefmt import iso_ms
from gateway.http.endpoint import Call, Doc, Operation, Reply
from gateway.http.errors import ApiError, bad_request, invalid
from gateway.http.models.reservations import (
    ReservationHeaders,
    ReservationPath,
    ReservationRequest,
    ReservationResult,
    SettleRequest,
    SettleResult,
)
from gateway.http.models.token import (
    Balance,
    Bucket,
    CheckRequest,
    CheckResult,
    DeductHeaders,
    DeductRequest,
    DeductResult,
    FeatureInfo,
    LevelBucket,
    LevelInfo,
    Stats,
    StatsQuery,
    UsagePage,
    UsageQuery,
)
from gateway.ledger.usage import period_overage, usage_page
from gateway.ledger.usage_groups import Group
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Admission
from gateway.metering.refusals import describe_refusal, seconds
from gateway.metering.reservations import Reservation, ReservationNotFound, ReservationRefused
from gateway.metering.reservations import SettleResult as Settled

__all__ = ["OPERATIONS", "balance_model", "bucket_overage", "refusal"]

log = logging.getLogger(__name__)

# /balance serves Redis' figures even when the ledger is slow: the overage waits this long.
OVERAGE_TIMEOUT_S = 2.0


async def bucket_overage(gate: CreditGate, bal: BalanceState) -> dict[str, int] | None:
    """The org's overage per bucket over its current period (its own period: contract
    A12), from the ledger; None without a ledger or when it does not answer in time."""
    try:
        store = await gate.store()
        if store is None:
            return None
        start = datetime.fromtimestamp(bal.period_start_ms / 1000, UTC)
        end = datetime.fromtimestamp(bal.period_end_ms / 1000, UTC)
        return await asyncio.wait_for(
            period_overage(store.pool, bal.org, start, end), OVERAGE_TIMEOUT_S
        )
    except Exception as exc:  # the ledger down: the balance itself still answers
        log.warning("overage of %s not read from the ledger: %s", bal.org, exc)
        return None


def balance_model(bal: BalanceState, overage: Mapping[str, int] | None = None) -> Balance:
    """``GET /balance`` (the admin's org view adds to it): plan, period, buckets, features;
    ``overage`` per bucket (:func:`bucket_overage`; None: unknown, each bucket's is null)."""
    return Balance(
        org=bal.org,
        plan=bal.plan,
        period=bal.period,
        period_start=iso_ms(bal.period_start_ms),
        period_end=iso_ms(bal.period_end_ms),
        refresh_at=iso_ms(bal.period_end_ms),
        buckets={
            name: Bucket(
                allocated=b.allocated, balance=b.balance, extra=b.extra, used=b.used,
                available=b.available, in_plan=b.in_plan,
                overage=None if overage is None else overage.get(name, 0),
            )
            for name, b in bal.buckets.items()
        },
        features={name: FeatureInfo(**info) for name, info in bal.features.items()},
    )  # fmt: skip


def refusal(adm: Admission) -> ApiError:
    """A refused admission as the proxy answers it (same status, code, title, facts)."""
    r = describe_refusal(adm)
    return ApiError(r.status, r.code, r.title, r.detail, headers=dict(r.headers), **r.facts)


def _known_feature(gate: CreditGate, feature: str) -> None:
    if feature not in gate.config.features:
        raise ApiError(
            422, "unknown_feature", "Unknown feature",
            f"No feature named {feature!r} (known: {', '.join(gate.config.features)})",
            feature=feature,
        )  # fmt: skip


async def balance(call: Call) -> Reply:
    """``GET /balance``, with the caller's team, user and key caps (contract A10)."""
    gate, ident = call.gate, call.identity
    bal = await gate.balance(ident.org)
    model = balance_model(bal, await bucket_overage(gate, bal))
    views = await gate.levels.caller(
        ident.org, bal.plan, bal.period, user=ident.user, key_id=ident.key_id, team=ident.team
    )
    model.levels = [
        LevelInfo(
            level=v.level, id=v.id,
            buckets={
                b: LevelBucket(cap=c.cap, used=c.used, remaining=c.remaining)
                for b, c in v.buckets.items()
            },
        )
        for v in views
    ]  # fmt: skip
    return Reply(model)


async def check(call: Call) -> Reply:
    """``POST /check``: reads only."""
    body = call.parsed(CheckRequest)
    _known_feature(call.gate, body.feature)
    res = await call.gate.check(call.identity.org, body.feature, quantity=body.quantity or 1)
    return Reply(
        CheckResult(
            allowed=res.allowed, code=res.code, feature=res.feature, bucket=res.bucket,  # type: ignore[arg-type]
            cost=res.cost, balance=res.balance, refresh_at=iso_ms(res.refresh_at_ms),
        )
    )  # fmt: skip


async def deduct(call: Call) -> Reply:
    """``POST /deduct``: charge without proxying (see the module docstring)."""
    body = call.parsed(DeductRequest)
    header = call.parsed(DeductHeaders).idempotency_key
    idem = body.idempotency_key
    if header is not None and idem is not None and idem != header:
        raise invalid([{"field": "idempotency_key",
                        "message": "differs from the Idempotency-Key header"}])  # fmt: skip
    idem = header if header is not None else idem
    gate, ident = call.gate, call.identity
    _known_feature(gate, body.feature)
    user = ident.user
    if user is not None and body.user_id is not None and body.user_id != user:
        raise ApiError(
            403, "user_mismatch", "User mismatch",
            "This credential belongs to a user and can only charge as that user",
        )  # fmt: skip
    if user is None:
        user = body.user_id
    adm = await gate.charge(
        ident.org, body.feature, user=user, quantity=body.quantity or 1, idempotency_key=idem,
        key_id=ident.key_id, team=ident.team,
    )  # fmt: skip
    if adm.status == "replay":
        left = (await gate.balance(ident.org)).buckets[adm.bucket].available
        return Reply(
            DeductResult(
                charged=0, replayed=True, remaining=left, feature=body.feature,
                bucket=adm.bucket, request_id=None,
            ),
            headers=_REPLAYED,
        )  # fmt: skip
    if not adm.ok:
        raise refusal(adm)
    assert adm.remaining is not None  # an admitted charge always reports what is left
    headers = {"X-Tokens-Cost": str(adm.cost), "X-Tokens-Remaining": str(adm.remaining)}
    if adm.limit is not None:
        headers.update({
            "RateLimit-Limit": str(adm.limit),
            "RateLimit-Remaining": str(adm.limit_remaining),
            "RateLimit-Reset": str(seconds(adm.limit_reset_ms)),
        })  # fmt: skip
    result = DeductResult(
        charged=adm.cost, replayed=False, remaining=adm.remaining, feature=body.feature,
        bucket=adm.bucket, request_id=adm.request_id,
    )  # fmt: skip
    return Reply(result, headers=headers)


_REPLAYED = {"Idempotent-Replayed": "true"}


def _reservation_model(r: Reservation) -> ReservationResult:
    return ReservationResult(
        id=r.id, feature=r.feature, reserved=r.reserved, expires_at=iso_ms(r.expires_at_ms),
        remaining=r.remaining,
    )  # fmt: skip


async def reserve(call: Call) -> Reply:
    """``POST /reservations``: hold an estimate (see the module docstring)."""
    body = call.parsed(ReservationRequest)
    idem = call.parsed(ReservationHeaders).idempotency_key
    gate, ident = call.gate, call.identity
    _known_feature(gate, body.feature)
    user = ident.user
    if user is not None and body.user_id is not None and body.user_id != user:
        raise ApiError(
            403, "user_mismatch", "User mismatch",
            "This credential belongs to a user and can only reserve as that user",
        )  # fmt: skip
    if user is None:
        user = body.user_id
    try:
        r = await gate.reserve(
            ident.org, body.feature, estimate=body.estimate, user=user,
            ttl_seconds=body.ttl_seconds, idempotency_key=idem,
        )  # fmt: skip
    except ReservationRefused as exc:
        raise refusal(exc.admission) from None
    return Reply(_reservation_model(r), status=201, headers=_REPLAYED if r.replayed else None)


def _settled(result: Settled) -> Reply:
    if result.outcome == "expired":
        raise ApiError(
            409, "reservation_expired", "Reservation expired",
            f"Reservation {result.id} expired before it was settled and was charged its"
            f" reserve of {result.reserved} tokens",
            id=result.id, reserved=result.reserved, charged=result.charged,
        )  # fmt: skip
    return Reply(
        SettleResult(
            id=result.id, reserved=result.reserved, charged=result.charged,
            refunded=result.refunded, overage=result.overage, remaining=result.remaining,
            outcome=result.outcome,
        )
    )  # fmt: skip


def _not_found() -> ApiError:
    return ApiError(
        404, "reservation_not_found", "Reservation not found",
        "No reservation with this id for your organization (or it ended longer ago than"
        " the idempotency window)",
    )  # fmt: skip


async def settle_reservation(call: Call) -> Reply:
    """``POST /reservations/{reservation_id}/settle``: charge the actual."""
    rid = call.parsed(ReservationPath).reservation_id
    body = call.parsed(SettleRequest)
    try:
        result = await call.gate.settle(rid, body.actual, org=call.identity.org)
    except ReservationNotFound:
        raise _not_found() from None
    return _settled(result)


async def release_reservation(call: Call) -> Reply:
    """``POST /reservations/{reservation_id}/release``: give the whole reserve back."""
    rid = call.parsed(ReservationPath).reservation_id
    try:
        result = await call.gate.release(rid, org=call.identity.org)
    except ReservationNotFound:
        raise _not_found() from None
    return _settled(result)


async def stats(call: Call) -> Reply:
    """``GET /stats``; ``?group=team|user`` adds ``by_group`` (contract A10)."""
    query = call.parsed(StatsQuery)
    group: Group | None = "team" if query.group == "team" else "user" if query.group else None
    found = await call.gate.stats(call.identity.org, days=query.days, group=group)
    return Reply(Stats.model_validate(found))


async def usage(call: Call) -> Reply:
    """``GET /usage``: the org's audit rows, newest first."""
    query = call.parsed(UsageQuery)
    store = await call.gate.require_store()
    try:
        items, next_cursor = await usage_page(
            store.pool, call.identity.org, query.cursor, query.limit
        )
    except ValueError:
        raise bad_request("cursor is not valid: pass back a next_cursor unchanged") from None
    return Reply(UsagePage.model_validate({"items": items, "next_cursor": next_cursor}))


OPERATIONS: list[Operation] = [
    Operation(
        "GET", "/balance", balance, "getBalance", "Plan, period and every bucket's balance",
        {200: Doc("The balance", Balance)}, (401, 429, 503),
    ),
    Operation(
        "POST", "/check", check, "check",
        "Would a call of this feature be allowed now, and why not",
        {200: Doc("The answer", CheckResult)}, (400, 401, 413, 422, 429, 503),
        body=CheckRequest,
    ),
    Operation(
        "POST", "/deduct", deduct, "deduct",
        "Charge a feature without proxying (same refusals as the proxy)",
        {200: Doc("Charged (or replayed)", DeductResult)},
        (400, 401, 402, 403, 409, 413, 422, 429, 503),
        body=DeductRequest, headers=DeductHeaders,
        description="An Idempotency-Key (header or body) charges at most once; a replay of a"
        " completed key answers 200 with charged 0 and replayed true. A credential bound to"
        " a user may only name that user (else 403 user_mismatch).",
    ),
    Operation(
        "POST", "/reservations", reserve, "reserve",
        "Hold tokens for a call whose cost is known only after it",
        {201: Doc("Reserved (or, for a repeated Idempotency-Key, the same reservation)",
                  ReservationResult)},
        (400, 401, 402, 403, 409, 413, 422, 429, 503),
        body=ReservationRequest, headers=ReservationHeaders,
        description="Holds the estimate (default: the feature's reserve, capped by its max)"
        " until it is settled or released; one left open past ttl_seconds is charged its"
        " reserve. 402 when even the estimate does not fit. An Idempotency-Key returns the"
        " same reservation for a repeat (Idempotent-Replayed: true), 422"
        " idempotency_key_reused for another body, 409 while the first is in flight.",
    ),
    Operation(
        "POST", "/reservations/{reservation_id}/settle", settle_reservation, "settleReservation",
        "Charge a reservation's actual cost",
        {200: Doc("Settled (a repeat answers the same body)", SettleResult)},
        (400, 401, 404, 409, 413, 422, 429, 503),
        path_params=ReservationPath, body=SettleRequest,
        description="Less than reserved refunds the rest; more takes the difference from"
        " what is left, and what cannot be covered is recorded as overage (never owed: no"
        " balance goes below zero). 404 reservation_not_found for an id that is not one of"
        " your organization's; 409 reservation_expired when it expired first (it was"
        " charged its reserve).",
    ),
    Operation(
        "POST", "/reservations/{reservation_id}/release", release_reservation,
        "releaseReservation", "Give a reservation's whole reserve back",
        {200: Doc("Released (a repeat answers the same body)", SettleResult)},
        (401, 404, 409, 429, 503), path_params=ReservationPath,
    ),
    Operation(
        "GET", "/stats", stats, "getStats",
        "Usage by feature, user, day and model, the overage, a forecast per bucket, and"
        " with ?group=team|user usage per team or user",
        {200: Doc("The stats", Stats)}, (400, 401, 429, 501, 503), query=StatsQuery,
    ),
    Operation(
        "GET", "/usage", usage, "getUsage", "The org's audit rows, newest first, paginated",
        {200: Doc("A page", UsagePage)}, (400, 401, 429, 501, 503), query=UsageQuery,
    ),
]  # fmt: skip
