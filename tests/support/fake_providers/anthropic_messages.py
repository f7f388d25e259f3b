"""Anthropic Messages, ``POST /v1/messages``, as the real API answers.

JSON: a ``message`` with one ``text`` block and ``usage``: ``input_tokens`` *excludes* the
cache counts ``cache_read_input_tokens`` and ``cache_creation_input_tokens``;
``output_tokens`` includes any thinking (``output_tokens_details.thinking_tokens`` is sent
only when the fake usage has reasoning).

``"stream": true``: ``event:`` + ``data:`` events: ``message_start`` (the message, empty
content, usage with the input and cache counts and ``output_tokens: 1``),
``content_block_start``, ``ping``, one ``content_block_delta`` (``text_delta``) per piece,
``content_block_stop``, ``message_delta`` (``stop_reason`` and the *cumulative*
``usage.output_tokens``, with the input counts repeated as the current API does) and
``message_stop``.
"""

from __future__ import annotations

from typing import Any

from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.wire import Call, Frame, JsonAnswer, StreamAnswer, sse


def _input_counts(usage: FakeUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input - usage.cached - usage.write,
        "cache_creation_input_tokens": usage.write,
        "cache_read_input_tokens": usage.cached,
    }


def usage_object(usage: FakeUsage, *, output: int | None = None) -> dict[str, Any]:
    document = _input_counts(usage) | {
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.write,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": usage.output if output is None else output,
        "service_tier": "standard",
    }
    if usage.reasoning > 0 and output is None:
        document["output_tokens_details"] = {"thinking_tokens": usage.reasoning}
    return document


def delta_usage(usage: FakeUsage) -> dict[str, Any]:
    document = _input_counts(usage) | {"output_tokens": usage.output}
    if usage.reasoning > 0:
        document["output_tokens_details"] = {"thinking_tokens": usage.reasoning}
    return document


def error_body(status: int, serial: int) -> dict[str, Any]:
    kind, message = {
        400: ("invalid_request_error", "The request body is not valid JSON"),
        429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit"),
    }.get(status, ("api_error", "Internal server error"))
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_fake{serial:06d}",
    }


def _message(call: Call, content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
    return {
        "id": f"msg_fake{call.serial:06d}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
    }


def answer(call: Call) -> JsonAnswer | StreamAnswer:
    headers = {"request-id": f"req_fake{call.serial:06d}"}
    if call.body.get("stream") is True:
        return call.stream(frames(call), headers=headers)
    text = "".join(call.behaviour.pieces)
    document = _message(call, [{"type": "text", "text": text}], "end_turn")
    usage = call.behaviour.counts(usage_object(call.behaviour.usage))
    if usage is not None:
        document["usage"] = usage
    return call.json(document, headers=headers)


def frames(call: Call) -> list[Frame]:
    behaviour = call.behaviour

    def event(kind: str, frame_kind: Any = "head", **fields: Any) -> Frame:
        return sse({"type": kind, **fields}, event=kind, kind=frame_kind)

    start = _message(call, [], None)
    usage = behaviour.counts(usage_object(behaviour.usage, output=1))
    if usage is not None:
        start["usage"] = usage
    out = [
        event("message_start", message=start),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
    ]
    out += [
        event("content_block_delta", "delta", index=0, delta={"type": "text_delta", "text": p})
        for p in behaviour.pieces
    ]
    out.append(event("content_block_stop", index=0))
    final: dict[str, Any] = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    usage = behaviour.counts(delta_usage(behaviour.usage))
    if usage is not None:
        final["usage"] = usage
    out.append(event("message_delta", "usage", **final))
    out.append(event("message_stop", "end"))
    return out
