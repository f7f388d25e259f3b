"""Reservations, library side (contract A9, issue 8 item 4): reserve an estimate, settle the
actual or release it; an unsettled one expires into a charge at its reserve (one event);
a repeated settle returns the same result; only the org that made one can touch it. On
fakeredis, the tests' Redis and a 3-master Redis Cluster (ports 7400-7439)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Actual
from gateway.metering.reservations import (
    Reservation,
    ReservationNotFound,
    ReservationRefused,
    SettleResult,
)
from gateway.usage.model import Usage
from tests.support.actual_costs import (
    RESEARCH_ALLOCATION,
    actual_cost_gate,
    bucket_state,
    events_of,
    sweep,
)
from tests.support.redis_servers import Cluster, free_ports, start_cluster

HOLD_MS = 900_000  # hold_ttl_seconds, the default ttl


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7400, 7439, cluster=True)) as c:
        yield c


@pytest.fixture(params=["memory", "redis"])
async def gate(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with actual_cost_gate(request.param, clock) as g:
        await g.set_plan("acme", "pro")
        yield g


async def left(gate: CreditGate, org: str = "acme") -> int:
    return (await gate.balance(org)).buckets["research"].available


async def request_events(gate: CreditGate, org: str = "acme") -> list:  # type: ignore[type-arg]
    kinds = ("charge", "refund", "expired_hold")
    return [e for e in await events_of(gate, org) if e.kind in kinds]


async def test_reserve_then_settle_less_more_and_beyond(
    gate: CreditGate, clock: FixedClock
) -> None:
    r = await gate.reserve("acme", "research", user="u1")
    assert isinstance(r, Reservation) and len(r.id) == 32
    assert (r.feature, r.bucket, r.reserved, r.remaining) == ("research", "research", 10, 40)
    assert r.expires_at_ms == clock.now_ms() + HOLD_MS and not r.replayed
    got = await gate.settle(r, 4)
    assert got == SettleResult(r.id, 10, 4, 6, 0, 46, "settled")
    assert await left(gate) == 46
    r2 = await gate.reserve("acme", "research", estimate=20, ttl_seconds=60)
    assert r2.expires_at_ms == clock.now_ms() + 60_000
    got = await gate.settle(r2.id, 30, org="acme")  # by id: 10 more than reserved
    assert got == SettleResult(r2.id, 20, 30, 0, 0, 16, "settled")
    r3 = await gate.reserve("acme", "research", estimate=6)
    got = await gate.settle(
        r3, Actual(40, Usage("anthropic", "claude-x", 5, 0, 7, 0), source="app")
    )
    assert got == SettleResult(r3.id, 6, 16, 0, 24, 0, "settled")
    evs = await request_events(gate)
    assert [(e.kind, e.tokens, e.reserved, e.overage, e.cost_source) for e in evs] == [
        ("charge", 4, 10, 0, "reservation"),
        ("charge", 30, 20, 0, "reservation"),
        ("charge", 16, 6, 24, "reservation"),
    ]
    assert evs[2].model == "claude-x" and evs[2].output_tokens == 7
    assert evs[0].user == "u1" and evs[0].route == "reservation"


async def test_a_repeated_settle_returns_the_same_result(gate: CreditGate) -> None:
    r = await gate.reserve("acme", "research")
    first = await gate.settle(r, 7)
    assert await gate.settle(r, 7) == first
    assert await gate.settle(r, 99) == first  # another actual changes nothing
    assert await gate.release(r) == first  # nor does a release
    assert await left(gate) == RESEARCH_ALLOCATION - 7
    assert len(await request_events(gate)) == 1


async def test_release_gives_it_all_back(gate: CreditGate) -> None:
    r = await gate.reserve("acme", "research", estimate=25)
    assert await left(gate) == 25
    got = await gate.release(r)
    assert got == SettleResult(r.id, 25, 0, 25, 0, 50, "released")
    assert await gate.release(r) == got and await gate.settle(r, 5) == got
    assert await left(gate) == 50
    [ev] = await request_events(gate)
    assert (ev.kind, ev.tokens, ev.reserved, ev.cost_source) == ("refund", 0, 25, "reservation")


async def test_refused_when_the_reserve_does_not_fit(gate: CreditGate) -> None:
    with pytest.raises(ReservationRefused) as refused:
        await gate.reserve("acme", "research", estimate=51)
    adm = refused.value.admission
    assert (adm.status, adm.remaining, adm.cost) == ("insufficient", 50, 51)
    everything = await gate.reserve("acme", "research", estimate=50, user="u1")
    assert everything.remaining == 0
    with pytest.raises(ReservationRefused) as refused:
        await gate.reserve("acme", "research", estimate=1)
    assert refused.value.admission.status == "insufficient"
    await gate.set_plan("tiny", "starter")
    with pytest.raises(ReservationRefused) as refused:
        await gate.reserve("tiny", "research")
    assert refused.value.admission.status == "not_in_plan"
    with pytest.raises(ValueError):
        await gate.reserve("acme", "research", estimate=0)
    with pytest.raises(ValueError):
        await gate.reserve("acme", "research", ttl_seconds=86_401)
    with pytest.raises(KeyError):
        await gate.reserve("acme", "nope")


async def test_the_estimate_and_the_actual_are_capped_by_the_features_max(
    gate: CreditGate,
) -> None:
    await gate.set_plan("big", "enterprise")
    r = await gate.reserve("big", "research", estimate=700)
    assert r.reserved == 500
    assert (await gate.settle(r, 900)).charged == 500
    fixed = await gate.reserve("acme", "goal_generation")
    assert (
        fixed.reserved == 3
        and (await gate.reserve("acme", "goal_generation", estimate=9)).reserved == 3
    )
    assert (await gate.settle(fixed, 100)).charged == 3


async def test_an_expired_reservation_is_charged_its_reserve_once(
    gate: CreditGate, clock: FixedClock
) -> None:
    r = await gate.reserve("acme", "research", estimate=12, ttl_seconds=30)
    clock.advance(31_000)
    assert await sweep(gate, "acme", clock.now_ms()) == (1, 1)
    [ev] = await request_events(gate)
    assert (ev.kind, ev.tokens, ev.reserved, ev.cost_source) == (
        "expired_hold",
        12,
        12,
        "reservation",
    )
    got = await gate.settle(r, 3)
    assert got == SettleResult(r.id, 12, 12, 0, 0, None, "expired")
    assert await gate.release(r) == got
    assert await left(gate) == RESEARCH_ALLOCATION - 12
    assert len(await request_events(gate)) == 1
    assert await sweep(gate, "acme", clock.now_ms() + HOLD_MS) == (0, 0)


async def test_a_settle_after_the_expiry_but_before_the_sweep_is_the_same_expiry(
    gate: CreditGate, clock: FixedClock
) -> None:
    r = await gate.reserve("acme", "research", estimate=12, ttl_seconds=30)
    clock.advance(30_000)
    got = await gate.settle(r, 3)
    assert (got.outcome, got.charged, got.refunded) == ("expired", 12, 0)
    assert await sweep(gate, "acme", clock.now_ms()) == (0, 0)
    [ev] = await request_events(gate)
    assert (ev.kind, ev.tokens) == ("expired_hold", 12)
    assert await gate.settle(r, 3) == got
    assert await left(gate) == RESEARCH_ALLOCATION - 12


async def test_only_the_org_that_made_it_can_settle_it(gate: CreditGate) -> None:
    shard = gate.keys.shard("acme").shard
    neighbour = next(f"o{i}" for i in range(1000) if gate.keys.shard(f"o{i}").shard == shard)
    stranger = next(f"o{i}" for i in range(1000) if gate.keys.shard(f"o{i}").shard != shard)
    r = await gate.reserve("acme", "research")
    for org in (neighbour, stranger):
        with pytest.raises(ReservationNotFound):
            await gate.settle(r.id, 1, org=org)
        with pytest.raises(ReservationNotFound):
            await gate.release(r.id, org=org)
    assert (await gate.settle(r, 2)).charged == 2  # untouched by the others
    with pytest.raises(ReservationNotFound):  # and its result is not theirs either
        await gate.settle(r.id, 1, org=neighbour)
    for bad in ("0" * 32, "not-an-id", "A" * 32):
        with pytest.raises(ReservationNotFound):
            await gate.settle(bad, 1, org="acme")


async def test_a_requests_hold_is_not_a_reservation(gate: CreditGate) -> None:
    adm = await gate.meter.admit("acme", "research")
    with pytest.raises(ReservationNotFound):
        await gate.settle(adm.request_id, 0, org="acme")
    assert await gate.meter.settle(adm, ok=True, status=200, latency_ms=1) == 10


async def test_an_idempotent_reserve_returns_the_same_reservation(gate: CreditGate) -> None:
    r = await gate.reserve("acme", "research", estimate=8, idempotency_key="job-1")
    again = await gate.reserve("acme", "research", estimate=8, idempotency_key="job-1")
    assert again.replayed and (again.id, again.reserved, again.expires_at_ms, again.remaining) == (
        r.id,
        r.reserved,
        r.expires_at_ms,
        r.remaining,
    )
    with pytest.raises(ReservationRefused) as refused:
        await gate.reserve("acme", "research", estimate=9, idempotency_key="job-1")
    assert refused.value.admission.status == "reused"
    assert await left(gate) == 42  # one hold
    await gate.settle(r, 8)
    after = await gate.reserve("acme", "research", estimate=8, idempotency_key="job-1")
    assert after.replayed and after.id == r.id  # settling does not free the key
    await gate.release(after)  # already settled: the settle's result stands
    assert await left(gate) == 42 and len(await request_events(gate)) == 1


async def test_reservations_on_a_redis_cluster(cluster: Cluster, clock: FixedClock) -> None:
    async with actual_cost_gate("redis", clock, redis_url=cluster.url) as gate:
        assert gate.redis.cluster
        for i in range(16):  # orgs on every shard, hence every master
            org = f"org{i}"
            await gate.set_plan(org, "pro")
            settled = await gate.reserve(org, "research", estimate=5)
            expiring = await gate.reserve(org, "research", estimate=7, ttl_seconds=10)
            released = await gate.reserve(org, "research", estimate=9, idempotency_key="k")
            assert (await gate.settle(settled, 15)).charged == 15
            assert (await gate.release(released)).outcome == "released"
            again = await gate.reserve(org, "research", estimate=9, idempotency_key="k")
            assert again.replayed and again.id == released.id
            clock.advance(10_001)
            assert await sweep(gate, org, clock.now_ms()) == (1, 1)  # writes the result key
            assert (await gate.settle(expiring, 1)).outcome == "expired"
            assert await left(gate, org) == RESEARCH_ALLOCATION - 15 - 7
            st = await bucket_state(gate, org, "research")
            assert (st["bal"], st["used"]) == (28, 22)
