"""Costs decided after the response (DESIGN A8): the request read before the call, the
response watched as it passes, and the actual charge.

Only features whose cost is ``usage`` or ``header`` come here (the middleware keeps a
:class:`VariableCost` per such feature, built once); a fixed cost never does.

Before the call (:func:`read_request`): when the hold depends on the request (``reserve:
auto``) or the request may need ``stream_options.include_usage`` (OpenAI Chat Completions
streams, which report no usage unless asked), the body is read, at most
:data:`REQUEST_BODY_LIMIT` bytes of it, and replayed to the app (:class:`TapReceive`). A
larger body is forwarded untouched and holds the feature's ``max``. A body read only for
``include_usage`` is left to an app that reads it anyway (the proxy,
:data:`~gateway.core.scope_keys.READS_USAGE_REQUEST`), which applies
:func:`stream_usage_asked` (or :func:`read_asking_stream_usage`) itself: no read ahead and
replay for the usual usage-charged request through the proxy.

After the call (:class:`ResponseTap`, which wraps ``send``):

- ``header``: the cost comes from the response header named in the config, removed before
  the client sees the response (or, in middleware mode, from ``scope["state"]
  ["creditgate_cost"]``: :data:`~gateway.core.scope_keys.APP_COST`);
- ``usage``, ``text/event-stream``: every chunk goes on at once while a
  :class:`~gateway.usage.sse.StreamTap` reads it (:class:`SseUsageTap`: only the events that
  can carry the usage); the headers give the hold, marked ``X-Tokens-Cost-Status: reserved``;
- ``usage``, any other body up to :data:`RESPONSE_BODY_LIMIT`: held until complete so that
  ``X-Tokens-Cost`` / ``X-Tokens-Remaining`` give the actual charge; Gemini's
  ``streamGenerateContent`` without ``alt=sse`` (a JSON array that streams) is passed on
  chunk by chunk and read at its end instead. An answer complete before its start (the
  proxy's, of known length) comes in one call instead, :meth:`ResponseTap.answer`
  (:data:`~gateway.core.scope_keys.USAGE_TAP`): read, priced and headed in one straight
  run, its settle value kept for the middleware (:attr:`ResponseTap.quiet`).

Then :meth:`ResponseTap.actual` prices the usage (``models:``, capped by ``max``), or, when
none came (none found, a stream that ended before its final usage, counts that cannot be
believed), applies ``on_missing_usage``. An explicit zero is a zero.

A client that leaves mid-response does not end the reading: see
:data:`~gateway.core.scope_keys.USAGE_DRAIN_SECONDS` (the proxy keeps reading the
upstream) and :class:`TapReceive` (any other app sees the disconnect late).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Awaitable, Callable, Container, Iterable, MutableMapping
from typing import Any, Final, Literal

from starlette.types import Message, Receive, Scope, Send

from gateway.config.costs import CostSpec
from gateway.core.problem import send_problem
from gateway.core.scope_keys import APP_COST, CLIENT_DISCONNECTED, UPSTREAM_ERROR
from gateway.core.splice import BodyObserver
from gateway.metering.admission import Admission
from gateway.metering.cost_headers import (
    COST_NAME,
    REMAINING_NAME,
    RESERVED,
    actual_headers,
    refunded_headers,
)
from gateway.metering.settlement import Actual, counts_value, quiet_extension
from gateway.usage import PriceTable, StreamTap, Usage, ensure_stream_usage, usage_from_json
from gateway.usage.model import checked_usage
from gateway.usage.requests import estimate_reserve
from gateway.usage.responses import MODE_CODES
from gateway.usage.sse import DEFAULT_MAX_LINE
from gateway.usage.topscan import Priced, UsageCounts
from gateway.usage.topscan import counts as _counts
from gateway.usage.topscan import priced as _priced
from gateway.usage.topscan import stream_key as _stream_key

__all__ = [
    "REQUEST_BODY_LIMIT",
    "RESPONSE_BODY_LIMIT",
    "ReplayFirst",
    "RequestRead",
    "ResponseTap",
    "SseUsageTap",
    "TapReceive",
    "VariableCost",
    "parse_cost_value",
    "priced_counts",
    "read_request",
]

Header = tuple[bytes, bytes]

REQUEST_BODY_LIMIT: Final = 1 << 20
"""The largest request body read before the call (for ``reserve: auto`` and
``include_usage``); a larger one is forwarded untouched and holds the feature's ``max``."""

RESPONSE_BODY_LIMIT: Final = 1 << 20
"""The largest non-stream response body held back to read its usage; a larger one goes on
as it comes (its headers say the hold) and its usage counts as missing."""

_COST_VALUE = re.compile(rb"[ \t]*([0-9]{1,16})[ \t]*")
# What makes StreamTap decode an event (gateway/usage/sse.py: _worth_decoding, [DONE]).
_USAGE_OBJECT = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')
# Gemini's streaming method: without alt=sse it streams one JSON array (not held back).
_GEMINI_STREAM = ":streamGenerateContent"
_CONTENT_TYPE = b"content-type"
_CONTENT_LENGTH = b"content-length"
_CONTENT_ENCODING = b"content-encoding"
_TRANSFER_ENCODING = b"transfer-encoding"
_ACCEPT_ENCODING = b"accept-encoding"
_IDENTITY = (_ACCEPT_ENCODING, b"identity")

