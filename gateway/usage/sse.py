"""An incremental tap on a server-sent-events stream that picks out the token usage.

The proxy forwards every chunk itself and hands the tap the same bytes: the tap never holds
a chunk back, never changes one, and never raises. It reads just enough to follow the SSE
framing (CRLF, LF or CR line ends split anywhere, multi-line ``data:``, comments, ``event:``
lines, a leading BOM) and decodes only the events that can carry usage or mark the end.

What each API sends, and what counts as its final usage (:attr:`StreamTap.usage_reached_end`):

- OpenAI Chat Completions, with ``stream_options.include_usage``: every chunk has
  ``"usage": null`` except one last chunk with ``"choices": []`` and the usage, then
  ``data: [DONE]``. Final: a usage chunk with empty ``choices``, or usage then ``[DONE]``.
- OpenAI Responses: ``response.completed`` (or ``response.incomplete`` /
  ``response.failed``) carries ``response.usage``; there is no ``[DONE]``. Final: one of these
  with a usage.
- Anthropic Messages: ``message_start`` has ``message.usage`` (input and cache counts, and
  the model); ``message_delta`` has ``usage.output_tokens`` *cumulative* (the last one is
  kept, never summed) and, on newer APIs, may repeat the input counts, which then replace
  the earlier ones. Final: ``message_stop`` after a ``message_delta``.
- Gemini ``streamGenerateContent?alt=sse``: chunks may carry ``usageMetadata`` (running
  totals; Vertex sends count-less ``{"trafficType": ...}`` ones, which are ignored); the last
  one is kept. Final: a usage at or after a chunk with a ``finishReason`` (or a
  ``promptFeedback.blockReason``).

``finish()`` returns the last usage seen even when it is not final (a stream cut short gives
a lower bound), and ``None`` when there was none or the tap gave up: a line or an event
longer than ``max_line`` bytes, or a usage whose counts cannot be believed. Then the caller
applies its missing-usage policy.
"""

from __future__ import annotations

import json
import re
from typing import Final

from gateway.usage.model import InvalidUsageError, Usage, provider_mode
from gateway.usage.normalize import from_anthropic, from_gemini, from_openai
from gateway.usage.sseframe import SseReader

DEFAULT_MAX_LINE: Final = 1 << 20
"""The longest line (and the largest event) the tap will hold, in bytes."""

# An event is decoded only if it has a usage object (not ``"usage": null``) or an end marker.
# Inside a JSON string every quote is escaped, so generated text cannot fake these.
_USAGE_OBJECT = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')
_RESPONSES_END: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC_TYPES: Final = frozenset({"message_start", "message_delta", "message_stop"})
_ANTHROPIC_COUNTS: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


