"""Meter.admit's pre-encoded charge.lua call reaches Redis as exactly the EVALSHA of
lua/charge.lua's documented KEYS and ARGV, through every script runner (the pipelined
single-node and cluster runners send the encoded bytes, the redis-py runner decodes them),
from a fresh template and from a cached one, and across a period change."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.config import Config
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import RedisPyRunner, ScriptRunner
from gateway.redisio.pipelined import FastRedis
from gateway.redisio.pipelined_cluster import FastRedisCluster
from gateway.redisio.resp import ScriptArg, pack_command
from tests.support.reference import MID_NOVEMBER_MS, reference_config

OK = ["ok", 1, -1, 0, 0]
NOV_END = 1_796_083_200_000  # 2026-12-01T00:00:00Z
DEC_END = 1_798_761_600_000  # 2027-01-01T00:00:00Z
HOLD_MS = 900_000  # the default hold_ttl_seconds, in ms
IDEM_TTL_MS = 86_400_000  # the default idempotency_ttl_seconds, in ms

# ARGV[16..] of the reference config, written out from lua/charge.lua's header: plans in
# config order (reference_config sorts them), allocation -1 when not in the plan, default
# caps ("" = none: the reference plans have none), limiter triples (KEYS index, count,
# period ms): KEYS index 0 for per-org limiters, 6 for pro's
# per-user one.
LEAD_WITH_USER = (
    "3", "enterprise", "500", "", "1", "0", "600", "60000",
    "pro", "60", "", "2", "0", "60", "60000", "6", "20", "60000",
    "starter", "-1", "", "0",
)  # fmt: skip
LEAD_WITHOUT_USER = (
    "3", "enterprise", "500", "", "1", "0", "600", "60000",
    "pro", "60", "", "1", "0", "60", "60000",
    "starter", "-1", "", "0",
)  # fmt: skip


class _Link:
    """Stands in for a pipelined connection: records what is sent, answers OK."""

    def __init__(self, sent: list[bytes]) -> None:
        self.sent = sent
        self._proto = None
        self.name = "recorder"

    async def _request_slow(self, command: bytes) -> Any:
        self.sent.append(command)
        return OK

    async def request(self, command: bytes) -> Any:
        return await self._request_slow(command)


def fast_redis(sent: list[bytes]) -> ScriptRunner:
    runner = FastRedis()
    runner.links = [_Link(sent)]  # type: ignore[list-item]
    return runner


def fast_cluster(sent: list[bytes]) -> ScriptRunner:
    runner = FastRedisCluster([("127.0.0.1", 1)])
    runner._slots = [_Link(sent)] * len(runner._slots)  # type: ignore[list-item]
    return runner


def redis_py(sent: list[bytes]) -> ScriptRunner:
    class Client:
        async def evalsha(self, sha: str, numkeys: int, *keys_and_args: ScriptArg) -> Any:
            sent.append(pack_command(("EVALSHA", sha, numkeys, *keys_and_args)))
            return OK

    return RedisPyRunner(Client(), close_client=False)  # type: ignore[arg-type]


def expected(
    gate: CreditGate,
    *,
    now: int,
    period: str,
    refresh_at: int,
    org: str,
    feature: str,
    cost: int,
    request_id: str,
    user: str | None = None,
    idempotency_key: str | None = None,
    method: str = "",
    route: str = "",
) -> bytes:
    """charge.lua's EVALSHA, spelled out from its header comment."""
    ks, shard = gate.keys, gate.keys.shard(org)
    keys: list[str] = [
        ks.org(org), shard.holds, shard.holdexp, shard.events,
        ks.idempotency(org, idempotency_key) if idempotency_key else shard.no_idempotency,
    ]  # fmt: skip
    if user:
        keys.append(ks.user_limiter(org, user, 20, 60_000))
    args: Sequence[ScriptArg] = (
        now, period, refresh_at, "lead_generation", cost, request_id, now + HOLD_MS,
        IDEM_TTL_MS if idempotency_key else 0, org, user or "", feature, method, route,
        "", "",  # API key id, the request's team (none here)
        *(LEAD_WITH_USER if user else LEAD_WITHOUT_USER),
    )  # fmt: skip
    return pack_command(("EVALSHA", gate.meter.admission.script.sha, len(keys), *keys, *args))


CASES: list[dict[str, Any]] = [
    {"org": "acme", "user": "u1", "method": "POST", "route": "/x", "request_id": "r-1"},
    {"org": "acmé", "request_id": "rïd"},  # non-ASCII: the template's exact path
    {"org": "o2", "user": "ü", "idempotency_key": "k1", "quantity": 3, "request_id": "r2"},
    {"org": "o2", "user": "u", "cost": 7, "route": "50%", "request_id": "r3"},
    {"org": "o%s", "idempotency_key": "ключ", "request_id": "r4"},
]


def _config() -> Config:
    return reference_config(redis_url=f"memory://{uuid.uuid4().hex}")


@pytest.mark.parametrize("make_runner", [fast_redis, fast_cluster, redis_py])
@pytest.mark.parametrize("case", CASES)
async def test_charge_call_is_the_documented_evalsha(
    make_runner: Any, case: dict[str, Any]
) -> None:
    gate = CreditGate(_config(), clock=FixedClock(MID_NOVEMBER_MS))
    sent: list[bytes] = []
    gate.redis.runner = make_runner(sent)
    quantity, cost = case.get("quantity", 1), case.get("cost")
    for _ in range(2):  # the second call fills the cached template
        adm = await gate.meter.admit(feature="lead_generation", **case)
        assert adm.ok and adm.refresh_at_ms == NOV_END
    want = expected(
        gate, now=MID_NOVEMBER_MS, period="2026-11", refresh_at=NOV_END,
        feature="lead_generation", cost=(cost or 5) * quantity,
        **{k: v for k, v in case.items() if k not in ("quantity", "cost")},
    )  # fmt: skip
    assert sent == [want, want]


async def test_templates_follow_the_period() -> None:
    clock = FixedClock(MID_NOVEMBER_MS)
    gate = CreditGate(_config(), clock=clock)
    sent: list[bytes] = []
    gate.redis.runner = fast_redis(sent)
    await gate.meter.admit("acme", "lead_generation", request_id="nov")
    clock.advance(20 * 86_400_000)  # into December
    december = await gate.meter.admit("acme", "lead_generation", request_id="dec")
    assert december.refresh_at_ms == DEC_END
    assert sent[1] == expected(
        gate, now=clock.now_ms(), period="2026-12", refresh_at=DEC_END, org="acme",
        feature="lead_generation", cost=5, request_id="dec",
    )  # fmt: skip


async def test_the_charge_awaits_fast_redis_without_run_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On FastRedis the charge awaits ``send_encoded``'s reply itself (one coroutine level
    fewer at every metered request's resume), the same bytes as ``run_encoded`` sends."""
    gate = CreditGate(_config(), clock=FixedClock(MID_NOVEMBER_MS))
    sent: list[bytes] = []
    gate.redis.runner = fast_redis(sent)

    async def not_called(*args: Any) -> Any:
        raise AssertionError("the charge went through run_encoded")

    monkeypatch.setattr(FastRedis, "run_encoded", not_called)
    adm = await gate.meter.admit("acme", "lead_generation", request_id="r1")
    assert adm.ok
    want = expected(
        gate, now=MID_NOVEMBER_MS, period="2026-11", refresh_at=NOV_END, org="acme",
        feature="lead_generation", cost=5, request_id="r1",
    )  # fmt: skip
    assert sent == [want]
