"""The migration runner against the real Postgres (each test in its own database)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from gateway.core.errors import DatabaseUnavailable
from gateway.core.resources import resource_dir
from gateway.ledger.migrate import (
    TRACKING_TABLE,
    ChecksumMismatch,
    MigrationError,
    load_migrations,
    migrate,
    pending,
)
from tests.support.pg import requires_postgres, temp_database

pytestmark = requires_postgres

REPO = Path(__file__).resolve().parents[2]
ALL = [m.name for m in load_migrations()]
CORE_TABLES = {
    "organizations",
    "api_keys",
    "ai_tokens",
    "ai_token_usage_log",
    "token_grants",
    "usage_daily",  # a view since 0015
    TRACKING_TABLE,
}


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " UNION ALL SELECT viewname FROM pg_views WHERE schemaname = 'public'"
        )
        return {r[0] for r in rows}
    finally:
        await conn.close()


async def _tracking_rows(dsn: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT version, name FROM {TRACKING_TABLE} ORDER BY version")
        return [(r["version"], r["name"]) for r in rows]
    finally:
        await conn.close()


def _copy_migrations(dest: Path) -> Path:
    src = resource_dir("migrations")
    dest.mkdir()
    for entry in src.iterdir():
        if entry.name.endswith(".sql"):
            (dest / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return dest


def test_shipped_migrations_are_numbered_from_one() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions[0] == 1
    assert versions == sorted(set(versions))
    assert ALL[0] == "0001_core"


async def test_creates_database_and_tables_then_applies_nothing() -> None:
    async with temp_database(create=False) as dsn:
        assert await pending(dsn) == ALL  # the database does not exist yet
        assert await migrate(dsn) == ALL
        assert await _tables(dsn) >= CORE_TABLES
        assert await _tracking_rows(dsn) == [(int(n[:4]), n) for n in ALL]
        assert await pending(dsn) == []
        assert await migrate(dsn) == []
        assert await _tracking_rows(dsn) == [(int(n[:4]), n) for n in ALL]


async def test_concurrent_migrate_in_one_process_applies_each_file_once() -> None:
    async with temp_database(create=False) as dsn:
        results = await asyncio.gather(*(migrate(dsn) for _ in range(5)))
        applied = [name for names in results for name in names]
        assert sorted(applied) == sorted(ALL)  # each exactly once, across all callers
        assert await _tracking_rows(dsn) == [(int(n[:4]), n) for n in ALL]
        assert await _tables(dsn) >= CORE_TABLES


async def test_concurrent_migrate_in_separate_processes() -> None:
    async with temp_database(create=False) as dsn:
        code = (
            "import asyncio, json, sys;"
            "from gateway.ledger.migrate import migrate;"
            "print(json.dumps(asyncio.run(migrate(sys.argv[1]))))"
        )
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                code,
                dsn,
                cwd=REPO,
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(3)
        ]
        outputs = await asyncio.gather(*(p.communicate() for p in procs))
        applied: list[str] = []
        for proc, (out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
            applied += json.loads(out)
        assert sorted(applied) == sorted(ALL)
        assert await _tracking_rows(dsn) == [(int(n[:4]), n) for n in ALL]


async def test_new_migration_is_applied_alone(tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    async with temp_database() as dsn:
        assert await migrate(dsn, directory=directory) == ALL
        (directory / "9999_extra.sql").write_text("CREATE TABLE cgt_extra (x int);\n")
        (directory / "README.txt").write_text("not a migration")
        assert await pending(dsn, directory=directory) == ["9999_extra"]
        assert await migrate(dsn, directory=directory) == ["9999_extra"]
        assert "cgt_extra" in await _tables(dsn)


async def test_failed_migration_rolls_back_with_its_tracking_row(tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    (directory / "9998_half.sql").write_text(
        "CREATE TABLE cgt_half (x int);\nSELECT no_such_function();\n"
    )
    async with temp_database() as dsn:
        with pytest.raises(MigrationError, match=r"9998_half\.sql failed"):
            await migrate(dsn, directory=directory)
        assert "cgt_half" not in await _tables(dsn)  # the whole file rolled back
        assert await pending(dsn, directory=directory) == ["9998_half"]
        # The lock was released: a fixed file applies on the next run.
        (directory / "9998_half.sql").write_text("CREATE TABLE cgt_half (x int);\n")
        assert await migrate(dsn, directory=directory) == ["9998_half"]


async def test_edited_applied_migration_is_a_checksum_error(tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    async with temp_database() as dsn:
        await migrate(dsn, directory=directory)
        core = directory / "0001_core.sql"
        # Line endings alone do not count as an edit (a Windows checkout).
        core.write_bytes(core.read_bytes().replace(b"\n", b"\r\n"))
        assert await migrate(dsn, directory=directory) == []
        core.write_text(core.read_text() + "\nCREATE TABLE sneaky (x int);\n")
        with pytest.raises(ChecksumMismatch, match=r"0001_core\.sql"):
            await migrate(dsn, directory=directory)
        with pytest.raises(ChecksumMismatch):
            await pending(dsn, directory=directory)
        assert "sneaky" not in await _tables(dsn)


def test_duplicate_numbers_are_an_error(tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    shutil.copy(directory / "0001_core.sql", directory / "0001_again.sql")
    with pytest.raises(MigrationError, match="0001"):
        load_migrations(directory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_unreachable_postgres_is_a_clear_error() -> None:
    port = _free_port()  # nothing listens there once the socket is closed
    dsn = f"postgresql://postgres@127.0.0.1:{port}/creditgate"
    started = time.monotonic()
    for call in (migrate, pending):
        with pytest.raises(DatabaseUnavailable) as info:
            await call(dsn)
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message
        assert "unreachable" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert time.monotonic() - started < 5
