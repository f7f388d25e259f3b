"""Helpers of the usage-cost tests (DESIGN A8): the harness config with every provider
feature charged by usage, the price the fake's usage must cost, and :class:`SettleLog`,
which records every settle the gateway under test hands its meter.

The gateway runs in a server thread; :func:`spy_on_settles` patches ``Meter.settle_nowait``
for the whole process (undone by the caller's ``monkeypatch``), so each settle is recorded
with the hold it settles and the ``Actual`` the middleware decided.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.core.events import unpacked
from gateway.metering.meter import Meter
from gateway.metering.settlement import Settlement
from gateway.metering.usage_tap import ResponseTap
from tests.support.fake_providers.clients import APIS
from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.harness import ORG, Gateway, provider_config

MAX = 2000
MODELS = {
    "gpt-4o-mini*": {"input": 10, "cached_input": 5, "output": 40},
    "gpt-4.1*": {"input": 20, "cached_input": 5, "output": 80},
    "claude-*": {"input": 30, "cached_input": 3, "output": 150},
    "gemini-*": {"input": 10, "output": 40},
    "default": {"input": 20, "output": 80},
}
USAGE_COST: dict[str, Any] = {"usage": "auto", "reserve": "auto", "max": MAX}
FEATURES = ("chat", "responses", "messages", "gemini")


def usage_config(
    upstream: str, *, top_level: dict[str, Any] | None = None, **cost: Any
) -> dict[str, Any]:
    """The harness config with every provider feature charged by usage (``cost`` overrides
    keys of the ``cost:`` mapping, ``top_level`` adds config keys)."""
    costs = {name: {**USAGE_COST, **cost} for name in FEATURES}
    return provider_config(upstream, costs=costs, models=MODELS, **(top_level or {}))


def price(gateway: Gateway, usage: FakeUsage, feature: str, maximum: int = MAX) -> int:
    """What the fake's ``usage`` on ``feature`` must cost under the config's prices."""
    provider, model = APIS[feature][:2]
    prices = gateway.config.prices
    assert prices is not None
    return prices.cost(usage.expected(provider, model), maximum)


@dataclass
class Settled:
    feature: str
    request_id: str
    ok: bool
    hold: int
    actual: Any  # gateway.metering.meter.Actual | None


class SettleLog:
    """Every ``Meter.settle_nowait`` of the process, in order."""

    def __init__(self) -> None:
        self.calls: list[Settled] = []
        self._lock = threading.Lock()

    def add(self, item: Settled) -> None:
        with self._lock:
            self.calls.append(item)

    async def wait(self, count: int, within: float = 10.0) -> list[Settled]:
        """The settles so far, once there are ``count`` (or ``within`` seconds passed)."""
        for _ in range(int(within / 0.01)):
            if len(self.calls) >= count:
                break
            await asyncio.sleep(0.01)
        return list(self.calls)


def spy_on_settles(monkeypatch: pytest.MonkeyPatch) -> SettleLog:
    """Record every settle the middleware queues: ``Meter.settle_nowait`` (which knows the
    actual cost), and the direct ``Settlement.queue`` of the fixed-cost path (the
    middleware binds the queue itself, a call less per request) and of a complete
    usage-charged answer (its settle value made by the tap, ``ResponseTap.answer``: its
    actual is the tap's)."""
    log = SettleLog()
    original = Meter.settle_nowait
    original_queue = Settlement.queue
    original_whole = ResponseTap._whole
    original_told = ResponseTap._told
    original_answer = ResponseTap.answer
    inside = threading.local()
    priced: dict[str, ResponseTap] = {}  # request id -> the tap that priced its answer

    # A complete answer is charged in answer itself (read and priced by the compiled call),
    # in _told (read and priced from _whole) or in _whole (no usage: the policy).
    def spy_answer(self: ResponseTap, start: Any, body: bytes) -> Any:
        priced[self._adm.request_id] = self
        return original_answer(self, start, body)

    def spy_whole(self: ResponseTap, body: bytes, head: Any, *args: Any) -> Any:
        priced[self._adm.request_id] = self
        return original_whole(self, body, head, *args)

    def spy_told(self: ResponseTap, read: Any, head: Any) -> Any:
        priced[self._adm.request_id] = self
        return original_told(self, read, head)

    def spy(self: Meter, adm: Any, **kw: Any) -> None:
        priced.pop(adm.request_id, None)
        log.add(Settled(adm.feature, adm.request_id, kw["ok"], adm.cost, kw.get("actual")))
        inside.active = True
        try:
            original(self, adm, **kw)
        finally:
            inside.active = False

    def spy_queue(self: Settlement, adm: Any, ok: bool, *args: Any, **kw: Any) -> None:
        if not getattr(inside, "active", False):
            tap = priced.pop(adm.request_id, None)
            ext = args[4] if len(args) > 4 else kw.get("ext")
            actual = tap.actual() if tap is not None and ext is not None else None
            log.add(Settled(adm.feature, adm.request_id, ok, adm.cost, actual))
        original_queue(self, adm, ok, *args, **kw)

    monkeypatch.setattr(Meter, "settle_nowait", spy)
    monkeypatch.setattr(Settlement, "queue", spy_queue)
    monkeypatch.setattr(ResponseTap, "_whole", spy_whole)
    monkeypatch.setattr(ResponseTap, "_told", spy_told)
    monkeypatch.setattr(ResponseTap, "answer", spy_answer)
    return log


async def balance_when(
    gateway: Gateway, bucket: str, expected: int, within: float = 5.0, org: str = ORG
) -> int:
    """The bucket's balance once it is ``expected`` (settles land after the last byte), or
    as it is after ``within`` seconds."""
    for _ in range(int(within / 0.02)):
        balance = await gateway.balance(bucket, org)
        if balance == expected:
            break
        await asyncio.sleep(0.02)
    return balance


async def audit_events(gateway: Gateway, *request_ids: str, org: str = ORG) -> list[dict[str, str]]:
    """The audit events of these requests in their org's shard stream (DESIGN A8 adds
    ``rs`` reserve, ``ov`` overage, ``cs`` cost source, ``um`` usage missing, ...)."""
    # The served gateway settles on its own loop, fire and forget, after a short window:
    # ``gateway.gate`` (another CreditGate) cannot wait for that, so the stream is read
    # until every request's event is in it (or for at most 5 s).
    await gateway.gate.meter.drain()
    client = gateway.gate.redis.client
    stream = gateway.gate.keys.of_org(org).shard.events
    wanted = set(request_ids)
    for _ in range(250):
        out = []
        for _, fields in await client.xrange(stream):
            decoded = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode() if isinstance(v, bytes) else v
                )
                for k, v in unpacked(fields).items()
            }
            if decoded.get("id") in wanted:
                out.append(decoded)
        if {e["id"] for e in out} >= wanted:
            break
        await asyncio.sleep(0.02)
    return out
