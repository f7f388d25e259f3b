"""The ``creditgate`` commands of teams, users and keys' teams and caps (contract A10):
``teams list|set|delete``, ``users set``, ``keys set``, and the ``--team``/``--cap``
options of ``keys create``.

They do what the admin API does (gateway.http.admin_levels), in the same order: commit to
Postgres (gateway.ledger.levels), then mirror the committed row into the org's Redis hash
(gateway.metering.levels), so the next request on every gateway process is charged by it.
An unknown org or team, a bad cap or bucket: one line and exit 1.

``--cap BUCKET=N`` (tokens) or ``--cap BUCKET=N%`` (of the allocation) sets an override and
``--clear-cap BUCKET`` removes one (the plan's default applies again); both repeat, and the
rest of the overrides stay as they are.

The ledger (asyncpg) is imported only by the commands that use it, as in gateway.commands.cli,
so ``creditgate --help`` and ``check-config`` stay quick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from gateway.commands.cli_support import ID, config_option, echo_json, with_gate
from gateway.config import Config
from gateway.core.caps import parse_cap, shown_cap

if TYPE_CHECKING:
    from gateway.ledger.levels import KeyLevels, LevelStore

__all__ = ["apply_key_levels", "cap_option", "cap_options", "keys_set", "teams", "users"]

CapsPatch = dict[str, int | str | None]


def cap_option(fn: Any) -> Any:
    """``--cap BUCKET=N|N%``, repeatable: what a new key, team or user can be given."""
    return click.option(
        "--cap", "caps", multiple=True, metavar="BUCKET=N|N%",
        help="Cap BUCKET at N tokens or N% of the allocation per period (repeatable).",
    )(fn)  # fmt: skip


def cap_options(fn: Any) -> Any:
    """``--cap BUCKET=N|N%`` and ``--clear-cap BUCKET``, both repeatable: for the commands
    that change what exists (a new key has no override to clear)."""
    fn = click.option(
        "--clear-cap", "clear_caps", multiple=True, metavar="BUCKET",
        help="Remove BUCKET's cap override (repeatable).",
    )(fn)  # fmt: skip
    return cap_option(fn)


def caps_patch(config: Config, caps: Sequence[str], clear: Sequence[str]) -> CapsPatch | None:
    """The overrides to merge, spelled as the admin API keeps them; ValueError naming the
    first bad one (a ValueError is one line and exit 1)."""
    out: CapsPatch = {}
    for item in caps:
        bucket, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--cap {item!r}: expected BUCKET=N or BUCKET=N%")
        _known_bucket(config, bucket)
        try:
            out[bucket] = shown_cap(parse_cap(value))
        except ValueError as exc:
            raise ValueError(f"--cap {item!r}: {exc}") from None
    for bucket in clear:
        _known_bucket(config, bucket)
        out[bucket] = None
    return out or None


def _known_bucket(config: Config, bucket: str) -> None:
    if bucket not in config.buckets:
        raise ValueError(f"unknown bucket {bucket!r} (known: {', '.join(config.buckets)})")


def _caps_text(caps: dict[str, int | str]) -> str:
    return ",".join(f"{b}={v}" for b, v in sorted(caps.items())) or "-"


async def _levels(gate: Any, org: str) -> LevelStore:
    """The level store, after checking that the ledger knows ``org``."""
    from gateway.ledger.levels import LevelStore

    store = await gate.require_store()
    if await store.get_org(org) is None:
        raise LookupError(
            f"unknown org {org!r}: create it with `creditgate orgs set-plan {org} PLAN`"
        )
    return LevelStore(store.pool)


@click.group()
def teams() -> None:
    """Teams inside an org, with cap overrides (contract A10)."""


@teams.command("list")
@config_option
@click.argument("org", type=ID)
@with_gate
async def teams_list(gate: Any, org: str) -> None:
    """List ORG's teams: id, name, cap overrides, users and active keys."""
    levels = await _levels(gate, org)
    for t in await levels.list_teams(org):
        click.echo(
            f"{t.id}  name={t.name!r}  caps={_caps_text(t.caps)}  users={t.users}  keys={t.keys}"
        )


