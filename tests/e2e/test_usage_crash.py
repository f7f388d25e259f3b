"""A gateway SIGKILLed in the middle of a usage-charged stream doubles nothing (issue 8).

A real ``creditgate serve`` process (``--no-sync``, so the test decides when the sync job
runs) sits in front of the fake providers (tests/support/fake_providers), with the OpenAI
chat feature charged by usage (contract A8) at a fixed reserve and a hold that expires
after :data:`HOLD_TTL` seconds. The fake sends the first text delta, then waits at a gate;
the test reads that first chunk and SIGKILLs the gateway's whole process group. Nobody is
left to settle the hold, so it stays open until the sync job's sweep (lua/sweep_holds.lua)
turns it into a charge at its reserve (DESIGN B2; contract A5: exactly one row):

- the org is charged exactly the reserve, and the ledger has exactly one row for the
  request: kind ``expired_hold``, tokens = the reserve, no upstream status (the outcome is
  unknown), no overage;
- the same Idempotency-Key, sent to the restarted gateway, is 409 while the hold is open
  (in flight) and 409 ``original_status: unknown`` once it was swept: never forwarded nor
  charged again (contract A9, lua/charge.lua);
- a fresh request is still charged its actual usage, once.

The second variant kills the gateway after the upstream finished and the client read the
whole stream, but before its settle reached Redis: a relay (tests/support/tcp_relay.py)
between the gateway and Redis holds back what the gateway sends, so the test waits until
the settle's EVALSHA was written, then kills. The third SIGKILLs the sync worker while the
expired hold's event is in flight (before and after its commit, through the writer's
``CREDITGATE_SYNC_CRASH`` hook) and restarts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import yaml

from gateway.commands.reconcile import reconcile
from gateway.config import Config, parse_config
from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from gateway.redisio.lua_scripts import load
from sync.worker import SyncWorker
from tests.support.fake_providers import FakeProviders, fake_headers, serve_fake_providers
from tests.support.fake_providers.clients import USAGE, request_for
from tests.support.fake_providers.harness import ORG, PLAN, identity_headers, provider_config
from tests.support.pg import requires_postgres
from tests.support.services import redis_url
from tests.support.tcp_relay import TcpRelay
from tests.support.usage_charging import MODELS

pytestmark = [pytest.mark.slow, requires_postgres]

REPO = Path(__file__).resolve().parents[2]
FEATURE = "chat"
RESERVE = 40  # a fixed reserve: what an expired hold charges
MAX = 2000
HOLD_TTL = 3  # seconds: short, so the test waits for the sweep only briefly
# USAGE (in 1200 of which 200 cached, out 340) at gpt-4o-mini's test prices (10, 5, 40 per
# 1,000): ceil((1000 * 10 + 200 * 5 + 340 * 40) / 1000) = ceil(24.6).
ACTUAL = 25
SHARDS = 4
GROUP = "creditgate-sync"

_SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Kill every process group a test started and left running (a failed assertion must not
    leave a gateway or a sync worker on the shared Redis)."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with serve_fake_providers() as fake:
        yield fake


# -- the setup ------------------------------------------------------------------------------


class Setup:
    """The config file, an inspection gate on it (wall clock, as the processes use) and the
    ledger: everything a test reads the outcome from."""

    def __init__(self, data: dict[str, Any], path: Path, pool: asyncpg.Pool) -> None:
        self.path, self.pool = path, pool
        # The tests' Redis itself, even when the gateway's config goes through a relay.
        direct = {**data, "redis_url": redis_url()}
        self.config: Config = parse_config(yaml.safe_dump(direct), str(path))
        self.keys = KeySpace(self.config.key_prefix, self.config.shards)
        self.gate = CreditGate(self.config)

    @property
    def redis(self) -> Any:
        return self.gate.redis.client

    async def balance(self) -> int:
        """Plan plus purchased tokens of the feature's bucket, as Redis holds them now."""
        return (await self.gate.balance(ORG)).buckets[FEATURE].available

    async def hold_open(self, request_id: str) -> bool:
        return bool(await self.redis.hexists(self.keys.of_org(ORG).shard.holds, request_id))

    async def rows(self, request_id: str) -> list[asyncpg.Record]:
        """The request's own ledger rows (a charge's lazy period reset names the request
        too, in its own row of kind reset)."""
        return list(
            await self.pool.fetch(
                "SELECT * FROM ai_token_usage_log WHERE request_id = $1"
                " AND kind IN ('charge', 'refund', 'expired_hold') ORDER BY id",
                request_id,
            )
        )

    async def wait_rows(self, request_id: str, within: float = HOLD_TTL + 15) -> None:
        deadline = time.monotonic() + within
        while not await self.rows(request_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id} after {within} s")
            await asyncio.sleep(0.05)

    async def sync_now(self) -> None:
        """One sync pass in this process (the sweep included): what is in the streams now
        goes to the ledger, so a worker started later has only the test's events to read."""
        worker = SyncWorker(redis=self.redis, pool=self.pool, keyspace=self.keys, consumer="setup")
        await worker.run_once()

    async def pending(self) -> int:
        """Stream entries read by the sync group but not acknowledged, over all shards."""
        total = 0
        for shard in self.keys.all_shards():
            with suppress(Exception):  # a shard whose stream or group does not exist yet
                total += int((await self.redis.xpending(shard.events, GROUP))["pending"])
        return total

    async def assert_ledger_matches_redis(self, start: int) -> None:
        """Σ tokens of the org's request rows is the balance change; no overage anywhere; one
        row per request; the ledger's snapshot is Redis' balance, and ``creditgate reconcile``
        finds nothing to repair (a repair would hand the expired hold's tokens back)."""
        rows = await self.pool.fetch(
            "SELECT request_id, tokens_deducted, overage FROM ai_token_usage_log"
            " WHERE organization_id = $1 AND kind IN ('charge', 'refund', 'expired_hold')",
            ORG,
        )
        ids = [r["request_id"] for r in rows]
        assert len(ids) == len(set(ids)), ids
        assert sum(r["tokens_deducted"] for r in rows) == start - await self.balance()
        assert sum(r["overage"] for r in rows) == 0
        snapshot = await self.pool.fetchval(
            "SELECT balance + extra FROM ai_tokens WHERE organization_id = $1 AND token_type = $2",
            ORG,
            FEATURE,
        )
        report = await reconcile(self.gate)
        assert report.clean, report.drifts
        assert snapshot == await self.balance()