# What the response tap does with the body (ResponseTap._mode).
_PASS = 0  # forwards it untouched (a header cost, a refunded status, no body, given up)
_TAP = 1  # an event stream: forwards each chunk, the StreamTap reads it
_COPY = 2  # a JSON stream (Gemini without alt=sse): forwards each chunk, keeps a copy
_HOLD = 3  # a JSON answer: holds the start and the body until the body is complete


def _no_prices(model: str | None) -> tuple[int, int, int, int]:
    raise AssertionError("a checked config has prices for every usage cost")


def priced_counts(
    read: UsageCounts, prices: PriceTable, maximum: int | None, left: int | None
) -> Priced:
    """A complete answer's usage ``read`` priced (at most ``maximum``) and told for a balance
    ``left`` (the remaining before the charge plus the hold; ``None``: not known), in the
    form the compiled reading answers it (gateway/usage/topscan.py ``priced``, the same
    values): the tokens, the settle value (:func:`~gateway.metering.settlement.counts_value`)
    as a 1-tuple, the X-Tokens-Cost and X-Tokens-Remaining values
    (:func:`~gateway.metering.cost_headers.actual_headers`'), then ``read`` itself."""
    provider, model, ui, uc, uo, ur = read
    tokens = prices.cost_of(model, ui, uc, uo + ur, maximum)
    value = counts_value(tokens, model, ui, uc, uo, ur)
    kept = None if left is None else left - tokens
    remaining = None if kept is None else b"%d" % kept if kept > 0 else b"0"
    return (tokens, (value,), b"%d" % tokens, remaining, provider, model, ui, uc, uo, ur)


def parse_cost_value(value: object) -> int | None:
    """A reported cost (a header's bytes, or what an app put in its scope state) as an
    integer >= 0; ``None`` for anything else (junk counts as no report)."""
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    if isinstance(value, bytes):
        match = _COST_VALUE.fullmatch(value)
        return int(match.group(1)) if match else None
    return None


def gemini_model(path: str) -> str | None:
    """The model a Gemini path names (``/v1beta/models/gemini-2.5-flash:generateContent``)."""
    at = path.rfind("/models/")
    if at < 0:
        return None
    name, colon, _ = path[at + 8 :].partition(":")
    return name if colon and name and "/" not in name else None


class VariableCost:
    """One ``usage`` or ``header`` feature as the middleware uses it (built once)."""

    __slots__ = (
        "asks_stream_usage",
        "drain_s",
        "header_key",
        "maximum",
        "mode",
        "prices",
        "provider",
        "quick_hold",
        "reads_body",
        "request",
        "reserve",
        "spec",
        "terms",
        "terms_for",
        "usage",
    )

    def __init__(
        self,
        spec: CostSpec,
        prices: PriceTable | None,
        drain_s: float,
        *,
        app_reads_request: bool = False,
        app_asks_identity: bool = False,
    ) -> None:
        self.spec = spec
        self.prices = prices
        # What the compiled pricing of a complete answer takes (topscan.priced): the
        # table's remembered terms per model, and how it finds a model's otherwise.
        self.terms = {} if prices is None else prices.terms_memo()
        self.terms_for = _no_prices if prices is None else prices.terms_for
        self.maximum = spec.maximum
        self.usage = spec.mode == "usage"
        self.provider = spec.provider or "auto"
        # The provider as the compiled reading takes it (gateway/usage/topscan.py counts).
        self.mode = MODE_CODES.get(self.provider, 0)
        self.header_key = spec.header_key
        # Drain only what may end with its usage; a header cost is known at the start.
        self.drain_s = drain_s if self.usage else 0.0
        # The body decides the hold (reserve: auto), or may be an OpenAI chat stream that
        # needs include_usage: read it before the call.
        # An OpenAI Chat Completions stream reports its usage only when asked
        # (``stream_options.include_usage``): the request is read to ask for it.
        self.asks_stream_usage = self.usage and self.provider in ("openai", "auto")
        self.reads_body = spec.reserve_auto or self.asks_stream_usage
        # The body read only to ask for include_usage: an app that reads the body anyway
        # (the proxy: READS_USAGE_REQUEST) may do it instead (USAGE_TAP's request element).
        self.request: RequestSide | None = (
            _REQUEST_SIDE if self.asks_stream_usage and not spec.reserve_auto else None
        )
        # The hold when it does not depend on the request (None: reserve: auto).
        self.reserve: int | None = spec.reserve
        # The hold of a request with nothing to do before the call, for an app that reads
        # the request body and asks for an uncompressed answer itself when told
        # (READS_USAGE_REQUEST, ASKS_IDENTITY_ENCODING: the proxy): the body read only
        # for include_usage is left to it (request), and the hold does not depend on the
        # body. None: the middleware reads or changes something first.
        body_here = self.reads_body and not (app_reads_request and self.request is not None)
        identity_here = self.usage and not app_asks_identity
        self.quick_hold = None if body_here or identity_here else spec.reserve

    def hold(self, body: bytes | None, path: str) -> int:
        """The tokens to hold: the reserve, or for ``reserve: auto`` the estimate from
        ``body`` (``None``: not read, too large) or else ``max``."""
        spec = self.spec
        if spec.reserve is not None:
            return spec.reserve
        if body is None:
            return spec.maximum
        model = gemini_model(path) if self.provider in ("gemini", "auto") else None
        prices = self.prices
        if prices is None or spec.provider is None:  # not a checked config: reserve_for says so
            return spec.reserve_for(body, prices, model=model)
        # spec.reserve_for's estimate, one call less (every reserve: auto request).
        return estimate_reserve(body, spec.provider, prices, model=model, cap=spec.maximum)


