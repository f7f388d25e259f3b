"""Meter.admit's pre-encoded charge.lua call (FastRedis.run_encoded) sends exactly the bytes
the plain path (ScriptRunner.run) would, so the two argument layouts cannot drift apart."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.config import Config
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import FastRedis, pack_command
from tests.support.reference import MID_NOVEMBER_MS, reference_config

OK = ["ok", 1, -1, 0, 0]


class Plain:
    """A runner without run_encoded: records the command run() would pack."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.sent.append(pack_command(("EVALSHA", script.sha, len(keys), *keys, *args)))
        return OK

    async def close(self) -> None:
        pass


class Encoded(FastRedis):
    """A FastRedis whose socket is replaced by a recorder."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        outer = self

        class _Link:
            _proto = None

            async def _request_slow(self, command: bytes) -> Any:
                outer.sent.append(command)
                return OK

        self.links = [_Link()]  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "org": "acme",
            "feature": "goal_generation",
            "user": "u1",
            "method": "POST",
            "route": "/x",
        },
        {"org": "acmé", "feature": "lead_generation", "request_id": "rïd"},
        {
            "org": "o2",
            "feature": "lead_generation",
            "user": "ü",
            "idempotency_key": "k1",
            "quantity": 3,
        },
        {"org": "o2", "feature": "lead_generation", "user": "ü", "cost": 7},
    ],
)
async def test_encoded_charge_is_byte_identical(kwargs: dict[str, Any]) -> None:
    config: Config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}")
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    kwargs = {"request_id": "fixed-id", **kwargs}
    plain, encoded = Plain(), Encoded()
    for runner in (plain, encoded, encoded):  # the second encoded call hits the caches
        gate.redis.runner = runner  # type: ignore[assignment]
        await gate.meter.admit(**kwargs)
    assert encoded.sent == plain.sent * 2
