"""Settle batches of several shards flushed together (``FastRedis.run_encoded_many``), on
the tests' real Redis: every hold is charged or refunded exactly once, as when each shard's
batch had a task of its own; a call that fails falls back to the per-shard path with its
retries; a mixed flush (fixed and extended items) settles both. The tests of the calls
themselves run with one call per shard (``multi_shard`` off: a cluster's way); those of
what callers get run both ways (settle.lua's multi-shard form: test_settle_multi_shard.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from gateway.core.errors import RedisUnavailable
from gateway.metering.gate import CreditGate
from gateway.metering.settlement import Actual
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import FastRedis, RedisReplyError

FEATURE = "lead_generation"


@pytest.fixture(params=["multi-shard", "per-shard"])
def gate(request: pytest.FixtureRequest, redisgate: CreditGate) -> CreditGate:
    """``redisgate``, sending a flush's batches in one call, or in one call per shard."""
    redisgate.meter.settlement.multi_shard = request.param == "multi-shard"
    return redisgate


@pytest.fixture
def per_shard(redisgate: CreditGate) -> CreditGate:
    """``redisgate``, sending a flush's batches in one call per shard."""
    redisgate.meter.settlement.multi_shard = False
    return redisgate


def _orgs(gate: CreditGate, shards: int) -> list[str]:
    """Orgs on ``shards`` different shards, two per shard."""
    seen: dict[int, list[str]] = {}
    n = 0
    while len([s for s in seen.values() if len(s) == 2]) < shards:
        org = f"org-{n}"
        n += 1
        got = seen.setdefault(gate.keys.of_org(org).shard.shard, [])
        if len(got) < 2:
            got.append(org)
    return [org for orgs in seen.values() if len(orgs) == 2 for org in orgs]


async def _available(gate: CreditGate, org: str) -> int:
    return (await gate.balance(org)).buckets[FEATURE].available


