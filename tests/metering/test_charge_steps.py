"""The fixed-cost charge in three steps (``Admitter.send_plain``, ``admitted``, ``answer``),
as the middleware runs it, answers what ``Admitter.admit`` answers: the same bytes to
Redis, the same Admission on every path (held, refused, an org seeded, a script Redis
forgot), on the pipelined client and on redis-py's runner (fakeredis)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import CreditGate
from gateway.metering.admission import Admission
from gateway.metering.request_ids import new_request_id
from gateway.redisio.pipelined import FastRedis
from tests.support.reference import reference_config

FIELDS = [f for f in Admission.__slots__ if f not in ("request_id", "org")]


@pytest.fixture(params=["pipelined", "redis-py"])
async def gate(
    request: pytest.FixtureRequest, redisgate: CreditGate, memgate: CreditGate
) -> AsyncIterator[CreditGate]:
    chosen = redisgate if request.param == "pipelined" else memgate
    assert (type(chosen.redis.runner) is FastRedis) == (request.param == "pipelined")
    yield chosen


async def steps(
    gate: CreditGate,
    org: str,
    feature: str = "goal_generation",
    *,
    user: str | None = None,
    cost: int | None = None,
    rid: str | None = None,
    method: str = "POST",
    route: str = "/api/v1/goals/{goal_id}/quests",
) -> Admission:
    """What the middleware's fixed-cost path does."""
    adm_ = gate.meter.admission
    rid = rid or new_request_id()
    sent, template, encoded, total, refresh_at, started = adm_.send_plain(
        org, feature, user, cost, rid, method, route, None, None
    )
    reply = await sent
    adm = adm_.admitted(reply, org, feature, rid, total, refresh_at, started)
    if adm is None:
        adm = await adm_.answer(
            reply, org, feature, rid, total, refresh_at, started, template, encoded,
            user=user, cost=cost, method=method, route=route, key_id=None, team=None,
        )  # fmt: skip
    return adm


def fields(adm: Admission) -> dict[str, Any]:
    return {f: getattr(adm, f) for f in FIELDS}


async def test_the_same_bytes_go_to_redis(gate: CreditGate) -> None:
    await gate.set_plan("acme", "enterprise")
    runner: Any = gate.redis.runner
    sent: list[bytes] = []
    name = "send_encoded" if type(runner) is FastRedis else "run_encoded"
    original = getattr(runner, name)

    def watched(script: Any, count: int, encoded: bytes) -> Any:
        sent.append(encoded)
        return original(script, count, encoded)

    setattr(runner, name, watched)
    try:
        await gate.meter.admission.admit(
            "acme", "goal_generation", user="u1", request_id="r" * 32, method="POST",
            route="/api/v1/goals/{goal_id}/quests",
        )  # fmt: skip
        await steps(gate, "acme", user="u1", rid="r" * 32)
    finally:
        setattr(runner, name, original)
    assert len(sent) == 2 and sent[0] == sent[1]


async def test_held_and_refused_alike(gate: CreditGate) -> None:
    """Two orgs on the same plan, one charged by admit and one by the steps, until both
    are refused: every answer the same (held, the balance left, then insufficient)."""
    for org in ("org-a", "org-b"):
        await gate.set_plan(org, "pro")
    answers: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for _ in range(9):
        by_admit = await gate.meter.admission.admit(
            "org-a", "goal_generation", method="POST", route="/api/v1/goals/{goal_id}/quests"
        )
        by_steps = await steps(gate, "org-b")
        answers.append((fields(by_admit), fields(by_steps)))
    assert all(a == b for a, b in answers)
    statuses = [a["status"] for a, _ in answers]
    assert "ok" in statuses and statuses[-1] == "insufficient"


async def test_an_org_without_state_is_seeded_then_charged(gate: CreditGate) -> None:
    by_admit = await gate.meter.admission.admit(
        "new-a", "goal_generation", method="POST", route="/api/v1/goals/{goal_id}/quests"
    )
    by_steps = await steps(gate, "new-b")
    assert fields(by_admit) == fields(by_steps)


async def test_a_script_redis_forgot_is_loaded_and_the_charge_sent_again(
    gate: CreditGate,
) -> None:
    await gate.set_plan("acme", "enterprise")
    first = await steps(gate, "acme")
    await gate.redis.client.script_flush()
    again = await steps(gate, "acme")
    assert first.ok and again.ok
    assert again.remaining == first.remaining - first.cost  # charged once more, not twice


async def test_the_usual_answer_with_and_without_a_limiter(gate: CreditGate) -> None:
    """``admitted`` builds the whole Admission in one call: every field as ``admit``'s,
    with the limiter's three (a rate-limited plan) and without them (a plan without
    limits: charge.lua answers -1)."""
    unlimited = CreditGate(
        reference_config(
            redis_url=f"memory://{uuid.uuid4().hex}",
            plans={"plain": {"allocations": {"goal_generation": 50}}},
            default_plan="plain",
        )
    )
    try:
        for chosen, limited in ((gate, True), (unlimited, False)):
            await chosen.set_plan("org-a", "pro" if limited else "plain")
            await chosen.set_plan("org-b", "pro" if limited else "plain")
            by_admit = await chosen.meter.admission.admit(
                "org-a", "goal_generation", method="POST",
                route="/api/v1/goals/{goal_id}/quests",
            )  # fmt: skip
            by_steps = await steps(chosen, "org-b")
            assert by_steps.status == "ok" and by_steps.remaining is not None
            assert all(hasattr(by_steps, f) for f in Admission.__slots__)  # every slot set
            assert fields(by_admit) == fields(by_steps)
            assert (by_steps.limit is not None) == limited
            assert (by_steps.limit_remaining is not None) == limited
            assert (by_steps.limit_reset_ms is not None) == limited
            assert by_steps.refresh_at_ms > 0
    finally:
        await unlimited.close()
