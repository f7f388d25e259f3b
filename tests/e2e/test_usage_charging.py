"""Usage-based costs through the proxy (DESIGN A8, issue 8 items 1-3): the official ``openai``
and ``anthropic`` SDKs in front of the fake providers (tests/support/fake_providers), each
call charged exactly ``prices.cost(usage, max)`` of the usage the fake reported.

Every test checks the money twice: what the middleware handed the meter
(:class:`SettleLog`: one settle per admitted request, with its ``Actual``) and what the org's
balance in Redis says afterwards.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.support.fake_providers import (
    FakeProviders,
    FakeUsage,
    fake_headers,
    serve_fake_providers,
)
from tests.support.fake_providers.clients import (
    APIS,
    CLAUDE,
    CLAUDE_USAGE,
    GPT,
    GPT_RESPONSES,
    MESSAGES,
    USAGE,
    Target,
    assert_chat_usage,
    request_for,
)
from tests.support.fake_providers.harness import (
    Gateway,
    identity_headers,
    provider_config,
    serve_gateway,
)
from tests.support.usage_charging import (
    MAX,
    SettleLog,
    audit_events,
    balance_when,
    price,
    spy_on_settles,
    usage_config,
)


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> SettleLog:
    return spy_on_settles(monkeypatch)


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with serve_fake_providers() as fake:
        yield fake


@pytest.fixture
async def gateway(fake: FakeProviders) -> AsyncIterator[Gateway]:
    async with serve_gateway(usage_config(fake.url)) as gw:
        yield gw


@pytest.fixture
def target(fake: FakeProviders, gateway: Gateway) -> Target:
    return Target(gateway.url, fake, gateway)


async def charged(gateway: Gateway, settles: SettleLog, feature: str, expect: int) -> int:
    """What ``feature`` was charged in the block's single settle, checked against the
    balance: waits for the settle and for the balance to show it."""
    calls = await settles.wait(1)
    assert len(calls) == 1, calls
    (call,) = calls
    assert call.feature == feature and call.ok
    assert call.actual is not None and call.actual.tokens == expect
    return int(call.actual.tokens)


# -- every API, JSON and streamed, charged its usage ------------------------------------------
async def test_openai_chat_completion_is_charged_its_usage(
    target: Target, gateway: Gateway, settles: SettleLog
) -> None:
    expect = price(gateway, USAGE, "chat")
    async with target.openai() as client, gateway.spent("chat", expect=expect) as spend:
        raw = await client.chat.completions.with_raw_response.create(
            model=GPT, messages=MESSAGES, extra_headers=fake_headers(USAGE)
        )
    assert_chat_usage(raw.parse().usage)
    # A JSON answer is read before its headers go out: they give the actual charge.
    assert raw.headers["x-tokens-cost"] == str(expect)
    assert "x-tokens-cost-status" not in raw.headers
    await charged(gateway, settles, "chat", expect)
    (call,) = settles.calls
    assert call.actual.usage == USAGE.expected("openai", GPT) and not call.actual.missing
    assert call.actual.source == "usage"
    assert int(raw.headers["x-tokens-remaining"]) == await gateway.balance("chat")
    assert spend.amount == expect


@pytest.mark.parametrize("include_usage", [True, False], ids=["asked", "added"])
async def test_openai_chat_stream_is_charged_its_usage(
    target: Target, gateway: Gateway, settles: SettleLog, include_usage: bool
) -> None:
    expect = price(gateway, USAGE, "chat")
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with target.openai() as client, gateway.spent("chat", expect=expect) as spend:
        stream = await client.chat.completions.create(
            model=GPT,
            messages=MESSAGES,
            stream=True,
            extra_headers=fake_headers(USAGE, deltas=5),
            **options,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4 "
    # What the client sees when creditgate added include_usage: the usage chunk at the end.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    forwarded = target.fake.only().json
    assert forwarded["stream_options"] == {"include_usage": True}
    sent = json.loads(stream.response.request.content)
    assert ("stream_options" in sent) is include_usage  # the SDK's own body was not changed
    headers = stream.response.headers
    hold = int(headers["x-tokens-cost"])
    assert headers["x-tokens-cost-status"] == "reserved" and hold >= 1
    await charged(gateway, settles, "chat", expect)
    assert settles.calls[0].hold == hold
    assert spend.amount == expect


async def test_openai_responses_are_charged_their_usage(
    target: Target, gateway: Gateway, settles: SettleLog
) -> None:
    expect = price(gateway, USAGE, "responses")
    async with target.openai() as client, gateway.spent("responses", expect=expect) as spend:
        raw = await client.responses.with_raw_response.create(
            model=GPT_RESPONSES, input="Summarise the quarter.", extra_headers=fake_headers(USAGE)
        )
    assert raw.parse().output_text == "w0 w1 w2 "
    assert raw.headers["x-tokens-cost"] == str(expect)
    await charged(gateway, settles, "responses", expect)
    assert spend.amount == expect


async def test_openai_responses_stream_is_charged_its_usage(
    target: Target, gateway: Gateway, settles: SettleLog
) -> None:
    expect = price(gateway, USAGE, "responses")
    async with target.openai() as client, gateway.spent("responses", expect=expect) as spend:
        stream = await client.responses.create(
            model=GPT_RESPONSES, input="hi", stream=True, extra_headers=fake_headers(USAGE)
        )
        events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert stream.response.headers["x-tokens-cost-status"] == "reserved"
    assert "stream_options" not in target.fake.only().json  # Responses report usage anyway
    await charged(gateway, settles, "responses", expect)
    assert spend.amount == expect


async def test_anthropic_message_is_charged_its_usage(
    target: Target, gateway: Gateway, settles: SettleLog
) -> None:
    expect = price(gateway, CLAUDE_USAGE, "messages")
    async with target.anthropic() as client, gateway.spent("messages", expect=expect) as spend:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE,
            max_tokens=1024,
            messages=MESSAGES,
            extra_headers=fake_headers(CLAUDE_USAGE),
        )
    assert (await raw.parse()).content[0].text == "w0 w1 w2 "
    assert raw.headers["x-tokens-cost"] == str(expect)
    await charged(gateway, settles, "messages", expect)
    assert settles.calls[0].actual.usage == CLAUDE_USAGE.expected("anthropic", CLAUDE)
    assert spend.amount == expect


async def test_anthropic_message_stream_is_charged_its_usage(
    target: Target, gateway: Gateway, settles: SettleLog
) -> None:
    expect = price(gateway, CLAUDE_USAGE, "messages")
    async with (
        target.anthropic() as client,
        gateway.spent("messages", expect=expect) as spend,
        client.messages.stream(
            model=CLAUDE,
            max_tokens=1024,
            messages=MESSAGES,
            extra_headers=fake_headers(CLAUDE_USAGE),
        ) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "w0 w1 w2 "
    await charged(gateway, settles, "messages", expect)
    # reserve: auto: max_tokens 1024 at Claude's output price, plus the prompt's size.
    held = gateway.config.reserve_for("messages", target.fake.only().body)
    assert settles.calls[0].hold == held > 1024 * 150 // 1000
    assert spend.amount == expect


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_gemini_is_charged_its_usage(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog, stream: bool
) -> None:
    path, body = request_for("gemini", stream)
    expect = price(gateway, USAGE, "gemini")
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent("gemini", expect=expect) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(USAGE))
    assert response.status_code == 200
    assert response.content == bytes(fake.only().response_body)
    await charged(gateway, settles, "gemini", expect)
    assert spend.amount == expect


async def test_gemini_json_array_stream_passes_as_it_comes_and_is_charged(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog
) -> None:
    """``streamGenerateContent`` without ``alt=sse`` streams a JSON array: not held back."""
    _, _, _, stream_path, body = APIS["gemini"]
    path = stream_path.partition("?")[0]
    expect = price(gateway, USAGE, "gemini")
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent("gemini", expect=expect) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(USAGE))
    assert response.status_code == 200 and response.json()[-1]["usageMetadata"]
    assert response.headers["x-tokens-cost-status"] == "reserved"
    await charged(gateway, settles, "gemini", expect)
    assert spend.amount == expect


# -- missing, lying and zero usage ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no-usage", "lie-negative", "lie-huge", "lie-string"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("feature", ["chat", "messages"])
async def test_usage_that_cannot_be_believed_is_charged_by_the_policy(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog, feature: str, stream: bool, mode: str
) -> None:
    path, body = request_for(feature, stream)
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent(feature) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(USAGE, mode=mode))
    assert response.status_code == 200
    (call,) = await settles.wait(1)
    hold = call.hold
    assert call.ok and call.actual.missing and call.actual.source == "policy"
    assert call.actual.tokens == hold  # on_missing_usage: charge_reserve (the default)
    if not stream:
        assert response.headers["x-tokens-cost"] == str(hold)
    assert await balance_when(gateway, feature, spend.before - hold) == spend.before - hold


@pytest.mark.parametrize(
    ("policy", "extra", "charge"),
    [("refund", {}, lambda hold: 0), ("charge_fixed", {"fixed": 7}, lambda hold: 7)],
)
async def test_on_missing_usage_policies(
    fake: FakeProviders, settles: SettleLog, policy: str, extra: dict[str, Any], charge: Any
) -> None:
    config = usage_config(fake.url, on_missing_usage=policy, **extra)
    path, body = request_for("chat", False)
    async with (
        serve_gateway(config) as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
    ):
        async with gateway.spent("chat") as spend:
            response = await http.post(path, json=body, headers=fake_headers(mode="no-usage"))
        (call,) = await settles.wait(1)
        assert call.actual.missing and call.actual.tokens == charge(call.hold)
        assert response.headers["x-tokens-cost"] == str(charge(call.hold))
        left = spend.before - charge(call.hold)
        assert await balance_when(gateway, "chat", left) == left


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_explicit_zero_usage_is_charged_nothing(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog, stream: bool
) -> None:
    path, body = request_for("chat", stream)
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent("chat", expect=0) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(FakeUsage()))
    assert response.status_code == 200
    (call,) = await settles.wait(1)
    assert call.actual.tokens == 0 and not call.actual.missing and call.actual.usage.is_zero
    assert spend.amount == 0


async def test_provider_errors_are_refunded(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog
) -> None:
    path, body = request_for("chat", False)
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent("chat", expect=0) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(mode="error-500"))
    assert response.status_code == 500 and response.headers["x-tokens-cost"] == "0"
    (call,) = await settles.wait(1)
    assert not call.ok and call.actual is None
    assert spend.amount == 0


async def test_a_stream_the_provider_cuts_is_refunded(
    fake: FakeProviders, gateway: Gateway, settles: SettleLog
) -> None:
    path, body = request_for("messages", True)
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
        gateway.spent("messages", expect=0) as spend,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(path, json=body, headers=fake_headers(CLAUDE_USAGE, mode="cut"))
    (call,) = await settles.wait(1)
    assert not call.ok
    assert spend.amount == 0


# -- the hold -----------------------------------------------------------------------------------
async def test_reserve_auto_holds_the_estimate_and_refuses_when_it_does_not_fit(
    fake: FakeProviders, settles: SettleLog
) -> None:
    config = usage_config(fake.url)
    config["plans"]["pro"]["allocations"]["chat"] = 100
    path, body = request_for("chat", False)
    async with (
        serve_gateway(config) as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
    ):
        small = {**body, "max_tokens": 1000}  # 1000 x 40 / 1000 = 40, plus the prompt
        ok = await http.post(path, json=small, headers=fake_headers(USAGE))
        assert ok.status_code == 200
        (call,) = await settles.wait(1)
        assert call.hold == gateway.config.reserve_for("chat", fake.only().body) > 40
        big = {**body, "max_tokens": 100_000}  # the hold (capped by max) cannot fit
        refused = await http.post(path, json=big, headers=fake_headers(USAGE))
        assert refused.status_code == 402
        assert refused.json()["code"] == "insufficient_tokens"
        assert len(fake.requests) == 1


async def test_a_request_body_over_the_limit_holds_the_max_and_passes_untouched(
    fake: FakeProviders, settles: SettleLog
) -> None:
    path, body = request_for("chat", True)
    del body["stream_options"]
    body["messages"] = [{"role": "user", "content": "x" * (1 << 20)}]
    async with (
        serve_gateway(usage_config(fake.url)) as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=identity_headers()) as http,
    ):
        response = await http.post(path, json=body, headers=fake_headers(USAGE))
        assert response.status_code == 200
        (call,) = await settles.wait(1)
    assert call.hold == MAX
    assert fake.only().body == response.request.content  # no include_usage spliced in
    assert call.actual.missing  # so the stream reported no usage: the policy


# -- many at once --------------------------------------------------------------------------------
async def test_300_concurrent_usage_requests_against_a_small_balance(
    fake: FakeProviders, settles: SettleLog
) -> None:
    """Holds of 10, actual charges of 4 (half) and 13 (the other half, over the hold).
    Every request waits at a gate until all have been admitted or refused, so exactly
    floor(B / 10) are admitted; then the cheap half settles first, the dear half next, and
    the balance is B - sum(actual) + the overage nobody could cover."""
    balance, hold, n = 250, 10, 300
    models = {"default": {"input": 0, "output": 1000}}  # one creditgate token per output token
    config = provider_config(
        fake.url,
        costs={"chat": {"usage": "openai", "reserve": hold, "max": 50}},
        models=models,
        allocations={"chat": balance},
    )
    cheap, dear = f"cheap-{uuid.uuid4().hex[:6]}", f"dear-{uuid.uuid4().hex[:6]}"
    path, body = request_for("chat", True)
    async with (
        serve_gateway(config) as gateway,
        httpx.AsyncClient(
            base_url=gateway.url,
            headers=identity_headers(),
            limits=httpx.Limits(max_connections=n + 10),
            timeout=60,
        ) as http,
    ):

        async def one(i: int) -> tuple[int, bytes]:
            gate, out = (cheap, 4) if i % 2 else (dear, 13)
            headers = fake_headers(FakeUsage(output=out), gate=gate)
            async with http.stream("POST", path, json=body, headers=headers) as response:
                return response.status_code, await response.aread()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        admitted_max = balance // hold
        for _ in range(3000):  # every admitted stream waits at its gate
            at_gate = [r for r in fake.requests if r.deltas_sent]
            if len(at_gate) >= admitted_max:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the refused ones: answered without the provider
        assert len(fake.requests) == admitted_max
        waiting = {g: len(fake.find(gate=g)) for g in (cheap, dear)}
        fake.release(cheap)
        await settles.wait(waiting[cheap])
        await gateway.gate.meter.drain()
        await asyncio.sleep(0.2)
        fake.release(dear)
        results = await asyncio.gather(*tasks)
        calls = await settles.wait(admitted_max)
        statuses = [status for status, _ in results]
        assert statuses.count(200) == admitted_max
        assert statuses.count(402) == n - admitted_max
        assert len(calls) == admitted_max  # one settle per admitted request, none for the rest
        assert len({c.request_id for c in calls}) == admitted_max
        assert sorted(c.actual.tokens for c in calls) == sorted(
            [4] * waiting[cheap] + [13] * waiting[dear]
        )
        # The cheap half gives back 6 each, the dear half takes 3 each from what is left.
        left = balance - admitted_max * hold + 6 * waiting[cheap]
        overage = max(0, 3 * waiting[dear] - left)
        total = sum(c.actual.tokens for c in calls)
        final = balance - total + overage
        assert await balance_when(gateway, "chat", final) == final >= 0
        # The ledger says the same, to the token: t is what was taken, ov what was not.
        events = await audit_events(gateway, *(c.request_id for c in calls))
        assert len(events) == admitted_max
        assert sum(int(e["t"]) for e in events) == balance - final
        assert sum(int(e["ov"] or 0) for e in events) == overage
        assert all(int(e["t"]) + int(e["ov"] or 0) in (4, 13) for e in events)