class RequestRead:
    """What :func:`read_request` read: the messages to replay, and the whole body when it
    is complete and within the limit (``None`` otherwise)."""

    __slots__ = ("body", "disconnected", "messages")

    def __init__(self, messages: list[Message], body: bytes | None, disconnected: bool) -> None:
        self.messages = messages
        self.body = body
        self.disconnected = disconnected


async def read_request(
    receive: Receive,
    headers: list[Header],
    limit: int = REQUEST_BODY_LIMIT,
    *,
    first: Message | None = None,
) -> RequestRead:
    """Read the request body, at most ``limit`` bytes, before the call (``first``: its
    first message, when the caller received it already).

    The usual body comes whole in its first message. Past that, a body declared larger than
    ``limit`` is read no further, and one that turns out larger is read up to the limit;
    the rest is left to the app (``body`` is then ``None``).
    """
    message = await receive() if first is None else first
    if message["type"] != "http.request":
        return RequestRead([], None, message["type"] == "http.disconnect")
    messages = [message]
    body: bytes = message.get("body", b"")
    size = len(body)
    if not message.get("more_body", False):
        return RequestRead(messages, body if size <= limit else None, False)
    for name, value in headers:
        if name == _CONTENT_LENGTH:
            if not value.isdigit() or int(value) > limit:
                return RequestRead(messages, None, False)
            break
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return RequestRead(messages, None, message["type"] == "http.disconnect")
        messages.append(message)
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            if size > limit:
                break
            return RequestRead(messages, b"".join(m.get("body", b"") for m in messages), False)
    return RequestRead(messages, None, False)


def stream_usage_asked(first: Message) -> Message:
    """The first ``http.request`` message of a body that came whole, as an app that reads
    the request itself forwards it (USAGE_TAP's ``request``: ``whole``): with
    ``stream_options.include_usage`` asked for when it is an OpenAI chat stream within
    :data:`REQUEST_BODY_LIMIT` (:func:`~gateway.usage.requests.ensure_stream_usage`), as
    :meth:`CreditGateMiddleware._variable_call` asks it when it reads the body itself."""
    body: bytes = first.get("body", b"")
    # A body without the key cannot be a stream: spared the JSON decode (the compiled
    # search when it is in use: gateway/usage/topscan.py stream_key).
    if _stream_key(body) and len(body) <= REQUEST_BODY_LIMIT:
        changed = ensure_stream_usage(body)
        if changed is not None:
            return {"type": "http.request", "body": changed, "more_body": False}
    return first


async def read_asking_stream_usage(
    scope: Scope, first: Message, receive: Receive
) -> tuple[Message, Receive] | None:
    """USAGE_TAP's ``request``: ``read``, for a body that did not come whole in its first
    message: read as :func:`read_request` reads it (at most :data:`REQUEST_BODY_LIMIT`),
    then what the app forwards: the whole body in one message (through
    :func:`stream_usage_asked`) and the rest of ``receive``, or, past the limit, the
    body's first message and a ``receive`` replaying what was read; ``None`` when the client
    left."""
    read = await read_request(receive, scope["headers"], first=first)
    if read.disconnected:
        return None
    if read.body is not None:
        whole = {"type": "http.request", "body": read.body, "more_body": False}
        return stream_usage_asked(whole), receive
    messages = read.messages
    if not messages:  # not a body message at all: left to the app as it came
        return first, receive
    return messages[0], TapReceive(messages[1:], receive, None, 0.0)


RequestSide = tuple[
    Callable[[Message], Message],
    Callable[[Scope, Message, Receive], Awaitable[tuple[Message, Receive] | None]],
]
"""USAGE_TAP's ``request`` element: ``(whole, read)`` (gateway/core/scope_keys.py)."""

_REQUEST_SIDE: Final[RequestSide] = (stream_usage_asked, read_asking_stream_usage)


def replaced_body_headers(headers: list[Header], length: int) -> list[Header]:
    """``headers`` for a body rewritten to ``length`` bytes: one Content-Length, no
    Transfer-Encoding (the app gets the whole body in one message)."""
    out = [h for h in headers if h[0] != _CONTENT_LENGTH and h[0] != _TRANSFER_ENCODING]
    out.append((_CONTENT_LENGTH, str(length).encode()))
    return out


def identity_encoding(headers: list[Header]) -> list[Header]:
    """``headers`` asking for an uncompressed answer: a usage cannot be read from gzip."""
    # Every usage-charged request comes here. Without an Accept-Encoding the list is copied
    # with one more header; else filtered by a list comprehension, not a generator. (The
    # names are compared in a plain loop: ~40 % cheaper than building a dict of the
    # headers to ask it, for a usual request's 7-10 headers.)
    for name, _ in headers:
        if name == _ACCEPT_ENCODING:
            break
    else:
        return [*headers, _IDENTITY]
    out = [h for h in headers if h[0] != _ACCEPT_ENCODING]
    out.append(_IDENTITY)
    return out


