"""What the ``creditgate`` commands share (gateway.commands.cli, gateway.commands.cli_levels):
``--config`` and where the config is found, the id parameter type, loading the config or
exiting with its errors, running a coroutine with service outages turned into one-line
errors, a connected gate per command, JSON output, and whether an org exists.

Exit codes (contract A1): errors a user can cause print one clear message and exit 1;
usage errors and unreachable services exit 2; a traceback is a bug.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from gateway.config import (
    Config,
    ConfigError,
    ConfigLocation,
    Mode,
    load_config,
    locate_config,
)
from gateway.core.ids import ID_RULE, valid_id

__all__ = [
    "ID",
    "config_option",
    "echo_json",
    "load",
    "locate",
    "no_config",
    "org_exists",
    "run",
    "with_gate",
]

P = ParamSpec("P")
T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $CREDITGATE_CONFIG or ./creditgate.yaml).",
)


class _Id(click.ParamType):  # type: ignore[type-arg, unused-ignore]  # generic from click 8.2
    """An org or user id (gateway.core.ids): a bad one is a usage error (exit 2)."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not valid_id(value):
            self.fail(f"{value!r} is not an id: it must be {ID_RULE}", param, ctx)
        return str(value)


ID = _Id()


def locate(config_path: Path | None) -> ConfigLocation:
    """The command's --config, else the group's (``creditgate --config F ...``), else
    $CREDITGATE_CONFIG, else ./creditgate.yaml."""
    ctx = click.get_current_context(silent=True)
    given_to_group = ctx.find_root().params.get("config_path") if ctx is not None else None
    return locate_config(config_path or given_to_group)


_WHY = {
    "option": "given with --config",
    "environment": "from $CREDITGATE_CONFIG={value}",
    "default": "the default, ./creditgate.yaml in the current directory:"
    " neither --config nor $CREDITGATE_CONFIG is set",
}


def no_config(location: ConfigLocation, *, argument: bool = False) -> None:
    """Exit 1 saying where the config was looked for, and how to point elsewhere."""
    why = "" if argument else " (" + _WHY[location.origin].format(value=location.path) + ")"
    click.echo(f"error: no config file at {location.path.absolute()}{why}", err=True)
    click.echo(
        "hint: point to your config with --config FILE (before or after the command)"
        " or CREDITGATE_CONFIG=FILE; `creditgate demo` runs without one",
        err=True,
    )
    raise SystemExit(1)


def load(config_path: Path | None, *, mode: Mode | None = None) -> Config:
    """The config the command should use, or exit 1 with every error in it."""
    location = locate(config_path)
    if not location.path.exists():
        no_config(location)
    try:
        return load_config(location.path, mode=mode)
    except ConfigError as exc:
        for err in exc.errors:
            click.echo(err, err=True)
        raise SystemExit(1) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning service outages into one-line errors (exit 2)."""
    from asyncpg import UndefinedTableError

    from gateway.core.errors import (
        DatabaseUnavailable,
        LedgerUnavailable,
        NoDatabase,
        RedisUnavailable,
    )

    try:
        return asyncio.run(coro)
    except (RedisUnavailable, LedgerUnavailable, DatabaseUnavailable, NoDatabase, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except UndefinedTableError as exc:  # a first run that skipped `creditgate migrate`
        click.echo(
            f"error: the database has no creditgate tables yet ({exc}):"
            " run `creditgate migrate` first",
            err=True,
        )
        raise SystemExit(2) from None
    except (ValueError, LookupError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None


def with_gate(
    fn: Callable[..., Awaitable[T]],
) -> Callable[..., T]:
    """Decorate an async command body taking (gate, ...) so it runs with a connected gate."""

    @functools.wraps(fn)
    def wrapper(config_path: Path | None, *args: Any, **kwargs: Any) -> T:
        from gateway.metering.gate import CreditGate

        config = load(config_path)

        async def main() -> T:
            gate = CreditGate(config)
            try:
                return await fn(gate, *args, **kwargs)
            finally:
                await gate.close()

        return run(main())

    return wrapper


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


async def org_exists(gate: Any, org: str) -> bool:
    """Whether ``org`` exists, found without writing: a ledger row, or its state in Redis
    (an org charged through the library that the sync job has not written yet)."""
    from gateway.core.errors import RedisUnavailable

    store = await gate.store()
    if store is not None and await store.get_org(org) is not None:
        return True
    try:
        return bool(await gate.redis.client.exists(gate.keys.org(org)))
    except Exception as exc:  # redis-py raises many types; all mean "unavailable" here
        raise RedisUnavailable(str(exc)) from exc
