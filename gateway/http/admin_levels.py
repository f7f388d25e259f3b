"""The admin API of teams, users and keys' caps inside an org (contract A10).

``PUT``/``DELETE /admin/orgs/{org}/teams/{team}``, ``GET /admin/orgs/{org}/teams``,
``PUT /admin/orgs/{org}/users/{user}`` and ``PATCH /admin/keys/{key_id}`` (``POST
/admin/keys`` takes ``team`` and ``caps`` too: gateway.http.admin_api). Each change is
committed to Postgres first (gateway.ledger.levels), then mirrored into the org's Redis
hash (gateway.metering.levels), so the next request on every gateway process is charged
by it. Every route names its org, and the ledger's foreign keys include the org: a user
or key can only join a team of its own org (else 422 ``unknown_team``), and a listing
shows only the org's own teams.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.core.caps import parse_cap, shown_cap
from gateway.http.endpoint import Call, Doc, Operation, Reply
from gateway.http.errors import ApiError, invalid, unknown_org
from gateway.http.models.admin import (
    KeyLevels,
    KeyPatch,
    KeyPath,
    OrgPath,
    TeamInfo,
    TeamList,
    TeamPath,
    TeamPut,
    TeamRequest,
    UserInfo,
    UserPath,
    UserRequest,
)
from gateway.http.models.fields import storable
from gateway.ledger.levels import KeyLevels as KeyRow
from gateway.ledger.levels import LevelStore, UnknownTeam
from gateway.metering.gate import CreditGate

__all__ = ["LEVEL_OPERATIONS", "key_levels_changed", "valid_caps"]


def valid_caps(
    gate: CreditGate, caps: Mapping[str, object] | None
) -> dict[str, int | str | None] | None:
    """``caps`` checked (known buckets, ``N`` or ``"N%"``) and spelled canonically;
    422 naming every bad entry."""
    if caps is None:
        return None
    out: dict[str, int | str | None] = {}
    errors = []
    for bucket, value in caps.items():
        if bucket not in gate.config.buckets:
            known = ", ".join(gate.config.buckets)
            errors.append(
                {"field": f"caps.{bucket}", "message": f"unknown bucket (known: {known})"}
            )
            continue
        if value is None:
            out[bucket] = None
            continue
        try:
            out[bucket] = shown_cap(parse_cap(value))
        except ValueError as exc:
            errors.append({"field": f"caps.{bucket}", "message": str(exc)})
    if errors:
        raise invalid(errors)
    return out


def _unknown_team(org: str, exc: UnknownTeam) -> ApiError:
    return ApiError(422, "unknown_team", "Unknown team", str(exc), org=org)


async def _levels(call: Call, org: str) -> LevelStore:
    """The level store, after checking that the ledger knows ``org`` (else 404)."""
    store = await call.gate.require_store()
    if await store.get_org(org) is None:
        raise unknown_org(org)
    return LevelStore(store.pool)


async def key_levels_changed(gate: CreditGate, row: KeyRow) -> None:
    """Mirror an API key's team and caps into its org's Redis hash."""
    await gate.levels.key_written(row)


async def put_team(call: Call) -> Reply:
    """``PUT /admin/orgs/{org}/teams/{team}``: create or update a team."""
    path, body = call.parsed(TeamPath), call.parsed(TeamRequest)
    levels = await _levels(call, path.org)
    caps = valid_caps(call.gate, body.caps)
    row, created = await levels.put_team(path.org, path.team, name=body.name, caps=caps)
    await call.gate.levels.team_written(row)
    teams = {t.id: t for t in await levels.list_teams(path.org)}
    counted = teams.get(path.team, row)
    answer = TeamPut(
        org=path.org, team=path.team, name=row.name, caps=row.caps,
        users=counted.users, keys=counted.keys, created=created,
    )  # fmt: skip
    return Reply(answer, status=201 if created else 200)


async def delete_team(call: Call) -> Reply:
    """``DELETE /admin/orgs/{org}/teams/{team}``: its users and keys are left teamless."""
    path = call.parsed(TeamPath)
    levels = await _levels(call, path.org)
    members = await levels.delete_team(path.org, path.team)
    if members is None:
        raise ApiError(
            404, "unknown_team", "Unknown team", f"Org {path.org!r} has no team {path.team!r}"
        )
    users, keys = members
    await call.gate.levels.team_deleted(path.org, path.team, users, keys)
    return Reply(None, status=204)


async def list_teams(call: Call) -> Reply:
    """``GET /admin/orgs/{org}/teams``: the org's teams (never another org's)."""
    org = call.parsed(OrgPath).org
    levels = await _levels(call, org)
    items = [
        TeamInfo(org=org, team=t.id, name=t.name, caps=t.caps, users=t.users, keys=t.keys)
        for t in await levels.list_teams(org)
    ]
    return Reply(TeamList(items=items))


async def put_user(call: Call) -> Reply:
    """``PUT /admin/orgs/{org}/users/{user}``: a user's team and cap overrides."""
    path, body = call.parsed(UserPath), call.parsed(UserRequest)
    levels = await _levels(call, path.org)
    caps = valid_caps(call.gate, body.caps)
    try:
        if "team" in body.model_fields_set:
            row = await levels.put_user(path.org, path.user, team=body.team, caps=caps)
        else:
            row = await levels.put_user(path.org, path.user, caps=caps)
    except UnknownTeam as exc:
        raise _unknown_team(path.org, exc) from None
    await call.gate.levels.user_written(row)
    return Reply(UserInfo(org=path.org, user=path.user, team=row.team, caps=row.caps))


