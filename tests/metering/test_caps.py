"""Team, user and key caps (contract A10) through the meter on fakeredis and real Redis:
checked and charged in charge.lua's one call, refunded and settled with the hold."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gateway.core.events import decode
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Actual
from gateway.metering.refusals import describe_refusal
from tests.support.caps import BUCKET, caps_gate, level_used, put

DAY_MS = 86_400_000


@pytest.fixture(params=["memory", "redis"])
async def gate(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with caps_gate(request.param, clock) as g:
        await g.set_plan("acme", "teams")
        yield g


async def available(gate: CreditGate, org: str = "acme", bucket: str = BUCKET) -> int:
    return (await gate.balance(org)).buckets[bucket].available


async def test_no_levels_charges_as_before_and_holds_no_levels(gate: CreditGate) -> None:
    adm = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_1")
    assert adm.ok and adm.remaining == 97
    raw = await gate.redis.client.hget(gate.keys.shard("acme").holds, adm.request_id)
    hold = json.loads(raw)
    assert "lx" not in hold and "tm" not in hold
    assert "lv" not in {
        (k.decode() if isinstance(k, bytes) else k)
        for k in await gate.redis.client.hkeys(gate.keys.org("acme"))
    }


async def test_user_cap_refuses_with_its_level_and_figures(gate: CreditGate) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 7})
    first = await gate.meter.admit("acme", BUCKET, user="u1")
    second = await gate.meter.admit("acme", BUCKET, user="u1")
    assert first.ok and first.remaining == 4  # the tightest level: 7 - 3
    assert second.ok and second.remaining == 1
    third = await gate.meter.admit("acme", BUCKET, user="u1")
    assert third.status == "insufficient" and third.level == "user"
    assert (third.level_id, third.level_cap, third.level_used) == ("u1", 7, 6)
    assert third.remaining == 1 and third.org_remaining == 94
    refusal = describe_refusal(third)
    assert refusal.status == 402 and refusal.code == "insufficient_tokens"
    assert refusal.facts["level"] == "user" and refusal.facts["cap"] == 7
    assert refusal.facts["used"] == 6 and refusal.facts["remaining"] == 1
    assert refusal.facts["balance"] == 94
    # Another user of the org is not limited by u1's cap.
    assert (await gate.meter.admit("acme", BUCKET, user="u2")).ok
    assert await available(gate) == 91


async def test_team_from_key_beats_request_team_and_user_team(gate: CreditGate) -> None:
    await put(gate, "acme", "team", "red", {BUCKET: 3})
    await put(gate, "acme", "team", "blue", {BUCKET: 6})
    await put(gate, "acme", "key", "key_a", team="red")
    await put(gate, "acme", "user", "u1", team="blue")
    # The key's team (red, cap 3) decides even though the request names blue.
    assert (await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a", team="blue")).ok
    refused = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a", team="blue")
    assert refused.level == "team" and refused.level_id == "red"
    # Without the key: the request's team, then the user's team.
    assert (await gate.meter.admit("acme", BUCKET, user="u9", team="blue")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).level_id == "blue"
    assert await level_used(gate, "acme", "team", "blue") == 6
    # Moving the key to blue applies at once.
    await put(gate, "acme", "key", "key_a", team="blue")
    moved = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    assert moved.level == "team" and moved.level_id == "blue"


async def test_percent_defaults_apply_to_levels_created_before(gate: CreditGate) -> None:
    # A user's team membership made while the org was on a plan without defaults ...
    await put(gate, "acme", "user", "u1", team="red")
    await gate.set_plan("acme", "capped")  # 60% team, 30% user and key of 100
    for _ in range(10):
        assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    refused = await gate.meter.admit("acme", BUCKET, user="u1")
    assert (refused.level, refused.level_cap, refused.level_used) == ("user", 30, 30)
    # A key of its own: 30% as well; the team's 60% is shared.
    for u in ("u2", "u3"):
        await put(gate, "acme", "user", u, team="red")
    got = [await gate.meter.admit("acme", BUCKET, user="u2", key_id="key_k") for _ in range(11)]
    assert [a.ok for a in got].count(True) == 10
    refused = got[-1]
    assert refused.level == "team" and refused.level_cap == 60 and refused.level_used == 60
    # Overrides beat the defaults (a share is of the allocation); the key's 30% still holds.
    await put(gate, "acme", "team", "red", {BUCKET: "90%"})
    await put(gate, "acme", "user", "u2", {BUCKET: 90}, team="red")
    refused = await gate.meter.admit("acme", BUCKET, user="u2", key_id="key_k")
    assert (refused.level, refused.level_cap, refused.level_used) == ("key", 30, 30)
    assert (await gate.meter.admit("acme", BUCKET, user="u3")).ok


async def test_caps_reset_with_the_period(gate: CreditGate, clock: FixedClock) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 6}, team="red")
    await put(gate, "acme", "team", "red", {BUCKET: 9})
    for _ in range(2):
        assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).level == "user"
    clock.advance(20 * DAY_MS)  # into the next month
    assert await level_used(gate, "acme", "user", "u1") == 0
    for _ in range(2):
        assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    assert await level_used(gate, "acme", "user", "u1") == 6
    assert await level_used(gate, "acme", "team", "red") == 6


async def test_refund_and_usage_settles_move_every_level(gate: CreditGate) -> None:
    await put(gate, "acme", "team", "red", {"research": 40})
    await put(gate, "acme", "user", "u1", {"research": 30}, team="red")
    await put(gate, "acme", "key", "key_a", {"research": 25})
    levels = [("team", "red"), ("user", "u1"), ("key", "key_a")]

    async def used() -> list[int]:
        return [await level_used(gate, "acme", lv, i, "research") for lv, i in levels]

    adm = await gate.meter.admit("acme", "research", user="u1", key_id="key_a")  # holds 10
    assert adm.ok and await used() == [10, 10, 10]
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    assert await used() == [0, 0, 0] and await available(gate, bucket="research") == 100
    # Less than the hold gives the rest back to every level.
    adm = await gate.meter.admit("acme", "research", user="u1", key_id="key_a")
    settled = await gate.meter.settle(adm, ok=True, status=200, latency_ms=1, actual=Actual(4))
    assert settled.charged == 4 and await used() == [4, 4, 4]
    # More than the hold: taken as far as the tightest level (key: 25 - 4 - 10 = 11 more)
    # allows; the rest is overage, never over a cap.
    adm = await gate.meter.admit("acme", "research", user="u1", key_id="key_a")
    settled = await gate.meter.settle(adm, ok=True, status=200, latency_ms=1, actual=Actual(30))
    assert (settled.charged, settled.overage) == (21, 9)
    assert await used() == [25, 25, 25]
    assert await available(gate, bucket="research") == 75
    stream = gate.keys.shard("acme").events
    rows = [decode(f) for _, f in await gate.redis.client.xrange(stream)]
    charged = [e for e in rows if e.request_id == adm.request_id]
    assert charged[0].team == "red" and charged[0].overage == 9


async def test_expired_hold_keeps_levels_charged_and_names_the_team(
    gate: CreditGate, clock: FixedClock
) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 9}, team="red")
    adm = await gate.meter.admit("acme", BUCKET, user="u1")
    assert adm.ok
    clock.advance(gate.config.hold_ttl_seconds * 1000 + 1)
    keys = gate.keys.shard("acme")
    from gateway.redisio.lua_scripts import load

    swept = await gate.redis.runner.run(
        load("sweep_holds"), [keys.holds, keys.holdexp, keys.events], [clock.now_ms(), 100]
    )
    assert int(swept[0]) == 1
    assert await level_used(gate, "acme", "user", "u1") == 3
    rows = [decode(f) for _, f in await gate.redis.client.xrange(keys.events)]
    expired = [e for e in rows if e.kind == "expired_hold"]
    assert len(expired) == 1 and expired[0].team == "red"


async def test_org_isolation_of_levels(gate: CreditGate) -> None:
    await gate.set_plan("other", "teams")
    await put(gate, "acme", "team", "red", {BUCKET: 3})
    await put(gate, "acme", "user", "u1", {BUCKET: 3}, team="red")
    # Org "other" with the same ids is not touched by acme's levels.
    for _ in range(3):
        assert (await gate.meter.admit("other", BUCKET, user="u1", team="red")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).level == "team"


async def test_the_hold_lists_caps_compactly_and_old_holds_still_settle(
    gate: CreditGate,
) -> None:
    await put(gate, "acme", "team", "red", {BUCKET: "50%"})
    await put(gate, "acme", "user", "u1", {BUCKET: 30}, team="red")
    await put(gate, "acme", "key", "key_a", {BUCKET: 9})
    holds = gate.keys.shard("acme").holds
    fields = [f"Ln:{BUCKET}:t:red", f"Ln:{BUCKET}:u:u1", f"Ln:{BUCKET}:k:key_a"]
    adm = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    hold = json.loads(await gate.redis.client.hget(holds, adm.request_id))
    assert (hold["tm"], hold["u"]) == ("red", "u1") and "k" not in hold
    # The caps of team, user and key (hexadecimal: 50, 30, 9), and the key.
    assert hold["lx"] == "32 1e 9 key_a"
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    # Only capped levels are named: a key without a cap leaves "-" and no key.
    await put(gate, "acme", "key", "key_b")
    adm = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_b")
    hold = json.loads(await gate.redis.client.hget(holds, adm.request_id))
    assert hold["lx"] == "32 1e -" and "k" not in hold
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    # A hold written when the caps were decimal in lv and the key its own field k is
    # refunded the same.
    adm = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    hold = json.loads(await gate.redis.client.hget(holds, adm.request_id))
    del hold["lx"]
    hold["lv"], hold["k"] = "50 30 9", "key_a"
    await gate.redis.client.hset(holds, adm.request_id, json.dumps(hold))
    assert await level_used(gate, "acme", "key", "key_a") == 3
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    assert await level_used(gate, "acme", "key", "key_a") == 0
    # A hold written before the compact form ([[counter, cap], ...]) is refunded the same.
    adm = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    hold = json.loads(await gate.redis.client.hget(holds, adm.request_id))
    del hold["lx"]
    hold["lv"] = [[fields[0], 50], [fields[1], 30], [fields[2], 9]]
    await gate.redis.client.hset(holds, adm.request_id, json.dumps(hold))
    assert [await level_used(gate, "acme", lv, i) for lv, i in
            (("team", "red"), ("user", "u1"), ("key", "key_a"))] == [3, 3, 3]  # fmt: skip
    assert await gate.meter.settle(adm, ok=False, status=500, latency_ms=1) == 0
    assert [await level_used(gate, "acme", lv, i) for lv, i in
            (("team", "red"), ("user", "u1"), ("key", "key_a"))] == [0, 0, 0]  # fmt: skip
    assert await available(gate) == 100


async def test_an_org_with_levels_is_a_hash_table_and_old_flags_are_upgraded(
    gate: CreditGate, request: pytest.FixtureRequest
) -> None:
    if "memory" in request.node.name:
        pytest.skip("encodings are real Redis's")
    org_key = gate.keys.org("acme")
    client = gate.redis.client

    async def encoding() -> str:
        raw = await client.object("encoding", org_key)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    assert await encoding() == "listpack"  # no levels: small and cheap as before
    await put(gate, "acme", "user", "u1", {BUCKET: 9})
    # Field lookups in a listpack scan every field; an org with levels has many.
    assert await encoding() == "hashtable"
    # Levels written with the old one-byte flag: the first charge with levels upgrades it.
    await client.delete(org_key)
    await gate.set_plan("acme", "teams")  # seeded again, without levels
    await client.hset(org_key, mapping={f"Lc:{BUCKET}:u:u1": "9", "lv": "1"})
    assert await encoding() == "listpack"
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).remaining == 6
    assert await encoding() == "hashtable"
