"""OpenAI Responses API, ``POST /v1/responses``, as the real API answers.

JSON: a ``response`` object whose ``output`` holds a ``reasoning`` item (only when the usage
has reasoning tokens) and an assistant ``message`` with one ``output_text`` part; ``usage``
has ``input_tokens`` (including ``input_tokens_details.cached_tokens``) and ``output_tokens``
(including ``output_tokens_details.reasoning_tokens``).

``"stream": true``: ``event:`` + ``data:`` events, each with ``type`` and an increasing
``sequence_number``: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, one
``response.output_text.delta`` per piece, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and ``response.completed``,
whose ``response.usage`` is the call's usage. There is no ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.openai_chat import HEADERS
from tests.support.fake_providers.wire import Call, Frame, JsonAnswer, StreamAnswer, sse


def usage_object(usage: FakeUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input,
        "input_tokens_details": {"cached_tokens": usage.cached},
        "output_tokens": usage.output,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.input + usage.output,
    }


def response_object(
    call: Call, status: str, output: list[dict[str, Any]], usage: Any
) -> dict[str, Any]:
    body = call.body
    return {
        "id": f"resp_fake{call.serial:06d}",
        "object": "response",
        "created_at": call.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": call.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _message(call: Call, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [_part(text)]
    status = "in_progress" if text is None else "completed"
    item_id = f"msg_fake{call.serial:06d}"
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _items(call: Call) -> list[dict[str, Any]]:
    """The output items before the message (a reasoning item when the model reasoned)."""
    if call.behaviour.usage.reasoning <= 0:
        return []
    return [{"id": f"rs_fake{call.serial:06d}", "type": "reasoning", "summary": []}]


def answer(call: Call) -> JsonAnswer | StreamAnswer:
    headers = {**HEADERS, "x-request-id": f"req_fake{call.serial:06d}"}
    if call.body.get("stream") is True:
        return call.stream(frames(call), headers=headers)
    output = [*_items(call), _message(call, "".join(call.behaviour.pieces))]
    usage = call.behaviour.counts(usage_object(call.behaviour.usage))
    return call.json(response_object(call, "completed", output, usage), headers=headers)


def frames(call: Call) -> list[Frame]:
    sequence = iter(range(1_000_000))
    out: list[Frame] = []

    def event(kind: str, frame_kind: Any = "head", **fields: Any) -> None:
        document = {"type": kind, "sequence_number": next(sequence), **fields}
        out.append(sse(document, event=kind, kind=frame_kind))

    pending = response_object(call, "in_progress", [], None)
    event("response.created", response=pending)
    event("response.in_progress", response=pending)
    items = _items(call)
    for index, item in enumerate(items):
        event("response.output_item.added", output_index=index, item=item)
        event("response.output_item.done", output_index=index, item=item)
    index = len(items)
    item_id = f"msg_fake{call.serial:06d}"
    where = {"item_id": item_id, "output_index": index, "content_index": 0}
    event("response.output_item.added", output_index=index, item=_message(call, None))
    event("response.content_part.added", **where, part=_part(""))
    for piece in call.behaviour.pieces:
        event("response.output_text.delta", "delta", **where, delta=piece, logprobs=[])
    text = "".join(call.behaviour.pieces)
    event("response.output_text.done", **where, text=text, logprobs=[])
    event("response.content_part.done", **where, part=_part(text))
    message = _message(call, text)
    event("response.output_item.done", output_index=index, item=message)
    usage = call.behaviour.counts(usage_object(call.behaviour.usage))
    done = response_object(call, "completed", [*items, message], usage)
    event("response.completed", "usage", response=done)
    return out
