"""Throwaway Postgres databases for tests (the shared server at 127.0.0.1:5432).

The server is shared with other test sessions running at the same time, so every test
gets its own uniquely named database (``creditgate_t_<hex>``) and drops it afterwards,
even when the test fails. Set ``CREDITGATE_TEST_PG`` to a DSN of a superuser connection to
the maintenance database to use another server (default
``postgresql://postgres@127.0.0.1:5432/postgres``).

Usage::

    from tests.support.pg import temp_database, migrated_database, empty_database

    async with temp_database() as dsn: ...                 # created, empty
    async with temp_database(migrated=True) as dsn: ...    # with every migration applied
    async with temp_database(create=False) as dsn: ...     # name reserved, not created
                                                           # (dropped after if it exists)
    # as pytest fixtures (asyncio_mode=auto), in a test module:
    pg_dsn = pytest.fixture(migrated_database)   # or empty_database
    async def test_x(pg_dsn: str) -> None: ...

    pytestmark = requires_postgres                # skip the module when no server
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

ADMIN_DSN = os.environ.get("CREDITGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = "creditgate_t_"


def unique_name(prefix: str = DB_PREFIX) -> str:
    """A fresh name for a database or role: ``prefix`` + 12 hex characters."""
    return prefix + uuid.uuid4().hex[:12]


def dsn_for(database: str, *, user: str | None = None) -> str:
    """ADMIN_DSN pointed at ``database`` (and, when given, logging in as ``user``)."""
    parts = urllib.parse.urlsplit(ADMIN_DSN)
    netloc = parts.netloc
    if user is not None:
        netloc = urllib.parse.quote(user, safe="") + "@" + netloc.rpartition("@")[2]
    path = "/" + urllib.parse.quote(database, safe="")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))


def postgres_available() -> bool:
    """Whether something accepts TCP connections at ADMIN_DSN's host and port."""
    parts = urllib.parse.urlsplit(ADMIN_DSN)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return True
    except OSError:
        return False


def postgres_missing() -> bool:
    """True when integration tests should skip for want of PostgreSQL. Never under CI
    (``CI`` set): `.ci/run` starts the server, so a missing one must fail loudly there
    instead of turning the ledger tests into silent skips."""
    return not os.environ.get("CI") and not postgres_available()


requires_postgres = pytest.mark.skipif(postgres_missing(), reason=f"no PostgreSQL at {ADMIN_DSN}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def admin_execute(sql: str) -> None:
    """Run one statement on the maintenance database as the admin user."""
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    """Drop a database if it exists, disconnecting anyone still using it."""
    await admin_execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")


@asynccontextmanager
async def temp_database(*, create: bool = True, migrated: bool = False) -> AsyncIterator[str]:
    """Yield the DSN of a uniquely named database, dropped on exit.

    ``create=False`` only reserves the name (for tests of database creation);
    ``migrated=True`` applies every migration with gateway.ledger.migrate first.
    """
    name = unique_name()
    dsn = dsn_for(name)
    try:
        if create:
            await admin_execute(f"CREATE DATABASE {_ident(name)}")
        if migrated:
            from gateway.ledger.migrate import migrate

            await migrate(dsn)
        yield dsn
    finally:
        await drop_database(name)


async def empty_database() -> AsyncIterator[str]:
    """Fixture function: a created, empty database's DSN."""
    async with temp_database() as dsn:
        yield dsn


async def migrated_database() -> AsyncIterator[str]:
    """Fixture function: the DSN of a database with every migration applied."""
    async with temp_database(migrated=True) as dsn:
        yield dsn