@teams.command("set")
@config_option
@click.argument("org", type=ID)
@click.argument("team", type=ID)
@click.option("--name", default=None, help="Display name (default: unchanged).")
@cap_options
@with_gate
async def teams_set(
    gate: Any, org: str, team: str, name: str | None, caps: tuple[str, ...],
    clear_caps: tuple[str, ...],
) -> None:  # fmt: skip
    """Create TEAM in ORG, or change its name and cap overrides."""
    patch = caps_patch(gate.config, caps, clear_caps)
    levels = await _levels(gate, org)
    row, created = await levels.put_team(org, team, name=name, caps=patch)
    await gate.levels.team_written(row)
    echo_json({"org": org, "team": team, "name": row.name, "caps": row.caps,
               "created": created})  # fmt: skip


@teams.command("delete")
@config_option
@click.argument("org", type=ID)
@click.argument("team", type=ID)
@with_gate
async def teams_delete(gate: Any, org: str, team: str) -> None:
    """Delete TEAM of ORG; its users and keys are left without a team."""
    levels = await _levels(gate, org)
    members = await levels.delete_team(org, team)
    if members is None:
        raise LookupError(f"org {org!r} has no team {team!r}")
    users, keys = members
    await gate.levels.team_deleted(org, team, users, keys)
    click.echo(f"deleted team {team} of {org} ({len(users)} users, {len(keys)} keys left teamless)")


def _team_choice(team: str | None, no_team: bool) -> dict[str, str | None]:
    """``team=`` for the store: absent (unchanged), a team, or None (``--no-team``)."""
    if team is not None and no_team:
        raise click.UsageError("--team and --no-team exclude each other")
    if no_team:
        return {"team": None}
    return {} if team is None else {"team": team}


@click.group()
def users() -> None:
    """Users inside an org: their team and cap overrides (contract A10)."""


@users.command("set")
@config_option
@click.argument("org", type=ID)
@click.argument("user", type=ID)
@click.option("--team", default=None, type=ID, help="Put the user in this team of ORG.")
@click.option("--no-team", is_flag=True, help="Take the user out of its team.")
@cap_options
@with_gate
async def users_set(
    gate: Any, org: str, user: str, team: str | None, no_team: bool, caps: tuple[str, ...],
    clear_caps: tuple[str, ...],
) -> None:  # fmt: skip
    """Set USER's team (unchanged unless given) and cap overrides in ORG."""
    from gateway.ledger.levels import UnknownTeam

    choice = _team_choice(team, no_team)
    patch = caps_patch(gate.config, caps, clear_caps)
    levels = await _levels(gate, org)
    try:
        row = await levels.put_user(org, user, caps=patch, **choice)
    except UnknownTeam as exc:
        raise LookupError(str(exc)) from None
    await gate.levels.user_written(row)
    echo_json({"org": org, "user": user, "team": row.team, "caps": row.caps})


async def apply_key_levels(
    gate: Any, key_id: str, team: dict[str, str | None], patch: CapsPatch | None
) -> KeyLevels:
    """Commit a key's team and caps, then mirror them; LookupError for an unknown key or
    a team its org does not have."""
    from gateway.ledger.levels import LevelStore, UnknownTeam

    store = await gate.require_store()
    try:
        row = await LevelStore(store.pool).set_key(key_id, caps=patch, **team)
    except UnknownTeam as exc:
        raise LookupError(str(exc)) from None
    if row is None:
        raise LookupError(f"no API key {key_id!r}")
    await gate.levels.key_written(row)
    return row


@click.command("set")
@config_option
@click.argument("key_id")
@click.option("--team", default=None, type=ID, help="Move the key to this team of its org.")
@click.option("--no-team", is_flag=True, help="Take the key out of its team.")
@cap_options
@with_gate
async def keys_set(
    gate: Any, key_id: str, team: str | None, no_team: bool, caps: tuple[str, ...],
    clear_caps: tuple[str, ...],
) -> None:  # fmt: skip
    """Move the key KEY_ID to another team, or change its cap overrides."""
    choice = _team_choice(team, no_team)
    row = await apply_key_levels(gate, key_id, choice, caps_patch(gate.config, caps, clear_caps))
    echo_json({"id": row.id, "org": row.org, "user": row.user, "team": row.team,
               "caps": row.caps})  # fmt: skip
