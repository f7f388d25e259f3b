"""Throwaway Postgres databases for tests, on the session's server.

The server is the one ``tests.support.services.database_url()`` finds or starts:
``CREDITGATE_TEST_DATABASE_URL`` (a superuser DSN on the maintenance database), else the
machine's PostgreSQL on 127.0.0.1:5432, else a private server for the session. It may be
shared with other test sessions running at the same time, so every test gets its own
uniquely named database (``creditgate_t_<hex>``) and drops it afterwards, even when the
test fails.

Usage::

    from tests.support.pg import temp_database, migrated_database, empty_database

    async with temp_database() as dsn: ...                 # created, empty
    async with temp_database(migrated=True) as dsn: ...    # with every migration applied
    async with temp_database(create=False) as dsn: ...     # name reserved, not created
                                                           # (dropped after if it exists)
    # as pytest fixtures (asyncio_mode=auto), in a test module:
    pg_dsn = pytest.fixture(migrated_database)   # or empty_database
    async def test_x(pg_dsn: str) -> None: ...

    pytestmark = requires_postgres                # skip the module's tests when there is
                                                  # no server and none can be started
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests.support.needs import under_ci
from tests.support.services import database_url, postgres_service

DB_PREFIX = "creditgate_t_"


def unique_name(prefix: str = DB_PREFIX) -> str:
    """A fresh name for a database or role: ``prefix`` + 12 hex characters."""
    return prefix + uuid.uuid4().hex[:12]


def admin_dsn() -> str:
    """The superuser DSN on the maintenance database (skips the test when there is none)."""
    return database_url()


def dsn_for(database: str, *, user: str | None = None) -> str:
    """admin_dsn() pointed at ``database`` (and, when given, logging in as ``user``)."""
    parts = urllib.parse.urlsplit(admin_dsn())
    netloc = parts.netloc
    if user is not None:
        netloc = urllib.parse.quote(user, safe="") + "@" + netloc.rpartition("@")[2]
    path = "/" + urllib.parse.quote(database, safe="")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))


def postgres_available() -> bool:
    """Whether the session has a PostgreSQL (found or started now)."""
    return postgres_service().url is not None


def postgres_missing() -> bool:
    """True when integration tests should skip for want of PostgreSQL. Never under CI
    (``CI`` set): `.ci/run` provides the server, so a missing one must fail loudly there
    instead of turning the ledger tests into silent skips."""
    return not under_ci() and not postgres_available()


# Checked when each marked test is set up (tests/conftest.py), not at import: the private
# server is only started when a test needs it, and a missing one skips with what to
# install (fails under CI).
requires_postgres = pytest.mark.requires_postgres


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def admin_execute(sql: str) -> None:
    """Run one statement on the maintenance database as the admin user."""
    conn = await asyncpg.connect(admin_dsn())
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
