"""The admin API (contract A4), under ``/admin``: plans, grants, keys, usage over all orgs.

Authorization is ``Authorization: Bearer <admin_token>`` (gateway.http.admin_auth): a
wrong or missing token is **401**, and an address that keeps sending wrong tokens is
throttled (**429**) like bad API keys. With no ``admin_token`` in the config the admin API
does not exist: every ``/admin`` path answers **404**, so an unconfigured deployment
exposes nothing.

Orgs are created explicitly (``PUT /admin/orgs/{org}``: **201** ``created: true`` exactly
when the org was not created before, whatever the sync job wrote meanwhile); grants and
keys for an org the ledger does not know are **404**, so a typo cannot create an org. Plan
changes and grants go through the gate (Lua scripts), so each leaves its ledger row
(``plan_change``, ``grant``) once the sync job has moved the event to Postgres.

Handlers are module-level functions of a :class:`~gateway.http.endpoint.Call`;
:data:`OPERATIONS` is their route table and their part of the OpenAPI document.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.core.timefmt import iso, utc_date
from gateway.http.admin_levels import LEVEL_OPERATIONS, key_levels_changed, valid_caps
from gateway.http.endpoint import Call, Doc, Operation, Reply
from gateway.http.errors import ApiError, bad_request, invalid, unknown_org
from gateway.http.models.admin import (
    MAX_WINDOW_DAYS,
    ApiKey,
    Grant,
    GrantRequest,
    KeyCreated,
    KeyList,
    KeyPath,
    KeyRequest,
    KeysQuery,
    OrgDetail,
    OrgList,
    OrgPath,
    OrgsQuery,
    PlanRequest,
    PlanResult,
    WindowQuery,
    WindowUsage,
)
from gateway.http.models.fields import storable
from gateway.http.token_api import balance_model, bucket_overage
from gateway.ledger.levels import LevelStore, UnknownTeam
from gateway.ledger.store import ApiKeyRow, GrantConflict
from gateway.ledger.usage import OrgPeriods, orgs_by_id, top_spenders, window_usage
from gateway.metering.gate import CreditGate

__all__ = ["OPERATIONS"]


def _key_fields(row: ApiKeyRow) -> dict[str, str | None]:
    return {
        "id": row.id, "org": row.org, "user": row.user, "name": row.name,
        "prefix": row.prefix, "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }  # fmt: skip


async def _org_exists(gate: CreditGate, org: str) -> bool:
    store = await gate.store()
    if store is not None:
        return await store.get_org(org) is not None
    return bool(await gate.redis.client.exists(gate.keys.org(org)))


def _period_start(gate: CreditGate) -> datetime:
    _, start, _ = gate.meter.period(gate.clock.now_ms())
    return datetime.fromtimestamp(start / 1000, tz=UTC)


async def put_org(call: Call) -> Reply:
    """``PUT /admin/orgs/{org}``: create the org or change its plan."""
    gate, org, body = call.gate, call.parsed(OrgPath).org, call.parsed(PlanRequest)
    if body.plan is None and body.period_anchor is None:
        raise invalid([{"field": "plan", "message": "give plan, period_anchor or both"}])
    if body.period_anchor is not None and not gate.config.calendar.anchored:
        raise invalid([{"field": "period_anchor", "message": _NOT_ANCHORED}])
    if body.plan is not None:
        plan, previous = body.plan, await gate.set_plan(org, body.plan)
    else:
        existed = await _org_exists(gate, org)
        plan = (await gate.balance(org)).plan
        previous = plan if existed else None
    anchor = None
    if body.period_anchor is not None:
        anchor = await gate.set_period_anchor(org, body.period_anchor.day)
    elif gate.config.calendar.anchored:
        anchor = await gate.period_anchor(org) or None
    result = PlanResult(
        org=org, plan=plan, previous_plan=previous, created=previous is None,
        period_anchor=anchor,
    )  # fmt: skip
    return Reply(result, status=201 if previous is None else 200)


_NOT_ANCHORED = "needs period.anchor subscription or created in the config (contract A12)"


async def get_org(call: Call) -> Reply:
    """``GET /admin/orgs/{org}``."""
    gate, org = call.gate, call.parsed(OrgPath).org
    store = await gate.store()
    row = None if store is None else await store.get_org(org)
    if row is None and (store is not None or not await _org_exists(gate, org)):
        raise unknown_org(org)
    keys = [] if store is None else await store.list_api_keys(org)
    bal = await gate.balance(org)
    detail = OrgDetail(
        **balance_model(bal, await bucket_overage(gate, bal)).model_dump(exclude={"levels"}),
        created_at=None if row is None else iso(row.created_at),
        keys=[k.id for k in keys if k.revoked_at is None],
    )
    return Reply(detail)


async def list_orgs(call: Call) -> Reply:
    """``GET /admin/orgs``: top spenders this period, or every org by id; with per-org
    periods (contract A12) each org's usage is over its own current period."""
    gate, query = call.gate, call.parsed(OrgsQuery)
    store = await gate.require_store()
    periods = OrgPeriods.at(gate.config.calendar, gate.clock.now_ms())  # contract A12
    if query.sort == "spend":
        items = await top_spenders(store.pool, periods, query.limit)
    else:
        items = await orgs_by_id(store.pool, query.after or "", query.limit, periods)
    return Reply(OrgList.model_validate({
        "sort": query.sort, "from": periods.start.isoformat(), "to": periods.today.isoformat(),
        "items": items,
    }))  # fmt: skip