class SseUsageTap:
    """A :class:`~gateway.usage.sse.StreamTap` fed only the events that matter.

    StreamTap follows the SSE framing line by line (a few µs per event in Python) but acts
    only on the events that can carry a usage or mark the end: a ``"usage": {...}`` or
    ``usageMetadata`` object, ``[DONE]``, ``finishReason``, ``blockReason``,
    ``message_stop`` (see :data:`_MARKS`); every other event passes through it without
    effect. So each chunk is looked at with a few substring scans, and only runs of whole
    events (from an event boundary to the last one in the chunk) that hold one of those
    marks go to the tap: its answer is the same (tests/metering/test_usage_tap.py compares
    them on every split of every provider's stream), for a fraction of the CPU
    (bench/usage_tap.py). Bytes after the last boundary wait for the next chunk.

    An event boundary is a blank line: two line ends in a row (LF LF, CR CR, or LF CR, which
    also is the middle of CRLF CRLF). Past the tap's line bound (an event that long),
    everything goes to the tap as it is, so that it gives up exactly as it would have.
    """

    __slots__ = ("_direct", "_end_marks", "_marks", "_pending", "_seen_usage", "tap")

    def __init__(self, provider: str) -> None:
        self.tap = StreamTap(provider)
        self._marks, self._end_marks = _MARKS[provider]
        self._seen_usage = False
        self._pending = b""  # the bytes after the last event boundary seen
        self._direct = False  # past the line bound: everything goes to the tap

    def feed(self, chunk: bytes) -> None:
        """Observe the next chunk of the body (never raises, as StreamTap.feed)."""
        # The usual chunk, on every chunk of a stream: whole events (it starts after a
        # blank line, and LF LF at its end is one, whatever the line ends before it).
        if (
            self._pending
            or self._direct
            or not chunk.endswith(b"\n\n")
            or len(chunk) > DEFAULT_MAX_LINE
        ):
            self._feed_any(chunk)
        elif self._marked(chunk):
            self._feed_tap(chunk)

    def _marked(self, data: bytes) -> bool:
        """Whether ``data`` may hold an event StreamTap acts on (see :data:`_MARKS`)."""
        at = data.find(b'"usage')
        while at >= 0:  # a usage object; OpenAI chat's "usage":null spares the regex
            if not data.startswith(b'"usage":null', at) and _USAGE_OBJECT.match(data, at):
                return True
            at = data.find(b'"usage', at + 6)
        for mark in self._marks:
            if mark in data:
                return True
        # [DONE] and message_stop act only once a usage is known (StreamTap: final).
        if self._seen_usage:
            for mark in self._end_marks:
                if mark in data:
                    return True
        return False

    def _feed_tap(self, data: bytes) -> None:
        self.tap.feed(data)
        self._seen_usage = self.tap.usage is not None

    def _feed_any(self, chunk: bytes) -> None:
        if self._direct:
            self.tap.feed(chunk)
            return
        if self._pending:
            chunk = self._pending + chunk
        end = _last_boundary(chunk)
        whole, self._pending = chunk[:end], chunk[end:]
        if len(whole) > DEFAULT_MAX_LINE or len(self._pending) > DEFAULT_MAX_LINE:
            self._direct = True  # let the tap meet the long event and give up as it would
            self._pending = b""
            self.tap.feed(chunk)
        elif whole and self._marked(whole):
            self._feed_tap(whole)

    def finish(self) -> Usage | None:
        """End of the body: the usage seen (StreamTap.finish; an unterminated last event
        still counts if its JSON is whole)."""
        if self._pending:
            pending, self._pending = self._pending, b""
            self.tap.feed(pending)
        return self.tap.finish()

    @property
    def usage_reached_end(self) -> bool:
        """True when the provider's final usage has been seen."""
        return self.tap.usage_reached_end


def _last_boundary(data: bytes) -> int:
    """The end of the last blank line in ``data`` (LF LF, CR CR, or LF CR, also the middle
    of CRLF CRLF), 0 if none. Data without CR (the usual) costs one scan."""
    last = data.rfind(b"\n\n")
    if b"\r" in data:
        last = max(last, data.rfind(b"\r\r"), data.rfind(b"\n\r"))
    return last + 2 if last >= 0 else 0


# Besides a usage object, what StreamTap acts on, per provider mode: finishReason and
# blockReason (Gemini: a finish, after which a usage is final), and, only once a usage was
# seen, [DONE] (OpenAI chat) and message_stop (Anthropic), which make it final. Supersets
# are fine (an event fed for nothing changes nothing): `Reason"` finds both Gemini keys,
# `_stop"` also content_block_stop. An explicit provider needs only its own marks:
# StreamTap classifies every event as that provider, on which the others' do nothing.
_MARKS: Final[dict[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]]] = {
    "openai": ((), (b"[DONE]",)),
    "anthropic": ((), (b'_stop"',)),
    "gemini": ((b'Reason"',), ()),
    "auto": ((b'Reason"',), (b"[DONE]", b'_stop"')),
}


