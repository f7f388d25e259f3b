"""Gateways and sync workers on a replicated Redis Cluster, and a master failover (issue 10).

One Redis Cluster of 3 masters with one replica each (tests/support/redis_failover.py),
3 ``creditgate serve`` processes (one with ``--workers 2``) and 2 ``creditgate sync``
workers, all real processes on one config and one ledger:

1. Requests for many orgs, spread over every shard and so every master, go round-robin to
   the gateways all at once: each org gets exactly floor(B/c) 200s and the rest 402, its
   balance is B - c * floor(B/c), and every admitted request leaves exactly one ledger row.
2. The replication of one master is cut (exactly: tests/support/redis_failover.py), a few
   orgs on its slots spend through the gateways and the sync workers commit those rows:
   writes the master acknowledged and never replicated. The master is SIGKILLed while
   traffic flows to orgs on every master; its replica is promoted. No request gets a wrong
   answer: every status is 200, 402 or 503; orgs on other masters never see a 503; orgs on
   the dead master's slots get 503 while the slots have no master, then 200; every 200 is
   exactly one ledger row and one charge in Redis.
3. ``creditgate reconcile`` names exactly the orgs that lost writes, each with exactly the
   tokens its lost requests had charged (Redis has them back; the ledger has the rows), and
   exits 3; ``--repair`` sets their balances to the ledger's (exit 0); a new pass is clean.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from gateway.commands.reconcile import reconcile
from gateway.commands.sample_app import app as sample_app
from gateway.config import parse_config
from gateway.core.errors import RedisUnavailable
from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from gateway.redisio.pipelined_cluster import slot_of
from tests.support.pg import requires_postgres
from tests.support.redis_failover import ReplicatedCluster, start_replicated_cluster
from tests.support.redis_servers import RedisServer, free_ports
from tests.support.reference import REFERENCE_YAML
from tests.support.upstream_app import serve_in_thread

pytestmark = [pytest.mark.slow, requires_postgres]

REPO = Path(__file__).resolve().parents[2]
PATH = "/api/v1/goals/g1/quests"  # goal_generation
BUCKET = "goal_generation"
COST = 3
BUDGET = 100  # the plan's allocation: floor(100 / 3) = 33 requests, 1 token left
ADMITTED = BUDGET // COST
SHARDS = 16
LOST_REQUESTS = 5  # per org that loses writes in the failover

_SPAWNED: list[subprocess.Popen[bytes]] = []
_LOGS: list[Path] = []  # the running test's tmp_path


@pytest.fixture(autouse=True)
def _reap(tmp_path: Path) -> Iterator[None]:
    """Kill every process group the test started, whatever happened; their output stays
    in the test's ``tmp_path`` (pytest keeps the last runs' for a look after a failure)."""
    _LOGS[:] = [tmp_path]
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def cluster() -> Iterator[ReplicatedCluster]:
    with start_replicated_cluster(free_ports(6, 7400, 7599, cluster=True)) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    """``creditgate ARGS`` in a process group of its own; output to a file in the test's
    ``tmp_path`` (``serve-N.log``, ``sync-N.log``)."""
    with (_LOGS[0] / f"{args[0]}-{len(_SPAWNED)}.log").open("wb") as log:
        proc = subprocess.Popen(  # the child keeps its own copy of the file
            [sys.executable, "-m", "gateway.commands.cli", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _SPAWNED.append(proc)
    return proc


async def _serve(config: Path, workers: int) -> str:
    port = _free_port()
    proc = _spawn(
        "serve", "--config", str(config), "--port", str(port), "--workers", str(workers),
        "--no-sync", "--log-level", "warning",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            with suppress(httpx.HTTPError):
                if (await http.get(url + "/healthz")).status_code == 200:
                    return url
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"creditgate serve did not start (exit {proc.returncode})")
            await asyncio.sleep(0.05)


async def _cli(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.commands.cli", *args, "--config", str(config),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode()


KEYS = KeySpace("cg", SHARDS)


def _shard(org: str) -> int:
    return KEYS.of_org(org).shard.shard


def _slot(org: str) -> int:
    return slot_of(KEYS.of_org(org).state)


class Traffic:
    """Requests sent round-robin over the gateways; every (org, status) recorded in order."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [
            httpx.AsyncClient(base_url=u, timeout=30, limits=httpx.Limits(max_connections=32))
            for u in urls
        ]
        self._next = itertools.cycle(range(len(urls)))
        self.statuses: dict[str, list[int]] = defaultdict(list)

    async def send(self, org: str) -> int:
        client = self.clients[next(self._next)]
        r = await client.post(PATH, headers={"X-Org-Id": org, "X-User-Id": "u"})
        assert r.status_code in (200, 402, 503), (org, r.status_code, r.text)
        self.statuses[org].append(r.status_code)
        return r.status_code

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