async def post_grant(call: Call) -> Reply:
    """``POST /admin/orgs/{org}/grants``: purchased tokens, once per reference."""
    gate, org, body = call.gate, call.parsed(OrgPath).org, call.parsed(GrantRequest)
    if not await _org_exists(gate, org):
        raise unknown_org(org)
    try:
        row, created = await gate.grant(
            org, body.bucket, body.amount, reference=body.reference, expires_at=body.expires_at
        )
    except GrantConflict as exc:
        raise ApiError(409, "grant_conflict", "Grant reference reused", str(exc)) from None
    grant = Grant(
        id=None if row is None else row.id, org=org, bucket=body.bucket, amount=body.amount,
        reference=body.reference,
        expires_at=iso(row.expires_at if row is not None else body.expires_at),
        created_at=None if row is None else iso(row.created_at), created=created,
    )  # fmt: skip
    return Reply(grant, status=201 if created else 200)


async def post_key(call: Call) -> Reply:
    """``POST /admin/keys``: a new key, shown once; ``team`` and ``caps`` (contract A10)
    put it in a team of its org and cap it."""
    gate, body = call.gate, call.parsed(KeyRequest)
    store = await gate.require_store()
    if await store.get_org(body.org) is None:
        raise unknown_org(body.org)
    caps = valid_caps(gate, body.caps)
    levels = LevelStore(store.pool)
    if body.team is not None and not any(
        t.id == body.team for t in await levels.list_teams(body.org)
    ):
        raise ApiError(
            422, "unknown_team", "Unknown team", f"org {body.org!r} has no team {body.team!r}",
            org=body.org,
        )  # fmt: skip
    row, key = await gate.create_key(body.org, user=body.user, name=body.name or "")
    fields: dict[str, object] = {**_key_fields(row), "key": key}
    if body.team is not None or caps:
        try:
            found = await levels.set_key(row.id, team=body.team, caps=caps)
        except UnknownTeam as exc:  # the team was deleted meanwhile
            await gate.revoke_key(row.id)
            raise ApiError(422, "unknown_team", "Unknown team", str(exc), org=body.org) from None
        assert found is not None
        await key_levels_changed(gate, found)
        fields.update(team=found.team, caps=found.caps)
    return Reply(KeyCreated.model_validate(fields), status=201)


async def list_keys(call: Call) -> Reply:
    """``GET /admin/keys?org=``: an org's keys, revoked ones included, with the team and
    cap overrides of the active ones (contract A10)."""
    store = await call.gate.require_store()
    org = call.parsed(KeysQuery).org
    rows = await store.list_api_keys(org)
    levels = {k.id: k for k in (await LevelStore(store.pool).org_levels(org)).keys}
    items = []
    for k in rows:
        fields: dict[str, object] = dict(_key_fields(k))
        if (found := levels.get(k.id)) is not None:
            fields.update(team=found.team, caps=found.caps)
        items.append(ApiKey.model_validate(fields))
    return Reply(KeyList(items=items))


