"""The token API (DESIGN A4), under ``config.api_prefix`` (default ``/api/v1/tokens``).

Authenticated like metered requests (API key, JWT, or whatever the identity config
accepts); the organization ALWAYS comes from the credentials. Nothing in a path, query or
body can name another org: there is no org parameter at all, and the only user a caller
may name is covered by the rule below.

``POST /deduct`` and ``user_id``: a key (or token) bound to a user charges as that user;
naming another user is **403** ``user_mismatch`` (a user cannot spend as, or shift usage
onto, a colleague). An org-level credential (no user) may attribute the charge to any user
id of its own org, which is how a backend that holds one org key reports its users.

A replayed ``Idempotency-Key`` of a completed deduct answers **200** with ``charged: 0``
and ``replayed: true``: unlike the proxy, no upstream work is attached to a deduct, so
telling the client "done" is safe and lets it retry blindly. A key still in flight is
**409**, as on the proxy.

The dashboard page (``GET /dashboard``) is served without credentials and holds no data:
its script asks for the API key, keeps it in ``sessionStorage`` (this tab only, gone when
it closes) and calls the JSON endpoints with an ``Authorization`` header. A key in the URL
(``?key=``) would end up in server logs, browser history and Referer headers, so it is
not accepted.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway.core.balances import Balance
from gateway.core.timefmt import iso_ms
from gateway.http.common import (
    MAX_KEY_LENGTH,
    ApiError,
    Fields,
    bad_request,
    guarded,
    json_object,
    query_int,
)
from gateway.identity.identifier import Identity, IdentityFailure
from gateway.ledger.usage import usage_page
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Admission
from gateway.metering.refusals import describe_refusal, seconds

MAX_QUANTITY = 1000


def balance_json(bal: Balance) -> dict[str, Any]:
    """``GET /balance`` (and the admin's org view): plan, period, buckets, features."""
    return {
        "org": bal.org,
        "plan": bal.plan,
        "period": bal.period,
        "period_start": iso_ms(bal.period_start_ms),
        "period_end": iso_ms(bal.period_end_ms),
        "refresh_at": iso_ms(bal.period_end_ms),
        "buckets": {
            name: {
                "allocated": b.allocated,
                "balance": b.balance,
                "extra": b.extra,
                "used": b.used,
                "available": b.available,
                "in_plan": b.in_plan,
            }
            for name, b in bal.buckets.items()
        },
        "features": bal.features,
    }


def refusal(adm: Admission) -> ApiError:
    """A refused admission as the proxy answers it (same status, code, title, facts)."""
    r = describe_refusal(adm)
    return ApiError(r.status, r.code, r.title, r.detail, headers=dict(r.headers), **r.facts)


async def authenticate(gate: CreditGate, request: Request) -> Identity:
    """The caller's identity, or an ApiError (401, 429); outages propagate (503)."""
    ident = await gate.identifier.identify(request.scope)
    if isinstance(ident, IdentityFailure):
        headers = {"WWW-Authenticate": 'Bearer realm="creditgate"'}
        if ident.status == 429:
            raise ApiError(
                429, "rate_limited", "Too many bad credentials", ident.detail,
                headers=headers, retry_after=ident.retry_after,
            )  # fmt: skip
        raise ApiError(
            ident.status, "unauthenticated", "Unauthenticated", ident.detail, headers=headers
        )
    return ident


def _unknown_feature(gate: CreditGate, feature: str) -> ApiError:
    return ApiError(
        422, "unknown_feature", "Unknown feature",
        f"No feature named {feature!r} (known: {', '.join(gate.config.features)})",
        feature=feature,
    )  # fmt: skip


def api_routes(gate: CreditGate) -> list[BaseRoute]:
    """The token API mounted at ``config.api_prefix`` (dashboard and OpenAPI included)."""
    from gateway.http.dashboard import dashboard_routes
    from gateway.http.openapi import openapi_document

    guard = guarded(gate.config.retry_after_unavailable_seconds)
    prefix = gate.config.api_prefix.rstrip("/")

    @guard
    async def balance(request: Request) -> Response:
        ident = await authenticate(gate, request)
        return JSONResponse(balance_json(await gate.balance(ident.org)))

    @guard
    async def check(request: Request) -> Response:
        ident = await authenticate(gate, request)
        f = Fields(await json_object(request))
        feature = f.string("feature", required=True)
        quantity = f.integer("quantity", default=1, maximum=MAX_QUANTITY)
        f.done()
        assert feature is not None and quantity is not None
        if feature not in gate.config.features:
            raise _unknown_feature(gate, feature)
        res = await gate.check(ident.org, feature, quantity=quantity)
        return JSONResponse({
            "allowed": res.allowed, "code": res.code, "feature": res.feature,
            "bucket": res.bucket, "cost": res.cost, "balance": res.balance,
            "refresh_at": iso_ms(res.refresh_at_ms),
        })  # fmt: skip

    @guard
    async def deduct(request: Request) -> Response:
        ident = await authenticate(gate, request)
        f = Fields(await json_object(request))
        feature = f.string("feature", required=True)
        quantity = f.integer("quantity", default=1, maximum=MAX_QUANTITY)
        idem = f.string("idempotency_key")
        user_id = f.string("user_id", ident=True)
        header = request.headers.get("idempotency-key")
        if header is not None:
            if not 0 < len(header) <= MAX_KEY_LENGTH:
                f.errors.append({
                    "field": "Idempotency-Key", "message": f"must be 1-{MAX_KEY_LENGTH} characters",
                })  # fmt: skip
            elif idem is not None and idem != header:
                f.errors.append({
                    "field": "idempotency_key",
                    "message": "differs from the Idempotency-Key header",
                })  # fmt: skip
            else:
                idem = header
        f.done()
        assert feature is not None and quantity is not None
        if feature not in gate.config.features:
            raise _unknown_feature(gate, feature)
        user = ident.user
        if user is not None and user_id is not None and user_id != user:
            raise ApiError(
                403, "user_mismatch", "User mismatch",
                "This credential belongs to a user and can only charge as that user",
            )  # fmt: skip
        if user is None:
            user = user_id
        adm = await gate.charge(
            ident.org, feature, user=user, quantity=quantity, idempotency_key=idem
        )
        if adm.status == "replay":
            left = (await gate.balance(ident.org)).buckets[adm.bucket].available
            return JSONResponse({
                "charged": 0, "replayed": True, "remaining": left, "feature": feature,
                "bucket": adm.bucket, "request_id": None,
            })  # fmt: skip
        if not adm.ok:
            raise refusal(adm)
        headers = {"X-Tokens-Cost": str(adm.cost), "X-Tokens-Remaining": str(adm.remaining)}
        if adm.limit is not None:
            headers.update({
                "RateLimit-Limit": str(adm.limit),
                "RateLimit-Remaining": str(adm.limit_remaining),
                "RateLimit-Reset": str(seconds(adm.limit_reset_ms)),
            })  # fmt: skip
        return JSONResponse(
            {
                "charged": adm.cost, "replayed": False, "remaining": adm.remaining,
                "feature": feature, "bucket": adm.bucket, "request_id": adm.request_id,
            },
            headers=headers,
        )  # fmt: skip

    @guard
    async def stats(request: Request) -> Response:
        ident = await authenticate(gate, request)
        days = query_int(request, "days", 30, 1, 366)
        return JSONResponse(await gate.stats(ident.org, days=days))

    @guard
    async def usage(request: Request) -> Response:
        ident = await authenticate(gate, request)
        limit = query_int(request, "limit", 50, 1, 500)
        cursor = request.query_params.get("cursor") or None
        store = await gate.require_store()
        try:
            items, next_cursor = await usage_page(store.pool, ident.org, cursor, limit)
        except ValueError:
            raise bad_request("cursor is not valid: pass back a next_cursor unchanged") from None
        return JSONResponse({"items": items, "next_cursor": next_cursor})

    document: dict[str, Any] | None = None

    async def openapi(request: Request) -> Response:
        nonlocal document
        if document is None:
            document = openapi_document(gate.config)
        return JSONResponse(document)

    routes: list[BaseRoute] = [
        Route("/balance", balance, methods=["GET"]),
        Route("/check", check, methods=["POST"]),
        Route("/deduct", deduct, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/usage", usage, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *dashboard_routes("org", base=prefix),
    ]
    return [Mount(prefix, routes=routes)]
