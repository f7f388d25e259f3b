"""Levels cached in charge.lua's argument templates (contract A10, issue 9's CPU target):
a process caches what a full read of its caller's levels resolved, charge.lua uses it only
while the org's levels version and plan are the ones it was resolved for, and anything
else (a change written by any process, a plan change, a reset, an org written before
versions) is read in full in the same call: a stale cache never admits what the current
caps refuse. Also the counters' layout (plain integers of the period in ``Lp:<bucket>``)
and the conversion of an org written with ``<used>@<period>`` counters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.pipelined import FastRedis
from tests.support.caps import BUCKET, caps_gate, level_used, put

DAY_MS = 86_400_000


@pytest.fixture(params=["memory", "redis"])
async def gate(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with caps_gate(request.param, clock) as g:
        await g.set_plan("acme", "teams")
        yield g


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


async def org_fields(gate: CreditGate, org: str = "acme") -> dict[str, str]:
    raw = await gate.redis.client.hgetall(gate.keys.org(org))
    return {_text(k) or "": _text(v) or "" for k, v in raw.items()}


def spy_charges(gate: CreditGate) -> list[tuple[bytes, int]]:
    """Record every encoded charge.lua call (its arguments and the reply's length)."""
    runner = gate.meter.redis.runner
    calls: list[tuple[bytes, int]] = []
    real = runner.run_encoded

    async def run_encoded(script: Any, count: int, encoded: bytes) -> Any:
        reply = await real(script, count, encoded)
        calls.append((encoded, len(reply)))
        return reply

    runner.run_encoded = run_encoded  # type: ignore[method-assign]
    if isinstance(runner, FastRedis):  # the charge awaits send_encoded's reply itself
        send = runner.send_encoded

        async def send_encoded(script: Any, count: int, encoded: bytes) -> Any:
            reply = await send(script, count, encoded)
            calls.append((encoded, len(reply)))
            return reply

        runner.send_encoded = send_encoded  # type: ignore[method-assign]
    return calls


async def test_the_second_charge_uses_the_cached_levels(gate: CreditGate) -> None:
    await put(gate, "acme", "team", "red", {BUCKET: 12})
    await put(gate, "acme", "user", "u1", {BUCKET: 9}, team="red")
    calls = spy_charges(gate)
    first = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    version = (await org_fields(gate))["lv"]
    second = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    assert (first.remaining, second.remaining) == (6, 3)  # the user's cap is the tightest
    # The first read the levels in full and reported them (5 + 5 values); the second
    # sent them with the version and was answered with the plain "ok".
    assert version.startswith("v") and version.encode() not in calls[0][0]
    assert calls[0][1] == 10 and version.encode() in calls[1][0] and calls[1][1] == 5
    third = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    refused = await gate.meter.admit("acme", BUCKET, user="u1", key_id="key_a")
    assert third.ok and third.remaining == 0
    assert (refused.level, refused.level_cap, refused.level_used) == ("user", 9, 9)
    assert [await level_used(gate, "acme", lv, i) for lv, i in
            (("team", "red"), ("user", "u1"))] == [9, 9]  # fmt: skip
    # The counters are hexadecimal integers of the period named once per bucket.
    fields = await org_fields(gate)
    assert fields[f"Ln:{BUCKET}:u:u1"] == "9" and fields[f"Ln:{BUCKET}:t:red"] == "9"
    assert fields[f"Lp:{BUCKET}"] == gate.meter.period(gate.clock.now_ms())[0]


async def test_a_cap_lowered_elsewhere_applies_to_the_next_cached_charge(
    gate: CreditGate,
) -> None:
    # Writing the mirror does not touch this process's templates: exactly what another
    # gateway process sees when an admin change is made through this one.
    await put(gate, "acme", "user", "u1", {BUCKET: 30})
    for _ in range(3):
        assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok  # 9 used, cached
    await put(gate, "acme", "user", "u1", {BUCKET: 10})
    refused = await gate.meter.admit("acme", BUCKET, user="u1")  # 9 + 3 > 10
    assert (refused.level, refused.level_cap, refused.level_used) == ("user", 10, 9)
    await put(gate, "acme", "user", "u1", {BUCKET: 12})
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).remaining == 0


async def test_a_key_moved_elsewhere_is_charged_against_its_new_team_at_once(
    gate: CreditGate,
) -> None:
    await put(gate, "acme", "team", "red", {BUCKET: 30})
    await put(gate, "acme", "team", "blue", {BUCKET: 6})
    await put(gate, "acme", "key", "key_a", team="red")
    for _ in range(3):
        assert (await gate.meter.admit("acme", BUCKET, key_id="key_a")).ok
    await put(gate, "acme", "key", "key_a", team="blue")
    for _ in range(2):
        assert (await gate.meter.admit("acme", BUCKET, key_id="key_a")).ok
    refused = await gate.meter.admit("acme", BUCKET, key_id="key_a")
    assert (refused.level, refused.level_id, refused.level_used) == ("team", "blue", 6)
    assert await level_used(gate, "acme", "team", "red") == 9


