"""The ``creditgate`` command line (contract A1).

Every command takes ``--config`` (default ``$CREDITGATE_CONFIG`` or ``./creditgate.yaml``),
before the command (``creditgate --config F orgs show acme``) or after it; the command's
wins when both are given. Errors a user can cause (bad or missing config, unknown plans,
keys or orgs) print one clear message and exit 1; usage errors (a malformed id) and
unreachable services exit 2; a traceback is a bug.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from gateway.__about__ import __version__
from gateway.commands.cli_levels import (
    apply_key_levels,
    cap_option,
    caps_patch,
    keys_set,
)
from gateway.commands.cli_levels import teams as teams_group
from gateway.commands.cli_levels import users as users_group
from gateway.commands.cli_support import ID, config_option
from gateway.commands.cli_support import echo_json as _echo_json
from gateway.commands.cli_support import load as _load
from gateway.commands.cli_support import locate as _locate
from gateway.commands.cli_support import no_config as _no_config
from gateway.commands.cli_support import org_exists as _org_exists
from gateway.commands.cli_support import run as _run
from gateway.commands.cli_support import with_gate as _with_gate
from gateway.config import Config, Mode, check_config, locate_config
from sync.leases import DEFAULT_LEASE_MS, check_lease_ms


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="creditgate")
@config_option
def main(config_path: Path | None) -> None:
    """creditgate: token budgets for AI features, enforced atomically in Redis."""
    # Commands read the group's --config through their context (_locate).


@main.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--no-sync", is_flag=True, help="Do not run the sync job inside the server.")
@click.option("--log-level", default="info", show_default=True)
def serve(
    config_path: Path | None, host: str, port: int, workers: int, no_sync: bool, log_level: str
) -> None:
    """Run the reverse proxy in front of `upstream`, metering the configured routes."""
    import uvicorn

    from gateway.commands.server import server_options
    from gateway.core.logs import uvicorn_log_config

    # mode="proxy": a missing `upstream` is reported as check-config reports it.
    config = _load(config_path, mode="proxy")
    _check_redis(config, _locate(config_path).path)
    # Workers are separate processes: they find the config and options in the environment.
    os.environ["CREDITGATE_CONFIG"] = str(_locate(config_path).path)
    if no_sync:
        os.environ["CREDITGATE_NO_SYNC"] = "1"
    uvicorn.run(
        "gateway.commands.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,
        # Header size/count limits, header-read and keep-alive timeouts (config `server:`).
        **server_options(config),
        log_config=uvicorn_log_config(log_level),
        # The upstream's own Server and Date headers pass through: do not add a second pair.
        server_header=False,
        date_header=False,
    )


def _check_redis(config: Config, path: Path) -> None:
    """Before binding a port: exit 2 with one line when no server of ``redis_url`` answers
    (a server that would answer every metered request 503 is better not started); warn
    about cluster seeds that are down while another answered. With ``fail_open`` it
    starts anyway, as it would let requests through if Redis went away later."""
    from gateway.core.errors import RedisUnavailable
    from gateway.redisio.connect import probe_redis

    try:
        probe = probe_redis(config.redis_url, command_timeout=config.redis_timeout_seconds)
        dead = asyncio.run(probe)
    except RedisUnavailable as exc:
        if config.fail_open:
            click.echo(
                f"warning: {path}: redis_url: {exc}; starting anyway (fail_open: metered"
                " requests pass uncharged until Redis answers)",
                err=True,
            )
            return
        click.echo(f"error: {path}: redis_url: {exc}", err=True)
        raise SystemExit(2) from None
    for seed in dead:
        click.echo(
            f"warning: {path}: redis_url: seed {seed} (the cluster was reached through"
            " another seed)",
            err=True,
        )


@main.command("check-config")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@config_option
@click.option(
    "--mode",
    type=click.Choice(["proxy", "middleware"]),
    default="proxy",
    show_default=True,
    help="proxy: also require what `creditgate serve` needs (upstream);"
    " middleware: the config of an app that runs creditgate inside it.",
)
def check_config_cmd(file: Path | None, config_path: Path | None, mode: Mode) -> None:
    """Validate FILE (default: the config the other commands use): exit 0, or 1 with every
    error, each naming the file and the key path (or line and column)."""
    location = locate_config(file) if file is not None else _locate(config_path)
    if not location.path.exists():
        _no_config(location, argument=file is not None)
    errors = check_config(location.path, mode=mode)
    for err in errors:
        click.echo(err, err=True)
    if errors:
        raise SystemExit(1)
    click.echo(f"{location.path}: ok")


@main.command()
@config_option
def migrate(config_path: Path | None) -> None:
    """Create or upgrade the Postgres schema (safe to run from several processes)."""
    from gateway.ledger.migrate import migrate as run_migrate

    config = _load(config_path)
    if not config.database_url:
        click.echo("error: no database_url in the config", err=True)
        raise SystemExit(1)
    applied = _run(run_migrate(config.database_url))
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


def _shown(url: str) -> str:
    """``url`` without its password (``redis://:***@host``)."""
    return re.sub(r"(://[^:/@,]*:)[^@]*@", r"\1***@", url)


@main.command()
@config_option
@click.option(
    "--lease-ms",
    type=click.IntRange(min=0),
    default=DEFAULT_LEASE_MS,
    show_default=True,
    help="Shard lease TTL: a dead process's shards are taken over after this long;"
    " 0 makes every process read every shard.",
)
def sync(config_path: Path | None, lease_ms: int) -> None:
    """Run the standalone sync worker (Redis streams -> Postgres); several may run at once.

    It moves every usage event from the Redis streams into the ledger until stopped;
    several split the shards between them (a lease per shard: a dead one's shards are
    taken over after --lease-ms, 5 s by default). SIGTERM or Ctrl-C stop it after the
    batch in flight and hand its shards over to the others.
    """
    from gateway.core.logs import configure_logging
    from sync.worker import run_sync

    try:
        check_lease_ms(lease_ms)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--lease-ms") from None
    config = _load(config_path)  # report config errors before connecting anywhere
    path = _locate(config_path).path
    if not config.database_url:
        click.echo(
            f"error: {path}: the sync job moves events into the ledger, and database_url is empty",
            err=True,
        )
        raise SystemExit(1)
    if config.redis_url.startswith("memory://"):
        click.echo(
            f"error: {path}: redis_url is memory:// (in-process), which another process cannot"
            " read: the sync job runs inside `creditgate serve` or `creditgate demo` then",
            err=True,
        )
        raise SystemExit(1)
    configure_logging("info")
    log = logging.getLogger("creditgate.sync")
    log.info(
        "creditgate sync: moving usage events from Redis %s (%d shards, keys %s:*) into the"
        " ledger at %s; it runs until stopped (Ctrl-C or SIGTERM finish the batch in flight"
        " first)",
        _shown(config.redis_url), config.shards, config.key_prefix, _shown(config.database_url),
    )  # fmt: skip
    _run(run_sync(str(path), lease_ms=lease_ms))
    log.info("creditgate sync: stopped")


@main.command()
@config_option
@click.option(
    "--once",
    is_flag=True,
    help="One pass (forecast sweep, due deliveries, outbox retention), then exit.",
)
def deliver(config_path: Path | None, once: bool) -> None:
    """Run the alert deliverer (contract A11): signed webhooks from the outbox, at least once.

    Several may run at once (claims skip each other's rows); SIGTERM or Ctrl-C stop it
    after the pass in flight. State lives in Postgres, so a killed deliverer resumes.
    """
    from gateway.alerts.deliverer import Deliverer, run_deliverer
    from gateway.core.logs import configure_logging

    config = _load(config_path)
    path = _locate(config_path).path
    if not config.database_url or config.alerts is None:
        what = "database_url is empty" if not config.database_url else "it has no alerts section"
        click.echo(
            f"error: {path}: the deliverer sends alerts from the ledger, and {what}", err=True
        )
        raise SystemExit(1)
    configure_logging("info")
    database_url, alerts = config.database_url, config.alerts
    if once:

        async def one_pass() -> None:
            import asyncpg

            pool = await asyncpg.create_pool(database_url, min_size=0, max_size=4)
            try:
                result = await Deliverer(pool, alerts).run_once()
            finally:
                await pool.close()
            _echo_json({"claimed": result.claimed, "delivered": result.delivered,
                        "failed": result.failed, "forecast": result.forecast,
                        "pruned": result.pruned})  # fmt: skip

        _run(one_pass())
        return
    log = logging.getLogger("creditgate.alerts")
    log.info("creditgate deliver: sending alert webhooks from %s", _shown(database_url))
    _run(run_deliverer(database_url, alerts))
    log.info("creditgate deliver: stopped")


@main.group()
def ledger() -> None:
    """The ledger's monthly partitions (retention)."""


@ledger.command("prune")
@config_option
@click.option(
    "--before",
    "before",
    required=True,
    metavar="YYYY-MM",
    help="Drop every month of audit rows before this one (at most the current month).",
)
def ledger_prune(config_path: Path | None, before: str) -> None:
    """Drop whole months of ai_token_usage_log (retention); refuses an incomplete month.

    The daily rollups keep the dropped months, so /stats and usage by day keep their
    history; the audit rows of those months are gone.
    """
    from gateway.ledger.migrate import connect
    from gateway.ledger.partitions import parse_month, partitions, prune

    config = _load(config_path)
    if not config.database_url:
        click.echo("error: no database_url in the config", err=True)
        raise SystemExit(1)
    try:
        first = parse_month(before)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--before") from None
    database_url = config.database_url

    async def body() -> None:
        conn = await connect(database_url)
        try:
            dropped = await prune(conn, first, datetime.now(UTC).date())
            kept = await partitions(conn)
        finally:
            await conn.close()
        for part in dropped:
            rows = "1 row" if part.rows == 1 else f"{part.rows} rows"
            click.echo(f"dropped {part.label} ({part.name}): {rows}")
        if not dropped:
            click.echo(f"nothing to drop: no month before {before}")
        span = f"{kept[0].label} to {kept[-1].label}" if kept else "no months"
        click.echo(f"kept: {span}; the daily rollups keep the history of dropped months")

    _run(body())


@main.group()
def orgs() -> None:
    """Organizations and their plans."""


@orgs.command("set-plan")
@config_option
@click.argument("org", type=ID)
@click.argument("plan")
@_with_gate
async def orgs_set_plan(gate: Any, org: str, plan: str) -> None:
    """Put ORG on PLAN (creates the org if new); the balance moves at once."""
    old = await gate.set_plan(org, plan)
    click.echo(f"{org}: {old or '(new)'} -> {plan}")


@orgs.command("show")
@config_option
@click.argument("org", type=ID)
@_with_gate
async def orgs_show(gate: Any, org: str) -> None:
    """Show ORG's plan, period and balances (exit 1 for an org that does not exist)."""
    if not await _org_exists(gate, org):
        # Before gate.balance(), which would seed the org in Redis: a typo creates nothing.
        click.echo(
            f"error: unknown org {org!r}: create it with `creditgate orgs set-plan {org} PLAN`",
            err=True,
        )
        raise SystemExit(1)
    bal = await gate.balance(org)
    _echo_json(
        {
            "org": bal.org,
            "plan": bal.plan,
            "period": bal.period,
            "refresh_at": datetime.fromtimestamp(bal.period_end_ms / 1000, UTC).isoformat(),
            "buckets": {
                name: {
                    "allocated": b.allocated, "balance": b.balance, "extra": b.extra,
                    "used": b.used, "in_plan": b.in_plan,
                }
                for name, b in bal.buckets.items()
            },
        }
    )  # fmt: skip


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@config_option
@click.option("--org", required=True, type=ID)
@click.option("--user", default=None, type=ID)
@click.option("--name", default="")
@click.option("--team", default=None, type=ID, help="Put the key in this team of ORG.")
@cap_option
@_with_gate
async def keys_create(
    gate: Any, org: str, user: str | None, name: str, team: str | None, caps: tuple[str, ...]
) -> None:  # fmt: skip
    """Create an API key; the key is printed once and only its hash is stored."""
    patch = caps_patch(gate.config, caps, ())
    if team is not None:
        # Before the key exists, as the admin API does: a typo creates no key.
        from gateway.ledger.levels import LevelStore

        store = await gate.require_store()
        if not any(t.id == team for t in await LevelStore(store.pool).list_teams(org)):
            raise LookupError(f"org {org!r} has no team {team!r}")
    row, key = await gate.create_key(org, user=user, name=name)
    if team is not None or patch:
        try:
            await apply_key_levels(gate, row.id, {} if team is None else {"team": team}, patch)
        except LookupError:  # the team was deleted meanwhile: no half-made key
            await gate.revoke_key(row.id)
            raise
    click.echo(f"id:  {row.id}", err=True)
    click.echo(key)


@keys.command("revoke")
@config_option
@click.argument("key_id")
@_with_gate
async def keys_revoke(gate: Any, key_id: str) -> None:
    """Revoke a key by id; every process stops accepting it within seconds."""
    if not await gate.revoke_key(key_id):
        click.echo(f"error: no active key {key_id}", err=True)
        raise SystemExit(1)
    click.echo(f"revoked {key_id}")


@keys.command("list")
@config_option
@click.option("--org", required=True, type=ID)
@_with_gate
async def keys_list(gate: Any, org: str) -> None:
    """List an org's keys (ids and prefixes, never the keys)."""
    store = await gate.require_store()
    for row in await store.list_api_keys(org):
        state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
        click.echo(f"{row.id}  {row.prefix}…  user={row.user or '-'}  {row.name!r}  {state}")


keys.add_command(keys_set)
main.add_command(teams_group)
main.add_command(users_group)


@main.command()
@config_option
@click.option("--repair", is_flag=True, help="Set drifted Redis balances to the ledger's.")
@_with_gate
async def reconcile(gate: Any, repair: bool) -> None:
    """Compare every org's Redis balances with the ledger (snapshot + unsynced events).

    Exits 0 when everything agrees (or was repaired), 3 when drift remains.
    """
    from gateway.commands.reconcile import reconcile as run_reconcile

    report = await run_reconcile(gate, repair=repair)
    for d in report.drifts:
        action = "repaired" if d.repaired else "drift"
        click.echo(
            f"{action}: {d.org} {d.bucket}: redis {d.redis_balance}+{d.redis_extra}"
            f" (+{d.held_balance}+{d.held_extra} held) vs ledger"
            f" {d.ledger_balance}+{d.ledger_extra} at seq {d.ledger_seq} ({d.tokens:+d} tokens)"
        )
    for org, n in report.missing_events.items():
        click.echo(f"missing events: {org}: Redis is {n} sequence numbers ahead of the ledger")
    for org, n in report.lost_writes.items():
        click.echo(
            f"lost writes: {org}: Redis is {n} sequence numbers behind the ledger"
            " (a failover or restore lost acknowledged writes)"
        )
    for org in report.unstable:
        click.echo(f"unstable: {org} kept changing during the pass; run again")
    click.echo(
        f"checked {report.orgs_checked} orgs, {report.buckets_checked} buckets:"
        f" {len(report.drifts)} drifted"
        + (f", {sum(d.repaired for d in report.drifts)} repaired" if repair else "")
    )
    unresolved = [d for d in report.drifts if not d.repaired]
    lost = [org for org in report.lost_writes if not _repaired(report, org)]
    if unresolved or report.missing_events or report.unstable or lost:
        raise SystemExit(3)


def _repaired(report: Any, org: str) -> bool:
    # An org that lost writes is resolved once every drifted bucket of it was repaired.
    drifts = [d for d in report.drifts if d.org == org]
    return bool(drifts) and all(d.repaired for d in drifts)


def _parse_date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date (e.g. 2026-12-31)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@main.command()
@config_option
@click.argument("org", type=ID)
@click.option("--bucket", required=True)
@click.option("--amount", required=True, type=click.IntRange(min=1))
@click.option("--expires", default=None, help="Expiry date (ISO 8601); default never.")
@click.option("--reference", default=None, help="Idempotency reference (default: random).")
def grant(
    config_path: Path | None,
    org: str,
    bucket: str,
    amount: int,
    expires: str | None,
    reference: str | None,
) -> None:
    """Add purchased tokens to ORG's BUCKET (idempotent by --reference)."""
    import uuid

    expires_at = _parse_date(expires)
    ref = reference or f"cli-{uuid.uuid4().hex}"

    @_with_gate
    async def body(gate: Any) -> None:
        _, created = await gate.grant(org, bucket, amount, reference=ref, expires_at=expires_at)
        click.echo(
            f"granted {amount} {bucket} to {org} (reference {ref})"
            if created
            else f"reference {ref} was already applied; nothing changed"
        )

    body(config_path)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the embedded Postgres keeps its data (default ~/.creditgate/demo;"
    " /var/tmp/creditgate-demo when run as root).",
)
@click.option("--database-url", default=None, help="Use this Postgres instead of the embedded one.")
@click.option("--no-postgres", is_flag=True, help="No ledger: balances in memory only.")
def demo(
    host: str, port: int, data_dir: Path | None, database_url: str | None, no_postgres: bool
) -> None:
    """Run everything embedded: in-process Redis, embedded Postgres, a sample app (A7).

    The demo builds its own config (the reference config: the sample app's five features
    and the starter, pro and enterprise plans), so it takes no --config.
    """
    from gateway.commands.demo import DemoOptions, run_demo
    from gateway.core.logs import configure_logging

    configure_logging("warning")
    options = DemoOptions(
        host=host, port=port, data_dir=data_dir, database_url=database_url,
        postgres=not no_postgres,
    )  # fmt: skip
    raise SystemExit(_run(run_demo(options)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
