"""Durable settles across a Redis Cluster failover (``settle_wait_replicas``, issue 10).

Two requests are admitted on a replicated cluster (their holds reach the replicas), then
the master's replication is cut exactly (tests/support/redis_failover.py) and each is
refunded: the master acknowledges the refund, the replica never gets it, the master is
killed and the replica promoted with the hold back.

- without the option the refund is lost: the hold is back on the new master (it would
  expire into a charge at its reserve) and the tokens stay taken;
- with ``settle_wait_replicas: 1`` the settle's future still gets the refund at once (the
  caller never waits for replicas), the unconfirmed batch is sent again until the promoted
  replica has it: the hold is gone, the tokens are back, and the stream holds exactly one
  refund event for the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.core.events import unpacked
from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from gateway.redisio.pipelined_cluster import slot_of
from tests.support.redis_failover import ReplicatedCluster, start_replicated_cluster
from tests.support.redis_servers import free_ports
from tests.support.reference import reference_config

pytestmark = pytest.mark.slow

FEATURE, BUCKET, COST, ALLOCATION = "goal_generation", "goal_generation", 3, 20  # pro plan


@pytest.fixture
def cluster() -> Iterator[ReplicatedCluster]:
    with start_replicated_cluster(free_ports(6, 7600, 7799, cluster=True)) as c:
        yield c


def _gate(cluster: ReplicatedCluster, wait_replicas: int) -> CreditGate:
    return CreditGate(
        reference_config(
            redis_url=cluster.url, shards=16, settle_wait_replicas=wait_replicas,
            settle_wait_timeout_ms=50,
        )
    )  # fmt: skip


def _org_on(cluster: ReplicatedCluster, keys: KeySpace, master: Any, taken: set[str]) -> str:
    for i in range(10_000):
        org = f"dur{i}"
        if org not in taken and cluster.node_for_slot(slot_of(keys.of_org(org).state)) is master:
            taken.add(org)
            return org
    raise AssertionError("no org on that master")


async def _refund_across_failover(
    cluster: ReplicatedCluster, gate: CreditGate, master: Any, org: str
) -> tuple[str, float]:
    """Admit two requests, cut replication, refund the first, kill the master; returns the
    refunded request's id and how long its settle future took."""
    await gate.set_plan(org, "pro")
    first = await gate.meter.admit(org, FEATURE, user="u")
    second = await gate.meter.admit(org, FEATURE, user="u")
    assert first.status == second.status == "ok"
    await asyncio.to_thread(cluster.wait_replicated)
    await asyncio.to_thread(cluster.cut_replication, master)
    started = time.monotonic()
    refunded = await gate.meter.settle(first, ok=False, status=500, latency_ms=1)
    answered = time.monotonic() - started
    assert refunded == 0  # the refund's reply: nothing charged
    await asyncio.to_thread(cluster.kill_master, master)
    return first.request_id, answered


async def _state(gate: CreditGate, org: str, request_id: str) -> tuple[bool, int, list[str]]:
    """On the promoted master: is the hold open, the bucket's balance, the request's events."""
    shard = gate.keys.of_org(org).shard
    client: Any = gate.redis.client  # decode_responses: strings
    for _ in range(20):  # redis-py's cluster client fails once on the dead master's socket
        try:
            held = bool(await client.hexists(shard.holds, request_id))
            balance = int(await client.hget(gate.keys.org(org), f"b:{BUCKET}"))
            entries = await client.xrange(shard.events)
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the promoted master did not answer")
    fields = [unpacked(f) for _, f in entries]
    kinds = [str(f["k"]) for f in fields if f.get("id") == request_id]
    return held, balance, kinds


async def test_settles_survive_a_failover_only_with_settle_wait_replicas(
    cluster: ReplicatedCluster,
) -> None:
    keys = KeySpace("cg", 16)
    taken: set[str] = set()
    plain, durable = _gate(cluster, 0), _gate(cluster, 1)
    try:
        # Without the option: the refund dies with the master.
        master = cluster.masters[0]
        org = _org_on(cluster, keys, master, taken)
        request_id, _ = await _refund_across_failover(cluster, plain, master, org)
        await plain.meter.drain()
        held, balance, kinds = await _state(plain, org, request_id)
        assert (held, balance, kinds) == (True, ALLOCATION - 2 * COST, [])

        # With it: the caller gets the refund at once; the resend lands on the new master.
        master = cluster.masters[1]
        org = _org_on(cluster, keys, master, taken)
        request_id, answered = await _refund_across_failover(cluster, durable, master, org)
        assert answered < 1.0, answered  # never waits for the replica (or the failover)
        await asyncio.wait_for(durable.meter.drain(), 30)
        stats = durable.meter.settlement.stats
        assert stats["unconfirmed"] >= 1 and stats["given_up"] == 0, stats
        held, balance, kinds = await _state(durable, org, request_id)
        assert (held, balance, kinds) == (False, ALLOCATION - COST, ["refund"])
    finally:
        await plain.close()
        await durable.close()
