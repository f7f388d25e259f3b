"""Settling a hold by the call's actual cost (contract A8, issue 8 item 2): lua/settle.lua
charges the actual, refunds what the hold over-reserved, takes what it under-reserved from
what is left, and records what cannot be covered as overage; never below zero, never
twice. On real Redis and on fakeredis (the memory:// store), each the same."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Actual, Settled
from gateway.usage.model import Usage
from tests.support.actual_costs import (
    RESEARCH_ALLOCATION,
    actual_cost_gate,
    bucket_state,
    events_of,
    raw_events_of,
)

DAY_MS = 86_400_000
KINDS = ["memory", "redis"]


@pytest.fixture(params=KINDS)
async def gate(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with actual_cost_gate(request.param, clock) as g:
        await g.set_plan("acme", "pro")
        yield g


async def admit(gate: CreditGate, cost: int | None = None, org: str = "acme"):  # type: ignore[no-untyped-def]
    adm = await gate.meter.admit(org, "research", user="u1", cost=cost, method="POST", route="/r")
    assert adm.ok, adm
    return adm


async def settle(gate: CreditGate, adm, tokens: int, **kw) -> Settled:  # type: ignore[no-untyped-def]
    usage = Usage("openai", "gpt-4o-mini", 120, 30, 40, 8)
    actual = Actual(
        tokens, usage, source=kw.pop("source", "usage"), missing=kw.pop("missing", False)
    )
    return await gate.meter.settle(adm, ok=True, status=200, latency_ms=7, actual=actual, **kw)


async def test_actual_below_the_hold_refunds_the_rest(gate: CreditGate) -> None:
    adm = await admit(gate)  # holds the reserve, 10
    assert (await bucket_state(gate, "acme", "research"))["bal"] == RESEARCH_ALLOCATION - 10
    got = await settle(gate, adm, 4)
    assert got == Settled(charged=4, refunded=6, overage=0, remaining=46, reserved=10)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["used"]) == (46, 4)
    [ev] = [e for e in await events_of(gate, "acme") if e.event_id == adm.request_id]
    assert (ev.kind, ev.tokens, ev.reserved, ev.overage) == ("charge", 4, 10, 0)
    assert (ev.model, ev.input_tokens, ev.cached_input_tokens) == ("gpt-4o-mini", 120, 30)
    assert (ev.output_tokens, ev.reasoning_tokens, ev.cost_source) == (40, 8, "usage")
    assert ev.usage_missing is False and ev.balance_after == 46 and ev.used == 4


async def test_actual_equal_to_the_hold(gate: CreditGate) -> None:
    adm = await admit(gate)
    got = await settle(gate, adm, 10)
    assert got == Settled(10, 0, 0, 40, 10)
    assert (await bucket_state(gate, "acme", "research"))["bal"] == 40


async def test_actual_above_the_hold_with_enough_left(gate: CreditGate) -> None:
    adm = await admit(gate)
    got = await settle(gate, adm, 35)
    assert got == Settled(35, 0, 0, 15, 10)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["used"]) == (15, 35)
    [ev] = [e for e in await events_of(gate, "acme") if e.event_id == adm.request_id]
    assert (ev.tokens, ev.reserved, ev.overage, ev.balance_after) == (35, 10, 0, 15)


async def test_actual_above_the_hold_with_too_little_left_is_overage(gate: CreditGate) -> None:
    first = await admit(gate)  # 10 held, 40 left
    other = await admit(gate, cost=35)  # 5 left
    got = await settle(gate, first, 30)  # 20 more wanted, 5 there
    assert got == Settled(charged=15, refunded=0, overage=15, remaining=0, reserved=10)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"], st["used"]) == (0, 0, 50)
    [ev] = [e for e in await events_of(gate, "acme") if e.event_id == first.request_id]
    assert (ev.tokens, ev.overage, ev.balance_after) == (15, 15, 0)
    # Overage is recorded, not owed: the next request is admitted by the balance as usual
    # (refused here because it is empty, not because of the overage) ...
    assert (await gate.meter.admit("acme", "research")).status == "insufficient"
    # ... and once tokens come back, they are not taken to pay the overage.
    assert await gate.meter.settle(other, ok=False, status=502, latency_ms=1) == 0
    assert (await bucket_state(gate, "acme", "research"))["bal"] == 35
    assert (await admit(gate)).remaining == 25


async def test_an_actual_of_zero_charges_nothing(gate: CreditGate) -> None:
    adm = await admit(gate)
    assert await settle(gate, adm, 0) == Settled(0, 10, 0, 50, 10)
    [ev] = [e for e in await events_of(gate, "acme") if e.event_id == adm.request_id]
    assert (ev.kind, ev.tokens, ev.reserved) == ("charge", 0, 10)


async def test_failed_call_with_an_actual_is_refunded(gate: CreditGate) -> None:
    adm = await admit(gate)
    actual = Actual(25, None, missing=True, source="policy")
    got = await gate.meter.settle(adm, ok=False, status=503, latency_ms=3, actual=actual)
    assert got == Settled(0, 10, 0, 50, 10)
    [ev] = [e for e in await events_of(gate, "acme") if e.event_id == adm.request_id]
    assert (ev.kind, ev.tokens, ev.upstream_status) == ("refund", 0, 503)
    assert (ev.cost_source, ev.usage_missing, ev.model, ev.input_tokens) == (
        "policy",
        True,
        None,
        None,
    )


async def test_a_retried_settle_never_charges_twice(gate: CreditGate) -> None:
    adm = await admit(gate)
    assert (await settle(gate, adm, 30)).charged == 30
    again = await settle(gate, adm, 30)
    assert again.gone and again.charged == 0
    # Also a plain settle of the same hold, and both in one batch.
    assert await gate.meter.settle(adm, ok=True, status=200, latency_ms=1) == -1
    second = await admit(gate)
    both = await asyncio.gather(settle(gate, second, 12), settle(gate, second, 12))
    assert sorted(b.gone for b in both) == [False, True]
    assert (await bucket_state(gate, "acme", "research"))["bal"] == 50 - 30 - 12
    mine = {adm.request_id, second.request_id}
    assert len([e for e in await events_of(gate, "acme") if e.event_id in mine]) == 2


async def test_fixed_cost_events_keep_their_21_fields(gate: CreditGate) -> None:
    adm = await gate.meter.admit("acme", "goal_generation")
    await gate.meter.settle(adm, ok=True, status=200, latency_ms=1)
    var = await admit(gate)
    await settle(gate, var, 3)
    raw = {e["id"]: e for e in await raw_events_of(gate, "acme")}
    assert len(raw[adm.request_id]) == 21
    assert list(raw[var.request_id])[21:] == ["rs", "ov", "mdl", "ui", "uc", "uo", "ur", "cs", "um"]
    assert [raw[var.request_id][k] for k in ("rs", "ov", "cs", "um")] == ["10", "", "usage", ""]


async def test_missing_usage_is_flagged(gate: CreditGate) -> None:
    adm = await admit(gate)
    got = await gate.meter.settle(
        adm, ok=True, status=200, latency_ms=1, actual=Actual(10, None, True, "policy")
    )
    assert got.charged == 10
    raw = {e["id"]: e for e in await raw_events_of(gate, "acme")}[adm.request_id]
    assert (raw["um"], raw["cs"], raw["mdl"], raw["ui"]) == ("1", "policy", "", "")


# --- purchased lots -------------------------------------------------------------------


async def lots_setup(gate: CreditGate, clock: FixedClock) -> None:
    """Plan tokens 5, then lot "soon" (8, expires in 10 days) and "never" (20)."""
    soon = datetime.fromtimestamp(clock.now_ms() / 1000, tz=UTC) + timedelta(days=10)
    await gate.grant("acme", "research", 8, reference="soon", expires_at=soon)
    await gate.grant("acme", "research", 20, reference="never")
    eater = await admit(gate, cost=45)  # plan: 50 -> 5
    await gate.meter.settle(eater, ok=True, status=200, latency_ms=1)


async def test_actual_below_a_hold_that_took_lots_gives_lots_back_first(
    gate: CreditGate, clock: FixedClock
) -> None:
    await lots_setup(gate, clock)
    adm = await admit(gate, cost=15)  # 5 plan, 8 "soon", 2 "never"
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"]) == (0, 18)
    got = await settle(gate, adm, 7)  # pays: 5 plan + 2 "soon"; back: 6 "soon", 2 "never"
    assert got == Settled(7, 8, 0, 26, 15)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"]) == (0, 26)
    assert [(lot[0], lot[2]) for lot in st["lots"]] == [("soon", 6), ("never", 20)]


async def test_actual_above_the_hold_takes_plan_then_lots_soonest_first(
    gate: CreditGate, clock: FixedClock
) -> None:
    await lots_setup(gate, clock)
    adm = await admit(gate, cost=3)  # plan 5 -> 2
    got = await settle(gate, adm, 16)  # 13 more: 2 plan, 8 "soon", 3 "never"
    assert got == Settled(16, 0, 0, 17, 3)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"]) == (0, 17)
    assert [(lot[0], lot[2]) for lot in st["lots"]] == [("never", 17)]
    # And beyond every lot: overage, nothing below zero.
    adm = await admit(gate, cost=2)
    got = await settle(gate, adm, 40)
    assert got == Settled(17, 0, 23, 0, 2)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"], st["lots"]) == (0, 0, [])


async def test_an_expired_lot_is_not_taken_by_the_difference(
    gate: CreditGate, clock: FixedClock
) -> None:
    await lots_setup(gate, clock)
    adm = await admit(gate, cost=5)  # plan 5 -> 0
    clock.advance(11 * DAY_MS)  # November 26: "soon" has expired
    got = await settle(gate, adm, 30)  # 25 more: only "never" (20) may pay
    assert (got.charged, got.overage) == (25, 5)
    st = await bucket_state(gate, "acme", "research")
    assert [(lot[0], lot[2]) for lot in st["lots"]] == [("soon", 8)]  # left to charge.lua
    assert st["extra"] == 8
    # charge.lua drops it with its own grant_expired event, as before.
    assert (await gate.meter.admit("acme", "research", cost=1)).status == "insufficient"
    expired = [e for e in await events_of(gate, "acme") if e.kind == "grant_expired"]
    assert [e.tokens for e in expired] == [8]


# --- across a period reset ------------------------------------------------------------


async def test_refund_across_a_period_reset_gives_back_lots_not_plan_tokens(
    gate: CreditGate, clock: FixedClock
) -> None:
    await gate.grant("acme", "research", 20, reference="never")
    eater = await admit(gate, cost=45)  # plan 50 -> 5
    await gate.meter.settle(eater, ok=True, status=200, latency_ms=1)
    adm = await admit(gate, cost=15)  # 5 plan + 10 lot
    clock.advance(20 * DAY_MS)  # December
    other = await admit(gate, cost=1)  # the lazy reset: plan 50, then 49
    got = await settle(gate, adm, 3)  # pays 3 plan tokens; 2 plan (forfeited) + 10 lot back
    assert got == Settled(3, 12, 0, 49 + 20, 15)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["extra"], st["used"]) == (49, 20, 1)  # December's used untouched
    await gate.meter.settle(other, ok=True, status=200, latency_ms=1)


async def test_difference_across_a_period_reset_comes_from_the_new_period(
    gate: CreditGate, clock: FixedClock
) -> None:
    adm = await admit(gate)  # November: 40 left
    clock.advance(20 * DAY_MS)
    other = await admit(gate, cost=1)  # December: 50 -> 49
    got = await settle(gate, adm, 25)  # 15 more from December's 49
    assert got == Settled(25, 0, 0, 34, 10)
    st = await bucket_state(gate, "acme", "research")
    assert (st["bal"], st["used"], st["period"]) == (34, 16, "2026-12")
    await gate.meter.settle(other, ok=True, status=200, latency_ms=1)


# --- many at once ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis"])
async def test_300_concurrent_admit_and_settle_account_to_the_token(
    kind: str, clock: FixedClock
) -> None:
    rng = random.Random(8)
    async with actual_cost_gate(kind, clock) as gate:
        await gate.set_plan("acme", "small")
        await gate.grant("acme", "research", 30, reference="lot")
        start = RESEARCH_ALLOCATION + 30

        async def one(i: int) -> tuple[int, Settled | None]:
            adm = await gate.meter.admit("acme", "research", cost=rng.randint(1, 12))
            if not adm.ok:
                assert adm.status == "insufficient"
                return 0, None
            await asyncio.sleep(rng.random() / 100)
            tokens = rng.randint(0, 40)
            ok = i % 7 != 0
            got = await gate.meter.settle(
                adm, ok=ok, status=200 if ok else 500, latency_ms=1,
                actual=Actual(tokens, None, source="header"),
            )  # fmt: skip
            return (tokens if ok else 0), got

        results = await asyncio.gather(*(one(i) for i in range(300)))
        settled = [(tokens, got) for tokens, got in results if got is not None]
        assert settled and len(settled) < 300  # the balance ran out on the way
        st = await bucket_state(gate, "acme", "research")
        evs = [e for e in await events_of(gate, "acme") if e.bucket == "research"]
        requests = [e for e in evs if e.kind in ("charge", "refund")]
        assert len(requests) == len(settled)
        # Every token: the events' net deductions plus what is left is where we started...
        assert sum(e.tokens for e in requests) + st["bal"] + st["extra"] == start
        # ... and each actual is its net charge plus its overage.
        assert sum(tokens for tokens, _ in settled) == sum(e.tokens + e.overage for e in requests)
        assert sum(g.overage for _, g in settled) == sum(e.overage for e in requests) > 0
        assert min(st["bal"], st["extra"]) >= 0
        assert all(e.balance_after is None or e.balance_after >= 0 for e in evs)


# --- the item forms: quiet ("a") and full ("C"), one usage value -------------------------


@pytest.mark.parametrize("tokens", [4, 10, 35, 90])
async def test_a_quiet_settle_charges_and_records_as_a_full_one(
    gate: CreditGate, tokens: int
) -> None:
    """settle_nowait's item ("a": the usage value only, an integer reply) does to the
    balance and the stream exactly what settle's ("C") does, on two orgs in the same
    state: below, equal to and above the hold (10), and beyond what is left (overage)."""
    await gate.set_plan("beta", "pro")
    usage = Usage("openai", "gpt-4o-mini", 120, 30, 40, 8)
    full, quiet = await admit(gate), await admit(gate, org="beta")
    got = await gate.meter.settle(
        full, ok=True, status=200, latency_ms=7, actual=Actual(tokens, usage)
    )
    gate.meter.settle_nowait(quiet, ok=True, status=200, latency_ms=7, actual=Actual(tokens, usage))
    await gate.meter.drain()
    states = [await bucket_state(gate, org, "research") for org in ("acme", "beta")]
    assert states[0] == states[1]
    assert states[0]["bal"] == got.remaining == max(0, RESEARCH_ALLOCATION - tokens)
    a = {e["id"]: e for e in await raw_events_of(gate, "acme")}[full.request_id]
    b = {e["id"]: e for e in await raw_events_of(gate, "beta")}[quiet.request_id]
    assert list(a) == list(b)
    same = {"id", "rq", "o", "s"}
    assert {k: v for k, v in a.items() if k not in same} == {
        k: v for k, v in b.items() if k not in same
    }
    assert (a["mdl"], a["ui"], a["uc"], a["uo"], a["ur"], a["cs"], a["um"]) == (
        "gpt-4o-mini", "120", "30", "40", "8", "usage", ""
    )  # fmt: skip
    assert (a["t"], a["ov"]) == (str(got.charged), str(got.overage) if got.overage else "")
    assert got.charged + got.overage == tokens


async def test_the_quiet_item_answers_the_tokens_charged(gate: CreditGate) -> None:
    """The "a" item's reply is one integer (the tokens charged, -1 when the hold is gone),
    not the 5-value array of a "C" item."""
    from gateway.metering.settlement import quiet_extension

    adm = await admit(gate)
    loop = asyncio.get_running_loop()
    first: asyncio.Future[object] = loop.create_future()
    again: asyncio.Future[object] = loop.create_future()
    ext = quiet_extension(Actual(7, None, source="header"))
    gate.meter.settlement.queue(adm, True, 200, 1, None, first, ext)
    gate.meter.settlement.queue(adm, True, 200, 1, None, again, ext)
    assert (await first, await again) == (7, -1)
    with pytest.raises(ValueError, match="quiet_extension"):
        gate.meter.settlement.queue(adm, False, 500, 1, None, None, ext)
    assert (await bucket_state(gate, "acme", "research"))["bal"] == RESEARCH_ALLOCATION - 7


@pytest.mark.parametrize(
    "model",
    ["gpt 4o mini 2024 07 18", "  1 2 3 4  ", "modèle/ünïcode:v1", "tab\there", "a" * 300, ""],
)
async def test_the_model_is_recorded_verbatim_from_the_one_usage_value(
    gate: CreditGate, model: str
) -> None:
    """The model is the usage value's last part and may hold spaces (and anything else a
    library caller puts in a Usage): the event gets it byte for byte, and the counts
    before it stay in their fields."""
    usage = Usage("openai", model or None, 1, 2, 3, 4)
    adm = await admit(gate)
    gate.meter.settle_nowait(adm, ok=True, status=200, latency_ms=1, actual=Actual(5, usage))
    held = await admit(gate)
    got = await gate.meter.settle(held, ok=True, status=200, latency_ms=1, actual=Actual(6, usage))
    assert got.charged == 6
    raw = {e["id"]: e for e in await raw_events_of(gate, "acme")}
    for rid, tokens in ((adm.request_id, "5"), (held.request_id, "6")):
        ev = raw[rid]
        assert (ev["t"], ev["mdl"], ev["ui"], ev["uc"], ev["uo"], ev["ur"]) == (
            tokens, model, "1", "2", "3", "4"
        )  # fmt: skip


async def test_a_malformed_usage_value_settles_nothing(gate: CreditGate) -> None:
    """An extended item whose usage value is not "<actual> <cs> <um> <ui> <uc> <uo> <ur>
    <mdl>" (a gateway bug) leaves its hold alone (-1: it expires into a charge at its
    reserve, as a lost settle), and the batch's other items settle as usual."""
    bad, good = await admit(gate), await admit(gate)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[object]] = [loop.create_future() for _ in range(3)]
    settlement = gate.meter.settlement
    settlement.queue(bad, True, 200, 1, None, futures[0], ("12 usage x 1 2 3 4 m",))
    settlement.queue(bad, True, 200, 1, None, futures[1], ("twelve usage  1 2 3 4 m", "", ""))
    settlement.queue(good, True, 200, 1, None, futures[2], ("3 header      ",))
    assert [await f for f in futures] == [-1, -1, 3]
    assert await gate.redis.client.hexists(gate.keys.shard("acme").holds, bad.request_id)
    ids = {e.event_id for e in await events_of(gate, "acme")}
    assert good.request_id in ids and bad.request_id not in ids
    # The hold is still there to settle properly.
    assert (await settle(gate, bad, 2)).charged == 2


