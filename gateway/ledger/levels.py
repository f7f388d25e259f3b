"""Teams, users and API keys' teams and caps in Postgres (contract A10; migration 0007).

Every query names the org, and the foreign keys include it: an org never reads or joins
another org's teams. Caps are kept as the admin API spells them (``{bucket: N | "N%"}``);
a patch merges into them, a ``None`` value clearing that bucket's override.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

__all__ = ["KeyLevels", "LevelStore", "OrgLevels", "TeamRow", "UnknownTeam", "UserRow"]

CapsPatch = Mapping[str, int | str | None]
_UNSET: Any = object()


class UnknownTeam(LookupError):
    """A user or key was put in a team its org does not have."""


@dataclass(frozen=True, slots=True)
class TeamRow:
    """A team of an org."""

    org: str
    id: str
    name: str
    caps: dict[str, int | str]
    users: int = 0
    keys: int = 0


@dataclass(frozen=True, slots=True)
class UserRow:
    """A user of an org: its team and cap overrides."""

    org: str
    id: str
    team: str | None
    caps: dict[str, int | str]


@dataclass(frozen=True, slots=True)
class KeyLevels:
    """An API key's org, user, team and cap overrides."""

    id: str
    org: str
    user: str | None
    team: str | None
    caps: dict[str, int | str]


@dataclass(slots=True)
class OrgLevels:
    """Everything of an org's levels, for seeding its Redis mirror."""

    teams: list[TeamRow] = field(default_factory=list)
    users: list[UserRow] = field(default_factory=list)
    keys: list[KeyLevels] = field(default_factory=list)


def _caps(raw: Any) -> dict[str, int | str]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return dict(value or {})


def _merged(current: Any, patch: CapsPatch | None) -> str:
    caps = _caps(current)
    for bucket, value in (patch or {}).items():
        if value is None:
            caps.pop(bucket, None)
        else:
            caps[bucket] = value
    return json.dumps(caps, sort_keys=True)


