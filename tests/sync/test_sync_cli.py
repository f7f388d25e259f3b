"""The sync worker's two command lines and their lease option, as a user runs them.

`creditgate sync --config F --lease-ms N` and `python -m sync --config F --lease-ms N`
must both run with a shard lease of N ms (before, the first had no such option and the
second silently ignored every option given with --config). Real processes, Redis and
Postgres: the lease is read back from the shard keys the running worker holds.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.core.redis_keys import KeySpace
from gateway.redisio.connect import connect_redis
from tests.support.pg import requires_postgres, temp_database
from tests.support.reference import REFERENCE_YAML
from tests.support.services import redis_url

pytestmark = requires_postgres


@pytest.fixture
async def config_file(tmp_path: Path) -> AsyncIterator[tuple[Path, KeySpace]]:
    prefix = f"cgl{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        data = yaml.safe_load(REFERENCE_YAML)
        data.update(redis_url=redis_url(), key_prefix=prefix, database_url=dsn, shards=2)
        path = tmp_path / "creditgate.yaml"
        path.write_text(yaml.safe_dump(data))
        yield path, KeySpace(prefix, 2)
    client = connect_redis(redis_url()).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


async def _lease_ttls(cmd: list[str], keys: KeySpace) -> list[int]:
    """Start ``cmd``, wait until it holds every shard's lease, return their PTTLs (ms)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    client = connect_redis(redis_url()).client
    try:
        for _ in range(200):
            ttls = [int(await client.pttl(shard.sync_lease)) for shard in keys.all_shards()]
            if all(t > 0 for t in ttls):
                return ttls
            if proc.returncode is not None:
                raise AssertionError(f"{cmd} exited: {await proc.communicate()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"{cmd}: no lease taken within 10 s")
    finally:
        await client.aclose()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err


@pytest.mark.parametrize(
    "command",
    [["-m", "gateway.commands.cli", "sync"], ["-m", "sync"]],
    ids=["creditgate sync", "python -m sync"],
)
async def test_lease_ms_is_used_with_a_config_file(
    command: list[str], config_file: tuple[Path, KeySpace]
) -> None:
    path, keys = config_file
    ttls = await _lease_ttls(
        [sys.executable, *command, "--config", str(path), "--lease-ms", "700"], keys
    )
    # The default is 5,000 ms: a lease of at most 700 ms shows the option was used.
    assert all(0 < t <= 700 for t in ttls), ttls


@pytest.mark.parametrize(
    ("command", "lease"),
    [(["-m", "gateway.commands.cli", "sync"], "100"), (["-m", "sync"], "100")],
    ids=["creditgate sync", "python -m sync"],
)
def test_a_lease_too_short_is_refused(
    command: list[str], lease: str, config_file: tuple[Path, KeySpace]
) -> None:
    path, _ = config_file
    proc = subprocess.run(
        [sys.executable, *command, "--config", str(path), "--lease-ms", lease],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "lease" in proc.stderr and "500" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_m_sync_refuses_options_the_config_file_decides(
    config_file: tuple[Path, KeySpace],
) -> None:
    path, _ = config_file
    proc = subprocess.run(
        [sys.executable, "-m", "sync", "--config", str(path), "--shards", "4", "--prefix", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--prefix, --shards: not allowed with --config" in proc.stderr
