"""The official ``openai`` and ``anthropic`` SDKs against fake provider upstreams that speak
the real wire formats (tests/support/fake_providers), directly and through creditgate.

Every SDK test runs twice (``target``): ``direct`` proves the fakes answer what the SDKs
parse, usage objects included (so a later charge can be trusted to come from what a real
provider would send); ``proxy`` proves the SDKs work unchanged through creditgate's reverse
proxy (request bodies forwarded as sent, streams event by event) and that each call is
charged its feature's fixed cost exactly once (refunded when the provider fails). The wire
tests check, with plain HTTP and creditgate's own parsers (gateway.usage), that the bytes
of all four APIs (Gemini included) carry exactly the usage the fake was told to report and
pass the proxy byte for byte, and that the fake's hostile modes do what they say.

Usage-based costs (contract A8) will reuse
:func:`~tests.support.fake_providers.harness.provider_config` with ``costs=`` and assert
``spend.amount == price(usage.expected(provider, model))``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.fake_providers import (
    FakeProviders,
    answer_text,
    fake_headers,
    serve_fake_providers,
)
from tests.support.fake_providers.clients import (
    API_KEY,
    APIS,
    CLAUDE,
    CLAUDE_USAGE,
    GPT,
    GPT_RESPONSES,
    MESSAGES,
    TRANSPORT_ERRORS,
    USAGE,
    Target,
    assert_chat_usage,
    assert_claude_usage,
    assert_responses_usage,
    read_usage,
    request_for,
    stream_text,
    usage_for,
)
from tests.support.fake_providers.harness import (
    FEATURE_OF_PATH,
    ORG,
    identity_headers,
    provider_config,
    serve_gateway,
)


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with serve_fake_providers() as fake:
        yield fake


@pytest.fixture(params=["direct", "proxy"])
async def target(request: pytest.FixtureRequest, fake: FakeProviders) -> AsyncIterator[Target]:
    if request.param == "direct":
        yield Target(fake.url, fake, None)
        return
    async with serve_gateway(provider_config(fake.url)) as gateway:
        yield Target(gateway.url, fake, gateway)


def assert_forwarded(target: Target, path: str, sent: bytes, headers: Any) -> None:
    """The fake got the SDK's body unchanged, with the SDK's own credentials; through the
    proxy, with creditgate's identity headers, and the client saw the fixed cost."""
    record = target.fake.only(path=path)
    assert record.body == sent
    credentials = (record.headers.get("authorization"), record.headers.get("x-api-key"))
    assert credentials in ((f"Bearer {API_KEY}", None), (None, API_KEY))
    if target.gateway is not None:
        feature = FEATURE_OF_PATH[path]
        assert record.headers["x-creditgate-org"] == ORG
        assert record.headers["x-creditgate-feature"] == feature
        assert headers["x-tokens-cost"] == str(target.cost(feature))


# -- OpenAI Chat Completions ------------------------------------------------------------------
async def test_openai_chat_completion(target: Target) -> None:
    async with target.openai() as client, target.spent("chat") as spend:
        raw = await client.chat.completions.with_raw_response.create(
            model=GPT, messages=MESSAGES, extra_headers=fake_headers(USAGE)
        )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == GPT
    assert completion.choices[0].message.content == answer_text()
    assert completion.choices[0].finish_reason == "stop"
    assert_chat_usage(completion.usage)
    assert_forwarded(target, "/v1/chat/completions", raw.http_request.content, raw.headers)
    assert spend.amount == target.cost("chat")