class LevelStore:
    """Teams, users and keys' levels over an asyncpg pool (the store's)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def put_team(
        self, org: str, team: str, *, name: str | None, caps: CapsPatch | None
    ) -> tuple[TeamRow, bool]:
        """Create or update a team; returns it and whether it was created."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT name, caps FROM org_teams WHERE organization_id = $1 AND team_id = $2"
                " FOR UPDATE",
                org,
                team,
            )
            merged = _merged(None if old is None else old["caps"], caps)
            new_name = name if name is not None else ("" if old is None else old["name"])
            await conn.execute(
                "INSERT INTO org_teams (organization_id, team_id, name, caps)"
                " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (organization_id, team_id)"
                " DO UPDATE SET name = EXCLUDED.name, caps = EXCLUDED.caps, updated_at = now()",
                org,
                team,
                new_name,
                merged,
            )
        return TeamRow(org, team, new_name, _caps(merged)), old is None

    async def delete_team(self, org: str, team: str) -> tuple[list[str], list[str]] | None:
        """Delete a team; returns its former members (users, keys), None if unknown."""
        async with self.pool.acquire() as conn, conn.transaction():
            users = await conn.fetch(
                "SELECT user_id FROM org_users WHERE organization_id = $1 AND team_id = $2",
                org,
                team,
            )
            keys = await conn.fetch(
                "SELECT id FROM api_keys WHERE organization_id = $1 AND team_id = $2", org, team
            )
            done = await conn.execute(
                "DELETE FROM org_teams WHERE organization_id = $1 AND team_id = $2", org, team
            )
        if done.endswith(" 0"):
            return None
        return [r["user_id"] for r in users], [r["id"] for r in keys]

    async def list_teams(self, org: str) -> list[TeamRow]:
        """The org's teams with their member counts, by id."""
        rows = await self.pool.fetch(
            "SELECT t.team_id, t.name, t.caps,"
            " (SELECT count(*) FROM org_users u WHERE u.organization_id = t.organization_id"
            "   AND u.team_id = t.team_id) AS users,"
            " (SELECT count(*) FROM api_keys k WHERE k.organization_id = t.organization_id"
            "   AND k.team_id = t.team_id AND k.revoked_at IS NULL) AS keys"
            " FROM org_teams t WHERE t.organization_id = $1 ORDER BY t.team_id",
            org,
        )
        return [
            TeamRow(org, r["team_id"], r["name"], _caps(r["caps"]), r["users"], r["keys"])
            for r in rows
        ]

    async def put_user(
        self, org: str, user: str, *, team: str | None = _UNSET, caps: CapsPatch | None
    ) -> UserRow:
        """Create or update a user's team (``team`` left out: unchanged; None: no team)
        and cap overrides. Raises UnknownTeam for a team the org does not have."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT team_id, caps FROM org_users WHERE organization_id = $1 AND user_id = $2"
                " FOR UPDATE",
                org,
                user,
            )
            new_team = (None if old is None else old["team_id"]) if team is _UNSET else team
            merged = _merged(None if old is None else old["caps"], caps)
            try:
                await conn.execute(
                    "INSERT INTO org_users (organization_id, user_id, team_id, caps)"
                    " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (organization_id, user_id)"
                    " DO UPDATE SET team_id = EXCLUDED.team_id, caps = EXCLUDED.caps,"
                    " updated_at = now()",
                    org,
                    user,
                    new_team,
                    merged,
                )
            except asyncpg.ForeignKeyViolationError:
                raise UnknownTeam(f"org {org!r} has no team {new_team!r}") from None
        return UserRow(org, user, new_team, _caps(merged))

    async def key_levels(self, key_id: str) -> KeyLevels | None:
        """An API key's levels (revoked keys included), None if unknown."""
        r = await self.pool.fetchrow(
            "SELECT id, organization_id, user_id, team_id, caps FROM api_keys WHERE id = $1",
            key_id,
        )
        return None if r is None else _key(r)

    async def set_key(
        self, key_id: str, *, team: str | None = _UNSET, caps: CapsPatch | None
    ) -> KeyLevels | None:
        """Change an API key's team (left out: unchanged) and cap overrides; None for an
        unknown key. Raises UnknownTeam for a team the key's org does not have."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT team_id, caps FROM api_keys WHERE id = $1 FOR UPDATE", key_id
            )
            if old is None:
                return None
            new_team = old["team_id"] if team is _UNSET else team
            try:
                r = await conn.fetchrow(
                    "UPDATE api_keys SET team_id = $2, caps = $3::jsonb WHERE id = $1"
                    " RETURNING id, organization_id, user_id, team_id, caps",
                    key_id,
                    new_team,
                    _merged(old["caps"], caps),
                )
            except asyncpg.ForeignKeyViolationError:
                raise UnknownTeam(f"the key's org has no team {new_team!r}") from None
        assert r is not None
        return _key(r)

    async def org_levels(self, org: str) -> OrgLevels:
        """Every team, user and non-revoked key of the org with a team or caps."""
        out = OrgLevels()
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            for r in await conn.fetch(
                "SELECT team_id, name, caps FROM org_teams WHERE organization_id = $1", org
            ):
                out.teams.append(TeamRow(org, r["team_id"], r["name"], _caps(r["caps"])))
            for r in await conn.fetch(
                "SELECT user_id, team_id, caps FROM org_users WHERE organization_id = $1", org
            ):
                out.users.append(UserRow(org, r["user_id"], r["team_id"], _caps(r["caps"])))
            for r in await conn.fetch(
                "SELECT id, organization_id, user_id, team_id, caps FROM api_keys"
                " WHERE organization_id = $1 AND revoked_at IS NULL"
                " AND (team_id IS NOT NULL OR caps <> '{}'::jsonb)",
                org,
            ):
                out.keys.append(_key(r))
        return out


def _key(r: asyncpg.Record) -> KeyLevels:
    return KeyLevels(r["id"], r["organization_id"], r["user_id"], r["team_id"], _caps(r["caps"]))
