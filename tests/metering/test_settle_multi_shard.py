"""settle.lua's multi-shard form (one call for every shard's batch of a flush, on a single
Redis), on the tests' real Redis: the same flush settled by a gate that sends it in one call
and by one that sends a call per shard leaves the same balances, holds, idempotency keys
and, byte for byte, the same stream entries, and answers every waiting caller the same; a
group whose settling fails leaves the others settled and its callers told, never resent; a
flush larger than a batch, a lost call and a batch that cannot be encoded by hand are
settled once; a cluster runner and durable settles keep the per-shard calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from gateway.core.errors import RedisUnavailable
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.settlement import Actual, Settlement
from gateway.redisio.connect import connect_redis
from gateway.redisio.lua_scripts import LuaScript, load
from gateway.redisio.pipelined import FastRedis, RedisReplyError
from gateway.usage.model import Usage
from tests.support import services
from tests.support.caps import BUCKET, caps_gate, put
from tests.support.redis_servers import Cluster, free_ports, start_cluster

pytestmark = pytest.mark.requires_redis

RESEARCH = "research"  # header cost: reserve 10, max 500 (tests/support/actual_costs.py)


@pytest.fixture
async def gates(clock: FixedClock) -> AsyncIterator[tuple[CreditGate, CreditGate]]:
    """Two gates on the tests' Redis under their own prefixes and the same clock: the
    first sends a flush's batches in one multi-shard call, the second one call per shard."""
    async with AsyncExitStack() as stack:
        multi = await stack.enter_async_context(caps_gate("redis", clock))
        single = await stack.enter_async_context(caps_gate("redis", clock))
        assert multi.meter.settlement.multi_shard
        single.meter.settlement.multi_shard = False
        yield multi, single


def _orgs_over_shards(gate: CreditGate, count: int) -> list[str]:
    """``count`` orgs, the first ones on distinct shards (as many as there are)."""
    seen: set[int] = set()
    first, rest = [], []
    n = 0
    while len(first) + len(rest) < count:
        org = f"org-{n}"
        n += 1
        shard = gate.keys.of_org(org).shard.shard
        (rest if shard in seen else first).append(org)
        seen.add(shard)
    return (first + rest)[:count]


