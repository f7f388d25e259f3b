"""Hand-built provider wire formats (JSON bodies and SSE streams) for the usage tests.

Each follows the provider's documented shape: field names, where usage sits, event names
and framing. Token counts are chosen so that every overlap (cache reads inside the prompt,
reasoning inside the completion) shows up if it were double counted.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.usage import Usage


def sse(*events: tuple[str | None, Any], eol: str = "\n", spaced: bool = False) -> bytes:
    """An SSE body: each event is (event name or None, JSON-able data or a raw str).

    JSON is compact as OpenAI and Anthropic send it (``spaced``: as Gemini does) and keeps
    non-ASCII text as UTF-8, so splits can fall inside a character.
    """
    separators = (", ", ": ") if spaced else (",", ":")
    out = []
    for name, data in events:
        text = (
            data
            if isinstance(data, str)
            else json.dumps(data, ensure_ascii=False, separators=separators)
        )
        if name is not None:
            out.append(f"event: {name}{eol}")
        out.append(f"data: {text}{eol}{eol}")
    return "".join(out).encode()


# -- OpenAI Chat Completions ------------------------------------------------------------------

_CHUNK: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "o4-mini-2025-04-16",
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
}


def _chunk(choices: list[Any], usage: Any = None) -> dict[str, Any]:
    return {**_CHUNK, "choices": choices, "usage": usage}


OPENAI_CHAT_USAGE = {
    "prompt_tokens": 1117,
    "completion_tokens": 346,
    "total_tokens": 1463,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 300,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_CHAT_EXPECTED = Usage("openai", "o4-mini-2025-04-16", 93, 1024, 46, 300)

OPENAI_CHAT_SSE = sse(
    (
        None,
        _chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        ),
    ),
    (
        None,
        _chunk(
            [
                {
                    "index": 0,
                    "delta": {"content": 'Hé "usage": {1} ✓'},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        ),
    ),
    (None, _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])),
    (None, _chunk([], OPENAI_CHAT_USAGE)),
    (None, "[DONE]"),
)

OPENAI_CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "o4-mini-2025-04-16",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hi",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": OPENAI_CHAT_USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
    }
).encode()

# -- OpenAI Responses -------------------------------------------------------------------------

_RESPONSE: dict[str, Any] = {
    "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
    "object": "response",
    "created_at": 1741290958,
    "model": "gpt-5-2025-08-07",
    "output": [],
    "parallel_tool_calls": True,
    "tools": [],
}
OPENAI_RESPONSES_USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096},
    "output_tokens": 900,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 5900,
}
OPENAI_RESPONSES_EXPECTED = Usage("openai", "gpt-5-2025-08-07", 904, 4096, 388, 512)


def _response(status: str, usage: Any) -> dict[str, Any]:
    return {**_RESPONSE, "status": status, "usage": usage}


OPENAI_RESPONSES_SSE = sse(
    (
        "response.created",
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": _response("in_progress", None),
        },
    ),
    (
        "response.in_progress",
        {
            "type": "response.in_progress",
            "sequence_number": 1,
            "response": _response("in_progress", None),
        },
    ),
    (
        "response.output_text.delta",
        {
            "type": "response.output_text.delta",
            "sequence_number": 4,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": 'a "usage":{"input_tokens":1}',
        },
    ),
    (
        "response.completed",
        {
            "type": "response.completed",
            "sequence_number": 9,
            "response": _response("completed", OPENAI_RESPONSES_USAGE),
        },
    ),
)

OPENAI_RESPONSES_JSON = json.dumps(_response("completed", OPENAI_RESPONSES_USAGE)).encode()

# -- Anthropic Messages -----------------------------------------------------------------------

ANTHROPIC_MODEL = "claude-sonnet-4-20250514"
_MESSAGE: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": ANTHROPIC_MODEL,
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
}
ANTHROPIC_START_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 1200,
    "cache_read_input_tokens": 9000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 2,
    "service_tier": "standard",
}
ANTHROPIC_EXPECTED = Usage("anthropic", ANTHROPIC_MODEL, 1672, 9000, 157, 0)

ANTHROPIC_SSE = sse(
    (
        "message_start",
        {"type": "message_start", "message": {**_MESSAGE, "usage": ANTHROPIC_START_USAGE}},
    ),
    (
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    ("ping", {"type": "ping"}),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Bonjour «monde» 🌍"},
        },
    ),
    (
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": '"message_stop" "usage": {"output_tokens": 9}'},
        },
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    # Two deltas (as with server tools): cumulative, so the second replaces the first.
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "pause_turn", "stop_sequence": None},
            "usage": {"output_tokens": 100},
        },
    ),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 157},
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)

ANTHROPIC_JSON = json.dumps(
    {
        **_MESSAGE,
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {**ANTHROPIC_START_USAGE, "output_tokens": 157},
    }
).encode()

# -- Gemini -----------------------------------------------------------------------------------

GEMINI_MODEL = "gemini-2.5-flash"


def _gemini(text: str, usage: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish:
        candidate["finishReason"] = finish
    doc: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        doc["usageMetadata"] = usage
    doc.update(modelVersion=GEMINI_MODEL, responseId="mAitaLmkGqGLz7IPrt2-sAY")
    return doc


GEMINI_FINAL_USAGE = {
    "promptTokenCount": 2200,
    "cachedContentTokenCount": 2048,
    "toolUsePromptTokenCount": 30,
    "candidatesTokenCount": 120,
    "thoughtsTokenCount": 640,
    "totalTokenCount": 2990,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2200}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
}
GEMINI_EXPECTED = Usage("gemini", GEMINI_MODEL, 182, 2048, 120, 640)

# The Gemini API frames its events with CRLF.
GEMINI_SSE = sse(
    (
        None,
        _gemini(
            "The", {"promptTokenCount": 2200, "candidatesTokenCount": 1, "totalTokenCount": 2201}
        ),
    ),
    (
        None,
        _gemini(
            " quick — ünïcödé",
            {
                "promptTokenCount": 2200,
                "candidatesTokenCount": 60,
                "thoughtsTokenCount": 640,
                "totalTokenCount": 2900,
            },
        ),
    ),
    (None, _gemini(" end.", GEMINI_FINAL_USAGE, finish="STOP")),
    eol="\r\n",
    spaced=True,
)

# Vertex AI: intermediate chunks carry a count-less usageMetadata.
GEMINI_VERTEX_SSE = sse(
    (None, _gemini("Hello!", {"trafficType": "ON_DEMAND"})),
    (None, _gemini(" How can I help", {"trafficType": "ON_DEMAND"})),
    (
        None,
        _gemini(
            "",
            {
                "promptTokenCount": 1,
                "candidatesTokenCount": 9,
                "totalTokenCount": 10,
                "trafficType": "ON_DEMAND",
            },
            finish="STOP",
        ),
    ),
    spaced=True,
)
GEMINI_VERTEX_EXPECTED = Usage("gemini", GEMINI_MODEL, 1, 0, 9, 0)

GEMINI_JSON = json.dumps(_gemini("The quick end.", GEMINI_FINAL_USAGE, finish="STOP")).encode()

STREAMS: dict[str, tuple[bytes, Usage]] = {
    "openai-chat": (OPENAI_CHAT_SSE, OPENAI_CHAT_EXPECTED),
    "openai-responses": (OPENAI_RESPONSES_SSE, OPENAI_RESPONSES_EXPECTED),
    "anthropic": (ANTHROPIC_SSE, ANTHROPIC_EXPECTED),
    "gemini": (GEMINI_SSE, GEMINI_EXPECTED),
    "gemini-vertex": (GEMINI_VERTEX_SSE, GEMINI_VERTEX_EXPECTED),
}

PROVIDER_OF: dict[str, str] = {
    "openai-chat": "openai",
    "openai-responses": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "gemini-vertex": "gemini",
}
