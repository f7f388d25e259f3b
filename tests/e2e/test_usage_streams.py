"""A client that leaves a usage-charged stream mid-way (DESIGN A8, issue 8 item 3).

Through the proxy: the fake provider sends the first text delta, then waits at a gate; the
client reads that first chunk and disconnects; only then does the test open the gate. The
proxy, asked by the middleware to drain (``USAGE_DRAIN_SECONDS``), keeps reading the
upstream after the client left, so the provider finishes its stream (the fake records
``finished``, not ``client-gone``) and the request is settled from the usage at its end:
exactly one settle and one audit event. When no usage comes, or the drain runs out first,
the feature's ``on_missing_usage`` policy decides.

Each test runs twice: served as ``creditgate serve`` serves (its protocol offers the
response splice, gateway/core/splice.py: a usage-cost stream's pieces then go to the client
from the upstream connection's ``data_received``, the usage tap observing each one) and
with uvicorn's own protocol (every piece through ASGI ``send``): the outcomes are the same.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.commands.splice import UvicornSplice
from tests.support.fake_providers import FakeProviders, fake_headers, harness, serve_fake_providers
from tests.support.fake_providers.clients import CLAUDE_USAGE, USAGE, request_for, usage_for
from tests.support.fake_providers.harness import Gateway, identity_headers, serve_gateway
from tests.support.usage_charging import (
    SettleLog,
    audit_events,
    balance_when,
    price,
    spy_on_settles,
    usage_config,
)


@pytest.fixture(autouse=True, params=["splice", "asgi"])
def protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Serve with the splice or without; with it, check that the stream took it (and, for a
    usage-cost stream, that the tap observed the spliced pieces)."""
    spliced = {"observed": 0, "plain": 0}
    write = UvicornSplice.write

    def counting(splice: UvicornSplice, data: bytes) -> bool:
        spliced["plain" if splice._observer is None else "observed"] += 1
        return write(splice, data)

    monkeypatch.setattr(UvicornSplice, "write", counting)
    monkeypatch.setattr(harness, "SERVE_PROTOCOL", request.param == "splice")
    yield request.param
    if request.param == "splice":
        fixed = "fixed_cost" in request.node.name
        assert spliced["plain" if fixed else "observed"] > 0, spliced
    else:
        assert spliced == {"observed": 0, "plain": 0}


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> SettleLog:
    return spy_on_settles(monkeypatch)


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with serve_fake_providers() as fake:
        yield fake


def streamed(feature: str) -> tuple[str, dict[str, Any]]:
    """A streaming request for ``feature`` that does not ask for usage itself."""
    path, body = request_for(feature, True)
    body.pop("stream_options", None)
    return path, body


