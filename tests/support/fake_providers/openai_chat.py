"""OpenAI Chat Completions, ``POST /v1/chat/completions``, as the real API answers.

JSON: a ``chat.completion`` with one choice and ``usage`` (``prompt_tokens`` includes
``prompt_tokens_details.cached_tokens``, ``completion_tokens`` includes
``completion_tokens_details.reasoning_tokens``).

``"stream": true``: ``data: {chat.completion.chunk}`` events — a first chunk with the role,
one per text delta, one with ``finish_reason`` — then ``data: [DONE]``. Exactly like OpenAI,
usage is sent only when the request has ``stream_options.include_usage: true``: then every
chunk carries ``"usage": null`` and one more chunk with ``"choices": []`` and the usage comes
before ``[DONE]``. Chunks carry an ``obfuscation`` padding string unless
``stream_options.include_obfuscation`` is false.
"""

from __future__ import annotations

from typing import Any

from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.wire import Call, Frame, JsonAnswer, StreamAnswer, sse

HEADERS = {"openai-processing-ms": "7", "openai-version": "2020-10-01"}


def usage_object(usage: FakeUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.input + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def error_body(status: int) -> dict[str, Any]:
    """OpenAI's error envelope (both APIs)."""
    if status == 429:
        message = "Rate limit reached for requests. Please try again in 1s."
        return {
            "error": {
                "message": message,
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
    if status == 400:
        message = "We could not parse the JSON body of your request."
        kind = "invalid_request_error"
    else:
        message = "The server had an error while processing your request. Sorry about that!"
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def answer(call: Call) -> JsonAnswer | StreamAnswer:
    headers = {**HEADERS, "x-request-id": f"req_fake{call.serial:06d}"}
    if call.body.get("stream") is True:
        return call.stream(frames(call), headers=headers)
    text = "".join(call.behaviour.pieces)
    document: dict[str, Any] = {
        "id": f"chatcmpl-fake{call.serial:06d}",
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    usage = call.behaviour.counts(usage_object(call.behaviour.usage))
    if usage is not None:
        document["usage"] = usage
    document |= {"service_tier": "default", "system_fingerprint": "fp_fake"}
    return call.json(document, headers=headers)


def frames(call: Call) -> list[Frame]:
    options = call.body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    include_usage = options.get("include_usage") is True
    obfuscate = options.get("include_obfuscation") is not False

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": f"chatcmpl-fake{call.serial:06d}",
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if include_usage:
            document["usage"] = usage
        if obfuscate:
            document["obfuscation"] = "x" * (1 + call.serial % 7)
        return document

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    out = [sse(chunk(choice({"role": "assistant", "content": "", "refusal": None})))]
    out += [sse(chunk(choice({"content": p})), kind="delta") for p in call.behaviour.pieces]
    out.append(sse(chunk(choice({}, "stop"))))
    if include_usage:
        usage = call.behaviour.counts(usage_object(call.behaviour.usage))
        if usage is not None:
            out.append(sse(chunk([], usage), kind="usage"))
    out.append(sse("[DONE]", kind="end"))
    return out
