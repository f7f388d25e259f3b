"""What a test tells the fake providers per request (``X-Fake-*`` headers), and what they record.

Headers (all optional; they pass through creditgate untouched, so a test sets them on the
SDK call with ``extra_headers=fake_headers(...)``):

- ``X-Fake-Usage: in=120,cached=20,write=0,out=40,reasoning=8`` — the call's usage in
  provider-neutral totals (see :class:`FakeUsage`); each provider renders it in its own
  shape. Without it: ``in`` = request body size / 4 (at least 1), ``out`` = the number of
  text deltas, the rest 0. Counts may be negative or huge here, to lie on purpose.
- ``X-Fake-Deltas: N`` — text pieces in the answer (default 3; ``w0 w1 w2 ``...).
- ``X-Fake-Delay: S`` — seconds between two stream events (default 0).
- ``X-Fake-Gate: NAME`` — after the first text delta event, wait until the test calls
  ``FakeProviders.release(NAME)`` (at most 30 s), so a test can look at a stream mid-way.
- ``X-Fake-Cut-After: K`` — with ``cut``, the number of text deltas sent before the cut
  (default 1).
- ``X-Fake-Model: NAME`` — the model the answer names (default: the one requested).
- ``X-Fake-Mode`` — hostile behaviour, one of :data:`MODES`:
  ``no-usage`` (no usage object anywhere), ``cut`` (drop the connection after K deltas, or
  halfway through a JSON body), ``cut-after-usage`` (streams: send everything up to and
  including the final usage, then drop the connection before the stream's normal end),
  ``lie-negative`` /
  ``lie-huge`` / ``lie-string`` (every count in the usage becomes -n, 10**18 or "n"),
  ``error-500``, ``error-429`` (the provider's own error body, before any byte of answer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.usage.model import Usage

Provider = Literal["openai", "anthropic", "gemini"]

USAGE = "x-fake-usage"
DELTAS = "x-fake-deltas"
DELAY = "x-fake-delay"
GATE = "x-fake-gate"
CUT_AFTER = "x-fake-cut-after"
MODEL = "x-fake-model"
MODE = "x-fake-mode"

MODES = (
    "normal",
    "no-usage",
    "cut",
    "cut-after-usage",
    "lie-negative",
    "lie-huge",
    "lie-string",
    "error-500",
    "error-429",
)
HUGE = 10**18


@dataclass(frozen=True)
class FakeUsage:
    """A call's usage as totals: ``input`` includes ``cached`` (cache reads) and ``write``
    (cache writes); ``output`` includes ``reasoning``. The fakes render it natively:

    - OpenAI (both APIs): prompt/input = ``input``, cached_tokens = ``cached``,
      completion/output = ``output``, reasoning_tokens = ``reasoning``;
    - Anthropic: input_tokens = ``input - cached - write``, cache_read_input_tokens =
      ``cached``, cache_creation_input_tokens = ``write``, output_tokens = ``output`` (thinking
      included; ``output_tokens_details.thinking_tokens`` = ``reasoning`` when non-zero);
    - Gemini: promptTokenCount = ``input``, cachedContentTokenCount = ``cached``,
      candidatesTokenCount = ``output - reasoning``, thoughtsTokenCount = ``reasoning``.
    """

    input: int = 0
    cached: int = 0
    output: int = 0
    reasoning: int = 0
    write: int = 0

    def header(self) -> str:
        return (
            f"in={self.input},cached={self.cached},write={self.write},"
            f"out={self.output},reasoning={self.reasoning}"
        )

    @classmethod
    def parse(cls, text: str) -> FakeUsage:
        names = {"in": "input", "out": "output", "cached": "cached"}
        names |= {"reasoning": "reasoning", "write": "write"}
        values: dict[str, int] = {}
        for part in text.split(","):
            key, _, value = part.strip().partition("=")
            values[names[key.strip()]] = int(value)
        return cls(**values)

    def expected(self, provider: Provider, model: str | None) -> Usage:
        """The :class:`~gateway.usage.model.Usage` creditgate must read from this call."""
        if provider == "anthropic":  # thinking is inside output_tokens, not apart
            return Usage(provider, model, self.input - self.cached, self.cached, self.output, 0)
        fresh = self.input - self.cached
        visible = self.output - self.reasoning
        return Usage(provider, model, fresh, self.cached, visible, self.reasoning)


def fake_headers(
    usage: FakeUsage | None = None,
    *,
    deltas: int | None = None,
    delay: float | None = None,
    gate: str | None = None,
    mode: str | None = None,
    cut_after: int | None = None,
    model: str | None = None,
) -> dict[str, str]:
    """The ``X-Fake-*`` headers for one call (pass as ``extra_headers``)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown fake mode {mode!r}")
    headers = {
        USAGE: usage.header() if usage else None,
        DELTAS: None if deltas is None else str(deltas),
        DELAY: None if delay is None else str(delay),
        GATE: gate,
        MODE: mode,
        CUT_AFTER: None if cut_after is None else str(cut_after),
        MODEL: model,
    }
    return {name: value for name, value in headers.items() if value is not None}


