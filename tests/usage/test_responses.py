"""Usage from whole JSON response bodies, with and without provider detection."""

from __future__ import annotations

import json

import pytest

from gateway.usage import Usage, detect_provider, usage_from_document, usage_from_json

from . import wire

# Every test once with the compiled top-level scan and once without (tests/usage/conftest.py).
pytestmark = pytest.mark.usefixtures("usage_form")

BODIES = {
    "openai-chat": (wire.OPENAI_CHAT_JSON, "openai", wire.OPENAI_CHAT_EXPECTED),
    "openai-responses": (wire.OPENAI_RESPONSES_JSON, "openai", wire.OPENAI_RESPONSES_EXPECTED),
    "anthropic": (wire.ANTHROPIC_JSON, "anthropic", wire.ANTHROPIC_EXPECTED),
    "gemini": (wire.GEMINI_JSON, "gemini", wire.GEMINI_EXPECTED),
}


@pytest.mark.parametrize("name", BODIES)
def test_each_provider_auto_and_explicit(name: str) -> None:
    body, provider, expected = BODIES[name]
    assert usage_from_json(body, "auto") == expected
    assert usage_from_json(body, provider) == expected


def test_gemini_json_array_from_stream_without_sse() -> None:
    chunks = [json.loads(line[6:]) for line in wire.GEMINI_SSE.split(b"\r\n") if line]
    body = json.dumps(chunks).encode()
    assert usage_from_json(body, "auto") == wire.GEMINI_EXPECTED
    assert usage_from_json(body, "gemini") == wire.GEMINI_EXPECTED
    assert usage_from_json(body, "openai") is None


def test_missing_is_none_and_zero_is_a_usage() -> None:
    assert usage_from_json(b'{"error": {"message": "overloaded"}}', "auto") is None
    assert (
        usage_from_json(b'{"id": "x", "object": "chat.completion", "usage": null}', "auto") is None
    )
    zero = (
        b'{"object": "chat.completion", "model": "m",'
        b' "usage": {"prompt_tokens": 0, "completion_tokens": 0}}'
    )
    assert usage_from_json(zero, "auto") == Usage("openai", "m")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json usage",
        b'{"usage": ',
        b'[1, 2, 3, "usage"]',
        b'"usage"',
        b"\xff\xfe usage",
        b'{"usage": {"prompt_tokens": -5}}',
        b'{"usage": {"prompt_tokens": 5.0, "completion_tokens": 1}}',
        b'{"usage": {"prompt_tokens": true}}',
        b'{"usage": {"prompt_tokens": "5"}}',
        b'{"usage": {"prompt_tokens": 1000000000001}}',
        b'{"usage": "lots"}',
        b'{"type": "message", "usage": {"input_tokens": 1, "output_tokens": -1}}',
        b'{"usageMetadata": {"promptTokenCount": 1, "cachedContentTokenCount": 2}}',
        b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"usage": {}}',
    ],
)
def test_garbage_and_lies_are_missing(body: bytes) -> None:
    for provider in ("auto", "openai", "anthropic", "gemini"):
        assert usage_from_json(body, provider) is None


def test_unknown_provider_mode_raises() -> None:
    with pytest.raises(ValueError, match="provider"):
        usage_from_json(b"{}", "mistral")


def test_detection_by_usage_keys() -> None:
    assert detect_provider({"usage": {"prompt_tokens": 1}}) == "openai"
    assert detect_provider({"usage": {"input_tokens": 1, "total_tokens": 1}}) == "openai"
    assert detect_provider({"usage": {"input_tokens": 1, "cache_read_input_tokens": 0}}) == (
        "anthropic"
    )
    assert detect_provider({"id": "resp_1", "usage": {"input_tokens": 1}}) == "openai"
    assert detect_provider({"id": "msg_1", "usage": {"input_tokens": 1}}) == "anthropic"
    assert detect_provider({"object": ["response"], "usage": None}) is None
    assert detect_provider({"usage": {"foo": 1}}) is None
    assert detect_provider({}) is None


def test_bare_input_output_reads_the_same_either_way() -> None:
    doc = {"model": "m", "usage": {"input_tokens": 10, "output_tokens": 5}}
    as_anthropic = usage_from_document(doc, "anthropic")
    as_openai = usage_from_document(doc, "openai")
    assert as_anthropic is not None and as_openai is not None
    assert (as_anthropic.input_tokens, as_anthropic.output_tokens) == (10, 5)
    assert (as_openai.input_tokens, as_openai.output_tokens) == (10, 5)


def test_anthropic_cache_fields_are_not_double_counted() -> None:
    usage = usage_from_json(wire.ANTHROPIC_JSON, "auto")
    assert usage is not None
    assert usage.total_tokens == 472 + 1200 + 9000 + 157
