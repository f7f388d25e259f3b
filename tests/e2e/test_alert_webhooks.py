"""Issue 9's proof, with real processes: usage crossing 80% is one signed webhook, which
survives a receiver that is down for a while and a deliverer SIGKILLed mid-retry; the
receiver (its own process, verifying with ``standardwebhooks``) sees the same webhook-id
when it gets the event twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from gateway.alerts.evaluation import AlertDefaults
from gateway.config import load_config
from gateway.metering.gate import CreditGate
from sync.worker import SyncWorker
from tests.alerts.test_deliverer import SECRET, free_port
from tests.support.api_support import REDIS, clean_prefix
from tests.support.pg import requires_postgres, temp_database
from tests.support.webhook_receiver import received

pytestmark = [requires_postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
_SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=REPO)
    _SPAWNED.append(proc)
    return proc


async def wait_for(check: Callable[[], object], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Path, str, int]]:
    port, prefix = free_port(), f"cgt{uuid.uuid4().hex[:10]}"
    async with temp_database(migrated=True) as dsn:
        config = tmp_path / "creditgate.yaml"
        config.write_text(f"""
redis_url: {REDIS}
database_url: {dsn}
key_prefix: {prefix}
features: {{lead_generation: {{cost: 5}}}}
plans: {{starter: {{}}, pro: {{allocations: {{lead_generation: 60}}}}}}
alerts:
  webhook_url: http://127.0.0.1:{port}/hook
  webhook_secret: {SECRET}
  thresholds: [80]
  forecast: false
  retry_first_seconds: 0.3
  retry_max_seconds: 1
  poll_seconds: 0.1
""")
        try:
            yield config, dsn, port
        finally:
            await clean_prefix(prefix)


async def test_one_signed_webhook_survives_a_down_receiver_and_a_killed_deliverer(
    setup: tuple[Path, str, int], tmp_path: Path
) -> None:
    config_path, dsn, port = setup
    config = load_config(config_path)
    assert config.alerts is not None
    gate = CreditGate(config)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    try:
        await gate.set_plan("acme", "pro")
        for _ in range(10):  # 50 of 60 tokens: crosses 80% once
            assert (await gate.charge("acme", "lead_generation")).ok
        await gate.meter.drain()
        worker = SyncWorker(
            redis=gate.redis.client, pool=pool, keyspace=gate.keys,
            alerts=AlertDefaults.of(config.alerts),
        )  # fmt: skip
        assert (await worker.run_once()).alerts == 1
        (event_id,) = [r[0] for r in await pool.fetch("SELECT id FROM alert_events")]

        # The receiver is down: the deliverer retries with backoff; kill it mid-retry.
        deliverer = spawn("gateway.commands.cli", "deliver", "--config", str(config_path))
        attempts = "SELECT count(*) FROM alert_attempts"
        await wait_for(lambda: _at_least(pool, attempts, 2))
        deliverer.send_signal(signal.SIGKILL)
        deliverer.wait(10)
        status = await pool.fetchval("SELECT status FROM alert_events WHERE id = $1", event_id)
        assert status == "pending"

        # The receiver comes up (answering 500 to the first delivery: it sees two), and a
        # new deliverer picks the event up where the killed one left it.
        log = tmp_path / "received.jsonl"
        spawn("tests.support.webhook_receiver", str(port), SECRET, str(log), "1")
        deliverer = spawn("gateway.commands.cli", "deliver", "--config", str(config_path))
        delivered = "SELECT count(*) FROM alert_events WHERE status = 'delivered'"
        await wait_for(lambda: _at_least(pool, delivered, 1))
        got = received(log)
        assert [(r["id"], r["verified"], r["answered"]) for r in got] == [
            (event_id, True, 500), (event_id, True, 204),
        ]  # fmt: skip
        data = got[1]["payload"]["data"]
        assert (data["org"], data["threshold"], data["used"], data["remaining"]) == (
            "acme", 80, 50, 10
        )  # fmt: skip

        # SIGTERM only sets the stop flag: the deliverer finishes its pass and exits 0.
        deliverer.send_signal(signal.SIGTERM)
        assert deliverer.wait(15) == 0
        assert len(received(log)) == 2  # nothing sent after delivery
    finally:
        await pool.close()
        await gate.close()


async def _at_least(pool: asyncpg.Pool, query: str, n: int) -> bool:
    return bool(await pool.fetchval(query) >= n)