async def test_a_plan_change_applies_its_default_caps_to_the_next_cached_charge(
    gate: CreditGate,
) -> None:
    # On "teams" the user has no cap (nor a counter): the cached levels say so. "capped"
    # gives every user 30% of 100; the cache resolved for "teams" (the team's 90 and the
    # org's 88 left would admit 26) must not let u1 past 30 (a plan change writes no
    # version: the plan is checked with it).
    await put(gate, "acme", "team", "red", {BUCKET: 90})
    for _ in range(4):
        assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    await gate.set_plan("acme", "capped")
    admitted = 0
    while (adm := await gate.meter.admit("acme", BUCKET, user="u1")).ok:
        admitted += 1
    assert admitted == 10 and adm.level == "user"
    assert (adm.level_cap, adm.level_used) == (30, 30)


async def test_an_org_written_with_the_old_counters_is_converted_without_losing_them(
    gate: CreditGate, clock: FixedClock
) -> None:
    """An org hash as the layout before versions left it: lv "1" and dots, counters
    "<used>@<period>" of this period and of an older one, no Lp."""
    period = gate.meter.period(clock.now_ms())[0]
    org_key = gate.keys.org("acme")
    await gate.redis.client.hset(
        org_key,
        mapping={
            "lv": "1" + "." * 127,
            "Lm:u:u1": "red",
            "Lm:u:u2": "red",
            f"Lc:{BUCKET}:t:red": "30",
            f"Lc:{BUCKET}:u:u1": "9",
            f"Ln:{BUCKET}:t:red": f"21@{period}",
            f"Ln:{BUCKET}:u:u1": f"6@{period}",
            f"Ln:{BUCKET}:u:u2": "15@2000-01",  # another period: gone
            f"Ln:{BUCKET}:u:gone": f"0@{period}",  # nothing drawn: gone
            "Ln:research:u:u1": f"4@{period}",  # another bucket: untouched
        },
    )
    # The one it still admits is the one every level has room for (u1: 6 + 3 <= 9).
    first = await gate.meter.admit("acme", BUCKET, user="u1")
    assert first.ok and first.remaining == 0
    refused = await gate.meter.admit("acme", BUCKET, user="u1")
    assert (refused.level, refused.level_used) == ("user", 9)
    fields = await org_fields(gate)
    assert fields["lv"].startswith("v") and len(fields["lvp"]) == 128
    assert fields[f"Lp:{BUCKET}"] == period
    assert (fields[f"Ln:{BUCKET}:t:red"], fields[f"Ln:{BUCKET}:u:u1"]) == ("18", "9")  # 24, 9
    assert f"Ln:{BUCKET}:u:u2" not in fields and f"Ln:{BUCKET}:u:gone" not in fields
    assert fields["Ln:research:u:u1"] == f"4@{period}" and "Lp:research" not in fields
    # u2 starts from 0: 6 more fit the team's 30 (24 + 6), then the team refuses.
    assert (await gate.meter.admit("acme", BUCKET, user="u2")).ok
    assert (await gate.meter.admit("acme", BUCKET, user="u2")).ok
    team_refused = await gate.meter.admit("acme", BUCKET, user="u2")
    assert (team_refused.level, team_refused.level_used) == ("team", 30)
    # A hold of the old layout's period is refunded into the converted counter.
    assert await gate.meter.settle(first, ok=False, status=500, latency_ms=1) == 0
    assert await level_used(gate, "acme", "user", "u1") == 6
    # /balance's view reads the converted counter.
    views = await gate.levels.caller("acme", "teams", period, user="u1", key_id=None, team=None)
    user_view = next(v for v in views if v.level == "user")
    assert user_view.buckets[BUCKET].used == 6


async def test_a_counter_written_in_the_old_form_by_an_old_process_still_counts(
    gate: CreditGate,
) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 9})
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok  # full read, 3 used
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok  # cached, 6 used
    period = gate.meter.period(gate.clock.now_ms())[0]
    # A gateway not yet upgraded charges once more and writes the old form.
    await gate.redis.client.hset(gate.keys.org("acme"), f"Ln:{BUCKET}:u:u1", f"9@{period}")
    refused = await gate.meter.admit("acme", BUCKET, user="u1")
    assert (refused.level, refused.level_used) == ("user", 9)


async def test_a_refund_after_the_reset_leaves_the_new_period_alone(
    gate: CreditGate, clock: FixedClock
) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 9})
    old = await gate.meter.admit("acme", BUCKET, user="u1")
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    clock.advance(20 * DAY_MS)  # into the next month
    new = await gate.meter.admit("acme", BUCKET, user="u1")
    assert new.ok and await level_used(gate, "acme", "user", "u1") == 3
    assert await gate.meter.settle(old, ok=False, status=500, latency_ms=1) == 0
    assert await level_used(gate, "acme", "user", "u1") == 3
    hold_raw = await gate.redis.client.hget(gate.keys.shard("acme").holds, new.request_id)
    assert json.loads(hold_raw)["lx"] == "- 9 -"
    assert await gate.meter.settle(new, ok=False, status=500, latency_ms=1) == 0
    assert await level_used(gate, "acme", "user", "u1") == 0


async def test_every_change_writes_a_new_version(gate: CreditGate) -> None:
    await put(gate, "acme", "user", "u1", {BUCKET: 9})
    assert (await gate.meter.admit("acme", BUCKET, user="u1")).ok
    before = (await org_fields(gate))["lv"]
    await put(gate, "acme", "user", "u1", {BUCKET: 6})
    after = (await org_fields(gate))["lv"]
    assert before != after and before.startswith("v") and after.startswith("v")
