"""Idempotency-Key replay, Redis side and library (contract A9, issue 8 item 5): a repeat of
a completed request gets its stored response back, one with another fingerprint is
``reused`` (422), one while the first is in flight ``in_flight`` (409, Retry-After), a
response too large or streamed cannot be replayed (409); charged once in every case. On
fakeredis, the tests' Redis, and a 3-master Redis Cluster (ports 7400-7439) through both
cluster runners."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.metering.meter import Actual, StoredResponse, request_fingerprint
from gateway.metering.refusals import describe_refusal
from tests.support.actual_costs import actual_cost_gate, bucket_state, events_of
from tests.support.redis_servers import Cluster, free_ports, start_cluster

HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"27"),
    (b"set-cookie", b"session=abc"),
    (b"x-creditgate-request-id", b"r1"),
    (b"x-tokens-cost", b"3"),
    (b"x-custom", b"kept"),
    (b"ratelimit-remaining", b"5"),
]
BODY = b'{"quest":"slay the dragon"}'
FP = request_fingerprint("POST", "/api/v1/goals/g1/quests", BODY)
OTHER_FP = request_fingerprint("POST", "/api/v1/goals/g1/quests", BODY + b" ")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7400, 7439, cluster=True)) as c:
        yield c


@pytest.fixture(params=["memory", "redis"])
async def gate(request: pytest.FixtureRequest, clock: FixedClock) -> AsyncIterator[CreditGate]:
    async with actual_cost_gate(request.param, clock) as g:
        await g.set_plan("acme", "pro")
        yield g


async def admit(gate: CreditGate, key: str = "k1", fp: str | None = FP, org: str = "acme"):  # type: ignore[no-untyped-def]
    return await gate.meter.admit(
        org, "goal_generation", idempotency_key=key, fingerprint=fp, method="POST",
        route="/api/v1/goals/{goal_id}/quests",
    )  # fmt: skip


async def available(gate: CreditGate, org: str = "acme") -> int:
    return (await gate.balance(org)).buckets["goal_generation"].available


async def charges(gate: CreditGate, org: str = "acme") -> list[int]:
    return [e.tokens for e in await events_of(gate, org) if e.kind in ("charge", "refund")]


async def replay_scenario(gate: CreditGate) -> None:
    """The whole story on one gate: in flight, reused, completed, replayed, reused."""
    first = await admit(gate)
    assert first.ok and await available(gate) == 17
    busy = await admit(gate)
    assert busy.status == "in_flight"
    refusal = describe_refusal(busy)
    assert (refusal.status, refusal.code) == (409, "idempotency_conflict")
    assert ("Retry-After", "1") in refusal.headers and refusal.facts["retry_after"] == 1
    assert (await admit(gate, fp=OTHER_FP)).status == "reused"  # 422 even while in flight
    stored = StoredResponse.capture(201, HEADERS, BODY)
    charged = await gate.meter.settle(
        first, ok=True, status=201, latency_ms=4, idempotency_key="k1", response=stored
    )
    assert charged == 3
    again = await admit(gate)
    assert again.status == "replay" and again.replay_status == "201"
    assert again.replay == StoredResponse(
        201,
        ((b"content-type", b"application/json"), (b"x-custom", b"kept")),
        BODY,
    )
    assert again.replay is not None and again.replay.replayable
    reused = await admit(gate, fp=OTHER_FP)
    assert reused.status == "reused"
    refusal = describe_refusal(reused)
    assert (refusal.status, refusal.code) == (422, "idempotency_key_reused")
    # Charged once in all.
    assert await available(gate) == 17 and await charges(gate) == [3]


async def test_replay_in_flight_reused_and_one_charge(gate: CreditGate) -> None:
    await replay_scenario(gate)


async def test_the_key_expires_with_the_idempotency_window(gate: CreditGate) -> None:
    first = await admit(gate)
    key = gate.keys.idempotency("acme", "k1")
    ttl = await gate.redis.client.pttl(key)
    assert 0 < ttl <= gate.config.idempotency_ttl_seconds * 1000
    await gate.meter.settle(first, ok=True, status=200, latency_ms=1, idempotency_key="k1",
                            response=StoredResponse.capture(200, [], b"ok"))  # fmt: skip
    assert 0 < await gate.redis.client.pttl(key) <= ttl  # settling keeps the TTL


@pytest.mark.parametrize("reason", ["too_large", "streamed"])
async def test_a_response_that_cannot_be_replayed_is_409_and_charged_once(
    gate: CreditGate, reason: str
) -> None:
    first = await admit(gate)
    big = b"x" * (gate.meter.max_replay_body + 1)
    stored = (
        StoredResponse.capture(200, HEADERS, big, max_body=gate.meter.max_replay_body)
        if reason == "too_large"
        else StoredResponse.capture(200, HEADERS, b"", streamed=True)
    )
    assert not stored.replayable and stored.unreplayable == reason
    await gate.meter.settle(
        first, ok=True, status=200, latency_ms=1, idempotency_key="k1", response=stored
    )
    again = await admit(gate)
    assert again.status == "replay" and again.replay is None
    assert again.replay_refusal == reason and again.replay_status == "200"
    refusal = describe_refusal(again)
    assert (refusal.status, refusal.code) == (409, "idempotency_conflict")
    assert "cannot be replayed" in refusal.detail and refusal.facts["replayable"] is False
    assert await charges(gate) == [3]


async def test_a_body_of_exactly_the_limit_is_kept(gate: CreditGate) -> None:
    assert gate.meter.max_replay_body == 64 * 1024
    first = await admit(gate)
    body = b"y" * gate.meter.max_replay_body
    stored = StoredResponse.capture(200, [], body, max_body=gate.meter.max_replay_body)
    await gate.meter.settle(
        first, ok=True, status=200, latency_ms=1, idempotency_key="k1", response=stored
    )
    again = await admit(gate)
    assert again.replay is not None and again.replay.body == body


async def test_binary_and_unicode_bodies_come_back_byte_for_byte(gate: CreditGate) -> None:
    for key, body in (("bin", bytes(range(256)) * 3), ("uni", "ключ ✓ 🐉\n".encode())):
        first = await admit(gate, key=key)
        headers = [(b"content-type", b"application/octet-stream"), (b"x-l", "é".encode("latin-1"))]
        await gate.meter.settle(
            first, ok=True, status=200, latency_ms=1, idempotency_key=key,
            response=StoredResponse.capture(200, headers, body),
        )  # fmt: skip
        again = await admit(gate, key=key)
        assert again.replay == StoredResponse(200, tuple(headers), body)


async def test_a_refunded_request_releases_its_key(gate: CreditGate) -> None:
    first = await admit(gate)
    await gate.meter.settle(
        first, ok=False, status=502, latency_ms=1, idempotency_key="k1",
        response=StoredResponse.capture(502, [], b"bad gateway"),
    )  # fmt: skip
    retry = await admit(gate)
    assert retry.ok  # the client's retry runs (and is charged) normally
    await gate.meter.settle(retry, ok=True, status=200, latency_ms=1, idempotency_key="k1")
    assert await charges(gate) == [0, 3] and await available(gate) == 17


async def test_keys_are_per_org_and_legacy_states_are_honoured(gate: CreditGate) -> None:
    await gate.set_plan("globex", "pro")
    first = await admit(gate)
    assert (await admit(gate, org="globex")).ok  # same key, other org
    await gate.meter.settle(first, ok=True, status=200, latency_ms=1, idempotency_key="k1")
    again = await admit(gate)
    assert again.status == "replay" and again.replay_status == "200" and again.replay is None
    assert (await admit(gate, fp=OTHER_FP)).status == "reused"  # fingerprint kept by settle
    # A key written before fingerprints existed matches any request.
    key = gate.keys.idempotency("acme", "old")
    await gate.redis.client.set(key, "d:201", px=60_000)
    old = await admit(gate, key="old", fp=OTHER_FP)
    assert old.status == "replay" and old.replay_status == "201"
    # A request without a fingerprint is not compared.
    assert (await admit(gate, fp=None)).status == "replay"


async def test_replay_of_a_usage_priced_request(gate: CreditGate) -> None:
    first = await gate.meter.admit(
        "acme", "research", idempotency_key="u1", fingerprint=FP, method="POST", route="/r"
    )
    got = await gate.meter.settle(
        first, ok=True, status=200, latency_ms=1, idempotency_key="u1",
        actual=Actual(4, None, source="header"), response=StoredResponse.capture(200, [], b"{}"),
    )  # fmt: skip
    assert (got.charged, got.refunded) == (4, 6)
    again = await gate.meter.admit("acme", "research", idempotency_key="u1", fingerprint=FP)
    assert again.replay == StoredResponse(200, (), b"{}")
    assert (await bucket_state(gate, "acme", "research"))["bal"] == 46


async def test_library_charge_fingerprints_feature_quantity_and_user(gate: CreditGate) -> None:
    first = await gate.charge("acme", "goal_generation", user="u1", idempotency_key="d1")
    assert first.ok
    assert (await gate.charge("acme", "goal_generation", user="u1", idempotency_key="d1")).status \
        == "replay"  # fmt: skip
    for kwargs in ({"user": "u2"}, {"quantity": 2}):
        again = await gate.charge("acme", "goal_generation", idempotency_key="d1", **kwargs)  # type: ignore[arg-type]
        assert again.status == "reused"
    other = await gate.charge("acme", "lead_generation", user="u1", idempotency_key="d1")
    assert other.status == "reused"
    assert await charges(gate) == [3]


@pytest.mark.parametrize("runner", ["fast", "redispy"])
async def test_replay_on_a_redis_cluster(cluster: Cluster, clock: FixedClock, runner: str) -> None:
    async with actual_cost_gate(
        "redis", clock, redis_url=cluster.url, fast=runner == "fast"
    ) as gate:
        assert gate.redis.cluster
        await gate.set_plan("acme", "pro")
        await replay_scenario(gate)
        for i in range(20):  # orgs on every shard, hence on every master
            org = f"org{i}"
            await gate.set_plan(org, "pro")
            first = await admit(gate, org=org)
            await gate.meter.settle(
                first, ok=True, status=200, latency_ms=1, idempotency_key="k1",
                response=StoredResponse.capture(200, [], org.encode()),
            )  # fmt: skip
            again = await admit(gate, org=org)
            assert again.replay is not None and again.replay.body == org.encode()
            assert (await admit(gate, org=org, fp=OTHER_FP)).status == "reused"
            assert await charges(gate, org) == [3]
