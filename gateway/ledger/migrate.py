"""Forward-only SQL migrations, safe to run from several processes at once.

Migrations are the files ``NNNN_name.sql`` of the shipped ``migrations`` directory (see
gateway.core.resources), applied in order of their number. Each one runs in its own transaction
together with its row in ``creditgate_schema_migrations`` (so a migration cannot use
statements that refuse to run in a transaction, such as ``CREATE INDEX CONCURRENTLY``).

Concurrency: everything happens under a session-level ``pg_advisory_lock`` with a constant
key, so when several gateways start at once one applies the pending files and the others
wait, then find nothing left to do. A database that does not exist yet is created first,
through the ``postgres`` maintenance database, under a second advisory lock there (and a
lost race with any other creator is tolerated). Session-level locks need a real session:
point the DSN at Postgres itself, not at a transaction-pooling PgBouncer.

A file's checksum is the SHA-256 of its text with line endings normalised to ``\\n``; an
applied migration whose file no longer matches is an error (released migrations are never
edited; add a new one instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypeVar

import asyncpg

from gateway.core.errors import DatabaseMissing, DatabaseUnavailable
from gateway.core.resources import resource_dir

__all__ = [
    "ChecksumMismatch",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "Migration",
    "MigrationError",
    "connect",
    "describe_server",
    "guard_connect",
    "load_migrations",
    "migrate",
    "pending",
]

TRACKING_TABLE = "creditgate_schema_migrations"
# Constant advisory lock keys (the ASCII of "cgmigrat" / "cgcreadb" as signed bigints).
MIGRATION_LOCK_KEY = int.from_bytes(b"cgmigrat", "big")
CREATE_DB_LOCK_KEY = int.from_bytes(b"cgcreadb", "big")
MAINTENANCE_DB = "postgres"

_FILE_RE = re.compile(r"(\d{4})_([A-Za-z0-9_]+)\.sql")

_T = TypeVar("_T")


class MigrationError(Exception):
    """A migration file is malformed or failed to apply."""


class ChecksumMismatch(MigrationError):
    """An already-applied migration file was edited after it was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: ``name`` is the file name without ``.sql`` (e.g. ``0001_core``)."""

    version: int
    name: str
    sql: str
    checksum: str


def checksum(sql: str) -> str:
    """The SHA-256 (hex) of a migration's text, insensitive to CRLF vs LF checkouts."""
    normalised = sql.replace("\r\n", "\n").replace("\r", "\n")
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def load_migrations(directory: Traversable | Path | None = None) -> list[Migration]:
    """Read every ``NNNN_name.sql`` file of ``directory`` (default: the shipped one), in order.

    Other files are ignored; two files with the same number are an error.
    """
    root: Traversable = directory if directory is not None else resource_dir("migrations")
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        match = _FILE_RE.fullmatch(entry.name)
        if match is None or not entry.is_file():
            continue
        version = int(match.group(1))
        name = entry.name[: -len(".sql")]
        if version in found:
            raise MigrationError(
                f"two migrations share number {version:04d}: {found[version].name}, {name}"
            )
        sql = entry.read_text(encoding="utf-8")
        found[version] = Migration(version, name, sql, checksum(sql))
    return [found[v] for v in sorted(found)]


# --- connecting ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DsnInfo:
    servers: str  # "host:port[,host:port]" for messages
    database: str


def _parse_dsn(dsn: str) -> _DsnInfo:
    """Extract what messages and database creation need, with libpq's defaults."""
    parsed = urllib.parse.urlsplit(dsn)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
    netloc = parsed.netloc
    auth, _, hostspec = netloc.rpartition("@")
    user = urllib.parse.unquote(auth.partition(":")[0]) if auth else ""
    hostspec = (
        urllib.parse.unquote(hostspec)
        or query.get("host", "")
        or os.environ.get("PGHOST", "localhost")
    )
    default_port = query.get("port") or os.environ.get("PGPORT") or "5432"
    servers = []
    for part in hostspec.split(","):
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or default_port
        else:
            host, _, port = part.partition(":")
            port = port or default_port
        servers.append(f"{host or 'localhost'}:{port}")
    user = user or query.get("user", "") or os.environ.get("PGUSER", "") or getpass.getuser()
    database = (
        urllib.parse.unquote(parsed.path.lstrip("/"))
        or query.get("dbname", "")
        or query.get("database", "")
        or os.environ.get("PGDATABASE", "")
        or user
    )
    return _DsnInfo(",".join(servers), database)


def describe_server(dsn: str) -> str:
    """``host:port`` of a DSN (comma-separated when it names several), for messages."""
    return _parse_dsn(dsn).servers