@asynccontextmanager
async def setup(
    fake: FakeProviders, pg_dsn: str, tmp_path: Path, *, via: str | None = None
) -> AsyncIterator[Setup]:
    """The config (the chat feature charged by usage at reserve :data:`RESERVE`), the org on
    its plan, and its plan_change already in the ledger; cleans the Redis keys up. ``via``:
    the Redis URL the gateway gets (a relay's); everything else uses the tests' Redis."""
    data = provider_config(
        fake.url,
        costs={FEATURE: {"usage": "openai", "reserve": RESERVE, "max": MAX}},
        models=MODELS,
        database_url=pg_dsn,
        shards=SHARDS,
        hold_ttl_seconds=HOLD_TTL,
    )
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump({**data, "redis_url": via} if via else data))
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    s = Setup(data, path, pool)
    try:
        await s.gate.set_plan(ORG, PLAN)
        await s.sync_now()
        yield s
    finally:
        async for key in s.redis.scan_iter(match=f"{s.config.key_prefix}:*", count=1000):
            await s.redis.delete(key)
        await s.gate.close()
        await pool.close()


# -- processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Run ``args`` in a process group of its own (a SIGKILL of the group takes uvicorn's
    worker processes with it); its output goes to a file, never to a pipe nobody reads."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process object
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _SPAWNED.append(proc)
    return proc