def _plain_answer(headers: Iterable[Header]) -> bool:
    """Whether an answer with ``headers`` is read whole for its usage (:meth:`ResponseTap.
    _started`'s tests of the body's kind): not compressed, not an event stream. The last of
    each header wins, as in its dict (a plain loop over the answer's few headers costs less
    than the dict). The compiled pricing tests the usual headers itself (topscan.priced)."""
    encoding: bytes | None = None
    kind = b""
    for name, value in headers:
        if name == _CONTENT_TYPE:
            kind = value
        elif name == _CONTENT_ENCODING:
            encoding = value
    return (
        encoding is None or encoding.strip().lower() in (b"", b"identity")
    ) and not kind.lower().startswith(b"text/event-stream")


class ResponseTap:
    """Wraps ``send`` for one admitted request of a variable-cost feature.

    ``adm`` is the request's admission and ``charged`` the X-Tokens-* headers it was
    admitted with (gateway/metering/cost_headers.py); ``refund_on`` the feature's refunding
    statuses (a refunded response's body is not read). ``path``: the request's path (tells
    Gemini's JSON stream). Built once per request: what the response start needs is kept
    in its slots, not in closures.
    """

    __slots__ = (
        "_adm",
        "_buffer",
        "_buffered",
        "_charged_headers",
        "_cost",
        "_gone",
        "_header_cost",
        "_mode",
        "_path",
        "_read",
        "_refund_on",
        "_send",
        "_start",
        "_state",
        "_tap",
        "complete",
        "hold",
        "missing",
        "model",
        "quiet",
        "status",
        "tokens",
    )

    # Set with ``quiet`` (a complete answer's charge, :meth:`_whole`), read only after it.
    tokens: int
    """The complete answer's actual charge (with :attr:`quiet`)."""
    model: str
    """The model its usage named, ``""`` when none (with :attr:`quiet`)."""
    missing: bool
    """Whether its usage was missing and ``on_missing_usage`` decided (with :attr:`quiet`)."""
    _read: Priced | None

    def __init__(
        self,
        cost: VariableCost,
        send: Send,
        state: MutableMapping[str, Any],
        adm: Admission,
        charged: list[Header],
        refund_on: Container[int],
        path: str = "",
    ) -> None:
        self._cost = cost
        self._send = send
        self._state = state
        self._adm = adm
        self.hold = adm.cost
        self._charged_headers = charged
        self._refund_on = refund_on
        self._path = path
        self._mode = _PASS
        self._tap: SseUsageTap | None = None
        # The body's chunks so far (_HOLD, _COPY), joined once at its end: no copy per chunk.
        self._buffer: list[bytes] | None = None
        self._buffered = 0  # their total length
        self._start: Message | None = None
        # A complete answer's settle value, priced when its body completed (for its
        # headers): quiet_extension's tuple, queued by the middleware as it is.
        self.quiet: tuple[str] | None = None
        self._header_cost: int | None = None
        self._gone: asyncio.Event | None = None
        self.status = 0
        self.complete = False

    def refunded(self, status: int) -> bool:
        """Whether the response refunds: a ``refund_on`` status, or the upstream failed."""
        return status in self._refund_on or UPSTREAM_ERROR in self._state

    def _headers_for(self, status: int, actual: int | None) -> list[Header]:
        """The X-Tokens-* headers of the response start: the refund, the ``actual`` charge,
        or (``None``: only the hold can be told yet, a stream) the hold marked reserved."""
        if status in self._refund_on or UPSTREAM_ERROR in self._state:
            return refunded_headers(self._charged_headers, self._adm)
        if actual is None:
            return [*self._charged_headers, RESERVED]
        return actual_headers(self._charged_headers, self._adm, actual)

    # -- send ------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """The app's ``send``: see the class docstring."""
        # One coroutine: the helpers are plain functions (each coroutine layer costs a
        # frame on every await), and this awaits the server's send directly.
        kind = message["type"]
        if kind == "http.response.body":
            mode = self._mode
            if mode == _TAP:
                body: bytes = message.get("body", b"")
                if body:
                    self._tap.feed(body)  # type: ignore[union-attr]  # set with _TAP
            elif mode == _HOLD:
                out = self._hold_body(message)
                if out is not None and CLIENT_DISCONNECTED not in self._state:
                    await self._send(out[0])
                    await self._send(out[1])
                return
            elif mode == _COPY:
                self._copy(message.get("body", b""))
            if not message.get("more_body", False):
                self._ended()
        elif kind == "http.response.start":
            started = self._started(message)
            if started is None:
                return  # held
            message = started
        # Once the client has left (the response being drained for its usage), nothing
        # goes to it any more: the server would drop it, or raise.
        if CLIENT_DISCONNECTED not in self._state:
            await self._send(message)

    def answer(self, start: Message, body: bytes) -> Send | None:
        """The whole response at once: its ``start`` and its complete ``body`` (the proxy's
        answer of known length, read before its start: :data:`~gateway.core.scope_keys.
        USAGE_TAP`). The caller then sends the start and one final body message to the
        ``send`` returned, or nothing when it returns ``None``: the same outcome as
        :meth:`send` of the two messages. For the usual usage-charged answer (a JSON body,
        not refunded) that is one straight run here: the usage read, priced, the start
        headed with the actual charge, the settle value kept (:attr:`quiet`), and the
        ``send`` after the tap returned, so that the caller awaits the server's ``send``
        itself, as on a fixed-cost route (no coroutine of the tap's in between). Anything
        else gets :meth:`send`: the two messages go through the tap."""
        status = self.status = start["status"]
        state = self._state
        if (
            self._cost.usage
            and status not in self._refund_on
            and UPSTREAM_ERROR not in state
            and status >= 200
            and status != 204
            and status != 304
        ):
            headers = start.get("headers", ())
            path = self._path
            # (":" first: a one-character search costs a fraction of the whole name's, and
            # the usual path has no colon at all.)
            if ":" not in path or _GEMINI_STREAM not in path:
                cost = self._cost
                adm = self._adm
                left = adm.remaining
                if left is not None:
                    left += adm.cost
                # The usual answer: its headers tested, its usage read, priced and told in
                # one compiled call; False: the headers' test is left to _plain_answer (and
                # the reading to _whole), None: the reading is left to Python.
                read = (
                    _priced(
                        body, cost.mode, cost.terms, cost.terms_for, cost.maximum, left, headers
                    )
                    if _priced is not None
                    else False
                )
                if read:  # the usual answer: read and priced already
                    # _told, inlined (every usage-charged answer through the proxy; the
                    # upstream failing was ruled out above): the charge and the settle
                    # value kept, the start headed with the values read holds.
                    self._mode = _HOLD
                    self.complete = True
                    if self._gone is not None:
                        self._gone.set()
                    self._read = read
                    self.tokens = read[0]
                    self.quiet = read[1]
                    self.model = read[5] or ""
                    self.missing = False
                    charged = self._charged_headers
                    if read[3] is None:
                        start["headers"] = [*headers, (COST_NAME, read[2]), *charged[1:]]
                    else:
                        start["headers"] = [
                            *headers, (COST_NAME, read[2]), (REMAINING_NAME, read[3]), *charged[2:]
                        ]  # fmt: skip
                    # Once the client has left, nothing goes to it (as in send).
                    return None if CLIENT_DISCONNECTED in state else self._send
                if read is None or _plain_answer(headers):
                    self._mode = _HOLD
                    start["headers"] = self._whole(body, headers, read, left)
                    return None if CLIENT_DISCONNECTED in state else self._send
        return self.send

    def _whole(
        self,
        body: bytes,
        head: Iterable[Header],
        read: Priced | Literal[False] | None = False,
        left: int | None = None,
    ) -> list[Header]:
        """A complete answer's charge: its usage read (the compiled reading of the usual
        shapes, else :func:`usage_from_json`) and priced, or the missing-usage policy; the
        settle value kept in :attr:`quiet`; the answer's headers ``head`` followed by the
        X-Tokens-* headers that tell the charge. ``read``: what :meth:`answer`'s compiled
        call made of it already, with the balance ``left`` it was given (``None``: not
        known by the compiled reading; False: nothing asked yet)."""
        adm = self._adm
        if read is False:
            cost = self._cost
            left = adm.remaining
            if left is not None:
                left += adm.cost
            # Read, priced, the settle value and the header values made in one compiled
            # call for the usual answer (never False without headers to test); else the
            # same in Python (priced_counts).
            read = (
                _priced(body, cost.mode, cost.terms, cost.terms_for, cost.maximum, left, None)
                if _priced is not None
                else None
            ) or None
        if read is None:
            read = self._priced_slow(body, left)
        if read is not None:
            return self._told(read, head)
        self.complete = True
        if self._gone is not None:
            self._gone.set()
        self._read = None
        tokens = self.tokens = self._missing_charge()
        self.model, self.missing = "", True
        self.quiet = quiet_extension(Actual(tokens, None, missing=True, source="policy"))
        if UPSTREAM_ERROR in self._state:
            return [*head, *refunded_headers(self._charged_headers, adm)]
        return actual_headers(self._charged_headers, adm, tokens, head)

    def _told(self, read: Priced, head: Iterable[Header]) -> list[Header]:
        """:meth:`_whole` of an answer whose usage was read and priced (``read``): the
        charge and the settle value kept, the answer's headers ``head`` followed by the
        X-Tokens-* headers, whose values ``read`` holds."""
        self.complete = True
        if self._gone is not None:
            self._gone.set()
        self._read = read
        self.tokens = read[0]
        self.quiet = read[1]
        self.model, self.missing = read[5] or "", False
        # The status did not refund (else nothing was read), but the upstream may have
        # failed since the start (middleware mode).
        if UPSTREAM_ERROR in self._state:
            return [*head, *refunded_headers(self._charged_headers, self._adm)]
        # actual_headers (gateway/metering/cost_headers.py) with the values made above.
        charged = self._charged_headers
        if read[3] is None:
            return [*head, (COST_NAME, read[2]), *charged[1:]]
        return [*head, (COST_NAME, read[2]), (REMAINING_NAME, read[3]), *charged[2:]]

    def _priced_slow(self, body: bytes, left: int | None) -> Priced | None:
        """:meth:`_whole`'s reading when the compiled one does not know (or is off): the
        usage read (``counts``, else :func:`usage_from_json`) and :func:`priced_counts`;
        ``None`` when no usage came."""
        cost = self._cost
        read = _counts(body, cost.mode) if _counts is not None else None
        if read is None:  # a shape the compiled reading leaves to Python (or it is off)
            usage = usage_from_json(body, cost.provider)
            if usage is None:
                return None
            read = (
                usage.provider, usage.model, usage.input_tokens,
                usage.cached_input_tokens, usage.output_tokens, usage.reasoning_tokens,
            )  # fmt: skip
        prices = cost.prices
        assert prices is not None  # a checked config has prices for every usage cost
        return priced_counts(read, prices, cost.maximum, left)

    def _started(self, message: Message) -> Message | None:
        """The start message to send, with its X-Tokens-* headers; ``None`` when held."""
        status = self.status = message["status"]
        cost = self._cost
        if not cost.usage:
            return self._started_reported(message, status)
        headers = message.get("headers", ())
        actual: int | None = None
        if status in self._refund_on or UPSTREAM_ERROR in self._state:
            pass  # refunded: nothing to read
        elif status < 200 or status in (204, 304):
            actual = self._missing_charge()  # no body, so no usage: known now
        else:
            # The last of each header wins, as in a dict built from the list (in C: no
            # Python loop over the headers on every usage-charged answer).
            named = dict(headers)
            encoding = named.get(_CONTENT_ENCODING)
            if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
                actual = self._missing_charge()  # compressed: not read (we asked for none)
            elif named.get(_CONTENT_TYPE, b"").lower().startswith(b"text/event-stream"):
                self._mode, self._tap = _TAP, SseUsageTap(cost.provider)
            elif _GEMINI_STREAM in self._path:  # a JSON stream: passed on as it comes
                self._mode, self._buffer = _COPY, []
            else:
                # Held until the body is complete: the headers then give the actual charge.
                # (_buffer stays None until a body comes in more than one message.)
                self._mode = _HOLD
                self._start = message
                return None
        message["headers"] = [*headers, *self._headers_for(status, actual)]
        return message

    def _started_reported(self, message: Message, status: int) -> Message:
        """:meth:`_started` of a ``header`` cost: its cost header taken out (also from a
        refunded answer), the cost it reports (or the app's) in the X-Tokens-* headers."""
        cost = self._cost
        headers = message.get("headers", ())
        if cost.header_key is not None:
            headers = self._take_cost_header(list(headers), cost.header_key)
        actual: int | None = None
        if status not in self._refund_on and UPSTREAM_ERROR not in self._state:
            reported = self._header_cost
            if reported is None and APP_COST in self._state:
                reported = parse_cost_value(self._state[APP_COST])
            if reported is not None:
                actual = cost.spec.capped(reported)
        message["headers"] = [*headers, *self._headers_for(status, actual)]
        return message

    def _hold_body(self, message: Message) -> tuple[Message, Message] | None:
        """The held start and the body message once the body is complete (the app's own
        message when it came whole: the usual answer), or what is held when it is too long
        to hold; ``None`` while held."""
        start = self._start
        assert start is not None
        body: bytes = message.get("body", b"")
        buffer = self._buffer
        if message.get("more_body", False):
            if body:
                if buffer is None:
                    buffer = self._buffer = []
                buffer.append(body)
                self._buffered += len(body)
            if self._buffered <= RESPONSE_BODY_LIMIT:
                return None
            # Too long to hold: send what there is; the usage will count as missing.
            self._mode = _PASS
            return self._flush_held(more=True)
        if buffer:  # the usual answer comes in one message: no join at all, and no copy
            buffer.append(body)
            body = b"".join(buffer)
            message = {"type": "http.response.body", "body": body}
        self._start = self._buffer = None
        # The complete answer, read and priced as answer() does it.
        start["headers"] = self._whole(body, start.get("headers", ()))
        return start, message

    def _flush_held(self, *, more: bool) -> tuple[Message, Message] | None:
        """The held start (headed with the hold) and what was held of the body."""
        start, buffer = self._start, self._buffer
        self._start = self._buffer = None
        if start is None:
            return None
        start["headers"] = [*start.get("headers", ()), *self._headers_for(self.status, None)]
        body = {"type": "http.response.body", "body": b"".join(buffer or ()), "more_body": more}
        return start, body

    def _copy(self, body: bytes) -> None:
        buffer = self._buffer
        if buffer is not None:
            self._buffered += len(body)
            if self._buffered > RESPONSE_BODY_LIMIT:
                self._buffer = None  # too long to read: its usage is missing
            elif body:
                buffer.append(body)

    def _ended(self) -> None:
        self.complete = True
        if self._gone is not None:
            self._gone.set()

    def _take_cost_header(self, headers: list[Header], key: bytes) -> list[Header]:
        """``headers`` without the cost header; its value (all copies must agree, junk is
        no report) goes to ``_header_cost``."""
        values = [value for name, value in headers if name.lower() == key]
        if not values:
            return headers
        parsed = {parse_cost_value(value) for value in values}
        self._header_cost = parsed.pop() if len(parsed) == 1 else None
        return [h for h in headers if h[0].lower() != key]

    # -- after the app returns --------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether a response start is still held back (see :meth:`close`)."""
        return self._start is not None

    async def close(self) -> None:
        """The app returned: a response still held (its body never ended) goes out now, as
        a 502 when the upstream failed (nothing had reached the client), else as it was."""
        if self._start is None or CLIENT_DISCONNECTED in self._state:
            return
        if UPSTREAM_ERROR in self._state:
            self._start = self._buffer = None
            self.status = 502
            await send_problem(
                self._send, 502, "bad_gateway", "Bad Gateway",
                "The upstream service is unavailable or broke off its answer.",
            )  # fmt: skip
            return
        held = self._flush_held(more=True)  # incomplete: the server closes the connection
        if held is not None:
            await self._send(held[0])
            await self._send(held[1])

    def actual(self) -> Actual:
        """The charge of a response that is not refunded: the cost read, else the policy."""
        mode = self._mode
        if mode == _HOLD:  # priced already, for the headers (quiet None: it never ended)
            if self.quiet is None:
                return Actual(self._missing_charge(), None, missing=True, source="policy")
            read = self._read
            if read is None:
                return Actual(self.tokens, None, missing=True, source="policy")
            return Actual(self.tokens, checked_usage(*read[4:]))
        cost = self._cost
        if not cost.usage:
            reported = self._header_cost
            source = "header"
            if reported is None and APP_COST in self._state:
                reported, source = parse_cost_value(self._state[APP_COST]), "app"
            if reported is None:
                return Actual(self._missing_charge(), None, missing=True, source="policy")
            return Actual(cost.spec.capped(reported), None, source=source)
        usage: Usage | None = None
        final = self.complete
        if mode == _TAP:
            tap = self._tap
            assert tap is not None
            usage = tap.finish()
            final = tap.usage_reached_end
        elif mode == _COPY:
            buffer = self._buffer
            if buffer is not None and self.complete:
                usage = usage_from_json(b"".join(buffer), cost.provider)
        else:
            final = False
        if usage is None or not final:
            return Actual(self._missing_charge(), usage, missing=True, source="policy")
        return Actual(self._price(usage), usage)

    def _price(self, usage: Usage) -> int:
        prices = self._cost.prices
        assert prices is not None  # a checked config has prices for every usage cost
        return prices.cost(usage, self._cost.spec.maximum)

    def _missing_charge(self) -> int:
        return self._cost.spec.missing_charge(self.hold)

    # -- the response splice (gateway/core/splice.py) ------------------------------------

    def splice_observer(self) -> BodyObserver | bool:
        """What this tap needs of the body once the start went out, for a server that
        splices the pieces around :meth:`send` (the middleware declares it in
        ``SEND_PASSES_BODY``): an event stream's pieces go to the :class:`SseUsageTap` as
        :meth:`send` would hand them (in order, every one, also while draining after the
        client left); a body that is passed on untouched needs nothing (True); one that is
        held or copied must come through :meth:`send` (False). The end still comes through
        :meth:`send`, which marks the response complete."""
        mode = self._mode
        if mode == _TAP:
            tap = self._tap
            assert tap is not None
            return tap.feed
        return mode == _PASS

    # -- the client leaves ------------------------------------------------------------------

    async def client_left(self, drain_s: float) -> None:
        """The client disconnected: forward nothing more, and (``drain_s`` > 0) wait until
        the response is complete, at most ``drain_s`` seconds, before the app is told."""
        self._state[CLIENT_DISCONNECTED] = True
        if drain_s <= 0 or self.complete:
            return
        gone = self._gone = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), drain_s)