@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_chat_stream(target: Target, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with target.openai() as client, target.spent("chat") as spend:
        stream = await client.chat.completions.create(
            model=GPT,
            messages=MESSAGES,
            stream=True,
            extra_headers=fake_headers(USAGE, deltas=5),
            **options,
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer_text(5)
    assert chunks[-2 if include_usage else -1].choices[0].finish_reason == "stop"
    if include_usage:  # like OpenAI: a last chunk with no choices carries the usage
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        assert_chat_usage(chunks[-1].usage)
    else:  # like OpenAI: no usage unless asked for
        assert all(c.usage is None for c in chunks)
    request = stream.response.request
    assert_forwarded(target, "/v1/chat/completions", request.content, stream.response.headers)
    assert target.fake.only().json.get("stream_options") == options.get("stream_options")
    assert spend.amount == target.cost("chat")


async def test_openai_chat_stream_helper(target: Target) -> None:
    async with (
        target.openai() as client,
        target.spent("chat") as spend,
        client.chat.completions.stream(
            model=GPT,
            messages=MESSAGES,
            stream_options={"include_usage": True},
            extra_headers=fake_headers(USAGE),
        ) as stream,
    ):
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == answer_text()
    assert_chat_usage(final.usage)
    assert spend.amount == target.cost("chat")


# -- OpenAI Responses -------------------------------------------------------------------------
async def test_openai_responses(target: Target) -> None:
    async with target.openai() as client, target.spent("responses") as spend:
        raw = await client.responses.with_raw_response.create(
            model=GPT_RESPONSES, input="Summarise the quarter.", extra_headers=fake_headers(USAGE)
        )
    response = raw.parse()
    assert response.status == "completed" and response.model == GPT_RESPONSES
    assert response.output_text == answer_text()
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert_responses_usage(response.usage)
    assert_forwarded(target, "/v1/responses", raw.http_request.content, raw.headers)
    assert spend.amount == target.cost("responses")


async def test_openai_responses_stream(target: Target) -> None:
    async with target.openai() as client, target.spent("responses") as spend:
        stream = await client.responses.create(
            model=GPT_RESPONSES, input="hi", stream=True, extra_headers=fake_headers(USAGE)
        )
        events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed" and types.count("response.output_text.delta") == 3
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == answer_text()
    assert events[0].response.usage is None
    assert_responses_usage(events[-1].response.usage)
    assert_forwarded(
        target, "/v1/responses", stream.response.request.content, stream.response.headers
    )
    assert spend.amount == target.cost("responses")


async def test_openai_responses_stream_helper(target: Target) -> None:
    async with (
        target.openai() as client,
        target.spent("responses") as spend,
        client.responses.stream(
            model=GPT_RESPONSES, input="hi", extra_headers=fake_headers(USAGE)
        ) as stream,
    ):
        final = await stream.get_final_response()
    assert final.output_text == answer_text()
    assert_responses_usage(final.usage)
    assert spend.amount == target.cost("responses")


# -- Anthropic Messages -----------------------------------------------------------------------
async def test_anthropic_message(target: Target) -> None:
    async with target.anthropic() as client, target.spent("messages") as spend:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE,
            max_tokens=1024,
            messages=MESSAGES,
            extra_headers=fake_headers(CLAUDE_USAGE),
        )
    message = await raw.parse()
    assert message.type == "message" and message.model == CLAUDE
    assert message.content[0].text == answer_text() and message.stop_reason == "end_turn"
    assert_claude_usage(message.usage)
    assert_forwarded(target, "/v1/messages", raw.http_request.content, raw.headers)
    assert spend.amount == target.cost("messages")


async def test_anthropic_message_stream_helper(target: Target) -> None:
    async with (
        target.anthropic() as client,
        target.spent("messages") as spend,
        client.messages.stream(
            model=CLAUDE,
            max_tokens=1024,
            messages=MESSAGES,
            extra_headers=fake_headers(CLAUDE_USAGE),
        ) as stream,
    ):
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == answer_text() and final.content[0].text == answer_text()
    assert_claude_usage(final.usage)  # message_start's input counts + message_delta's output
    assert spend.amount == target.cost("messages")


async def test_anthropic_message_stream_events(target: Target) -> None:
    async with target.anthropic() as client, target.spent("messages") as spend:
        stream = await client.messages.create(
            model=CLAUDE,
            max_tokens=1024,
            messages=MESSAGES,
            stream=True,
            extra_headers=fake_headers(CLAUDE_USAGE, deltas=2),
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK drops ``ping``
    start, delta = events[0].message.usage, events[-2].usage
    assert (start.input_tokens, start.cache_read_input_tokens, start.output_tokens) == (900, 200, 1)
    assert delta.output_tokens == CLAUDE_USAGE.output  # cumulative, not an increment
    assert_forwarded(
        target, "/v1/messages", stream.response.request.content, stream.response.headers
    )
    assert spend.amount == target.cost("messages")


# -- Streams pass event by event; cuts; errors; refusals ------------------------------------
@pytest.mark.parametrize("feature", ["chat", "responses", "messages"])
async def test_streams_reach_the_sdk_event_by_event(target: Target, feature: str) -> None:
    """The fake sends one text delta, then waits at a gate the test opens only after the SDK
    has that delta: a proxy that buffered the stream would time out here."""
    gate = f"{feature}-{uuid.uuid4().hex[:8]}"
    pieces = stream_text(target, feature, fake_headers(usage_for(feature), deltas=4, gate=gate))
    async with target.spent(feature) as spend:
        first = await asyncio.wait_for(anext(pieces), timeout=10)
        first_at = time.monotonic()
        record = target.fake.only(gate=gate)
        assert (first, record.outcome, record.deltas_sent) == ("w0 ", "pending", 1)
        target.fake.release(gate)
        rest = [piece async for piece in pieces]
    assert first + "".join(rest) == answer_text(4)
    assert record.outcome == "finished" and first_at < record.event_times[-1]
    assert spend.amount == target.cost(feature)


@pytest.mark.parametrize("feature", ["chat", "responses", "messages"])
async def test_a_stream_the_provider_cuts_fails_in_the_sdk_and_is_refunded(
    target: Target, feature: str
) -> None:
    headers = fake_headers(usage_for(feature), deltas=4, mode="cut", cut_after=2)
    got: list[str] = []
    async with target.spent(feature, expect=0) as spend:
        with pytest.raises((*TRANSPORT_ERRORS, openai.APIError, anthropic.APIError)):
            async for piece in stream_text(target, feature, headers):
                got.append(piece)
    assert got == ["w0 ", "w1 "]
    assert target.fake.only().outcome == "cut"
    assert spend.amount == 0  # contract A3: an upstream failing mid-body refunds a fixed cost


async def test_a_provider_500_reaches_the_sdk_and_every_attempt_is_refunded(
    target: Target,
) -> None:
    async with target.openai(max_retries=1) as client, target.spent("chat", expect=0) as spend:
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(
                model=GPT, messages=MESSAGES, extra_headers=fake_headers(mode="error-500")
            )
    assert raised.value.type == "server_error"  # the provider's own error, parsed by the SDK
    assert len(target.fake.find(path="/v1/chat/completions")) == 2  # the SDK retried once
    assert spend.amount == 0


async def test_a_provider_429_reaches_the_sdk_as_the_providers_error(target: Target) -> None:
    async with target.anthropic() as client, target.spent("messages") as spend:
        with pytest.raises(anthropic.RateLimitError) as raised:
            await client.messages.create(
                model=CLAUDE,
                max_tokens=8,
                messages=MESSAGES,
                extra_headers=fake_headers(mode="error-429"),
            )
    assert raised.value.body["error"]["type"] == "rate_limit_error"  # not creditgate's 429
    assert raised.value.response.headers["retry-after"] == "1"
    assert spend.amount == target.cost("messages")  # contract A3: only 5xx refunds by default


async def test_calls_creditgate_refuses_never_reach_the_provider(fake: FakeProviders) -> None:
    async with (
        serve_gateway(provider_config(fake.url)) as gateway,
        openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY) as client,
    ):
        with pytest.raises(openai.AuthenticationError) as raised:  # no identity: 401
            await client.chat.completions.create(model=GPT, messages=MESSAGES)
        assert raised.value.body["code"] == "unauthenticated"
        with pytest.raises(openai.PermissionDeniedError):  # starter plan: 403
            await client.chat.completions.create(
                model=GPT, messages=MESSAGES, extra_headers=identity_headers("poor-org")
            )
    assert fake.requests == []


# -- The bytes on the wire: what creditgate's usage parsers will read -------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("feature", list(APIS))
async def test_the_wire_carries_the_usage_creditgate_reads(
    target: Target, feature: str, stream: bool
) -> None:
    provider, model = APIS[feature][:2]
    path, body = request_for(feature, stream)
    usage = usage_for(feature)
    async with (
        httpx.AsyncClient(base_url=target.url, headers=identity_headers()) as http,
        target.spent(feature) as spend,
    ):
        response = await http.post(path, json=body, headers=fake_headers(usage))
    assert response.status_code == 200
    assert response.content == bytes(target.fake.only().response_body)  # byte for byte
    assert read_usage(response.content, stream) == usage.expected(provider, model)
    assert spend.amount == target.cost(feature)


@pytest.mark.parametrize("mode", ["no-usage", "lie-negative", "lie-huge", "lie-string"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("feature", list(APIS))
async def test_hostile_usage_modes_leave_no_usage_to_believe(
    fake: FakeProviders, feature: str, stream: bool, mode: str
) -> None:
    path, body = request_for(feature, stream)
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post(path, json=body, headers=fake_headers(USAGE, mode=mode))
    assert response.status_code == 200
    assert read_usage(response.content, stream) is None


@pytest.mark.parametrize("feature", list(APIS))
async def test_cut_modes_drop_the_connection(fake: FakeProviders, feature: str) -> None:
    provider, model = APIS[feature][:2]
    async with httpx.AsyncClient(base_url=fake.url) as http:
        for stream, mode in [(False, "cut"), (True, "cut"), (True, "cut-after-usage")]:
            path, body = request_for(feature, stream)
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(path, json=body, headers=fake_headers(USAGE, mode=mode))
            record = fake.requests[-1]
            assert record.outcome == "cut"
            sent = read_usage(bytes(record.response_body), stream)
            if mode == "cut-after-usage":  # the final usage went out before the cut
                assert sent == USAGE.expected(provider, model)
            elif stream:
                assert record.deltas_sent == 1


async def test_the_fake_notices_a_client_that_leaves_mid_stream(fake: FakeProviders) -> None:
    """What a later test needs to tell whether creditgate kept reading for the usage."""
    path, body = request_for("messages", stream=True)
    headers = fake_headers(CLAUDE_USAGE, deltas=3, gate="leave")
    async with (
        httpx.AsyncClient(base_url=fake.url) as http,
        http.stream("POST", path, json=body, headers=headers) as response,
    ):
        async for _ in response.aiter_bytes():
            if fake.only().deltas_sent:
                break
    # The fake's gate gives up once it sees the client gone. Releasing the gate before that
    # raced the notice (the fake runs on another thread's loop): on a loaded machine the
    # release could win and the fake finish its stream into the closed socket ("finished").
    for _ in range(500):
        if fake.only().outcome != "pending":
            break
        await asyncio.sleep(0.01)
    fake.release("leave")
    assert fake.only().outcome == "client-gone" and fake.only().deltas_sent == 1