async def serve(config: Path, *, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """``creditgate serve --no-sync`` on a free port, once its /healthz answers."""
    port = _free_port()
    cli = [sys.executable, "-m", "gateway.commands.cli"]
    proc = _spawn(
        [*cli, "serve", "--config", str(config), "--port", str(port), "--workers", str(workers),
         "--no-sync", "--log-level", "warning"]
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            with suppress(httpx.HTTPError):
                if (await http.get(url + "/healthz")).status_code == 200:
                    return proc, url
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"creditgate serve did not start (exit {proc.returncode})")
            await asyncio.sleep(0.05)


async def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (uvicorn's supervisor and its workers) and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
    # Workers are the supervisor's children, in its group: none may survive it.
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "a gateway worker outlived the SIGKILL"
        await asyncio.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a sync worker finishes its batch) and wait, at most 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while proc.poll() is None:
        assert time.monotonic() < deadline, "did not stop on SIGTERM"
        await asyncio.sleep(0.02)


def sync_worker(s: Setup, *, crash: str | None = None) -> subprocess.Popen[bytes]:
    """``python -m sync`` on the setup's Redis and ledger (what ``creditgate sync`` runs),
    reclaiming a dead worker's entries after 300 ms idle instead of 30 s."""
    return _spawn(
        [sys.executable, "-m", "sync", "--redis-url", s.config.redis_url,
         "--database-url", str(s.config.database_url), "--prefix", s.config.key_prefix,
         "--shards", str(SHARDS), "--consumer", f"w-{uuid.uuid4().hex[:6]}",
         "--claim-idle-ms", "300", "--variable-features", FEATURE, "--log-level", "WARNING"],
        env={"CREDITGATE_SYNC_CRASH": crash} if crash else {"CREDITGATE_SYNC_CRASH": ""},
    )  # fmt: skip


# -- requests -------------------------------------------------------------------------------


def chat_request(**fake: Any) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The streamed chat completion (path, body, headers); ``fake``: :func:`fake_headers`."""
    path, body = request_for(FEATURE, True)
    return path, body, {**identity_headers(), **fake_headers(USAGE, deltas=4, **fake)}


async def post(url: str, key: str | None = None, **fake: Any) -> httpx.Response:
    """The chat request read to its end; ``key``: its Idempotency-Key."""
    path, body, headers = chat_request(**fake)
    if key:
        headers["Idempotency-Key"] = key
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return await http.post(path, json=body, headers=headers)


async def start_stream(
    http: httpx.AsyncClient, fake: FakeProviders, gate: str, key: str
) -> tuple[httpx.Response, AsyncIterator[bytes], str]:
    """Send the gated stream and read until its first text delta came through; returns the
    open response, the rest of its body (an iterator: a response is read once) and the
    request id creditgate gave the upstream."""
    path, body, headers = chat_request(gate=gate)
    request = http.build_request(
        "POST", path, json=body, headers={**headers, "Idempotency-Key": key}
    )
    response = await http.send(request, stream=True)
    assert response.status_code == 200
    # The hold, not the actual, is what a stream's headers give (contract A8).
    assert response.headers["x-tokens-cost"] == str(RESERVE)
    assert response.headers["x-tokens-cost-status"] == "reserved"
    chunks = response.aiter_raw()
    seen = b""
    async for chunk in chunks:
        seen += chunk
        if b"w0 " in seen:
            break
    assert b"w0 " in seen  # the first delta reached the client
    upstream = fake.only(gate=gate)
    return response, chunks, upstream.headers["x-creditgate-request-id"]


def problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = json.loads(response.content)
    return body


def relayed_url(url: str, port: int) -> str:
    """The Redis ``url`` with its host and port replaced by the relay's (same database)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigkill_mid_stream_expires_into_the_reserve_once(
    fake: FakeProviders, pg_dsn: str, tmp_path: Path, workers: int
) -> None:
    gate, key = f"kill-{uuid.uuid4().hex[:8]}", f"k-{uuid.uuid4().hex}"
    async with setup(fake, pg_dsn, tmp_path) as s:
        start = await s.balance()
        gateway, url = await serve(s.path, workers=workers)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            response, _, rid = await start_stream(http, fake, gate, key)
            assert await s.hold_open(rid)
            assert await s.balance() == start - RESERVE  # held at admission
            await sigkill(gateway)
            with suppress(httpx.HTTPError):  # the connection died with the gateway
                await response.aclose()
        fake.release(gate)

        # The restarted gateway, while the dead one's hold is still open: the key is in
        # flight, and the repeat is neither forwarded nor charged.
        gateway, url = await serve(s.path)
        forwarded = len(fake.requests)
        repeat = await post(url, key)
        assert repeat.status_code == 409
        assert problem(repeat)["code"] == "idempotency_conflict"
        assert repeat.headers["retry-after"] == "1"
        assert "in progress" in problem(repeat)["detail"]
        assert await s.hold_open(rid)
        assert await s.rows(rid) == []  # nothing settled it

        # The sync job (a process of its own, as `creditgate sync`) sweeps the hold once it
        # expired: a charge at the reserve, one row.
        worker = sync_worker(s)
        await s.wait_rows(rid)
        assert not await s.hold_open(rid)
        (row,) = await s.rows(rid)
        assert row["kind"] == "expired_hold"
        assert row["tokens_deducted"] == RESERVE
        assert row["overage"] == 0 and row["upstream_status"] is None
        # Its usage never came: the row says so, as a settle's by on_missing_usage would.
        assert (row["reserved"], row["usage_missing"], row["cost_source"]) == (
            RESERVE, True, "policy",
        )  # fmt: skip
        assert (row["organization_id"], row["feature_used"]) == (ORG, FEATURE)
        assert await s.balance() == start - RESERVE  # the reserve, and nothing more

        # Swept, the key has completed with an unknown outcome: still never a second charge.
        repeat = await post(url, key)
        assert repeat.status_code == 409
        assert problem(repeat)["code"] == "idempotency_conflict"
        assert problem(repeat)["original_status"] == "unknown"
        assert len(fake.requests) == forwarded  # neither repeat reached the provider
        assert await s.balance() == start - RESERVE

        # A fresh request works, and is charged its actual usage once.
        fresh = await post(url, f"k-{uuid.uuid4().hex}")
        assert fresh.status_code == 200 and b"[DONE]" in fresh.content
        fresh_rid = fake.requests[-1].headers["x-creditgate-request-id"]
        await s.wait_rows(fresh_rid)
        (row,) = await s.rows(fresh_rid)
        assert (row["kind"], row["tokens_deducted"], row["reserved"]) == ("charge", ACTUAL, RESERVE)
        assert (row["cost_source"], row["usage_missing"], row["overage"]) == ("usage", False, 0)
        assert await s.balance() == start - RESERVE - ACTUAL
        await stop(worker)
        await stop(gateway)
        assert len(await s.rows(rid)) == 1
        await s.assert_ledger_matches_redis(start)


