"""Money semantics of the Lua scripts, driven through Meter/CreditGate on fakeredis (A5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis.crc import key_slot

from gateway.core.events import decode
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.lua_scripts import load

DAY_MS = 86_400_000


async def events(gate: CreditGate, org: str) -> list:
    stream = gate.keys.shard(org).events
    entries = await gate.redis.client.xrange(stream)
    return [decode(fields) for _, fields in entries if decode(fields).org == org]


async def bucket(gate: CreditGate, org: str, name: str) -> int:
    return (await gate.balance(org)).buckets[name].available


async def test_seed_smoke_quest_20_to_17_then_402_then_next_month(
    memgate: CreditGate, clock: FixedClock
) -> None:
    await memgate.set_plan("acme", "pro")
    assert await bucket(memgate, "acme", "goal_generation") == 20
    adm = await memgate.charge("acme", "goal_generation", user="u1")
    assert adm.ok and adm.cost == 3 and adm.remaining == 17
    assert await bucket(memgate, "acme", "goal_generation") == 17
    for _ in range(5):
        assert (await memgate.charge("acme", "goal_generation", user="u1")).ok
    seventh = await memgate.charge("acme", "goal_generation", user="u1")
    assert seventh.status == "insufficient" and seventh.remaining == 2
    clock.advance(20 * DAY_MS)  # into December
    assert await bucket(memgate, "acme", "goal_generation") == 20
    assert (await memgate.charge("acme", "goal_generation")).remaining == 17
    kinds = [e.kind for e in await events(memgate, "acme")]
    assert kinds.count("charge") == 7 and kinds.count("reset") == 2


async def test_starter_gets_not_in_plan(memgate: CreditGate) -> None:
    await memgate.set_plan("tiny", "starter")
    adm = await memgate.charge("tiny", "lead_generation")
    assert adm.status == "not_in_plan" and adm.plan == "starter"
    assert await events(memgate, "tiny") == [
        e for e in await events(memgate, "tiny") if e.kind == "plan_change"
    ]


async def test_unknown_org_starts_on_default_plan(memgate: CreditGate) -> None:
    assert (await memgate.charge("nobody", "goal_generation")).status == "not_in_plan"


async def test_refund_restores_tokens_and_writes_zero_row(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    adm = await memgate.meter.admit("acme", "lead_generation", user="u1", method="POST", route="/x")
    assert adm.ok and await bucket(memgate, "acme", "lead_generation") == 55
    charged = await memgate.meter.settle(adm, ok=False, status=500, latency_ms=12)
    assert charged == 0
    assert await bucket(memgate, "acme", "lead_generation") == 60
    rows = [e for e in await events(memgate, "acme") if e.event_id == adm.request_id]
    assert len(rows) == 1 and rows[0].kind == "refund" and rows[0].tokens == 0
    assert rows[0].upstream_status == 500 and rows[0].latency_ms == 12
    # Settling the same hold again changes nothing and writes nothing.
    assert await memgate.meter.settle(adm, ok=True, status=200, latency_ms=1) == -1
    assert len([e for e in await events(memgate, "acme") if e.event_id == adm.request_id]) == 1


async def test_idempotency_key_charges_once(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    first = await memgate.meter.admit("acme", "goal_generation", idempotency_key="k1")
    assert first.ok
    again = await memgate.meter.admit("acme", "goal_generation", idempotency_key="k1")
    assert again.status == "in_flight"
    await memgate.meter.settle(first, ok=True, status=200, latency_ms=5, idempotency_key="k1")
    replay = await memgate.meter.admit("acme", "goal_generation", idempotency_key="k1")
    assert replay.status == "replay" and replay.replay_status == "200"
    assert await bucket(memgate, "acme", "goal_generation") == 17
    # Another org may use the same key independently.
    await memgate.set_plan("other", "pro")
    assert (await memgate.meter.admit("other", "goal_generation", idempotency_key="k1")).ok


async def test_refunded_idempotency_key_can_retry(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    first = await memgate.meter.admit("acme", "goal_generation", idempotency_key="k2")
    await memgate.meter.settle(first, ok=False, status=502, latency_ms=5, idempotency_key="k2")
    retry = await memgate.meter.admit("acme", "goal_generation", idempotency_key="k2")
    assert retry.ok and retry.remaining == 17


async def test_rate_limit_per_user_then_recovers(memgate: CreditGate, clock: FixedClock) -> None:
    await memgate.set_plan("big", "pro")
    await memgate.grant("big", "general_insights", 1000, reference="r1")
    for i in range(20):
        adm = await memgate.charge("big", "general_insights", user="alice")
        assert adm.ok, i
    assert adm.limit == 20 and adm.limit_remaining == 0
    limited = await memgate.charge("big", "general_insights", user="alice")
    assert limited.status == "rate_limited" and 0 < limited.retry_after_ms <= 3000
    # Another user still has room under the org's 60/minute.
    assert (await memgate.charge("big", "general_insights", user="bob")).ok
    clock.advance(3000)
    assert (await memgate.charge("big", "general_insights", user="alice")).ok


async def test_rate_limited_request_takes_no_tokens(memgate: CreditGate) -> None:
    await memgate.set_plan("big", "pro")
    await memgate.grant("big", "general_insights", 1000, reference="r1")
    for _ in range(21):
        await memgate.charge("big", "general_insights", user="alice")
    assert await bucket(memgate, "big", "general_insights") == 40 + 1000 - 20


async def test_purchased_tokens_spent_after_plan_and_survive_reset(
    memgate: CreditGate, clock: FixedClock
) -> None:
    await memgate.set_plan("acme", "pro")
    await memgate.grant("acme", "goal_generation", 10, reference="topup-1")
    bal = (await memgate.balance("acme")).buckets["goal_generation"]
    assert (bal.balance, bal.extra) == (20, 10)
    for _ in range(7):  # 21 tokens: 20 plan + 1 extra
        assert (await memgate.charge("acme", "goal_generation")).ok
    bal = (await memgate.balance("acme")).buckets["goal_generation"]
    assert (bal.balance, bal.extra) == (0, 9)
    clock.advance(20 * DAY_MS)
    bal = (await memgate.balance("acme")).buckets["goal_generation"]
    assert (bal.balance, bal.extra) == (20, 9)


async def test_grant_is_idempotent_and_expires(memgate: CreditGate, clock: FixedClock) -> None:
    await memgate.set_plan("acme", "pro")
    expiry = datetime.fromtimestamp(clock.now_ms() / 1000, UTC) + timedelta(days=2)
    _, created = await memgate.grant(
        "acme", "lead_generation", 50, reference="p1", expires_at=expiry
    )
    _, again = await memgate.grant("acme", "lead_generation", 50, reference="p1", expires_at=expiry)
    assert created and not again
    assert (await memgate.balance("acme")).buckets["lead_generation"].extra == 50
    clock.advance(3 * DAY_MS)
    assert (await memgate.balance("acme")).buckets["lead_generation"].extra == 0
    await memgate.charge("acme", "lead_generation")  # applies the expiry in Redis
    kinds = [e.kind for e in await events(memgate, "acme")]
    assert kinds.count("grant") == 1 and kinds.count("grant_expired") == 1


async def test_refund_returns_purchased_tokens_to_their_lot(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    await memgate.grant("acme", "goal_generation", 4, reference="t")
    for _ in range(6):
        await memgate.charge("acme", "goal_generation")  # 18 of 20 plan tokens
    adm = await memgate.meter.admit("acme", "goal_generation")  # 2 plan + 1 extra
    bal = (await memgate.balance("acme")).buckets["goal_generation"]
    assert (bal.balance, bal.extra) == (0, 3)
    await memgate.meter.settle(adm, ok=False, status=504, latency_ms=1)
    bal = (await memgate.balance("acme")).buckets["goal_generation"]
    assert (bal.balance, bal.extra) == (2, 4)


async def test_plan_change_moves_balance_by_allocation_difference(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    await memgate.charge("acme", "goal_generation")  # 17 left
    assert await memgate.set_plan("acme", "enterprise") == "pro"
    assert await bucket(memgate, "acme", "goal_generation") == 17 + 300 - 20
    for _ in range(10):
        await memgate.charge("acme", "goal_generation")  # 267 left
    await memgate.set_plan("acme", "pro")
    # 267 - 280 would be negative: clamped at zero.
    assert (await memgate.balance("acme")).buckets["goal_generation"].balance == 0
    changes = [e for e in await events(memgate, "acme") if e.kind == "plan_change"]
    assert {e.plan for e in changes} >= {"pro", "enterprise"}


async def test_missing_state_is_seeded_once(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    key = memgate.keys.org("acme")
    await memgate.redis.client.delete(key)
    seeded = await memgate.meter.seed_state("acme", "pro", 7, [])
    assert seeded
    assert not await memgate.meter.seed_state("acme", "enterprise", 9, [])
    assert (await memgate.redis.client.hget(key, "plan")) in (b"pro", "pro")


async def test_expired_hold_is_swept_into_a_charge(memgate: CreditGate, clock: FixedClock) -> None:
    await memgate.set_plan("acme", "pro")
    adm = await memgate.meter.admit("acme", "goal_generation", idempotency_key="z")
    shard = memgate.keys.shard("acme")
    clock.advance(memgate.config.hold_ttl_seconds * 1000 + 1)
    swept = await memgate.redis.runner.run(
        load("sweep_holds"), [shard.holds, shard.holdexp, shard.events], [clock.now_ms(), 100]
    )
    assert [int(n) for n in swept] == [1, 0]  # swept, of which usage missing (fixed cost)
    rows = [e for e in await events(memgate, "acme") if e.event_id == adm.request_id]
    assert [(r.kind, r.tokens) for r in rows] == [("expired_hold", 3)]
    # The gateway coming back late cannot settle it twice.
    assert await memgate.meter.settle(adm, ok=False, status=500, latency_ms=1) == -1
    assert await bucket(memgate, "acme", "goal_generation") == 17
    # Its Idempotency-Key is no longer "in flight".
    replay = await memgate.meter.admit("acme", "goal_generation", idempotency_key="z")
    assert replay.status == "replay" and replay.replay_status == "unknown"


async def test_event_invariant_sum_of_deductions_equals_balance_drop(memgate: CreditGate) -> None:
    await memgate.set_plan("acme", "pro")
    await memgate.grant("acme", "goal_generation", 5, reference="g")
    for i in range(9):
        adm = await memgate.meter.admit("acme", "goal_generation")
        if adm.ok:
            await memgate.meter.settle(adm, ok=i % 3 != 0, status=200, latency_ms=1)
    await memgate.set_plan("acme", "enterprise")
    evs = [e for e in await events(memgate, "acme") if e.bucket == "goal_generation"]
    final = await bucket(memgate, "acme", "goal_generation")
    assert 0 - sum(e.tokens for e in evs) == final
    seqs = [e.seq for e in evs if e.seq is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_every_key_of_a_request_shares_one_slot() -> None:
    from gateway.core.redis_keys import KeySpace

    ks = KeySpace("cg", 16)
    for org in ("acme", "org-1", "ÜnïcødeOrg", "x" * 200):
        shard = ks.shard(org)
        keys = [
            ks.org(org), shard.holds, shard.holdexp, shard.events,
            ks.idempotency(org, "abc"), ks.no_idempotency(org),
            ks.user_limiter(org, "bob", 20, 60000), shard.dead_letters,
        ]  # fmt: skip
        assert len({key_slot(k.encode()) for k in keys}) == 1


def test_request_ids_are_unique_hex_and_differ_after_fork() -> None:
    import os

    from gateway.metering.meter import new_request_id

    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its prefix must differ from the parent's
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child[:20] != next(iter(ids))[:20]
