"""The official SDKs, and plain HTTP, pointed at the fake providers or at creditgate in front.

:class:`Target` makes ``openai.AsyncOpenAI`` / ``anthropic.AsyncAnthropic`` clients for one
base URL (the fake's, or a :class:`~tests.support.fake_providers.harness.Gateway`'s) with
the SDKs' own credentials and creditgate's trusted identity headers, and measures what a
block of calls cost (nothing when pointed at the fake). :func:`stream_text` runs one streamed
call per API and yields the text as the SDK hands it out. :data:`APIS` and
:func:`request_for` give the plain request for each API (JSON or stream) for raw ``httpx``
calls; :func:`read_usage` reads the answer with creditgate's own usage parsers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai

from gateway.usage.responses import usage_from_json
from gateway.usage.sse import usage_from_sse
from tests.support.fake_providers.app import FakeProviders
from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.harness import FIXED_COSTS, Gateway, Spend, identity_headers

try:  # the SDKs' own HTTP client (a fork of httpx) raises its own transport errors
    import httpx2

    TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx2.HTTPError)
except ImportError:  # older SDKs use httpx itself
    TRANSPORT_ERRORS = (httpx.HTTPError,)

GPT, GPT_RESPONSES, CLAUDE, GEMINI = (
    "gpt-4o-mini",
    "gpt-4.1",
    "claude-sonnet-4-5",
    "gemini-2.5-flash",
)
MESSAGES: Any = [{"role": "user", "content": "Summarise the quarter."}]
API_KEY = "sk-test-not-a-creditgate-key"
# Cached input and reasoning inside the totals (OpenAI, Gemini); Anthropic also writes cache.
USAGE = FakeUsage(input=1200, cached=200, output=340, reasoning=64)
CLAUDE_USAGE = FakeUsage(input=1200, cached=200, write=100, output=340, reasoning=64)


@dataclass
class Target:
    """Where the SDKs are pointed: the fake itself, or creditgate in front of it."""

    url: str
    fake: FakeProviders
    gateway: Gateway | None

    def openai(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=API_KEY,
            default_headers=identity_headers(),
            **{"max_retries": 0, **options},
        )

    def anthropic(self, **options: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=self.url,
            api_key=API_KEY,
            default_headers=identity_headers(),
            **{"max_retries": 0, **options},
        )

    def cost(self, feature: str) -> int:
        return FIXED_COSTS[feature] if self.gateway else 0

    @asynccontextmanager
    async def spent(self, feature: str, *, expect: int | None = None) -> AsyncIterator[Spend]:
        if self.gateway is None:
            yield (spend := Spend(0))
            spend.after = 0
            return
        async with self.gateway.spent(feature, expect=expect) as spend:
            yield spend


def assert_chat_usage(usage: Any, u: FakeUsage = USAGE) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens) == (u.input, u.output)
    assert usage.total_tokens == u.input + u.output
    assert usage.prompt_tokens_details.cached_tokens == u.cached
    assert usage.completion_tokens_details.reasoning_tokens == u.reasoning


def assert_responses_usage(usage: Any, u: FakeUsage = USAGE) -> None:
    assert (usage.input_tokens, usage.output_tokens) == (u.input, u.output)
    assert usage.total_tokens == u.input + u.output
    assert usage.input_tokens_details.cached_tokens == u.cached
    assert usage.output_tokens_details.reasoning_tokens == u.reasoning


def assert_claude_usage(usage: Any, u: FakeUsage = CLAUDE_USAGE) -> None:
    assert usage.input_tokens == u.input - u.cached - u.write  # cache counts are apart
    assert usage.cache_read_input_tokens == u.cached
    assert usage.cache_creation_input_tokens == u.write
    assert usage.output_tokens == u.output  # thinking included
    assert usage.output_tokens_details.thinking_tokens == u.reasoning


async def stream_text(target: Target, feature: str, headers: dict[str, str]) -> AsyncIterator[str]:
    """The text pieces of one streamed SDK call, as the SDK hands them out."""
    if feature == "messages":
        async with (
            target.anthropic() as claude,
            claude.messages.stream(
                model=CLAUDE, max_tokens=64, messages=MESSAGES, extra_headers=headers
            ) as stream,
        ):
            async for piece in stream.text_stream:
                yield piece
        return
    async with target.openai() as client:
        if feature == "chat":
            chunks = await client.chat.completions.create(
                model=GPT, messages=MESSAGES, stream=True, extra_headers=headers
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
            return
        events = await client.responses.create(
            model=GPT_RESPONSES, input="hi", stream=True, extra_headers=headers
        )
        async for event in events:
            if event.type == "response.output_text.delta":
                yield event.delta


def usage_for(feature: str) -> FakeUsage:
    return CLAUDE_USAGE if feature == "messages" else USAGE


GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
APIS: dict[str, tuple[Any, ...]] = {  # feature: provider, model, JSON path, stream path, body
    "chat": ("openai", GPT, "/v1/chat/completions", "/v1/chat/completions", {"model": GPT}),
    "responses": ("openai", GPT_RESPONSES, "/v1/responses", "/v1/responses", {"input": "hi"}),
    "messages": ("anthropic", CLAUDE, "/v1/messages", "/v1/messages", {"max_tokens": 64}),
    "gemini": (
        "gemini",
        GEMINI,
        f"/v1beta/models/{GEMINI}:generateContent",
        f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse",
        GEMINI_BODY,
    ),
}


def request_for(feature: str, stream: bool) -> tuple[str, dict[str, Any]]:
    _, model, json_path, stream_path, body = APIS[feature]
    if feature != "gemini":
        body = {"model": model, **body}
        body |= {"input": "hi"} if feature == "responses" else {"messages": MESSAGES}
    if not stream:
        return json_path, body
    if feature == "gemini":
        return stream_path, body
    extra = {"stream_options": {"include_usage": True}} if feature == "chat" else {}
    return stream_path, {**body, "stream": True, **extra}


def read_usage(body: bytes, stream: bool) -> Any:
    return usage_from_sse(body, "auto") if stream else usage_from_json(body, "auto")
