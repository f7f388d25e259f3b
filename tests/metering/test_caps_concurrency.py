"""500 concurrent requests by 5 users of one team against team, user and org caps
(contract A10): exactly the requests that fit every level succeed, on one Redis and on a
3-master Redis Cluster; twice: first with every level read in full, then again (after
refunding the first round) with the levels the first round's charges reported cached in
the charge's arguments."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from tests.support.caps import BUCKET, caps_gate, level_used, put
from tests.support.redis_servers import Cluster, free_ports, start_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7440, 7479, cluster=True)) as c:
        yield c


async def _run(kind: str, clock: FixedClock, url: str | None) -> None:
    async with caps_gate(kind, clock, url) as gate:
        await gate.set_plan("acme", "teams")  # 100 tokens, cost 3
        await put(gate, "acme", "team", "red", {BUCKET: 30})
        users = [f"u{i}" for i in range(5)]
        for u in users:
            await put(gate, "acme", "user", u, {BUCKET: 9}, team="red")
        await _round(gate, users)
        # The users admitted in the first round have their levels cached by now.
        assert gate.meter.admission.args._levels
        await _round(gate, users)


async def _round(gate: CreditGate, users: list[str]) -> None:
    """500 concurrent requests, then every admitted one refunded."""
    adms = await asyncio.gather(*(
        gate.meter.admit("acme", BUCKET, user=users[i % 5]) for i in range(500)
    ))  # fmt: skip
    ok = [a for a in adms if a.ok]
    # Users could take 5 * 3 = 15 requests; the team's 30 allows 10.
    assert len(ok) == 10
    per_user = Counter(a.request_id and users[i % 5] for i, a in enumerate(adms) if a.ok)
    assert all(n <= 3 for n in per_user.values())
    refused = Counter(a.level for a in adms if not a.ok)
    assert set(refused) <= {"team", "user"} and sum(refused.values()) == 490
    assert all(a.status == "insufficient" for a in adms if not a.ok)
    assert await level_used(gate, "acme", "team", "red") == 30
    for u in users:
        assert await level_used(gate, "acme", "user", u) == 3 * per_user[u] <= 9
    assert (await gate.balance("acme")).buckets[BUCKET].available == 70
    # Refunding every hold restores every level and the org.
    await asyncio.gather(*(
        gate.meter.settle(a, ok=False, status=500, latency_ms=1) for a in ok
    ))  # fmt: skip
    assert await level_used(gate, "acme", "team", "red") == 0
    assert all([await level_used(gate, "acme", "user", u) == 0 for u in users])
    assert (await gate.balance("acme")).buckets[BUCKET].available == 100


@pytest.mark.requires_redis
async def test_500_concurrent_on_one_redis(clock: FixedClock) -> None:
    await _run("redis", clock, None)


@pytest.mark.requires_redis
async def test_500_concurrent_on_a_cluster(clock: FixedClock, cluster: Cluster) -> None:
    await _run("redis", clock, cluster.url)