def _count_calls(gate: CreditGate) -> dict[str, list[int]]:
    """The settle calls ``gate``'s runner sends: ``many`` (calls per ``run_encoded_many``),
    ``one`` (``run_encoded``) and ``packed`` (``run``, hiredis packing)."""
    runner = gate.redis.runner
    assert isinstance(runner, FastRedis)
    calls: dict[str, list[int]] = {"many": [], "one": [], "packed": []}
    many, one, packed = runner.run_encoded_many, runner.run_encoded, runner.run

    async def run_encoded_many(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        calls["many"].append(len(batch))
        return await many(script, batch)

    async def run_encoded(script: LuaScript, count: int, encoded: bytes) -> Any:
        if script.name == "settle":
            calls["one"].append(count)
        return await one(script, count, encoded)

    async def run(script: LuaScript, keys: Any, args: Any) -> Any:
        if script.name == "settle":
            calls["packed"].append(len(keys))
        return await packed(script, keys, args)

    runner.run_encoded_many = run_encoded_many  # type: ignore[method-assign]
    runner.run_encoded = run_encoded  # type: ignore[method-assign]
    runner.run = run  # type: ignore[method-assign]
    return calls


async def _prepare(gate: CreditGate, orgs: list[str]) -> None:
    """Plans, purchased tokens (every third org) and capped levels (every fourth)."""
    for k, org in enumerate(orgs):
        await gate.set_plan(org, "teams")
        if k % 3 == 0:
            await gate.grant(org, BUCKET, 20, reference=f"lot-{org}")
        if k % 4 == 0:
            await put(gate, org, "team", "red", {BUCKET: 40})
            await put(gate, org, "user", "u1", {BUCKET: 20}, team="red")


async def _admit_all(gate: CreditGate, orgs: list[str]) -> dict[str, Any]:
    """Seven requests per org, with the same request ids and idempotency keys on every gate:
    fixed-cost charge and refund, the same with an Idempotency-Key, and three costs read
    after the call (below the reserve, above it, refunded)."""
    adms: dict[str, Any] = {}
    for org in orgs:
        for k in range(7):
            rid = f"rq-{org}-{k}"
            feature = BUCKET if k < 4 else RESEARCH
            idem = f"idem-{org}-{k}" if k in (2, 3) else None
            adm = await gate.meter.admit(
                org, feature, user="u1", request_id=rid, idempotency_key=idem
            )
            assert adm.ok, (org, k, adm)
            adms[rid] = adm
    return adms


def _queue_flush(gate: CreditGate, orgs: list[str], adms: dict[str, Any]) -> list[Any]:
    """Every settle of ``_admit_all``'s requests queued in one tick (one flush); the futures
    of those that wait. The first request of every org is settled twice: the second finds
    its hold gone (-1)."""
    meter, waits = gate.meter, []
    usage = Usage("openai", "gpt-4o-mini", 10, 2, 3, 1)
    for org in orgs:
        a = [adms[f"rq-{org}-{k}"] for k in range(7)]
        meter.settle_nowait(a[0], ok=True, status=200, latency_ms=7)
        meter.settle_nowait(a[1], ok=False, status=503, latency_ms=8)
        waits.append(
            meter.settle(a[2], ok=True, status=201, latency_ms=9, idempotency_key=f"idem-{org}-2")
        )
        waits.append(
            meter.settle(a[3], ok=False, status=500, latency_ms=10, idempotency_key=f"idem-{org}-3")
        )
        meter.settle_nowait(a[4], ok=True, status=200, latency_ms=11, actual=Actual(4, usage))
        waits.append(meter.settle(a[5], ok=True, status=200, latency_ms=12, actual=Actual(37)))
        waits.append(meter.settle(a[6], ok=False, status=502, latency_ms=13, actual=Actual(0)))
        waits.append(meter.settle(a[0], ok=True, status=200, latency_ms=14))  # gone: -1
    return waits


async def _stream_marks(gate: CreditGate) -> list[str]:
    """Each shard stream's last entry id now ("0" when empty)."""
    marks = []
    for shard in gate.keys.all_shards():
        last = await gate.redis.client.xrevrange(shard.events, count=1)
        marks.append(last[0][0] if last else "0")
    return marks


async def _entries_after(gate: CreditGate, marks: list[str]) -> list[list[dict[Any, Any]]]:
    """Per shard, the fields of the stream entries written after ``marks``."""
    out = []
    for shard, mark in zip(gate.keys.all_shards(), marks, strict=True):
        entries = await gate.redis.client.xrange(shard.events, min=f"({mark}")
        out.append([fields for _, fields in entries])
    return out


async def _state(gate: CreditGate, orgs: list[str]) -> dict[str, Any]:
    """Org hashes (without the levels version, a time), holds, hold expiries and the
    idempotency keys' values; the gate's key prefix (in a hold's key) written ``P``."""
    client, state = gate.redis.client, {}
    for org in orgs:
        org_hash = await client.hgetall(gate.keys.org(org))
        state[f"org {org}"] = {k: v for k, v in org_hash.items() if k != "lv"}
        for k in (2, 3):
            state[f"idem {org} {k}"] = await client.get(
                gate.keys.idempotency(org, f"idem-{org}-{k}")
            )
    for shard in gate.keys.all_shards():
        state[f"holds {shard.shard}"] = await client.hgetall(shard.holds)
        state[f"holdexp {shard.shard}"] = await client.zrange(shard.holdexp, 0, -1)
    text = json.dumps(state).replace(f"{gate.config.key_prefix}:", "P:")
    return json.loads(text)  # type: ignore[no-any-return]


def _outcome(result: Any) -> Any:
    """A settled future's result, or its error's code (a RedisReplyError's)."""
    if isinstance(result, RedisReplyError):
        return ("error", result.code)
    if isinstance(result, BaseException):
        return ("error", type(result).__name__)
    return result


async def _flush_replies(gate: CreditGate, orgs: list[str], adms: dict[str, Any]) -> list[Any]:
    """Settle ``_admit_all``'s requests in one flush: what the waiting settles got."""
    waits = _queue_flush(gate, orgs, adms)
    got = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 20)
    await gate.meter.drain()
    return [_outcome(g) for g in got]


async def _settle_flush(
    gate: CreditGate, orgs: list[str], adms: dict[str, Any]
) -> tuple[list[Any], list[list[dict[Any, Any]]]]:
    """``_flush_replies``, and the stream entries the flush wrote, per shard."""
    marks = await _stream_marks(gate)
    replies = await _flush_replies(gate, orgs, adms)
    return replies, await _entries_after(gate, marks)