async def _charge_rows(pool: asyncpg.Pool, orgs: list[str]) -> dict[str, int]:
    """Charge rows per org; asserts no request id has two rows."""
    rows = await pool.fetch(
        "SELECT organization_id, request_id FROM ai_token_usage_log"
        " WHERE organization_id = ANY($1::text[]) AND kind IN ('charge', 'refund', 'expired_hold')",
        orgs,
    )
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request has two ledger rows"
    return dict(Counter(r["organization_id"] for r in rows))


async def _wait_rows(pool: asyncpg.Pool, expected: dict[str, int], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while (got := await _charge_rows(pool, list(expected))) != {
        o: n for o, n in expected.items() if n
    }:
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger rows {got} != {expected}")
        await asyncio.sleep(0.1)


async def _balance(gate: CreditGate, org: str) -> int:
    # redis-py's cluster client (no retries: a timed-out command may have run) answers the
    # first command on a connection to the dead master with an error, and reloads its slot
    # map for the next one; a 503 for the caller, never a wrong balance.
    for _ in range(5):
        with suppress(RedisUnavailable):
            return (await gate.balance(org)).buckets[BUCKET].available
        await asyncio.sleep(0.1)
    raise AssertionError(f"no balance for {org}")


async def test_gateways_and_sync_workers_through_a_master_failover(
    cluster: ReplicatedCluster, pg_dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    started = time.monotonic()
    data: dict[str, Any] = yaml.safe_load(REFERENCE_YAML)
    data["plans"]["fo"] = {"allocations": {BUCKET: BUDGET}}
    with serve_in_thread(sample_app) as upstream:
        data.update(
            redis_url=cluster.url, database_url=pg_dsn, upstream=upstream, shards=SHARDS,
            identity={"trusted_headers": True},
        )  # fmt: skip
        path = tmp_path / "creditgate.yaml"
        path.write_text(yaml.safe_dump(data))
        gate = CreditGate(parse_config(yaml.safe_dump(data), str(path)))

        # Orgs on every shard; the victim master is the one serving shard 0's slot.
        by_shard: dict[int, list[str]] = defaultdict(list)
        for i in itertools.count():
            org = f"org{i}"
            if len(by_shard[_shard(org)]) < 4:
                by_shard[_shard(org)].append(org)
            if all(len(by_shard[s]) == 4 for s in range(SHARDS)):
                break
        victim: RedisServer = cluster.node_for_slot(_slot(by_shard[0][0]))
        on_victim = [o for s, os_ in by_shard.items() for o in os_ if cluster.node_for_slot(
            _slot(o)) is victim]  # fmt: skip
        elsewhere = [o for os_ in by_shard.values() for o in os_ if o not in on_victim]
        masters = {cluster.node_for_slot(_slot(o)).port for os_ in by_shard.values() for o in os_}
        assert len(masters) == 3 and len(on_victim) >= 8
        burst = [*on_victim[:4], *elsewhere[:28]]  # phase 1
        lossy = on_victim[4:7]  # phase 2: their writes after the cut are lost
        live_victim, live_elsewhere = on_victim[7:], elsewhere[28:]
        everyone = [*burst, *lossy, *live_victim, *live_elsewhere]
        for org in everyone:
            await gate.set_plan(org, "fo")

        sync_workers = [_spawn("sync", "--config", str(path)) for _ in range(2)]
        urls = await asyncio.gather(_serve(path, 2), _serve(path, 1), _serve(path, 1))
        traffic = Traffic(list(urls))
        try:
            # 1. 40 concurrent requests per org, all orgs at once, over every gateway.
            await asyncio.gather(*(traffic.send(o) for o in burst for _ in range(40)))
            for org in burst:
                assert Counter(traffic.statuses[org]) == {200: ADMITTED, 402: 40 - ADMITTED}
                assert await _balance(gate, org) == BUDGET - COST * ADMITTED
            await _wait_rows(pool, {o: ADMITTED for o in burst})
            phase1 = time.monotonic() - started

            # 2. Writes the victim acknowledges but never replicates, synced to the ledger.
            # The orgs that will lose them are active ones (one request this period before
            # the cut, replicated): Redis holds their bucket for the period.
            for org in lossy:
                assert await traffic.send(org) == 200
            await _wait_rows(pool, {o: 1 for o in lossy})
            await asyncio.to_thread(cluster.wait_replicated)
            await asyncio.to_thread(cluster.cut_replication, victim)
            for org in lossy:
                for _ in range(LOST_REQUESTS):
                    assert await traffic.send(org) == 200
            await _wait_rows(pool, {o: 1 + LOST_REQUESTS for o in lossy})

            # Traffic on the other masters throughout; on the victim's slots from the kill.
            stop = asyncio.Event()
            killed = asyncio.Event()

            async def flow(org: str) -> None:
                while not stop.is_set():
                    if org in live_victim and not killed.is_set():
                        await asyncio.sleep(0.01)
                        continue
                    await traffic.send(org)
                    await asyncio.sleep(0.02)

            flows = [asyncio.create_task(flow(o)) for o in [*live_victim, *live_elsewhere]]
            await asyncio.sleep(0.3)
            victim.kill()
            killed.set()
            kill_at = time.monotonic()
            cluster.servers.remove(victim)
            cluster.dead.append(victim)
            replica = cluster.replica_of(victim)
            deadline = time.monotonic() + 30
            while cluster.role(replica) != "master":
                assert time.monotonic() < deadline, "the replica was not promoted"
                await asyncio.sleep(0.05)
            promoted_after = time.monotonic() - kill_at
            await asyncio.to_thread(cluster.wait_until_consistent)
            # Then every victim org must be served again, by every gateway process.
            deadline = time.monotonic() + 20
            while not all(traffic.statuses[o][-4:] == [200] * 4 for o in live_victim):
                assert time.monotonic() < deadline, dict(traffic.statuses)
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*flows)
            recovered_after = time.monotonic() - kill_at

            # No wrong answers: 503 only on the dead master's slots, then 200 again.
            for org in live_elsewhere:
                assert 503 not in traffic.statuses[org], (org, traffic.statuses[org])
            assert any(503 in traffic.statuses[o] for o in live_victim)
            for org in [*live_victim, *live_elsewhere]:
                codes = Counter(traffic.statuses[org])
                assert codes[200] <= ADMITTED and (not codes[402] or codes[200] == ADMITTED)
                assert await _balance(gate, org) == BUDGET - COST * codes[200], org
            await _wait_rows(pool, {o: traffic.statuses[o].count(200) for o in everyone
                                    if o not in lossy})  # fmt: skip
            for org in lossy:  # Redis forgot them; the ledger kept them
                assert await _balance(gate, org) == BUDGET - COST

            # 3. reconcile reports exactly the lost writes, and --repair restores them.
            report = await reconcile(gate)
            assert set(report.lost_writes) == set(lossy), report.lost_writes
            assert {(d.org, d.bucket, d.tokens) for d in report.drifts} == {
                (o, BUCKET, COST * LOST_REQUESTS) for o in lossy
            }
            assert not report.missing_events and not report.unstable
            code, out = await _cli(path, "reconcile")
            assert code == 3, out
            for org in lossy:
                assert f"drift: {org} {BUCKET}: redis {BUDGET - COST}+0" in out, out
                assert f"({COST * LOST_REQUESTS:+d} tokens)" in out and f"lost writes: {org}" in out
            code, out = await _cli(path, "reconcile", "--repair")
            assert code == 0, out
            assert out.count("repaired: ") == len(lossy), out
            for org in lossy:
                assert await _balance(gate, org) == BUDGET - COST * (1 + LOST_REQUESTS)
            code, out = await _cli(path, "reconcile")
            assert code == 0 and "0 drifted" in out, out
            # The repaired orgs spend on from the ledger's balance, newer than its snapshot.
            assert await traffic.send(lossy[0]) == 200
            await _wait_rows(pool, {lossy[0]: 1 + LOST_REQUESTS + 1})
            assert await _balance(gate, lossy[0]) == BUDGET - COST * (2 + LOST_REQUESTS)
            assert (await reconcile(gate)).clean
        finally:
            await traffic.close()
            await gate.close()
            for proc in sync_workers:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        print(
            f"phase 1 at {phase1:.1f} s; promoted {promoted_after:.2f} s and served again"
            f" {recovered_after:.2f} s after the kill; total {time.monotonic() - started:.1f} s"
        )