async def patch_key(call: Call) -> Reply:
    """``PATCH /admin/keys/{key_id}``: move a key to another team, or change its caps."""
    key_id, body = call.parsed(KeyPath).key_id, call.parsed(KeyPatch)
    store = await call.gate.require_store()
    levels = LevelStore(store.pool)
    unknown = ApiError(404, "unknown_key", "Unknown key", f"No API key {key_id!r}")
    if not storable(key_id):
        raise unknown
    caps = valid_caps(call.gate, body.caps)
    try:
        if "team" in body.model_fields_set:
            row = await levels.set_key(key_id, team=body.team, caps=caps)
        else:
            row = await levels.set_key(key_id, caps=caps)
    except UnknownTeam as exc:
        found = await levels.key_levels(key_id)
        raise _unknown_team(found.org if found else "", exc) from None
    if row is None:
        raise unknown
    await key_levels_changed(call.gate, row)
    return Reply(KeyLevels(id=row.id, org=row.org, user=row.user, team=row.team, caps=row.caps))


_COMMON = (401, 429, 503)

LEVEL_OPERATIONS: list[Operation] = [
    Operation(
        "PUT", "/admin/orgs/{org}/teams/{team}", put_team, "putTeam",
        "Create or update a team of an org: its name and cap overrides",
        {200: Doc("Team updated", TeamPut), 201: Doc("Team created", TeamPut)},
        (*_COMMON, 400, 404, 413, 422, 501), security="admin", tag="admin",
        path_params=TeamPath, body=TeamRequest,
    ),
    Operation(
        "DELETE", "/admin/orgs/{org}/teams/{team}", delete_team, "deleteTeam",
        "Delete a team (its users and keys are left without a team)",
        {204: Doc("Deleted")}, (*_COMMON, 404, 422, 501),
        security="admin", tag="admin", path_params=TeamPath,
    ),
    Operation(
        "GET", "/admin/orgs/{org}/teams", list_teams, "listTeams", "An org's teams",
        {200: Doc("The teams", TeamList)}, (*_COMMON, 404, 422, 501),
        security="admin", tag="admin", path_params=OrgPath,
    ),
    Operation(
        "PUT", "/admin/orgs/{org}/users/{user}", put_user, "putUser",
        "A user's team and cap overrides",
        {200: Doc("The user", UserInfo)}, (*_COMMON, 400, 404, 413, 422, 501),
        security="admin", tag="admin", path_params=UserPath, body=UserRequest,
    ),
    Operation(
        "PATCH", "/admin/keys/{key_id}", patch_key, "patchKey",
        "Move an API key to another team of its org, or change its cap overrides",
        {200: Doc("The key", KeyLevels)}, (*_COMMON, 400, 404, 413, 422, 501),
        security="admin", tag="admin", path_params=KeyPath, body=KeyPatch,
    ),
]  # fmt: skip