class ReplayFirst:
    """The app's ``receive`` for a variable-cost request whose body came whole in one
    message, read before the call, and that holds no disconnect back (the usual one
    through the proxy): that message first, then the server's. :class:`TapReceive` for
    anything else."""

    __slots__ = ("_first", "_receive")

    def __init__(self, first: Message, receive: Receive) -> None:
        self._first: Message | None = first
        self._receive = receive

    async def __call__(self) -> Message:
        first = self._first
        if first is None:
            return await self._receive()
        self._first = None
        return first


class TapReceive:
    """The app's ``receive`` for a variable-cost request: the body read before the call
    (``replay``) first, then the server's messages.

    ``drain_s`` > 0 (a usage cost, and an app that does not drain by itself): once the body
    is in, a ``http.disconnect`` reaches the app only when its response is complete or
    ``drain_s`` seconds later, whichever comes first, so that it finishes the upstream call
    whose usage is charged; meanwhile the tap forwards nothing.
    """

    __slots__ = ("_body_done", "_drain_s", "_receive", "_replay", "_tap")

    def __init__(
        self, replay: list[Message], receive: Receive, tap: ResponseTap | None, drain_s: float
    ) -> None:
        self._replay = deque(replay)
        self._receive = receive
        self._tap = tap
        self._drain_s = drain_s
        # Whether the body is in (then a disconnect is held back): only asked with a drain
        # (not through the proxy, which drains by itself: the usual usage-cost request).
        self._body_done = drain_s > 0 and bool(replay) and not replay[-1].get("more_body", False)

    async def __call__(self) -> Message:
        if self._replay:
            return self._replay.popleft()
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            if not message.get("more_body", False):
                self._body_done = True
        elif kind == "http.disconnect" and self._tap is not None:
            await self._tap.client_left(self._drain_s if self._body_done else 0.0)
        return message
