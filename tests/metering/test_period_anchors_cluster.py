"""The anchor-mismatch retry on a 3-master Redis Cluster (issue 9, contract A12).

Each gateway process caches every org's period anchor (gateway/metering/charge_args.py)
and builds charge.lua's period argument from it. When another process changes the anchor
(the admin API, a Stripe webhook: ``set_period_anchor`` writes the org's hash field
``pa``), charge.lua sees that the period it was given assumed another anchor, changes
nothing and answers ``anchor``; the process learns the new anchor and charges again in
the org's own period. On a cluster the org's hash, holds and stream share one slot, so
the check and the charge stay one atomic step on the org's node. These tests run two
gates (two processes' worth of caches and connections) on the same cluster and key
prefix, with orgs spread over every master, through the plain, Idempotency-Key and
reservation paths, and many concurrent stale charges: each lands exactly once, in the
new period, after exactly one reset. (tests/metering/test_period_anchors.py proves the
same on one Redis.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.core.periods import FixedClock
from gateway.core.redis_keys import KeySpace
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support.actual_costs import RESEARCH_ALLOCATION, actual_cost_config, events_of
from tests.support.redis_servers import Cluster, free_ports, start_cluster

NY = ZoneInfo("America/New_York")
PERIOD = {"every": "month", "anchor": "subscription", "timezone": "America/New_York"}
COST = 5


def ny(y: int, m: int, d: int, h: int = 0) -> int:
    return int(datetime(y, m, d, h, tzinfo=NY).timestamp() * 1000)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7800, 7839, cluster=True)) as c:
        yield c


@asynccontextmanager
async def two_gates(cluster: Cluster, clock: FixedClock) -> AsyncIterator[tuple[CreditGate, ...]]:
    """Two gates (as two gateway processes) on ``cluster``, one key prefix, no database."""
    config = actual_cost_config(
        redis_url=cluster.url.split(",")[0], key_prefix=f"cgt{uuid.uuid4().hex[:10]}",
        period=PERIOD,
    )  # fmt: skip
    gates = tuple(
        CreditGate(config, clock=clock, redis=connect_redis(cluster.url)) for _ in range(2)
    )
    try:
        yield gates
    finally:
        for g in gates:
            await g.close()


def record_statuses(gate: CreditGate) -> list[str]:
    """Every status charge.lua answers ``gate``'s admissions from now on (the runner's
    replies, seen through a wrapper): proof that the retry path ran."""
    runner, seen = gate.redis.runner, []
    plain, encoded = runner.run, runner.run_encoded

    def status(reply: Any) -> Any:
        if isinstance(reply, list) and reply and isinstance(reply[0], (bytes, str)):
            head = reply[0]
            seen.append(head.decode() if isinstance(head, bytes) else head)
        return reply

    async def run(*args: Any, **kw: Any) -> Any:
        return status(await plain(*args, **kw))

    async def run_encoded(*args: Any, **kw: Any) -> Any:
        return status(await encoded(*args, **kw))

    runner.run, runner.run_encoded = run, run_encoded  # type: ignore[method-assign]
    return seen


def orgs_on_every_master(cluster: Cluster, keys: KeySpace, per_node: int = 2) -> list[str]:
    """Org ids whose state lives on each master (``per_node`` each)."""
    from redis.crc import key_slot

    owners: dict[int, int] = {}
    with cluster.servers[0].client() as client:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            for slot in range(int(start), int(end) + 1):
                owners[slot] = int(master[1])
    found: dict[int, list[str]] = {s.port: [] for s in cluster.servers}
    n = 0
    while any(len(v) < per_node for v in found.values()):
        org = f"org{n}"
        n += 1
        port = owners[key_slot(keys.org(org).encode())]
        if len(found[port]) < per_node:
            found[port].append(org)
    return [o for v in found.values() for o in v]


async def test_a_stale_anchor_is_retried_in_the_orgs_own_period(cluster: Cluster) -> None:
    clock = FixedClock(ny(2027, 1, 31, 12))
    async with two_gates(cluster, clock) as (a, b):
        assert a.redis.cluster and b.redis.cluster
        orgs = orgs_on_every_master(cluster, a.keys)
        for org in orgs:
            await a.set_plan(org, "small")
            # b charges first on calendar periods and caches that (no anchor yet).
            assert (await b.meter.admit(org, "research", cost=COST)).ok
            assert b.meter.admission.args.anchors.get(org, "") == ""
        for org in orgs:  # another process anchors them (the admin API, a webhook)
            assert await a.set_period_anchor(org, 31) == "31:2027-01-31"
        statuses = record_statuses(b)

        for i, org in enumerate(orgs):
            # b's cache is stale: charge.lua answers "anchor", b learns it, charges again.
            if i % 3 == 0:
                adm = await b.meter.admit(org, "research", cost=COST)
            elif i % 3 == 1:
                adm = await b.meter.admit(
                    org, "research", cost=COST, idempotency_key=f"k-{org}",
                    fingerprint="f" * 64,
                )  # fmt: skip
            else:
                r = await b.reserve(org, "research", estimate=COST)
                assert r.reserved == COST and r.remaining == RESEARCH_ALLOCATION - COST
                adm = None
            if adm is not None:
                # The new period's reset gave the allocation back, then one charge.
                assert adm.ok and adm.remaining == RESEARCH_ALLOCATION - COST
                assert adm.refresh_at_ms == ny(2027, 2, 28)  # Feb has no 31st
            assert b.meter.admission.args.anchors[org] == "31:2027-01-31"
            # charge.lua refused the stale period once, then admitted the retry.
            assert statuses[-2:] == ["anchor", "ok"], statuses
            bal = await b.balance(org)
            assert bal.period == "2027-01-31..2027-02-28"
            assert bal.buckets["research"].available == RESEARCH_ALLOCATION - COST
        await b.meter.drain()
        for org in orgs:
            events = await events_of(a, org)
            resets = [e.period for e in events if e.kind == "reset" and e.bucket == "research"]
            assert resets == ["2027-01", "2027-01-31..2027-02-28"]  # one each, never twice


async def test_concurrent_stale_charges_each_land_once(cluster: Cluster) -> None:
    """60 charges of b at once on three orgs (one per master) whose anchor a just changed:
    every one is retried and admitted exactly once; the buckets hold exactly what was
    charged."""
    clock = FixedClock(ny(2027, 1, 31, 12))
    async with two_gates(cluster, clock) as (a, b):
        orgs = orgs_on_every_master(cluster, a.keys, per_node=1)
        first = []
        for org in orgs:
            await a.set_plan(org, "small")
            first.append(await b.meter.admit(org, "research", cost=1))  # caches no anchor
            await a.set_period_anchor(org, 15)
        n_each = 20
        statuses = record_statuses(b)
        admissions = await asyncio.gather(*(
            b.meter.admit(org, "research", cost=1) for org in orgs for _ in range(n_each)
        ))  # fmt: skip
        assert all(adm.ok for adm in admissions)
        # Each org's stale charges were refused by charge.lua before b learned the anchor.
        assert statuses.count("anchor") >= len(orgs) and statuses.count("ok") == len(admissions)
        assert len({adm.request_id for adm in admissions}) == len(admissions)
        for org in orgs:
            assert b.meter.admission.args.anchors[org] == "15:2027-01-31"
            bal = await a.balance(org)
            assert bal.period == "2027-01-31..2027-02-15"
            # The reset at the anchor gave 50 back; then exactly n_each charges of 1.
            assert bal.buckets["research"].available == RESEARCH_ALLOCATION - n_each
        for adm in [*first, *admissions]:
            await b.meter.settle(adm, ok=True, status=200, latency_ms=1)
        await b.meter.drain()
        for org in orgs:
            charges = [e for e in await events_of(a, org) if e.kind == "charge"]
            # Every admission settled into exactly one charge: the first one (of the old
            # period) and the 20 retried ones.
            assert len(charges) == 1 + n_each and sum(e.tokens for e in charges) == 1 + n_each
