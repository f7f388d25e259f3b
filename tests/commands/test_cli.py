"""The creditgate command line as a user runs it: real processes, Redis and Postgres."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.redisio.connect import connect_redis
from tests.support.pg import temp_database
from tests.support.reference import REFERENCE_YAML
from tests.support.services import redis_url


def cli(
    *args: str, config: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway.commands.cli", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture
async def config_file(tmp_path: Path) -> AsyncIterator[Path]:
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(create=False) as dsn:
        data = yaml.safe_load(REFERENCE_YAML)
        data.update(redis_url=redis_url(), key_prefix=prefix, database_url=dsn)
        path = tmp_path / "creditgate.yaml"
        path.write_text(yaml.safe_dump(data))
        yield path
    client = connect_redis(redis_url()).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


def test_version_and_help() -> None:
    assert "creditgate, version" in cli("--version").stdout
    for command in (
        "serve",
        "check-config",
        "migrate",
        "sync",
        "grant",
        "orgs",
        "keys",
        "teams",
        "users",
    ):
        assert "Usage" in cli(command, "--help").stdout


def test_check_config_reports_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(REFERENCE_YAML)
    data["routes"].append({"method": "POST", "path": "/x", "feature": "nope"})
    data["plans"]["pro"]["rate_limits"][0]["limit"] = "60/fortnight"
    data["features"]["general_insights"]["cost"] = 0
    bad.write_text(yaml.safe_dump(data))
    proc = cli("check-config", str(bad), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "bad.yaml: routes[5].feature" in proc.stderr
    assert "plans.pro.rate_limits[0].limit" in proc.stderr
    assert "features.general_insights.cost" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text(REFERENCE_YAML)
    assert cli("check-config", str(good)).returncode == 0
    missing = cli("check-config", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_operator_workflow(config_file: Path) -> None:
    assert "applied: 0001_core" in cli("migrate", config=config_file).stdout
    assert "up to date" in cli("migrate", config=config_file).stdout
    assert "(new) -> pro" in cli("orgs", "set-plan", "acme", "pro", config=config_file).stdout
    shown = json.loads(cli("orgs", "show", "acme", config=config_file).stdout)
    assert shown["plan"] == "pro" and shown["buckets"]["goal_generation"]["balance"] == 20
    made = cli("keys", "create", "--org", "acme", "--user", "alice", config=config_file)
    key = made.stdout.strip()
    key_id = made.stderr.split("id:")[1].split()[0]
    assert key.startswith("cg_") and len(key) == 46
    listed = cli("keys", "list", "--org", "acme", config=config_file).stdout
    assert key_id in listed and key not in listed
    out = cli("grant", "acme", "--bucket", "goal_generation", "--amount", "10",
              "--reference", "inv-1", config=config_file).stdout  # fmt: skip
    assert "granted 10" in out
    again = cli("grant", "acme", "--bucket", "goal_generation", "--amount", "10",
                "--reference", "inv-1", config=config_file).stdout  # fmt: skip
    assert "already applied" in again
    shown = json.loads(cli("orgs", "show", "acme", config=config_file).stdout)
    assert shown["buckets"]["goal_generation"]["extra"] == 10
    assert "revoked" in cli("keys", "revoke", key_id, config=config_file).stdout
    bad = cli("orgs", "set-plan", "acme", "platinum", config=config_file, check=False)
    assert bad.returncode == 1 and "unknown plan" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("grant", "acme", "--bucket", "nope", "--amount", "1", config=config_file, check=False)
    assert bad.returncode == 1 and "unknown bucket" in bad.stderr


def test_unreachable_services_are_one_line_errors(tmp_path: Path) -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(
        redis_url="redis://127.0.0.1:1/0", database_url="postgresql://postgres@127.0.0.1:1/x"
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    for args in (("migrate",), ("orgs", "show", "acme")):
        proc = cli(*args, config=path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_keys_create_offers_caps_but_nothing_to_clear() -> None:
    # A new key has no cap override to remove: --clear-cap belongs to `keys set` only.
    create = cli("keys", "create", "--help").stdout
    assert "--cap BUCKET=N|N%" in create and "--clear-cap" not in create
    assert "--clear-cap" in cli("keys", "set", "--help").stdout
    refused = cli("keys", "create", "--org", "acme", "--clear-cap", "x", check=False)
    assert refused.returncode == 2 and "No such option '--clear-cap'" in refused.stderr