async def leave_after_first_chunk(
    gateway: Gateway, fake: FakeProviders, path: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Headers:
    """Send the request, read until the provider's first text delta arrived, disconnect."""
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        http.stream("POST", path, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for _ in response.aiter_raw():
            if fake.requests and fake.requests[-1].deltas_sent:
                break
        answer = response.headers
    # Leaving the block closed the connection mid-body; give the gateway time to see it.
    await asyncio.sleep(0.3)
    return answer


async def outcome(fake: FakeProviders, within: float = 10.0) -> str:
    for _ in range(int(within / 0.01)):
        if fake.only().outcome != "pending":
            break
        await asyncio.sleep(0.01)
    return fake.only().outcome


@pytest.mark.parametrize("feature", ["chat", "responses", "messages", "gemini"])
async def test_a_stream_the_client_leaves_is_settled_from_the_usage_at_its_end(
    fake: FakeProviders, settles: SettleLog, feature: str
) -> None:
    gate = f"{feature}-{uuid.uuid4().hex[:8]}"
    path, body = streamed(feature)
    usage = usage_for(feature)
    async with serve_gateway(usage_config(fake.url)) as gateway:
        expect = price(gateway, usage, feature)
        before = await gateway.balance(feature)
        headers = await leave_after_first_chunk(
            gateway, fake, path, body, fake_headers(usage, deltas=4, gate=gate)
        )
        assert headers["x-tokens-cost-status"] == "reserved"
        assert fake.only().outcome == "pending"  # the provider is still at its gate
        fake.release(gate)
        assert await outcome(fake) == "finished"  # the proxy read the stream to its end
        (call,) = await settles.wait(1)
        assert call.ok and not call.actual.missing and call.actual.tokens == expect
        await asyncio.sleep(0.2)
        assert len(settles.calls) == 1  # exactly one settle
        (event,) = await audit_events(gateway, call.request_id)  # and one audit event
        assert (event["t"], event["cs"], event["um"]) == (str(expect), "usage", "")
        if feature == "chat":  # the usage came because creditgate asked for it
            assert fake.only().json["stream_options"] == {"include_usage": True}
        assert await balance_when(gateway, feature, before - expect) == before - expect


async def test_a_stream_the_client_leaves_without_usage_is_charged_by_the_policy(
    fake: FakeProviders, settles: SettleLog
) -> None:
    gate = f"nousage-{uuid.uuid4().hex[:8]}"
    path, body = streamed("messages")
    headers = fake_headers(CLAUDE_USAGE, deltas=3, gate=gate, mode="no-usage")
    async with serve_gateway(usage_config(fake.url, on_missing_usage="refund")) as gateway:
        before = await gateway.balance("messages")
        await leave_after_first_chunk(gateway, fake, path, body, headers)
        fake.release(gate)
        assert await outcome(fake) == "finished"
        (call,) = await settles.wait(1)
        assert call.ok and call.actual.missing and call.actual.source == "policy"
        assert call.actual.tokens == 0  # on_missing_usage: refund
        (event,) = await audit_events(gateway, call.request_id)
        assert (event["t"], event["cs"], event["um"]) == ("0", "policy", "1")
        assert await balance_when(gateway, "messages", before) == before


async def test_the_drain_is_bounded_then_the_policy_applies(
    fake: FakeProviders, settles: SettleLog
) -> None:
    """``usage_drain_seconds: 0.5``: the provider stays at its gate for longer, so the proxy
    gives up, closes the upstream, and the hold is charged (``charge_reserve``)."""
    gate = f"slow-{uuid.uuid4().hex[:8]}"
    path, body = streamed("chat")
    config = usage_config(fake.url, top_level={"usage_drain_seconds": 0.5})
    async with serve_gateway(config) as gateway:
        before = await gateway.balance("chat")
        left = time.monotonic()
        await leave_after_first_chunk(gateway, fake, path, body, fake_headers(USAGE, gate=gate))
        (call,) = await settles.wait(1, within=5)
        waited = time.monotonic() - left
        assert 0.5 <= waited < 3.0
        assert call.ok and call.actual.missing and call.actual.tokens == call.hold
        assert await outcome(fake) == "client-gone"  # the proxy stopped reading
        fake.release(gate)
        await asyncio.sleep(0.2)
        assert len(settles.calls) == 1
        assert len(await audit_events(gateway, call.request_id)) == 1
        assert await balance_when(gateway, "chat", before - call.hold) == before - call.hold


async def test_no_drain_when_it_is_off(fake: FakeProviders, settles: SettleLog) -> None:
    gate = f"off-{uuid.uuid4().hex[:8]}"
    path, body = streamed("messages")
    config = usage_config(fake.url, top_level={"usage_drain_seconds": 0})
    async with serve_gateway(config) as gateway:
        await leave_after_first_chunk(
            gateway, fake, path, body, fake_headers(CLAUDE_USAGE, gate=gate)
        )
        (call,) = await settles.wait(1, within=5)
        assert call.actual.missing  # settled at once, by the policy
        assert await outcome(fake) == "client-gone"
        fake.release(gate)


async def test_a_fixed_cost_stream_still_stops_when_the_client_leaves(
    fake: FakeProviders, settles: SettleLog
) -> None:
    """Draining is for usage costs only: a fixed-cost stream is dropped at once, as before."""
    from tests.support.fake_providers.harness import provider_config

    gate = f"fixed-{uuid.uuid4().hex[:8]}"
    path, body = streamed("messages")
    async with serve_gateway(provider_config(fake.url)) as gateway:
        await leave_after_first_chunk(
            gateway, fake, path, body, fake_headers(CLAUDE_USAGE, gate=gate)
        )
        assert await outcome(fake) == "client-gone"
        (call,) = await settles.wait(1)
        assert call.actual is None  # the fixed path: today's settle
        fake.release(gate)