def test_an_actual_is_a_value() -> None:
    usage = Usage("openai", "m", 1, 2, 3, 4)
    a = Actual(5, usage, source="usage")
    assert a == Actual(5, usage) and hash(a) == hash(Actual(5, usage))
    assert a != Actual(5, usage, missing=True) and a != (5, usage, False, "usage")
    assert repr(Actual(3, None, True, "policy")) == (
        "Actual(tokens=3, usage=None, missing=True, source='policy')"
    )
    with pytest.raises(AttributeError):
        a.other = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_event_of_a_batch_has_the_bucket_state_after_it(
    gate: CreditGate, clock: FixedClock, seed: int
) -> None:
    """A refund or an actual other than the hold leaves its bucket's snapshot from what it
    read and wrote instead of reading it again (settle.lua snapshot_after): every event of
    one batch (refunds, actuals below, equal to and above the hold, some taking or giving
    back lots, some overage) still carries the state after it. The holds are all taken
    before the batch, so from one event to the next plan + extra moves by rs - t and used
    by t - rs, from the state before the batch to the state after it."""
    rng = random.Random(seed)
    await lots_setup(gate, clock)
    await gate.grant("acme", "research", 30, reference="more")
    adms = [await admit(gate, cost=rng.randint(1, 6)) for _ in range(12)]
    before = await bucket_state(gate, "acme", "research")
    settles = []
    for i, adm in enumerate(adms):
        tokens = rng.choice([0, adm.cost, adm.cost + rng.randint(1, 9), rng.randint(0, 30)])
        actual = Actual(tokens, Usage("openai", f"m {i}", i, 0, 1, 0))
        ok = rng.random() > 0.2
        settles.append(
            gate.meter.settle(adm, ok=ok, status=200 if ok else 502, latency_ms=1, actual=actual)
        )
    got = await asyncio.gather(*settles)  # one batch: queued in the same iteration
    assert not any(g.gone for g in got)
    after = await bucket_state(gate, "acme", "research")
    mine = {adm.request_id for adm in adms}
    evs = [e for e in await events_of(gate, "acme") if e.event_id in mine]
    assert len(evs) == len(adms)
    total, used = before["bal"] + before["extra"], before["used"]
    for ev in evs:
        assert ev.reserved is not None and ev.balance_after is not None
        total += ev.reserved - ev.tokens
        used += ev.tokens - ev.reserved
        assert (ev.balance_after + (ev.extra_after or 0), ev.used) == (total, used), ev
    assert (total, used) == (after["bal"] + after["extra"], after["used"])
    assert evs[-1].balance_after == after["bal"] and evs[-1].extra_after == after["extra"]
    assert {e.allocated for e in evs} == {RESEARCH_ALLOCATION}
    assert [e.seq for e in evs] == sorted({e.seq for e in evs})