async def delete_key(call: Call) -> Reply:
    """``DELETE /admin/keys/{key_id}``: revoke everywhere within the key cache time."""
    key_id = call.parsed(KeyPath).key_id
    if not storable(key_id) or not await call.gate.revoke_key(key_id):
        raise ApiError(404, "unknown_key", "Unknown key", f"No API key {key_id!r}")
    return Reply(None, status=204)


async def usage(call: Call) -> Reply:
    """``GET /admin/usage``: usage of every org over a window of at most 366 days."""
    gate, query = call.gate, call.parsed(WindowQuery)
    end = query.to or utc_date(gate.clock.now_ms())
    try:
        default_start = (
            end - timedelta(days=query.days - 1)
            if query.days
            else min(_period_start(gate).date(), end)
        )
    except OverflowError:
        raise bad_request("the window starts before year 1") from None
    start = query.from_ or default_start
    if start > end:
        raise bad_request("from must not be after to")
    if (end - start) > timedelta(days=MAX_WINDOW_DAYS - 1):
        raise bad_request(f"the window may span at most {MAX_WINDOW_DAYS} days")
    store = await gate.require_store()
    return Reply(
        WindowUsage.model_validate(await window_usage(store.pool, start, end, query.limit))
    )


_COMMON = (401, 429, 503)

OPERATIONS: list[Operation] = [
    Operation(
        "GET", "/admin/orgs", list_orgs, "listOrgs",
        "Organizations: top spenders this period (sort=spend) or by id",
        {200: Doc("The orgs", OrgList)}, (*_COMMON, 400, 501),
        security="admin", tag="admin", query=OrgsQuery,
    ),
    Operation(
        "PUT", "/admin/orgs/{org}", put_org, "putOrg", "Create an org or change its plan (at once)",
        {200: Doc("Plan changed", PlanResult), 201: Doc("Org created", PlanResult)},
        (*_COMMON, 400, 413, 422), security="admin", tag="admin",
        path_params=OrgPath, body=PlanRequest,
    ),
    Operation(
        "GET", "/admin/orgs/{org}", get_org, "getOrg", "An org's plan, balances and active key ids",
        {200: Doc("The org", OrgDetail)}, (*_COMMON, 404, 422),
        security="admin", tag="admin", path_params=OrgPath,
    ),
    Operation(
        "POST", "/admin/orgs/{org}/grants", post_grant, "grant",
        "Add purchased tokens (idempotent by reference)",
        {200: Doc("Already granted (same reference)", Grant), 201: Doc("Granted", Grant)},
        (*_COMMON, 400, 404, 409, 413, 422), security="admin", tag="admin",
        path_params=OrgPath, body=GrantRequest,
    ),
    Operation(
        "POST", "/admin/keys", post_key, "createKey", "Create an API key (shown once)",
        {201: Doc("The key", KeyCreated)}, (*_COMMON, 400, 404, 413, 422, 501),
        security="admin", tag="admin", body=KeyRequest,
    ),
    Operation(
        "GET", "/admin/keys", list_keys, "listKeys", "An org's API keys (revoked ones included)",
        {200: Doc("The keys", KeyList)}, (*_COMMON, 400, 501),
        security="admin", tag="admin", query=KeysQuery,
    ),
    Operation(
        "DELETE", "/admin/keys/{key_id}", delete_key, "revokeKey", "Revoke an API key",
        {204: Doc("Revoked")}, (*_COMMON, 404, 501),
        security="admin", tag="admin", path_params=KeyPath,
    ),
    Operation(
        "GET", "/admin/usage", usage, "windowUsage",
        "Usage by feature, day, org, user and model over a window (at most 366 days, else 400)",
        {200: Doc("The usage", WindowUsage)}, (*_COMMON, 400, 501),
        security="admin", tag="admin", query=WindowQuery,
    ),
    *LEVEL_OPERATIONS,
]  # fmt: skip