class StreamTap:
    """Feed it every chunk of an SSE response body, then call :meth:`finish`.

    ``provider`` is ``auto`` (tell the API by the first event that can carry usage),
    ``openai``, ``anthropic`` or ``gemini``; anything else raises :class:`ValueError`.
    Memory is a small multiple of ``max_line`` whatever the stream sends.
    """

    __slots__ = (
        "_anthropic",
        "_anthropic_delta",
        "_final",
        "_finished",
        "_gave_up",
        "_gemini_finish",
        "_kind",
        "_mode",
        "_model",
        "_reader",
        "_usage",
    )

    def __init__(self, provider: str = "auto", *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._mode = provider_mode(provider)
        self._reader = SseReader(self._handle, max_line)
        self._kind: str | None = None  # chat | responses | anthropic | gemini, once known
        self._usage: Usage | None = None
        self._final = False
        self._gave_up = False
        self._finished = False
        self._model: object = None
        self._anthropic: dict[str, object] = {}
        self._anthropic_delta = False
        self._gemini_finish = False

    @property
    def usage(self) -> Usage | None:
        """The usage seen so far (``None`` if none, or if the tap gave up)."""
        return None if self._gave_up else self._usage

    @property
    def usage_reached_end(self) -> bool:
        """True when the provider's final usage has been seen (see the module docstring)."""
        return self._final and not self._gave_up

    @property
    def gave_up(self) -> bool:
        """True when the tap stopped reading: an over-long line or an unbelievable usage."""
        return self._gave_up

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Observe the next chunk of the body, exactly as received. Never raises."""
        if self._gave_up or self._finished or not chunk:
            return
        try:
            self._reader.feed(chunk if isinstance(chunk, bytes) else bytes(chunk))
        except Exception:  # a tap must never break the stream it watches
            self._gave_up = True
        if self._gave_up or self._reader.stopped:
            self._gave_up = True
            self._reader.stop()

    def finish(self) -> Usage | None:
        """End of the body: the usage seen (see :attr:`usage`). Idempotent; never raises.

        An unterminated last line and an event missing its closing blank line still count,
        but only if their JSON is whole, so a truncated stream cannot invent numbers.
        """
        if not self._finished:
            self._finished = True
            if not self._gave_up:
                try:
                    self._reader.close()
                except Exception:
                    self._gave_up = True
                self._gave_up = self._gave_up or self._reader.stopped
        return self.usage

    # -- events --------------------------------------------------------------------------

    def _handle(self, event: bytes, data: bytes) -> None:
        # The event name is not needed: every API repeats it as the JSON's "type".
        if self._gave_up:
            return
        if data == b"[DONE]":
            if self._kind == "chat" and self._usage is not None:
                self._final = True
            return
        if not _worth_decoding(data):
            return
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # garbage, cut, or not UTF-8: not an event
            return
        if not isinstance(doc, dict):
            return
        kind = self._classify(doc)
        if kind is None or (self._kind is not None and kind != self._kind):
            return
        self._kind = kind
        try:
            if kind == "chat":
                self._chat(doc)
            elif kind == "responses":
                self._responses(doc)
            elif kind == "anthropic":
                self._anthropic_event(doc)
            else:
                self._gemini(doc)
        except InvalidUsageError:
            self._gave_up = True

    def _classify(self, doc: dict[str, object]) -> str | None:
        kind = doc.get("type")
        kind = kind if isinstance(kind, str) else ""
        if self._mode in ("anthropic", "gemini"):
            return self._mode
        if kind.startswith("response."):
            return "responses"
        if self._mode == "openai":
            return "chat"
        if kind in _ANTHROPIC_TYPES:
            return "anthropic"
        if "usageMetadata" in doc or "candidates" in doc or "promptFeedback" in doc:
            return "gemini"
        if "choices" in doc or "usage" in doc:
            return "chat"
        return None

    def _chat(self, doc: dict[str, object]) -> None:
        usage = from_openai(doc.get("usage"), doc.get("model"))
        if usage is not None:
            self._usage = usage
            choices = doc.get("choices")
            self._final = isinstance(choices, list) and not choices

    def _responses(self, doc: dict[str, object]) -> None:
        response = doc.get("response")
        if doc.get("type") in _RESPONSES_END and isinstance(response, dict):
            usage = from_openai(response.get("usage"), response.get("model"))
            if usage is not None:
                self._usage = usage
                self._final = True

    def _anthropic_event(self, doc: dict[str, object]) -> None:
        kind = doc.get("type")
        if kind == "message_stop":
            self._final = self._anthropic_delta and self._usage is not None
            return
        if kind == "message_start":
            message = doc.get("message")
            if not isinstance(message, dict):
                return
            self._model = message.get("model")
            counts = message.get("usage")
        elif kind == "message_delta":
            counts = doc.get("usage")
            self._anthropic_delta = True
        else:
            return
        if counts is None:
            return
        if not isinstance(counts, dict):
            raise InvalidUsageError("usage: not an object")
        # Cumulative counts: each one present replaces the last, nothing is added up.
        for key in _ANTHROPIC_COUNTS:
            if counts.get(key) is not None:
                self._anthropic[key] = counts[key]
        self._usage = from_anthropic(self._anthropic, self._model)
        self._final = False

    def _gemini(self, doc: dict[str, object]) -> None:
        if _gemini_finished(doc):
            self._gemini_finish = True
        usage = from_gemini(doc.get("usageMetadata"), doc.get("modelVersion"))
        if usage is not None:
            self._usage = usage
            self._final = self._gemini_finish


def _worth_decoding(data: bytes) -> bool:
    # Substring scans first: far cheaper than a regex over every byte of every event.
    at = data.find(b'"usage')
    while at >= 0:
        if _USAGE_OBJECT.match(data, at):
            return True
        at = data.find(b'"usage', at + 1)
    return b'"finishReason"' in data or b'"blockReason"' in data or b'"message_stop"' in data


def _gemini_finished(doc: dict[str, object]) -> bool:
    candidates = doc.get("candidates")
    if isinstance(candidates, list) and any(
        isinstance(c, dict) and c.get("finishReason") for c in candidates
    ):
        return True
    feedback = doc.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def usage_from_sse(body: bytes, provider: str = "auto") -> Usage | None:
    """The usage in a whole buffered ``text/event-stream`` body (a :class:`StreamTap` run once)."""
    tap = StreamTap(provider)
    tap.feed(body)
    return tap.finish()
