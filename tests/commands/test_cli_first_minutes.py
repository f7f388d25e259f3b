"""The command line in a new user's first minutes: where the config comes from, what a
missing one says, what `creditgate sync` is doing, and `orgs show` of an org that does not
exist. Real processes, real Redis and Postgres."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from gateway.config.checks import PROXY_NEEDS_UPSTREAM
from gateway.redisio.connect import connect_redis
from tests.support.pg import temp_database
from tests.support.reference import REFERENCE_YAML
from tests.support.services import redis_url

NO_UPSTREAM = f"upstream: {PROXY_NEEDS_UPSTREAM}"


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CREDITGATE_CONFIG"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.commands.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=environment,
    )  # fmt: skip


def write_config(path: Path, **settings: object) -> Path:
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(settings)
    path.write_text(yaml.safe_dump(data))
    return path


async def redis_keys(prefix: str) -> list[str]:
    client = connect_redis(redis_url()).client
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    finally:
        await client.aclose()


async def delete_keys(prefix: str) -> None:
    client = connect_redis(redis_url()).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"cgt{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def migrated_dsn() -> AsyncIterator[str]:
    async with temp_database(migrated=True) as dsn:
        yield dsn


@pytest.fixture
async def live_config(tmp_path: Path, prefix: str, migrated_dsn: str) -> AsyncIterator[Path]:
    """The reference config on the real Redis (a fresh key prefix) and a migrated database."""
    yield write_config(
        tmp_path / "live.yaml", redis_url=redis_url(), key_prefix=prefix, database_url=migrated_dsn
    )
    await delete_keys(prefix)


# -- --config on the command group --------------------------------------------------------


def test_config_on_the_group_or_the_subcommand(live_config: Path, tmp_path: Path) -> None:
    made = cli("--config", str(live_config), "orgs", "set-plan", "acme", "pro")
    assert made.returncode == 0, made.stderr
    before = cli("--config", str(live_config), "orgs", "show", "acme")
    after = cli("orgs", "show", "acme", "--config", str(live_config))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert '"plan": "pro"' in before.stdout and before.stdout == after.stdout
    # Both given: the subcommand's wins.
    elsewhere = tmp_path / "elsewhere.yaml"
    wins = cli("--config", str(elsewhere), "orgs", "show", "acme", "--config", str(live_config))
    assert wins.returncode == 0 and '"plan": "pro"' in wins.stdout, wins.stderr
    loses = cli("--config", str(live_config), "orgs", "show", "acme", "--config", str(elsewhere))
    assert loses.returncode == 1 and str(elsewhere) in loses.stderr
    # check-config without FILE checks the config the other commands would use.
    assert cli("--config", str(live_config), "check-config").stdout == f"{live_config}: ok\n"


# -- a missing config file ----------------------------------------------------------------


def test_missing_config_from_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "creditgate.yaml"
    for args in (
        ("orgs", "show", "acme", "--config", str(missing)),
        ("--config", str(missing), "orgs", "show", "acme"),
        ("--config", str(missing), "migrate"),
    ):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.splitlines() == [
            f"error: no config file at {missing} (given with --config)",
            "hint: point to your config with --config FILE (before or after the command)"
            " or CREDITGATE_CONFIG=FILE; `creditgate demo` runs without one",
        ]


def test_missing_config_from_the_environment(tmp_path: Path) -> None:
    proc = cli("orgs", "show", "acme", cwd=tmp_path, env={"CREDITGATE_CONFIG": "conf/cg.yaml"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"error: no config file at {tmp_path / 'conf' / 'cg.yaml'}"
        " (from $CREDITGATE_CONFIG=conf/cg.yaml)"
    )
    assert "--config FILE" in proc.stderr


def test_missing_config_by_default(tmp_path: Path) -> None:
    proc = cli("keys", "list", "--org", "acme", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"error: no config file at {tmp_path / 'creditgate.yaml'} (the default, ./creditgate.yaml"
        " in the current directory: neither --config nor $CREDITGATE_CONFIG is set)"
    )
    assert "Traceback" not in proc.stderr


def test_check_config_of_a_missing_file(tmp_path: Path) -> None:
    proc = cli("check-config", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"error: no config file at {tmp_path / 'nope.yaml'}"


# -- check-config and serve agree on `upstream` --------------------------------------------


def test_upstream_is_required_for_the_proxy_only(tmp_path: Path) -> None:
    config = yaml.safe_load(REFERENCE_YAML)
    del config["upstream"]
    path = tmp_path / "middleware.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = cli("check-config", str(path))
    assert checked.returncode == 1
    assert checked.stderr == f"{path}: {NO_UPSTREAM}\n"
    assert cli("check-config", str(path), "--mode", "proxy").stderr == checked.stderr
    ok = cli("check-config", str(path), "--mode", "middleware")
    assert ok.returncode == 0 and ok.stdout == f"{path}: ok\n"
    # serve refuses it before binding a port, with the same words.
    served = cli("serve", "--config", str(path), "--port", "1")
    assert served.returncode == 1
    assert served.stderr == checked.stderr


def test_check_config_reports_every_kind_of_error_at_once(tmp_path: Path) -> None:
    config = yaml.safe_load(REFERENCE_YAML)
    del config["upstream"]
    config["features"]["lead_generation"]["cost"] = 1.5
    config["features"]["general_insights"]["cost"] = -1
    config["identity"]["trusted_header"] = True
    config["admin_token"] = "${CGTEST_UNSET_ADMIN_TOKEN}"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = cli("check-config", str(path))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{path}: identity.trusted_header: unknown key (did you mean 'trusted_headers'?)",
        f"{path}: features.lead_generation.cost: expected an integer, got float 1.5",
        f"{path}: {NO_UPSTREAM}",
        f"{path}: admin_token: empty (environment variable CGTEST_UNSET_ADMIN_TOKEN is not set)",
        f"{path}: features.general_insights.cost: must be positive, got -1",
    ]


def test_check_config_yaml_errors_in_words(tmp_path: Path) -> None:
    path = tmp_path / "creditgate.yaml"
    path.write_text("features:\n  lead_generation:\n    cost: 5\n      bucket: leads\n")
    proc = cli("check-config", str(path))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"{path}:4:7: bad indentation: this line is indented more than the key above it"
        " expects ('cost' on line 3 already has a value)\n"
    )


# -- creditgate sync ----------------------------------------------------------------------


def test_sync_says_what_it_does_and_stops_on_sigterm(
    tmp_path: Path, prefix: str, migrated_dsn: str
) -> None:
    # A password in the database URL is not printed (trust auth ignores it).
    user, _, rest = migrated_dsn.partition("://")[2].partition("@")
    dsn = f"postgresql://{user}:hunter2@{rest}"
    path = write_config(
        tmp_path / "sync.yaml", redis_url=redis_url(), key_prefix=prefix, database_url=dsn
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.commands.cli", "sync", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=30)
        shown_dsn = f"postgresql://{user}:***@{rest}"
        assert first.rstrip("\n").endswith(
            f"creditgate sync: moving usage events from Redis {redis_url()} (16 shards,"
            f" keys {prefix}:*) into the ledger at {shown_dsn}; it runs until stopped"
            " (Ctrl-C or SIGTERM finish the batch in flight first)"
        ), first
        time.sleep(1.0)  # let it reach its loop
        assert proc.poll() is None, "".join(lines.queue)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        reader.join(timeout=5)
        rest_of_log = "".join(lines.queue)
        assert "creditgate sync: stopped" in rest_of_log
        assert "hunter2" not in first + rest_of_log
        assert "Traceback" not in rest_of_log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sync_without_a_database_says_so(tmp_path: Path, prefix: str) -> None:
    path = write_config(
        tmp_path / "c.yaml", redis_url=redis_url(), key_prefix=prefix, database_url=""
    )
    proc = cli("sync", "--config", str(path))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {path}: the sync job moves events into the ledger, and database_url is empty\n"
    )


# -- orgs show of an unknown org ----------------------------------------------------------


async def test_orgs_show_unknown_org_writes_nothing(
    live_config: Path, prefix: str, migrated_dsn: str, tmp_path: Path
) -> None:
    proc = cli("orgs", "show", "ghost", "--config", str(live_config))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: unknown org 'ghost': create it with `creditgate orgs set-plan ghost PLAN`\n"
    )
    conn = await asyncpg.connect(migrated_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 0
        assert await conn.fetchval("SELECT count(*) FROM ai_token_usage_log") == 0
    finally:
        await conn.close()
    assert await redis_keys(prefix) == []
    # Without a database, Redis alone says whether the org exists; still nothing written.
    no_db = write_config(
        tmp_path / "nodb.yaml", redis_url=redis_url(), key_prefix=prefix, database_url=""
    )
    proc = cli("orgs", "show", "ghost", "--config", str(no_db))
    assert proc.returncode == 1 and "unknown org 'ghost'" in proc.stderr
    assert await redis_keys(prefix) == []
    # A known org still shows.
    assert cli("orgs", "set-plan", "ghost", "pro", "--config", str(live_config)).returncode == 0
    shown = cli("orgs", "show", "ghost", "--config", str(live_config))
    assert shown.returncode == 0 and '"plan": "pro"' in shown.stdout


async def test_a_database_without_the_schema_says_to_migrate(tmp_path: Path, prefix: str) -> None:
    async with temp_database() as dsn:  # created, no migrations applied
        path = write_config(
            tmp_path / "c.yaml", redis_url=redis_url(), key_prefix=prefix, database_url=dsn
        )
        for args in (("orgs", "show", "acme"), ("keys", "list", "--org", "acme")):
            proc = cli(*args, "--config", str(path))
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1, proc.stderr
            assert proc.stderr.startswith("error: the database has no creditgate tables yet")
            assert proc.stderr.endswith("does not exist): run `creditgate migrate` first\n")
    await delete_keys(prefix)
