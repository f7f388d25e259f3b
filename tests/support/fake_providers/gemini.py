"""Google Gemini, ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent``, as the real API answers.

JSON: a ``GenerateContentResponse`` with one candidate (``finishReason: STOP``) and
``usageMetadata``: ``promptTokenCount`` includes ``cachedContentTokenCount``;
``candidatesTokenCount`` excludes ``thoughtsTokenCount``; ``totalTokenCount`` is their sum.
The optional counts (cached, thoughts) are absent when zero, as Google sends them.

``:streamGenerateContent?alt=sse``: ``data: {GenerateContentResponse}`` events separated by
CRLF, as Google's servers send them, one text piece per chunk; every chunk carries running
``usageMetadata`` totals and the last one has ``finishReason`` and the final usage. No
sentinel ends the stream. Without ``alt=sse`` the same chunks come as one JSON array, written
piece by piece.
"""

from __future__ import annotations

from typing import Any

from tests.support.fake_providers.control import FakeUsage
from tests.support.fake_providers.wire import Call, Frame, JsonAnswer, StreamAnswer, dumps, sse


def usage_object(usage: FakeUsage, visible: int | None = None) -> dict[str, Any]:
    candidates = usage.output - usage.reasoning if visible is None else visible
    document: dict[str, Any] = {
        "promptTokenCount": usage.input,
        "candidatesTokenCount": candidates,
        "totalTokenCount": usage.input + candidates + usage.reasoning,
    }
    if usage.cached:
        document["cachedContentTokenCount"] = usage.cached
    document["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": usage.input}]
    if usage.cached:
        document["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": usage.cached}]
    if usage.reasoning:
        document["thoughtsTokenCount"] = usage.reasoning
    return document


def error_body(status: int) -> dict[str, Any]:
    if status == 429:
        message = "Resource has been exhausted (e.g. check quota)."
        return {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}
    if status == 400:
        message = "Invalid JSON payload received."
        return {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
    message = "An internal error has occurred. Please retry or report in the troubleshooting guide."
    return {"error": {"code": 500, "message": message, "status": "INTERNAL"}}


def _chunk(call: Call, text: str, finished: bool, usage: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finished:
        candidate["finishReason"] = "STOP"
    candidate["index"] = 0
    document: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        document["usageMetadata"] = usage
    document |= {"modelVersion": call.model, "responseId": f"fake{call.serial:06d}"}
    return document


def _chunks(call: Call) -> list[dict[str, Any]]:
    behaviour, usage = call.behaviour, call.behaviour.usage
    pieces = behaviour.pieces or [""]
    visible = usage.output - usage.reasoning
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        running = usage_object(usage, visible if last else visible * (i + 1) // len(pieces))
        out.append(_chunk(call, piece, last, behaviour.counts(running)))
    return out


def answer(call: Call, method: str, alt: str | None) -> JsonAnswer | StreamAnswer:
    headers = {"x-fake-server": "gemini"}
    if method == "generateContent":
        text = "".join(call.behaviour.pieces)
        usage = call.behaviour.counts(usage_object(call.behaviour.usage))
        document = _chunk(call, text, True, usage)
        return call.json(document, headers=headers, content_type="application/json; charset=UTF-8")
    chunks = _chunks(call)
    kinds: list[Any] = ["delta"] * (len(chunks) - 1) + ["usage"]
    if alt == "sse":
        frames = [sse(c, kind=k, eol="\r\n") for c, k in zip(chunks, kinds, strict=True)]
        return call.stream(frames, headers=headers, content_type="text/event-stream")
    array = [
        Frame((b"[" if i == 0 else b",\r\n") + dumps(c), k)
        for i, (c, k) in enumerate(zip(chunks, kinds, strict=True))
    ]
    array.append(Frame(b"]", "end"))
    return call.stream(array, headers=headers, content_type="application/json; charset=UTF-8")