def _count_calls(runner: Any) -> dict[str, list[int]]:
    """Wraps the runner's two encoded entry points: the number of calls per use."""
    calls: dict[str, list[int]] = {"many": [], "one": []}
    many, one = runner.run_encoded_many, runner.run_encoded

    async def run_encoded_many(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        calls["many"].append(len(batch))
        return await many(script, batch)  # type: ignore[no-any-return]

    async def run_encoded(script: LuaScript, count: int, encoded: bytes) -> Any:
        if script.name == "settle":
            calls["one"].append(1)
        return await one(script, count, encoded)

    runner.run_encoded_many, runner.run_encoded = run_encoded_many, run_encoded
    return calls


async def _admitted(gate: CreditGate, orgs: list[str]) -> tuple[list[Any], dict[str, int]]:
    before = {}
    for org in orgs:
        await gate.set_plan(org, "pro")
        before[org] = await _available(gate, org)
    adms = [await gate.meter.admit(org, FEATURE, user="u1") for org in orgs]
    assert all(a.ok for a in adms)
    return adms, before


async def test_many_shards_settle_in_one_flush(per_shard: CreditGate) -> None:
    runner = per_shard.redis.runner
    assert isinstance(runner, FastRedis)
    calls = _count_calls(runner)
    orgs = _orgs(per_shard, 6)
    adms, before = await _admitted(per_shard, orgs)
    # Every other org refunded; all queued in one tick, as the middleware queues them.
    for k, adm in enumerate(adms):
        per_shard.meter.settle_nowait(adm, ok=k % 2 == 0, status=200 if k % 2 == 0 else 503,
                                      latency_ms=3)  # fmt: skip
    await per_shard.meter.drain()
    assert calls == {"many": [6], "one": []}  # six shards, one task, no per-shard call
    for k, (org, adm) in enumerate(zip(orgs, adms, strict=True)):
        expected = before[org] - adm.cost if k % 2 == 0 else before[org]
        assert await _available(per_shard, org) == expected
    # Every hold is gone: settling again anywhere finds nothing.
    again = [per_shard.meter.settle(adm, ok=True, status=200, latency_ms=1) for adm in adms]
    assert await asyncio.gather(*again) == [-1] * len(adms)


async def test_waiting_settles_of_many_shards_get_their_own_replies(
    gate: CreditGate,
) -> None:
    orgs = _orgs(gate, 4)
    adms, _ = await _admitted(gate, orgs)
    futures = [
        gate.meter.settle(adm, ok=k % 3 != 0, status=200, latency_ms=1)
        for k, adm in enumerate(adms)
    ]
    got = await asyncio.gather(*futures)
    assert got == [0 if k % 3 == 0 else adm.cost for k, adm in enumerate(adms)]


async def test_a_failed_call_falls_back_to_its_own_retried_batch(
    per_shard: CreditGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = per_shard.redis.runner
    assert isinstance(runner, FastRedis)
    real = runner.run_encoded_many

    async def second_call_lost(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        # The second shard's call never reached Redis (its connection dropped).
        replies = await real(script, [batch[0], *batch[2:]])
        return [replies[0], RedisUnavailable("lost"), *replies[1:]]

    monkeypatch.setattr(runner, "run_encoded_many", second_call_lost)
    orgs = _orgs(per_shard, 3)
    adms, before = await _admitted(per_shard, orgs)
    futures = [per_shard.meter.settle(adm, ok=True, status=200, latency_ms=1) for adm in adms]
    assert await asyncio.gather(*futures) == [adm.cost for adm in adms]
    for org, adm in zip(orgs, adms, strict=True):
        assert await _available(per_shard, org) == before[org] - adm.cost


async def test_a_flush_with_extended_items_settles_both_kinds(gate: CreditGate) -> None:
    orgs = _orgs(gate, 3)
    adms, before = await _admitted(gate, orgs)
    fixed = [gate.meter.settle(adm, ok=True, status=200, latency_ms=1) for adm in adms[:4]]
    extended = [
        gate.meter.settle(adm, ok=True, status=200, latency_ms=1, actual=Actual(1))
        for adm in adms[4:]
    ]
    assert await asyncio.gather(*fixed) == [adm.cost for adm in adms[:4]]
    assert [s.charged for s in await asyncio.gather(*extended)] == [1, 1]
    for org in orgs[4:]:
        assert await _available(gate, org) == before[org] - 1


async def test_run_encoded_many_recovers_noscript_and_reports_errors_in_place(
    redisgate: CreditGate,
) -> None:
    runner = redisgate.redis.runner
    assert isinstance(runner, FastRedis)
    tag = uuid.uuid4().hex  # a script this Redis has never seen: NOSCRIPT, then a load
    echo = LuaScript.from_source("echo", f"-- {tag}\nreturn ARGV[1]")
    failing = LuaScript.from_source("failing", f"-- {tag}\nreturn redis.error_reply('ERR no')")
    calls = [(2, b"$1\r\n0\r\n$1\r\nA\r\n"), (2, b"$1\r\n0\r\n$1\r\nB\r\n")]
    assert await runner.run_encoded_many(echo, calls) == ["A", "B"]
    (error,) = await runner.run_encoded_many(failing, calls[:1])
    assert isinstance(error, RedisReplyError) and error.code == "ERR"


async def test_an_error_reply_is_not_sent_again_and_reaches_its_callers(
    per_shard: CreditGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = per_shard.redis.runner
    assert isinstance(runner, FastRedis)
    real = runner.run_encoded_many

    async def second_call_failed(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        # The second shard's script failed (perhaps after some of its writes): a resend
        # could apply them twice, so it must not happen.
        replies = await real(script, [batch[0], *batch[2:]])
        return [replies[0], RedisReplyError("ERR script failed"), *replies[1:]]

    monkeypatch.setattr(runner, "run_encoded_many", second_call_failed)
    calls = _count_calls(runner)
    orgs = _orgs(per_shard, 3)
    adms, _ = await _admitted(per_shard, orgs)
    got = await asyncio.gather(
        *(per_shard.meter.settle(adm, ok=True, status=200, latency_ms=1) for adm in adms),
        return_exceptions=True,
    )
    failed = [g for g in got if isinstance(g, RedisReplyError)]
    assert len(failed) == 2  # both settles of the second shard
    assert [g for g in got if not isinstance(g, BaseException)] == [5, 5, 5, 5]
    assert calls["one"] == []  # nothing resent


async def test_a_single_shards_error_reply_reaches_its_caller(
    gate: CreditGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The per-shard path (one shard in the flush): the caller used to wait forever.
    runner = gate.redis.runner
    real = runner.run_encoded
    sent: list[int] = []

    async def failing(script: LuaScript, count: int, encoded: bytes) -> Any:
        if script.name == "settle":
            sent.append(count)
            raise RedisReplyError("ERR script failed")
        return await real(script, count, encoded)

    monkeypatch.setattr(runner, "run_encoded", failing)
    (org,) = _orgs(gate, 1)[:1]
    adms, _ = await _admitted(gate, [org])
    with pytest.raises(RedisReplyError):
        await asyncio.wait_for(gate.meter.settle(adms[0], ok=True, status=200, latency_ms=1), 5)
    assert len(sent) == 1  # not resent


async def test_a_waiting_settle_among_nowait_ones_gets_its_reply_in_every_flush(
    gate: CreditGate,
) -> None:
    # The replies of a flush are walked only when a settle of it waits: the flag must be
    # set by a waiting settle queued after nowait ones (same flush), and be cleared and set
    # again per flush (a nowait-only flush between two that wait).
    orgs = _orgs(gate, 4)
    adms, before = await _admitted(gate, orgs)
    meter = gate.meter
    for adm in adms[:3]:
        meter.settle_nowait(adm, ok=True, status=200, latency_ms=1)
    first = meter.settle(adms[3], ok=False, status=503, latency_ms=1)  # another shard
    assert await asyncio.wait_for(first, 10) == 0
    await meter.drain()
    for adm in adms[4:6]:
        meter.settle_nowait(adm, ok=True, status=200, latency_ms=1)
    await meter.drain()  # nowait only
    meter.settle_nowait(adms[6], ok=True, status=200, latency_ms=1)
    last = meter.settle(adms[7], ok=True, status=200, latency_ms=1)
    assert await asyncio.wait_for(last, 10) == adms[7].cost
    await meter.drain()
    for k, (org, adm) in enumerate(zip(orgs, adms, strict=True)):
        assert await _available(gate, org) == before[org] - (0 if k == 3 else adm.cost)


async def test_run_encoded_many_on_a_socket_not_yet_connected(redisgate: CreditGate) -> None:
    # The first use of a runner: no live socket, each call waits for the connection (the
    # slow path of Link.request) and still gets its own reply, in order.
    runner = redisgate.redis.runner
    assert isinstance(runner, FastRedis)
    await runner.close()
    echo = LuaScript.from_source("echo", f"-- {uuid.uuid4().hex}\nreturn ARGV[1]")
    calls = [(2, b"$1\r\n0\r\n$1\r\nA\r\n"), (2, b"$1\r\n0\r\n$1\r\nB\r\n")]
    assert await runner.run_encoded_many(echo, calls) == ["A", "B"]
    assert await runner.run_encoded_many(echo, calls[::-1]) == ["B", "A"]