async def test_sigkill_after_the_stream_before_the_settle_reached_redis(
    fake: FakeProviders, pg_dsn: str, tmp_path: Path
) -> None:
    """The client read the whole answer and its usage, the gateway wrote the settle, but
    Redis never got it: the hold expires into the reserve, not the actual, exactly once."""
    gate, key = f"late-{uuid.uuid4().hex[:8]}", f"k-{uuid.uuid4().hex}"
    direct = urlsplit(redis_url())
    relay = TcpRelay(direct.hostname or "127.0.0.1", direct.port or 6379)
    relay_port = await relay.start()
    try:
        async with setup(fake, pg_dsn, tmp_path, via=relayed_url(redis_url(), relay_port)) as s:
            start = await s.balance()
            gateway, url = await serve(s.path)
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                response, chunks, rid = await start_stream(http, fake, gate, key)
                relay.hold()  # from here on, nothing the gateway sends reaches Redis
                fake.release(gate)
                rest = b"".join([chunk async for chunk in chunks])
                await response.aclose()
            assert b"[DONE]" in rest and b'"usage"' in rest  # the client got it all
            assert fake.only(gate=gate).outcome == "finished"
            # The settle script's EVALSHA is written: the gateway dies before Redis reads it.
            await relay.wait_held(load("settle").sha.encode())
            await sigkill(gateway)
            await relay.close()
            assert await s.hold_open(rid)
            assert await s.balance() == start - RESERVE

            worker = sync_worker(s)
            await s.wait_rows(rid)
            (row,) = await s.rows(rid)
            assert (row["kind"], row["tokens_deducted"], row["overage"]) == (
                "expired_hold", RESERVE, 0,
            )  # fmt: skip
            assert (row["reserved"], row["usage_missing"]) == (RESERVE, True)
            assert await s.balance() == start - RESERVE  # the reserve, not the actual usage
            assert not await s.hold_open(rid)
            await stop(worker)
            assert len(await s.rows(rid)) == 1
            await s.assert_ledger_matches_redis(start)
    finally:
        await relay.close()


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
async def test_sync_worker_sigkilled_with_the_expired_hold_in_flight(
    fake: FakeProviders, pg_dsn: str, tmp_path: Path, point: str
) -> None:
    """The gateway dies mid-stream; the sync worker that sweeps its hold dies too, with the
    expired_hold event read but not acknowledged (before or after its commit); a restarted
    worker claims the event: still exactly one row, and the reserve charged once."""
    gate, key = f"sync-{uuid.uuid4().hex[:8]}", f"k-{uuid.uuid4().hex}"
    async with setup(fake, pg_dsn, tmp_path) as s:
        start = await s.balance()
        gateway, url = await serve(s.path)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            response, _, rid = await start_stream(http, fake, gate, key)
            await sigkill(gateway)
            with suppress(httpx.HTTPError):
                await response.aclose()
        fake.release(gate)

        # The charge's lazy period reset wrote an event: sync it now (the hold has not
        # expired yet), so the sweep's event is the only one, the crashing worker's batch 1.
        await s.sync_now()
        assert await s.hold_open(rid)
        assert await s.pending() == 0
        crashed = sync_worker(s, crash=f"{point}:1")
        deadline = time.monotonic() + HOLD_TTL + 15
        while crashed.poll() is None:
            assert time.monotonic() < deadline, "the worker never wrote the swept hold"
            await asyncio.sleep(0.02)
        assert crashed.returncode == -signal.SIGKILL
        assert not await s.hold_open(rid)  # swept: the hold is gone from Redis for good
        assert await s.pending() == 1  # its event was read, never acknowledged
        assert len(await s.rows(rid)) == (1 if point == "after_commit" else 0)
        assert await s.balance() == start - RESERVE

        survivor = sync_worker(s)
        deadline = time.monotonic() + 15
        while await s.pending() or not await s.rows(rid):
            assert time.monotonic() < deadline, "the restarted worker did not take the event"
            await asyncio.sleep(0.05)
        await stop(survivor)
        (row,) = await s.rows(rid)
        assert (row["kind"], row["tokens_deducted"]) == ("expired_hold", RESERVE)
        assert await s.balance() == start - RESERVE
        await s.assert_ledger_matches_redis(start)
