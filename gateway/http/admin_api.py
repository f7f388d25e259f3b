"""The admin API (DESIGN A4), under ``/admin``: plans, grants, keys, usage over all orgs.

Authorization is ``Authorization: Bearer <admin_token>``, compared in constant time
(``hmac.compare_digest``); a wrong or missing token is **401**, and an address that keeps
sending wrong tokens is throttled (**429**) like bad API keys. With no ``admin_token`` in
the config the admin API does not exist: every ``/admin`` path answers **404**, so an
unconfigured deployment exposes nothing.

Orgs are created explicitly (``PUT /admin/orgs/{org}``); grants and keys for an org the
ledger does not know are **404**, so a typo cannot create an org. Plan changes and grants
go through the gate (Lua scripts), so each leaves its ledger row (``plan_change``,
``grant``) once the sync job has moved the event to Postgres.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.core.timefmt import iso, utc_date
from gateway.http.common import (
    ApiError,
    Fields,
    bad_request,
    guarded,
    invalid,
    json_object,
    query_date,
    query_int,
    storable,
)
from gateway.http.token_api import balance_json
from gateway.identity.bad_credentials import BadCredentialLimiter, client_address
from gateway.identity.principal import valid_id
from gateway.ledger.store import ApiKeyRow, GrantConflict
from gateway.ledger.usage import orgs_by_id, top_spenders, window_usage
from gateway.metering.gate import CreditGate

MAX_WINDOW_DAYS = 366


def _key_json(row: ApiKeyRow) -> dict[str, Any]:
    return {
        "id": row.id, "org": row.org, "user": row.user, "name": row.name,
        "prefix": row.prefix, "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }  # fmt: skip


def _org_param(request: Request) -> str:
    org: str = request.path_params["org"]
    if not valid_id(org):
        raise invalid([
            {"field": "org", "message": "must be 1-200 printable ASCII characters without spaces"}
        ])  # fmt: skip
    return org


def admin_routes(gate: CreditGate) -> list[BaseRoute]:
    """The /admin routes; none when no admin_token is configured (everything is 404)."""
    from gateway.http.dashboard import dashboard_routes

    token = gate.config.admin_token
    if not token:
        return []
    expected = token.encode()
    limiter = BadCredentialLimiter(gate.config.identity.bad_credentials_per_minute)
    guard = guarded(gate.config.retry_after_unavailable_seconds)

    def authorize(request: Request) -> None:
        challenge = {"WWW-Authenticate": 'Bearer realm="creditgate-admin"'}
        address = client_address(request.scope)
        retry = limiter.retry_after(address)
        if retry is not None:
            raise ApiError(
                429, "rate_limited", "Too many bad credentials",
                "too many bad admin tokens from this address", retry_after=retry,
            )  # fmt: skip
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            limiter.record(address)
            raise ApiError(
                401, "unauthenticated", "Unauthenticated",
                "send Authorization: Bearer <admin_token>", headers=challenge,
            )  # fmt: skip

    async def org_exists(org: str) -> bool:
        store = await gate.store()
        if store is not None:
            return await store.get_org(org) is not None
        return bool(await gate.redis.client.exists(gate.keys.org(org)))

    def unknown_org(org: str) -> ApiError:
        return ApiError(
            404, "unknown_org", "Unknown organization",
            f"No organization {org!r}: create it with PUT /admin/orgs/{{org}}", org=org,
        )  # fmt: skip

    def period_start() -> datetime:
        _, start, _ = gate.meter.period(gate.clock.now_ms())
        return datetime.fromtimestamp(start / 1000, tz=UTC)

    @guard
    async def put_org(request: Request) -> Response:
        authorize(request)
        org = _org_param(request)
        f = Fields(await json_object(request))
        plan = f.string("plan", required=True)
        f.done()
        if plan not in gate.config.plans:
            raise invalid([{
                "field": "plan", "message": f"unknown plan (known: {', '.join(gate.config.plans)})",
            }])  # fmt: skip
        previous = await gate.set_plan(org, plan)
        body = {"org": org, "plan": plan, "previous_plan": previous, "created": previous is None}
        return JSONResponse(body, status_code=201 if previous is None else 200)

    @guard
    async def get_org(request: Request) -> Response:
        authorize(request)
        org = _org_param(request)
        store = await gate.store()
        row = None if store is None else await store.get_org(org)
        if row is None and (store is not None or not await org_exists(org)):
            raise unknown_org(org)
        keys = [] if store is None else await store.list_api_keys(org)
        body = balance_json(await gate.balance(org))
        body["created_at"] = None if row is None else iso(row.created_at)
        body["keys"] = [k.id for k in keys if k.revoked_at is None]
        return JSONResponse(body)

    @guard
    async def list_orgs(request: Request) -> Response:
        authorize(request)
        sort = request.query_params.get("sort") or "spend"
        if sort not in ("spend", "id"):
            raise bad_request("sort must be spend or id")
        limit = query_int(request, "limit", 50, 1, 1000)
        after = request.query_params.get("after") or ""
        if not storable(after):
            raise bad_request("after must be UTF-8 text without NUL characters")
        store = await gate.require_store()
        start, today = period_start().date(), utc_date(gate.clock.now_ms())
        if sort == "spend":
            items = await top_spenders(store.pool, start, today, limit)
        else:
            items = await orgs_by_id(store.pool, after, limit, start, today)
        return JSONResponse({
            "sort": sort, "from": start.isoformat(), "to": today.isoformat(), "items": items,
        })  # fmt: skip

    @guard
    async def post_grant(request: Request) -> Response:
        authorize(request)
        org = _org_param(request)
        f = Fields(await json_object(request))
        bucket = f.string("bucket", required=True)
        amount = f.integer("amount")
        reference = f.string("reference", required=True)
        expires_at = f.timestamp("expires_at")
        if bucket is not None and bucket not in gate.config.buckets:
            known = ", ".join(gate.config.buckets)
            f.errors.append({"field": "bucket", "message": f"unknown bucket (known: {known})"})
        now = datetime.fromtimestamp(gate.clock.now_ms() / 1000, tz=UTC)
        if expires_at is not None and expires_at <= now:
            f.errors.append({"field": "expires_at", "message": "must be in the future"})
        f.done()
        assert bucket is not None and amount is not None and reference is not None
        if not await org_exists(org):
            raise unknown_org(org)
        try:
            row, created = await gate.grant(
                org, bucket, amount, reference=reference, expires_at=expires_at
            )
        except GrantConflict as exc:
            raise ApiError(409, "grant_conflict", "Grant reference reused", str(exc)) from None
        body = {
            "id": None if row is None else row.id, "org": org, "bucket": bucket,
            "amount": amount, "reference": reference,
            "expires_at": iso(row.expires_at if row is not None else expires_at),
            "created_at": None if row is None else iso(row.created_at), "created": created,
        }  # fmt: skip
        return JSONResponse(body, status_code=201 if created else 200)

    @guard
    async def post_key(request: Request) -> Response:
        authorize(request)
        f = Fields(await json_object(request))
        org = f.string("org", required=True, ident=True)
        user = f.string("user", ident=True)
        name = f.string("name", max_length=200)
        f.done()
        assert org is not None
        store = await gate.require_store()
        if await store.get_org(org) is None:
            raise unknown_org(org)
        row, key = await gate.create_key(org, user=user, name=name or "")
        return JSONResponse({**_key_json(row), "key": key}, status_code=201)

    @guard
    async def list_keys(request: Request) -> Response:
        authorize(request)
        org = request.query_params.get("org")
        if not org or not valid_id(org):
            raise bad_request("org is required (an org id)")
        store = await gate.require_store()
        return JSONResponse({"items": [_key_json(k) for k in await store.list_api_keys(org)]})

    @guard
    async def delete_key(request: Request) -> Response:
        authorize(request)
        key_id: str = request.path_params["key_id"]
        if not storable(key_id) or not await gate.revoke_key(key_id):
            raise ApiError(404, "unknown_key", "Unknown key", f"No API key {key_id!r}")
        return Response(status_code=204)

    @guard
    async def usage(request: Request) -> Response:
        authorize(request)
        today = utc_date(gate.clock.now_ms())
        end = query_date(request, "to", today)
        days = query_int(request, "days", 0, 1, MAX_WINDOW_DAYS) or None
        try:
            default_start = (
                end - timedelta(days=days - 1) if days else min(period_start().date(), end)
            )
        except OverflowError:
            raise bad_request("the window starts before year 1") from None
        start = query_date(request, "from", default_start)
        if start > end:
            raise bad_request("from must not be after to")
        if (end - start) > timedelta(days=MAX_WINDOW_DAYS - 1):
            raise bad_request(f"the window may span at most {MAX_WINDOW_DAYS} days")
        limit = query_int(request, "limit", 20, 1, 1000)
        store = await gate.require_store()
        return JSONResponse(await window_usage(store.pool, start, end, limit))

    return [
        Route("/admin/orgs", list_orgs, methods=["GET"]),
        Route("/admin/orgs/{org}", put_org, methods=["PUT"]),
        Route("/admin/orgs/{org}", get_org, methods=["GET"]),
        Route("/admin/orgs/{org}/grants", post_grant, methods=["POST"]),
        Route("/admin/keys", post_key, methods=["POST"]),
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/{key_id}", delete_key, methods=["DELETE"]),
        Route("/admin/usage", usage, methods=["GET"]),
        *dashboard_routes("admin"),
    ]
