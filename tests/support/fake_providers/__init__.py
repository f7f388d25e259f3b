"""Fake LLM provider upstreams that speak the real wire formats, for proxy and SDK tests.

One Starlette app (:class:`FakeProviders`, served over TCP by :func:`serve_fake_providers`)
answers, as the real APIs do, in JSON or as a stream:

- OpenAI Chat Completions ``POST /v1/chat/completions`` (:mod:`.openai_chat`);
- OpenAI Responses ``POST /v1/responses`` (:mod:`.openai_responses`);
- Anthropic Messages ``POST /v1/messages`` (:mod:`.anthropic_messages`);
- Gemini ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``
  (``?alt=sse``, or a JSON array without it) (:mod:`.gemini`).

Each request's usage, answer length, pacing and misbehaviour are set by ``X-Fake-*``
request headers (:mod:`.control`; build them with :func:`fake_headers`), so a test knows the
exact usage the provider reported and can compare what creditgate charged with
``price(usage.expected(provider, model))``. Every request is recorded
(:class:`RecordedRequest`: headers, body, parsed JSON, the bytes answered, when each event
went out and how the answer ended), so a test can check what creditgate forwarded (e.g. an
added ``stream_options.include_usage``) or that nothing was forwarded at all.

:mod:`.harness` builds a creditgate proxy in front of the fake from a config dict and
measures what calls cost an org; :mod:`.clients` points the official ``openai`` and
``anthropic`` SDKs (or plain ``httpx``) at the fake or at that proxy.
"""

from tests.support.fake_providers.app import FakeProviders, serve_fake_providers
from tests.support.fake_providers.control import (
    MODES,
    Behaviour,
    FakeUsage,
    Provider,
    RecordedRequest,
    answer_text,
    fake_headers,
)

__all__ = [
    "MODES",
    "Behaviour",
    "FakeProviders",
    "FakeUsage",
    "Provider",
    "RecordedRequest",
    "answer_text",
    "fake_headers",
    "serve_fake_providers",
]
