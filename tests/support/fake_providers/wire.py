"""Sending an answer the way the tests asked: whole, streamed, slowed, gated or cut.

Both senders are raw ASGI apps so they control every byte: a cut is the app returning
before the response is complete, which makes uvicorn close the connection with no closing
chunk (the client sees an incomplete body, exactly like a provider dropping the socket).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import Receive, Scope, Send

from tests.support.fake_providers.control import Behaviour, RecordedRequest

Kind = Literal["head", "delta", "usage", "end"]
GATE_TIMEOUT = 30.0


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Frame:
    """One SSE event's bytes. ``kind``: ``delta`` carries answer text; ``usage`` is the event
    with the final usage (``cut-after-usage`` cuts after the last one); ``end`` closes the
    stream (``[DONE]``, ``message_stop``)."""

    data: bytes
    kind: Kind = "head"


def sse(data: Any, *, event: str | None = None, kind: Kind = "head", eol: str = "\n") -> Frame:
    """An SSE event: optional ``event:`` line, one ``data:`` line, a blank line."""
    payload = data if isinstance(data, str) else dumps(data).decode()
    head = f"event: {event}{eol}" if event else ""
    return Frame(f"{head}data: {payload}{eol}{eol}".encode(), kind)


def _headers(content_type: str, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    pairs = [("content-type", content_type), *extra.items()]
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


class JsonAnswer:
    """A whole JSON body (``cut``: headers with the full Content-Length, then half of it)."""

    def __init__(
        self,
        record: RecordedRequest,
        document: Any,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.record, self.status, self.body = record, status, dumps(document)
        self.headers = _headers(content_type, headers or {})
        self.headers.append((b"content-length", str(len(self.body)).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        record.status = self.status
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        behaviour = record.behaviour
        if self.status == 200 and behaviour is not None and behaviour.mode == "cut":
            half = self.body[: len(self.body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            record.sent(half, delta=False)
            record.outcome = "cut"
            return  # uvicorn closes the connection: the body is never completed
        await send({"type": "http.response.body", "body": self.body})
        record.sent(self.body, delta=False)
        record.outcome = "finished" if self.status < 400 else "error"


class StreamAnswer:
    """An event stream, one ``send`` per frame, with the behaviour's delay, gate and cuts."""

    def __init__(
        self,
        record: RecordedRequest,
        frames: list[Frame],
        gate_event: Callable[[str], threading.Event],
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "text/event-stream; charset=utf-8",
    ) -> None:
        self.record, self.frames, self.gate_event = record, frames, gate_event
        self.headers = _headers(content_type, {"cache-control": "no-cache", **(headers or {})})

    def _cut_point(self, behaviour: Behaviour) -> int | None:
        """Index of the frame after which the connection is dropped (``None``: never)."""
        if behaviour.mode == "cut":
            seen = 0
            for i, frame in enumerate(self.frames):
                seen += frame.kind == "delta"
                if seen >= behaviour.cut_after:
                    return i
            return len(self.frames) - 1
        if behaviour.mode == "cut-after-usage":
            usage = [i for i, f in enumerate(self.frames) if f.kind == "usage"]
            if usage:
                return usage[-1]
            ends = [i for i, f in enumerate(self.frames) if f.kind == "end"]
            return (ends[0] if ends else len(self.frames)) - 1
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        behaviour = record.behaviour or Behaviour.from_headers({}, b"")
        cut = self._cut_point(behaviour)
        gone = asyncio.Event()

        async def watch() -> None:  # the request body was read already: next is disconnect
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        record.status = 200
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            gated = False
            for i, frame in enumerate(self.frames):
                if i and behaviour.delay:
                    await asyncio.sleep(behaviour.delay)
                if gone.is_set():
                    record.outcome = "client-gone"
                    return
                await send({"type": "http.response.body", "body": frame.data, "more_body": True})
                record.sent(frame.data, delta=frame.kind == "delta")
                if cut == i:
                    record.outcome = "cut"
                    return  # uvicorn closes the connection without the closing chunk
                if behaviour.gate and not gated and record.deltas_sent:
                    gated = True
                    await wait_for_gate(self.gate_event(behaviour.gate), gone)
            await send({"type": "http.response.body", "body": b""})
            record.outcome = "client-gone" if gone.is_set() else "finished"
        finally:
            watcher.cancel()
            if record.outcome == "pending":
                record.outcome = "client-gone"


async def wait_for_gate(gate: threading.Event, gone: asyncio.Event) -> None:
    """Wait for the test's release (a ``threading.Event``: the test runs on another loop),
    without blocking this loop; give up when the client goes or after GATE_TIMEOUT."""
    deadline = time.monotonic() + GATE_TIMEOUT
    # A threading.Event cannot be awaited: poll it (the test sets it from another loop).
    while not gate.is_set() and not gone.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


@dataclass
class Call:
    """One request being answered: what a provider module needs to build its answer."""

    record: RecordedRequest
    behaviour: Behaviour
    body: dict[str, Any]
    model: str
    serial: int
    gate_event: Callable[[str], threading.Event]

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def json(
        self,
        document: Any,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JsonAnswer:
        return JsonAnswer(
            self.record, document, status=status, headers=headers, content_type=content_type
        )

    def stream(
        self,
        frames: list[Frame],
        *,
        headers: dict[str, str] | None = None,
        content_type: str = "text/event-stream; charset=utf-8",
    ) -> StreamAnswer:
        self.record.stream = True
        return StreamAnswer(
            self.record, frames, self.gate_event, headers=headers, content_type=content_type
        )
