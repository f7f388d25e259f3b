"""Teams, users and API keys inside an org (contract A10): their Redis mirror and views.

Postgres is the source of truth (gateway.ledger.levels); charge.lua reads a mirror in the
org's hash (field names: gateway.core.caps), so an admin change applies to the very next
request on every gateway process without a cache to expire and without another round
trip. The admin API commits to Postgres first, then writes the mirror with
lua/levels.lua; an org without state in Redis gets it seeded from the ledger, levels
included (lua/seed.lua), which brings the change along.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.core.caps import (
    LEVELS,
    Level,
    cap_field,
    cap_tokens,
    counters_period_field,
    membership_field,
    parse_cap,
    used_field,
    used_of,
)
from gateway.core.redis_keys import KeySpace
from gateway.ledger.levels import KeyLevels, OrgLevels, TeamRow, UserRow
from gateway.redisio.connect import RedisHandles
from gateway.redisio.lua_scripts import load

__all__ = ["LevelCap", "LevelView", "Levels", "Mirror", "level_fields", "stored_caps"]


@dataclass(slots=True)
class Mirror:
    """Fields of the org hash to set and to delete for one admin change."""

    set: dict[str, str] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LevelCap:
    """One level's cap of one bucket this period."""

    cap: int
    used: int

    @property
    def remaining(self) -> int:
        """What the level may still draw (the org's balance still decides)."""
        return max(0, self.cap - self.used)