@dataclass(frozen=True)
class Behaviour:
    """The parsed ``X-Fake-*`` headers of one request."""

    usage: FakeUsage
    deltas: int = 3
    delay: float = 0.0
    gate: str | None = None
    mode: str = "normal"
    cut_after: int = 1
    model: str | None = None

    @classmethod
    def from_headers(cls, headers: dict[str, str], body: bytes) -> Behaviour:
        deltas = int(headers.get(DELTAS, "3"))
        usage = (
            FakeUsage.parse(headers[USAGE])
            if USAGE in headers
            else FakeUsage(input=max(1, len(body) // 4), output=deltas)
        )
        mode = headers.get(MODE, "normal")
        if mode not in MODES:
            raise ValueError(f"unknown {MODE}: {mode!r}")
        return cls(
            usage=usage,
            deltas=deltas,
            delay=float(headers.get(DELAY, "0")),
            gate=headers.get(GATE),
            mode=mode,
            cut_after=int(headers.get(CUT_AFTER, "1")),
            model=headers.get(MODEL),
        )

    @property
    def pieces(self) -> list[str]:
        return text_pieces(self.deltas)

    def counts(self, usage: dict[str, Any]) -> dict[str, Any] | None:
        """A rendered usage object as this mode sends it (``None``: send no usage at all)."""
        if self.mode == "no-usage":
            return None
        if self.mode.startswith("lie-"):
            lied: dict[str, Any] = _lie(usage, self.mode)
            return lied
        return usage


def text_pieces(deltas: int) -> list[str]:
    """The text deltas of an answer; their concatenation is :func:`answer_text`."""
    return [f"w{i} " for i in range(deltas)]


def answer_text(deltas: int = 3) -> str:
    return "".join(text_pieces(deltas))


def _lie(value: Any, mode: str) -> Any:
    if isinstance(value, dict):
        return {k: _lie(v, mode) for k, v in value.items()}
    if isinstance(value, list):
        return [_lie(v, mode) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        if mode == "lie-negative":
            return -(value or 1)
        return HUGE if mode == "lie-huge" else str(value)
    return value


@dataclass
class RecordedRequest:
    """One request as the fake received it, and how its answer went.

    ``outcome``: ``pending`` (still answering), ``finished`` (complete answer sent),
    ``cut`` (the fake dropped the connection on purpose), ``client-gone`` (the client, e.g.
    creditgate, closed the connection first; the fake then stops, like the real APIs),
    ``error`` (an error status was answered).
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    json: Any
    provider: Provider | None = None
    api: str = ""
    stream: bool = False
    behaviour: Behaviour | None = None
    status: int = 0
    events_sent: int = 0
    deltas_sent: int = 0
    response_body: bytearray = field(default_factory=bytearray)
    event_times: list[float] = field(default_factory=list)
    outcome: str = "pending"
    received_at: float = field(default_factory=time.monotonic)

    def sent(self, data: bytes, *, delta: bool) -> None:
        self.response_body += data
        self.events_sent += 1
        self.deltas_sent += 1 if delta else 0
        self.event_times.append(time.monotonic())