async def test_one_call_settles_a_flush_as_a_call_per_shard_does(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    multi, single = gates
    orgs = _orgs_over_shards(multi, 24)  # 16 shards, some with two or three orgs
    results = []
    for gate in (multi, single):
        await _prepare(gate, orgs)
        adms = await _admit_all(gate, orgs)
        calls = _count_calls(gate)
        replies, entries = await _settle_flush(gate, orgs, adms)
        results.append((replies, entries, await _state(gate, orgs), calls))
    (m_replies, m_entries, m_state, m_calls), (s_replies, s_entries, s_state, s_calls) = results
    assert m_calls == {"many": [1], "one": [], "packed": []}  # the whole flush: one call
    assert s_calls["many"] == [16] and s_calls["packed"] == []  # a call per shard
    assert m_replies == s_replies
    assert -1 in m_replies and 37 in [getattr(r, "charged", None) for r in m_replies]
    assert m_entries == s_entries  # byte for byte, shard by shard, in order
    assert sum(len(e) for e in m_entries) == 24 * 7  # one event per request, none twice
    assert m_state == s_state
    assert not any(v for k, v in m_state.items() if k.startswith(("holds", "holdexp")))


async def test_a_failing_group_leaves_the_other_shards_settled_and_tells_its_callers(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    multi, single = gates
    orgs = _orgs_over_shards(multi, 16)
    broken_hold, broken_stream = orgs[3], orgs[7]  # two shards whose settling fails
    results = []
    for gate in (multi, single):
        await _prepare(gate, orgs)
        adms = await _admit_all(gate, orgs)
        client = gate.redis.client
        # A hold that is not JSON (a Lua error in the group, after its first item was
        # settled: that part stays written, as with a call of its own) ...
        await client.hset(gate.keys.shard(broken_hold).holds, f"rq-{broken_hold}-3", "{no")
        # ... and a stream that is not a stream (a redis.call error at the first event).
        stream = gate.keys.shard(broken_stream).events
        await client.delete(stream)
        await client.set(stream, "not a stream")
        calls = _count_calls(gate)
        replies = await _flush_replies(gate, orgs, adms)
        await client.delete(stream)
        results.append((replies, await _state(gate, orgs), calls))
    (m_replies, m_state, m_calls), (s_replies, s_state, s_calls) = results
    assert m_calls == {"many": [1], "one": [], "packed": []}  # nothing resent
    assert s_calls["one"] == s_calls["packed"] == []
    assert m_replies == s_replies
    per_org = len(m_replies) // len(orgs)
    for k, org in enumerate(orgs):
        got = m_replies[k * per_org : (k + 1) * per_org]
        if org == broken_hold:
            assert got == [("error", "ERR")] * per_org
        elif org == broken_stream:
            assert got == [("error", "WRONGTYPE")] * per_org
        else:
            assert not [g for g in got if isinstance(g, tuple)]
    assert m_state == s_state
    # The failing groups' holds are still there (their HDEL never ran); no other's is.
    for shard in multi.keys.all_shards():
        held = m_state[f"holds {shard.shard}"]
        if shard.shard in {multi.keys.of_org(o).shard.shard for o in (broken_hold, broken_stream)}:
            assert held
        else:
            assert not held


async def test_a_flush_larger_than_a_batch_goes_in_several_calls(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    multi, _ = gates
    orgs = _orgs_over_shards(multi, 20)
    big = orgs[0]  # 300 settles of one org: two batches of its shard, in two calls
    for org in orgs:
        await multi.set_plan(org, "teams")  # no rate limits
        await multi.grant(org, BUCKET, 1000, reference=f"lot-{org}")
    before = {org: (await multi.balance(org)).buckets[BUCKET].available for org in orgs}
    admitted = []
    for org in orgs:
        for _ in range(300 if org == big else 15):
            adm = await multi.meter.admit(org, BUCKET, user="u1")
            assert adm.ok
            admitted.append(adm)
    calls = _count_calls(multi)
    sent: list[int] = []
    runner = multi.redis.runner
    counting = runner.run_encoded_many

    async def sizes(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        sent.extend(count for count, _ in batch)
        return await counting(script, batch)

    runner.run_encoded_many = sizes  # type: ignore[method-assign]
    for k, adm in enumerate(admitted):
        multi.meter.settle_nowait(adm, ok=k % 5 != 0, status=200, latency_ms=1)
    await multi.meter.drain()
    assert calls["one"] == calls["packed"] == [] and len(calls["many"]) == 1
    # Each call settles at most 256 holds (6 bulk strings per item, ~4-5 more per group).
    assert len(sent) >= 3 and all(count <= 6 * 256 + 5 * 20 for count in sent)
    for org in orgs:
        mine = [k for k, a in enumerate(admitted) if a.org == org]
        charged = sum(admitted[k].cost for k in mine if k % 5 != 0)
        assert (await multi.balance(org)).buckets[BUCKET].available == (before[org] - charged)
    again = [multi.meter.settle(a, ok=True, status=200, latency_ms=1) for a in admitted[:40]]
    assert await asyncio.gather(*again) == [-1] * 40  # every hold settled, once


async def test_a_lost_call_is_settled_shard_by_shard(
    gates: tuple[CreditGate, CreditGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    multi, _ = gates
    runner = multi.redis.runner
    assert isinstance(runner, FastRedis)

    async def lost(script: LuaScript, batch: list[tuple[int, bytes]]) -> list[Any]:
        return [RedisUnavailable("lost") for _ in batch]  # never reached Redis

    orgs = _orgs_over_shards(multi, 6)
    for org in orgs:
        await multi.set_plan(org, "teams")
    adms = [await multi.meter.admit(org, BUCKET, user="u1") for org in orgs]
    calls = _count_calls(multi)
    monkeypatch.setattr(runner, "run_encoded_many", lost)
    got = await asyncio.gather(
        *(multi.meter.settle(a, ok=True, status=200, latency_ms=1) for a in adms)
    )
    assert got == [a.cost for a in adms]
    assert len(calls["one"]) == 6  # the fallback: a call per shard, each retried alone


async def test_a_batch_not_encoded_by_hand_goes_alone(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    multi, _ = gates
    orgs = _orgs_over_shards(multi, 4)
    for org in orgs:
        await multi.set_plan(org, "teams")
    adms = [await multi.meter.admit(org, RESEARCH, user="u1") for org in orgs]
    calls = _count_calls(multi)
    # A model name that is not ASCII: its shard's batch is packed by hiredis.
    model = Usage("openai", "modèle", 1, 0, 1, 0)
    multi.meter.settle_nowait(adms[0], ok=True, status=200, latency_ms=1, actual=Actual(3, model))
    for adm in adms[1:]:
        multi.meter.settle_nowait(adm, ok=True, status=200, latency_ms=1, actual=Actual(2))
    await multi.meter.drain()
    assert calls == {"many": [1], "one": [], "packed": [3 + 2]}
    for org, spent in zip(orgs, (3, 2, 2, 2), strict=True):
        assert (await multi.balance(org)).buckets[RESEARCH].available == 100 - spent


async def test_a_malformed_multi_shard_call_writes_nothing(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    multi, _ = gates
    (org,) = _orgs_over_shards(multi, 1)
    await multi.set_plan(org, "teams")
    adm = await multi.meter.admit(org, BUCKET, user="u1")
    shard = multi.keys.shard(org)
    keys = [shard.holds, shard.holdexp, shard.events, multi.keys.org(org), shard.no_idempotency]
    # The first group is well formed, the second's item count is not a number: the call
    # fails before settling anything.
    args = ["1", "*", "1", adm.request_id, "c", "200", "1", "x"]
    with pytest.raises(RedisReplyError):
        await multi.redis.runner.run(load("settle"), keys, args)
    assert await multi.meter.settle(adm, ok=True, status=200, latency_ms=1) == adm.cost


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7700, 7739, cluster=True)) as c:
        yield c


async def test_a_cluster_runner_keeps_a_call_per_shard(clock: FixedClock, cluster: Cluster) -> None:
    async with caps_gate("redis", clock, cluster.url) as gate:
        assert not gate.meter.settlement.multi_shard
        assert not getattr(gate.redis.runner, "cross_slot", False)
        runner = gate.redis.runner
        sent: list[str] = []
        real: Callable[..., Any] = runner.run_encoded

        async def run_encoded(script: LuaScript, count: int, encoded: bytes) -> Any:
            sent.append(script.name)
            return await real(script, count, encoded)

        orgs = _orgs_over_shards(gate, 6)
        for org in orgs:
            await gate.set_plan(org, "teams")
        adms = [await gate.meter.admit(org, BUCKET, user="u1") for org in orgs]
        runner.run_encoded = run_encoded  # type: ignore[method-assign]
        got = await asyncio.gather(
            *(gate.meter.settle(a, ok=True, status=200, latency_ms=1) for a in adms)
        )
        assert got == [a.cost for a in adms]
        assert sent == ["settle"] * 6


async def test_durable_settles_keep_a_call_per_shard(redisgate: CreditGate) -> None:
    url = services.redis_url()
    durable = Settlement(
        connect_redis(url), redisgate.keys, now_ms=lambda: 0, wait_replicas=1, redis_url=url
    )
    try:
        assert not durable.multi_shard
        plain = Settlement(connect_redis(url), redisgate.keys, now_ms=lambda: 0)
        assert plain.multi_shard
        await plain.redis.close()
    finally:
        await durable.close()
        await durable.redis.close()