async def guard_connect(
    dsn: str, attempt: Callable[[], Awaitable[_T]], *, database: str | None = None
) -> _T:
    """Run a connection attempt, turning connection failures into DatabaseUnavailable.

    ``database`` names the database really connected to when it is not the DSN's.

    Used for single connections and pools alike; the asyncpg exception is not chained, so
    the error shown to an operator is one line naming the server.
    """
    info = _parse_dsn(dsn)
    try:
        return await attempt()
    except asyncpg.InvalidCatalogNameError:
        raise DatabaseMissing(
            f"database {database or info.database!r} does not exist on PostgreSQL at {info.servers}"
            " (run `creditgate migrate` to create it)"
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise DatabaseUnavailable(
            f"PostgreSQL at {info.servers} rejected the login: {exc}"
        ) from None
    except (
        OSError,
        TimeoutError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.ConnectionDoesNotExistError,
    ) as exc:
        if isinstance(exc, TimeoutError):
            reason = "connection timed out"
        elif isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc) or type(exc).__name__
        raise DatabaseUnavailable(
            f"PostgreSQL at {info.servers} is unreachable: {reason}"
        ) from None


async def connect(
    dsn: str, *, database: str | None = None, connect_timeout: float = 10.0
) -> asyncpg.Connection:
    """Open one connection (to ``database`` instead of the DSN's when given).

    Raises DatabaseUnavailable with the server's host:port when that fails.
    """
    return await guard_connect(
        dsn,
        lambda: asyncpg.connect(dsn, database=database, timeout=connect_timeout),
        database=database,
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _ensure_database(dsn: str, connect_timeout: float) -> None:
    """Create the DSN's database if it does not exist (several callers may race)."""
    info = _parse_dsn(dsn)
    conn = await connect(dsn, database=MAINTENANCE_DB, connect_timeout=connect_timeout)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", CREATE_DB_LOCK_KEY)
        try:
            for attempt in range(10):
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", info.database
                )
                if exists:
                    return
                try:
                    await conn.execute(f"CREATE DATABASE {_quote_ident(info.database)}")
                    return
                except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                    return  # created by someone not using our lock
                except asyncpg.ObjectInUseError:
                    # Someone is connected to template1: CREATE DATABASE must wait for them.
                    await asyncio.sleep(0.1 * (attempt + 1))
                except asyncpg.InsufficientPrivilegeError:
                    raise MigrationError(
                        f"database {info.database!r} does not exist on {info.servers} and"
                        " this role may not create it (create it, or grant CREATEDB)"
                    ) from None
            raise MigrationError(
                f"could not create database {info.database!r}: template1 stayed in use"
            )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", CREATE_DB_LOCK_KEY)
    finally:
        await conn.close()


# --- applying -------------------------------------------------------------------------------


async def _tracking_table_exists(conn: asyncpg.Connection) -> bool:
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TRACKING_TABLE)
    return bool(found)


async def _applied(conn: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of every applied migration."""
    if not await _tracking_table_exists(conn):
        return {}
    rows = await conn.fetch(f"SELECT version, name, checksum FROM {TRACKING_TABLE}")
    return {row["version"]: (row["name"], row["checksum"]) for row in rows}


def _unapplied(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> list[Migration]:
    """The migrations still to apply; raises ChecksumMismatch if an applied one changed."""
    todo = []
    for m in migrations:
        done = applied.get(m.version)
        if done is None:
            todo.append(m)
            continue
        name, digest = done
        if name != m.name or digest != m.checksum:
            raise ChecksumMismatch(
                f"migration {m.name}.sql does not match what was applied as {name}"
                f" (checksum {digest[:12]}…, file now {m.checksum[:12]}…): released"
                " migrations must not be edited; add a new numbered migration instead"
            )
    # Versions applied but unknown here come from a newer release: nothing to do for us.
    return todo


async def migrate(
    dsn: str,
    *,
    directory: Traversable | Path | None = None,
    connect_timeout: float = 10.0,
) -> list[str]:
    """Apply every pending migration; return the names applied (e.g. ``["0001_core"]``).

    Creates the database first if it does not exist. Safe to call from several processes
    at once: each migration is applied exactly once, the others wait for the lock and then
    return ``[]``. Raises DatabaseUnavailable, ChecksumMismatch or MigrationError.
    """
    migrations = load_migrations(directory)
    try:
        conn = await connect(dsn, connect_timeout=connect_timeout)
    except DatabaseMissing:
        await _ensure_database(dsn, connect_timeout)
        conn = await connect(dsn, connect_timeout=connect_timeout)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in _unapplied(migrations, await _applied(conn)):
                try:
                    async with conn.transaction():
                        await conn.execute(m.sql)
                        await conn.execute(
                            f"INSERT INTO {TRACKING_TABLE} (version, name, checksum)"
                            " VALUES ($1, $2, $3)",
                            m.version,
                            m.name,
                            m.checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {m.name}.sql failed: {exc}") from None
                applied_now.append(m.name)
        finally:
            # Closing the session releases the lock too; unlocking first just frees it
            # sooner, and must not hide the error that got us here.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied_now


async def pending(
    dsn: str, *, directory: Traversable | Path | None = None, connect_timeout: float = 10.0
) -> list[str]:
    """Names of the migrations not yet applied (all of them if the database is missing).

    Raises ChecksumMismatch if an applied migration's file was edited, DatabaseUnavailable
    if the server cannot be reached.
    """
    migrations = load_migrations(directory)
    try:
        conn = await connect(dsn, connect_timeout=connect_timeout)
    except DatabaseMissing:
        return [m.name for m in migrations]
    try:
        return [m.name for m in _unapplied(migrations, await _applied(conn))]
    finally:
        await conn.close()