@dataclass(frozen=True, slots=True)
class LevelView:
    """A caller's level (team, user or key) and its caps per bucket (capped buckets only)."""

    level: Level
    id: str
    buckets: dict[str, LevelCap]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Levels:
    """Writes the levels' mirror and reads a caller's levels (see the module docstring).

    ``seed(org)`` must create the org's Redis state from the ledger (the gate's seeder).
    """

    def __init__(
        self,
        config: Config,
        redis: RedisHandles,
        keys: KeySpace,
        *,
        seed: Callable[[str], Awaitable[None]],
    ) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self._seed = seed
        self.script = load("levels")

    # -- the mirror ----------------------------------------------------------------------

    def entity(
        self,
        level: Level,
        ident: str,
        caps: Mapping[str, str],
        *,
        team: str | None = None,
        into: Mirror | None = None,
    ) -> Mirror:
        """The mirror of one team, user or key: its team (users and keys) and its cap
        overrides (stored forms, by bucket); buckets without one lose theirs."""
        out = into if into is not None else Mirror()
        if level != "team":
            member = membership_field(level, ident)
            if team:
                out.set[member] = team
            else:
                out.delete.append(member)
        for bucket in self.config.buckets:
            name = cap_field(bucket, level, ident)
            if bucket in caps:
                out.set[name] = caps[bucket]
            else:
                out.delete.append(name)
        return out

    def removed_team(
        self, team: str, users: Iterable[str], keys: Iterable[str], into: Mirror | None = None
    ) -> Mirror:
        """The mirror of a deleted team: its overrides and counters go, and its members
        (users and keys) belong to no team any more."""
        out = into if into is not None else Mirror()
        for bucket in self.config.buckets:
            out.delete += [cap_field(bucket, "team", team), used_field(bucket, "team", team)]
        out.delete += [membership_field("user", u) for u in users]
        out.delete += [membership_field("key", k) for k in keys]
        return out

    async def write(self, org: str, mirror: Mirror) -> None:
        """Apply ``mirror`` to the org's hash (after the Postgres commit)."""
        args: list[str | int] = [len(mirror.set)]
        for name, value in mirror.set.items():
            args += [name, value]
        args += mirror.delete
        keys = [self.keys.org(org)]
        reply = _text(await self.redis.runner.run(self.script, keys, args))
        if reply == "missing":
            # Seeded from the ledger, which has the change; run again in case another
            # process seeded from what it read before the commit.
            await self._seed(org)
            await self.redis.runner.run(self.script, keys, args)

    # -- after a committed change (the admin API and the CLI) --------------------------------

    async def team_written(self, row: TeamRow) -> None:
        """Mirror a team's cap overrides as committed."""
        caps = stored_caps(self.config, row.caps)
        await self.write(row.org, self.entity("team", row.id, caps))

    async def user_written(self, row: UserRow) -> None:
        """Mirror a user's team and cap overrides as committed."""
        caps = stored_caps(self.config, row.caps)
        await self.write(row.org, self.entity("user", row.id, caps, team=row.team))

    async def key_written(self, row: KeyLevels) -> None:
        """Mirror an API key's team and cap overrides as committed."""
        caps = stored_caps(self.config, row.caps)
        await self.write(row.org, self.entity("key", row.id, caps, team=row.team))

    async def team_deleted(
        self, org: str, team: str, users: Iterable[str], keys: Iterable[str]
    ) -> None:
        """Mirror a deleted team: its overrides and counters go, its members are teamless."""
        await self.write(org, self.removed_team(team, users, keys))

    # -- a caller's levels ------------------------------------------------------------------

    async def caller(
        self,
        org: str,
        plan: str,
        period: str,
        *,
        user: str | None,
        key_id: str | None,
        team: str | None,
    ) -> list[LevelView]:
        """The caller's team, user and key with their caps this period (as charge.lua
        sees them: the key's own team first, then ``team``, then the user's)."""
        client, org_key = self.redis.client, self.keys.org(org)
        members = [membership_field("key", key_id or ""), membership_field("user", user or "")]
        key_team, user_team = (_text(v) for v in await client.hmget(org_key, members))
        resolved = (key_team if key_id else None) or team or (user_team if user else None)
        ids: dict[Level, str | None] = {"team": resolved, "user": user, "key": key_id}
        present = [(lv, i) for lv in LEVELS if (i := ids[lv])]
        buckets_counted = [counters_period_field(b) for b in self.config.buckets]
        names: list[str] = list(buckets_counted) if present else []
        for lv, ident in present:
            for bucket in self.config.buckets:
                names += [cap_field(bucket, lv, ident), used_field(bucket, lv, ident)]
        values = [_text(v) for v in await client.hmget(org_key, names)] if names else []
        counted = dict(zip(self.config.buckets, values, strict=False))
        views, at = [], len(buckets_counted) if present else 0
        for lv, ident in present:
            buckets: dict[str, LevelCap] = {}
            for bucket in self.config.buckets:
                override, used = values[at], values[at + 1]
                at += 2
                cap = self._cap(plan, bucket, lv, override)
                if cap is not None:
                    buckets[bucket] = LevelCap(cap, used_of(used, period, counted[bucket]))
            views.append(LevelView(lv, ident, buckets))
        return views

    def _cap(self, plan: str, bucket: str, level: Level, override: str | None) -> int | None:
        alloc = self.config.allocation(plan, bucket)
        if alloc is None:
            return None
        if override is not None:
            return cap_tokens(override, alloc)
        defaults = self.config.default_caps(plan, bucket)
        if defaults is None:
            return None
        cap = defaults[LEVELS.index(level)]
        return None if cap < 0 else cap


def stored_caps(config: Config, caps: Mapping[str, int | str]) -> dict[str, str]:
    """Cap overrides as the admin API keeps them, in stored form (buckets the config no
    longer has are left out)."""
    return {b: parse_cap(v) for b, v in caps.items() if b in config.buckets}


def level_fields(levels: Levels, found: OrgLevels) -> dict[str, str]:
    """The org hash fields of everything the ledger knows of an org's levels (seeding)."""
    mirror, config = Mirror(), levels.config
    for t in found.teams:
        levels.entity("team", t.id, stored_caps(config, t.caps), into=mirror)
    for u in found.users:
        levels.entity("user", u.id, stored_caps(config, u.caps), team=u.team, into=mirror)
    for k in found.keys:
        levels.entity("key", k.id, stored_caps(config, k.caps), team=k.team, into=mirror)
    return mirror.set
