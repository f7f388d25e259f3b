"""Costs decided after the response (DESIGN A8) in the middleware: gateway/metering/usage_tap.py.

The pieces alone (reported costs, the request read before the call, the response tap with
an in-memory ``send``), then ``CreditGateMiddleware`` in front of a Starlette app against the
tests' Redis: a ``header`` cost reported by the app through the response header or through
``scope["state"]["creditgate_cost"]``, a ``usage`` cost read from the app's JSON or stream,
and a client that leaves a stream mid-way (the app sees the disconnect late, bounded).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from gateway import CreditGate, CreditGateMiddleware
from gateway.config import Config, ConfigError, parse_config
from gateway.core.counters import METRICS
from gateway.core.scope_keys import (
    ASKS_IDENTITY_ENCODING,
    CLIENT_DISCONNECTED,
    UPSTREAM_ERROR,
    USAGE_DRAIN_SECONDS,
    USAGE_TAP,
)
from gateway.metering import usage_tap
from gateway.metering.admission import Admission
from gateway.metering.settlement import Actual, counts_value, quiet_extension, usage_value
from gateway.metering.usage_tap import (
    RESPONSE_BODY_LIMIT,
    ResponseTap,
    SseUsageTap,
    VariableCost,
    gemini_model,
    identity_encoding,
    parse_cost_value,
    read_request,
)
from gateway.usage import StreamTap, Usage
from tests.support.reference import REFERENCE_YAML
from tests.support.services import redis_url
from tests.support.usage_charging import SettleLog, spy_on_settles
from tests.usage import wire

MODELS = {
    "gpt-*": {"input": 10, "cached_input": 5, "output": 40},
    "default": {"input": 20, "output": 80},
}
CHAT_COST = {"usage": "openai", "reserve": "auto", "max": 500}
CHAT5_COST = {"usage": "openai", "reserve": 5, "max": 500}
RESEARCH_COST = {"header": True, "reserve": 20, "max": 50}


def config_data(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(REFERENCE_YAML)
    data["features"]["chat"] = {"cost": CHAT_COST}
    data["features"]["research"] = {"cost": RESEARCH_COST}
    data["features"]["chat5"] = {"cost": CHAT5_COST}
    data["plans"]["pro"]["allocations"] |= {"chat": 1000, "research": 1000, "chat5": 1000}
    data["plans"]["pro"]["rate_limits"] = []
    data["routes"] += [
        {"method": "POST", "path": "/v1/chat/completions", "feature": "chat"},
        {"method": "POST", "path": "/research", "feature": "research"},
        {"method": "POST", "path": "/research/stream", "feature": "research"},
        {"method": "POST", "path": "/v1/chat5/completions", "feature": "chat5"},
    ]
    data["models"] = MODELS
    data.update(top)
    return data


def make_config(**top: Any) -> Config:
    return parse_config(yaml.safe_dump(config_data(**top)), "usage-tap.yaml")


# -- reported costs, paths, request bodies ------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"12", 12), (b" 7 ", 7), (b"0", 0), ("42", 42), (3, 3), (0, 0),
        (b"-1", None), (b"1.5", None), (b"abc", None), (b"", None), (b"1e3", None),
        (b"12345678901234567", None), (-3, None), (True, None), (2.0, None), (None, None),
    ],
)  # fmt: skip
def test_a_reported_cost_is_an_integer_or_nothing(value: object, expected: int | None) -> None:
    assert parse_cost_value(value) == expected


def test_the_model_of_a_gemini_path() -> None:
    assert gemini_model("/v1beta/models/gemini-2.5-flash:generateContent") == "gemini-2.5-flash"
    assert gemini_model("/v1/chat/completions") is None
    assert gemini_model("/v1beta/models/gemini-2.5-flash") is None


def receiving(*messages: Message) -> Any:
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def test_the_request_body_is_read_whole_within_the_limit() -> None:
    parts = [{"type": "http.request", "body": b"ab", "more_body": True}]
    parts += [{"type": "http.request", "body": b"cd", "more_body": False}]
    read = await read_request(receiving(*parts), [(b"content-length", b"4")])
    assert read.body == b"abcd" and read.messages == parts and not read.disconnected


async def test_a_body_over_the_limit_is_left_to_the_app() -> None:
    first = {"type": "http.request", "body": b"x" * 4, "more_body": True}
    declared = await read_request(receiving(first), [(b"content-length", b"11")], limit=10)
    assert declared.body is None and declared.messages == [first]  # read no further
    parts = [{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 3
    read = await read_request(receiving(*parts), [], limit=10)
    assert read.body is None and len(read.messages) == 2  # replayed, the rest goes on
    gone = await read_request(receiving({"type": "http.disconnect"}), [])
    assert gone.disconnected


# -- the filtered SSE tap reads what StreamTap reads -----------------------------------------------
def both_taps(chunks: list[bytes], provider: str = "auto") -> tuple[Any, Any]:
    taps = [StreamTap(provider), SseUsageTap(provider)]
    for tap in taps:
        for chunk in chunks:
            tap.feed(chunk)
    return tuple((tap.finish(), tap.usage_reached_end) for tap in taps)


def reframed(body: bytes, eol: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n").replace(b"\n", eol)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("name", sorted(wire.STREAMS))
def test_the_filtered_tap_reads_every_stream_as_streamtap_does(name: str, eol: bytes) -> None:
    body = reframed(wire.STREAMS[name][0], eol)
    expected = (wire.STREAMS[name][1], True)
    for provider in ("auto", wire.PROVIDER_OF[name]):
        for size in (1, 2, 5, 13, 64, 1000, len(body)):
            chunks = [body[i : i + size] for i in range(0, len(body), size)]
            plain, filtered = both_taps(chunks, provider)
            assert plain == filtered == expected, (provider, size, plain, filtered)
        for cut in range(len(body) + 1):  # every truncation: the same partial answer
            assert len(set(both_taps([body[:cut]], provider))) == 1, (provider, cut)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(sorted(wire.STREAMS)),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.booleans(),
    st.sampled_from(["auto", "openai", "anthropic", "gemini"]),
)
def test_any_split_gives_streamtaps_answer(
    name: str, eol: bytes, cuts: list[int], truncate: bool, provider: str
) -> None:
    body = reframed(wire.STREAMS[name][0], eol)
    if truncate and cuts:
        body = body[: cuts[0] % (len(body) + 1)]
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    plain, filtered = both_taps(chunks, provider)
    assert plain == filtered


@pytest.mark.parametrize(
    "noise",
    [
        b'data: {"choices":[{"delta":{"content":"[DONE] finishReason usage"}}],"usage":null}\n\n',
        b': comment with "usage":{ inside\n\n',
        b"event: ping\ndata: {}\n\n",
        b"data: " + b"x" * 100 + b"\n\n",
    ],
)
def test_noise_between_events_changes_nothing(noise: bytes) -> None:
    body = wire.STREAMS["openai-chat"][0]
    events = body.split(b"\n\n")
    mixed = b"\n\n".join(e + b"\n\n" + noise.rstrip(b"\n") for e in events[:-1]) + b"\n\n"
    for size in (1, 9, len(mixed)):
        chunks = [mixed[i : i + size] for i in range(0, len(mixed), size)]
        plain, filtered = both_taps(chunks)
        assert plain == filtered


def test_an_over_long_event_gives_up_as_streamtap_does() -> None:
    from gateway.usage.sse import DEFAULT_MAX_LINE

    body = wire.STREAMS["anthropic"][0]
    long_event = b"data: " + b"y" * (DEFAULT_MAX_LINE + 10) + b"\n\n"
    for stream in (long_event + body, body + long_event, body[:200] + long_event + body[200:]):
        chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
        plain, filtered = both_taps(chunks)
        assert plain == filtered


# -- the response tap alone ---------------------------------------------------------------------
class Sent:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def told(self) -> bytes:
        """What the response start told of the charge: the cost, or b"reserved" (a hold)."""
        headers = self.headers
        if headers.get(b"x-tokens-cost-status") == b"reserved":
            return b"reserved"
        return headers[b"x-tokens-cost"]


def admitted(feature: str, hold: int = 30) -> tuple[Admission, list[tuple[bytes, bytes]]]:
    """An admission holding ``hold`` tokens (balance unknown) and its charged headers."""
    adm = Admission("ok", "req-1", "org", feature, feature, hold)
    return adm, [(b"x-tokens-cost", str(hold).encode()), (b"x-creditgate-request-id", b"req-1")]


def tap_for(
    feature: str, state: dict[str, Any] | None = None, *, refunded: bool = False
) -> tuple[ResponseTap, Sent, dict[str, Any]]:
    config = make_config()
    cost = VariableCost(config.cost_spec(feature), config.prices, 15.0)
    sent, state = Sent(), ({} if state is None else state)
    adm, charged = admitted(feature)
    refund_on = range(100, 600) if refunded else range(500, 600)
    tap = ResponseTap(cost, sent, state, adm, charged, refund_on)
    return tap, sent, state


def start(content_type: bytes = b"application/json", *extra: tuple[bytes, bytes]) -> Message:
    headers = [(b"content-type", content_type), *extra]
    return {"type": "http.response.start", "status": 200, "headers": headers}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
CHAT_JSON = json.dumps({"object": "chat.completion", "model": "gpt-4o", "usage": CHAT_USAGE})
CHAT_PRICE = (1000 * 10 + 500 * 40) // 1000  # 30


def sse_events(usage: dict[str, Any] | None) -> list[bytes]:
    chunk = {"object": "chat.completion.chunk", "model": "gpt-4o", "usage": None}
    events = [chunk | {"choices": [{"delta": {"content": f"w{i} "}}]} for i in range(3)]
    if usage is not None:
        events.append(chunk | {"choices": [], "usage": usage})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


async def test_a_json_answer_is_held_until_read_and_headed_with_its_charge() -> None:
    tap, sent, _ = tap_for("chat")
    await tap.send(start())
    await tap.send(body(CHAT_JSON[:10].encode(), more=True))
    assert sent.messages == []  # held: the headers must say the actual charge
    await tap.send(body(CHAT_JSON[10:].encode()))
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert sent.told == str(CHAT_PRICE).encode()
    assert sent.messages[1]["body"] == CHAT_JSON.encode()
    actual = tap.actual()
    assert (actual.tokens, actual.missing, actual.source) == (CHAT_PRICE, False, "usage")
    assert actual.usage == Usage("openai", "gpt-4o", 1000, 0, 500, 0)


@pytest.mark.parametrize("size", [1, 3, 64])
async def test_a_json_answer_in_many_pieces_is_sent_whole_once(size: int) -> None:
    """The held pieces (empty ones too) are joined once, in order, into one body message."""
    tap, sent, _ = tap_for("chat")
    data = CHAT_JSON.encode()
    await tap.send(start())
    for at in range(0, len(data), size):
        await tap.send(body(data[at : at + size], more=True))
        await tap.send(body(b"", more=True))
    assert sent.messages == []
    await tap.send(body(b""))
    assert [m["type"] for m in sent.messages] == ["http.response.start", "http.response.body"]
    assert sent.messages[1]["body"] == data and not sent.messages[1].get("more_body")
    assert sent.told == str(CHAT_PRICE).encode()
    assert tap.actual().tokens == CHAT_PRICE


def gemini_stream_tap() -> tuple[ResponseTap, Sent]:
    data = config_data()
    data["features"]["gem"] = {"cost": {"usage": "auto", "reserve": 30, "max": 500}}
    data["plans"]["pro"]["allocations"] |= {"gem": 1000}
    config = parse_config(yaml.safe_dump(data), "usage-tap.yaml")
    cost = VariableCost(config.cost_spec("gem"), config.prices, 15.0)
    sent = Sent()
    adm, charged = admitted("gem")
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    tap = ResponseTap(cost, sent, {}, adm, charged, range(500, 600), path)
    return tap, sent


async def test_a_gemini_json_stream_goes_on_as_it_comes_and_is_read_at_its_end() -> None:
    """streamGenerateContent without alt=sse: a JSON array passed chunk by chunk, its copy
    joined once at the end and read (the last element with counts wins)."""
    tap, sent = gemini_stream_tap()
    items = [
        {"candidates": [{"content": {"parts": [{"text": "hi "}]}}], "modelVersion": "gemini-x"},
        {"usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 500}},
    ]
    data = json.dumps(items).encode()
    await tap.send(start())
    assert sent.told == b"reserved"
    for at in range(0, len(data), 7):
        message = body(data[at : at + 7], more=True)
        await tap.send(message)
        assert sent.messages[-1] is message  # forwarded at once, unchanged
    await tap.send(body(b""))
    actual = tap.actual()
    assert not actual.missing
    assert actual.usage == Usage("gemini", None, 1000, 0, 500, 0)
    assert actual.tokens == (1000 * 20 + 500 * 80) // 1000  # the default price


async def test_a_gemini_json_stream_too_long_to_read_is_missing() -> None:
    tap, sent = gemini_stream_tap()
    await tap.send(start())
    await tap.send(body(b"[" + b" " * RESPONSE_BODY_LIMIT, more=True))
    await tap.send(body(b'{"usageMetadata": {"promptTokenCount": 5}}]'))
    assert len(sent.messages) == 3
    assert tap.actual().missing


async def test_every_stream_chunk_goes_on_at_once_and_the_usage_is_read() -> None:
    tap, sent, _ = tap_for("chat")
    await tap.send(start(b"text/event-stream; charset=utf-8"))
    assert sent.told == b"reserved"
    for event in sse_events(CHAT_USAGE):
        for piece in (event[:7], event[7:]):  # split anywhere
            message = body(piece, more=True)
            await tap.send(message)
            assert sent.messages[-1] is message  # forwarded as it came, unchanged
    await tap.send(body(b""))
    assert tap.actual().tokens == CHAT_PRICE and not tap.actual().missing


async def test_a_spliced_stream_is_read_by_the_observer_as_send_would_read_it() -> None:
    """Around a server that splices the body (gateway/core/splice.py): after the start, an
    event stream's tap hands out its observer, which reads the pieces as send would; the end
    still comes through send. A held JSON answer needs send (False); a refunded or
    compressed body needs nothing (True)."""
    tap, sent, _ = tap_for("chat")
    await tap.send(start(b"text/event-stream"))
    observe = tap.splice_observer()
    assert callable(observe)
    for event in sse_events(CHAT_USAGE):
        observe(event[:5])
        observe(event[5:])
    assert len(sent.messages) == 1  # the pieces went around send
    await tap.send(body(b""))
    assert tap.actual().tokens == CHAT_PRICE and not tap.actual().missing
    held, _, _ = tap_for("chat")
    await held.send(start())
    assert held.splice_observer() is False
    refunded, _, _ = tap_for("chat", refunded=True)
    await refunded.send(start(b"text/event-stream"))
    assert refunded.splice_observer() is True


async def test_a_stream_that_ends_before_its_usage_is_missing() -> None:
    tap, _, _ = tap_for("chat")
    await tap.send(start(b"text/event-stream"))
    for event in sse_events(None):
        await tap.send(body(event, more=True))
    await tap.send(body(b""))
    actual = tap.actual()
    assert actual.missing and actual.source == "policy" and actual.tokens == 30  # the hold


async def test_an_explicit_zero_is_not_missing() -> None:
    tap, sent, _ = tap_for("chat")
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    await tap.send(start())
    await tap.send(body(json.dumps({"object": "chat.completion", "usage": zero}).encode()))
    assert sent.told == b"0"
    assert (tap.actual().tokens, tap.actual().missing) == (0, False)


async def test_a_json_answer_too_large_to_hold_passes_with_the_hold_in_its_headers() -> None:
    tap, sent, _ = tap_for("chat")
    await tap.send(start())
    await tap.send(body(b"x" * RESPONSE_BODY_LIMIT, more=True))
    assert sent.messages == []
    await tap.send(body(b"yy", more=True))
    assert sent.told == b"reserved" and len(sent.messages) == 2
    await tap.send(body(CHAT_JSON.encode()))
    assert sent.messages[-1]["body"] == CHAT_JSON.encode()
    assert tap.actual().missing


# -- a complete answer in one call (ResponseTap.answer, USAGE_TAP) ------------------------------
def _gem_path_tap(path: str) -> tuple[ResponseTap, Sent, dict[str, Any]]:
    config = parse_config(yaml.safe_dump(gem_config_data()), "gem.yaml")
    cost = VariableCost(config.cost_spec("gem"), config.prices, 15.0)
    sent, state = Sent(), {}
    adm, charged = admitted("gem")
    tap = ResponseTap(cost, sent, state, adm, charged, range(500, 600), path)
    return tap, sent, state


def gem_config_data() -> dict[str, Any]:
    data = config_data()
    data["features"]["gem"] = {"cost": {"usage": "auto", "reserve": 30, "max": 500}}
    data["plans"]["pro"]["allocations"] |= {"gem": 1000}
    return data


CHAT_DETAILED = json.dumps(
    {
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "usage": {
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 400},
            "completion_tokens_details": {"reasoning_tokens": 100},
        },
    }
).encode()
NON_ASCII_MODEL = CHAT_JSON.replace('"gpt-4o"', '"gpt-\u00e9"').encode()
ZERO = json.dumps(
    {"object": "chat.completion", "model": "gpt-4o", "usage": {"prompt_tokens": 0}}
).encode()
HEAVY = json.dumps(
    {"object": "chat.completion", "usage": {"prompt_tokens": 10**9, "completion_tokens": 1}}
).encode()
WHOLE_CASES = [
    # (feature or gem path, status, extra headers, body, state before)
    ("chat", 200, (), CHAT_JSON.encode(), {}),
    ("chat", 200, (), CHAT_DETAILED, {}),
    ("chat", 200, (), NON_ASCII_MODEL, {}),  # left to the Python reading
    ("chat", 200, (), ZERO, {}),  # an explicit zero is zero
    ("chat", 200, (), HEAVY, {}),  # capped by max
    ("chat", 200, (), b'{"object":"chat.completion"}', {}),  # no usage: the policy
    ("chat", 200, (), b"not json", {}),
    ("chat", 201, (), CHAT_JSON.encode(), {}),
    ("chat", 500, (), CHAT_JSON.encode(), {}),  # refunded: not read
    ("chat", 204, (), b"", {}),
    ("chat", 200, ((b"content-encoding", b"gzip"),), b"\x1f\x8b...", {}),
    ("chat", 200, ((b"content-encoding", b" Identity "),), CHAT_JSON.encode(), {}),
    ("chat", 200, ((b"content-type", b"text/event-stream"),), b"".join(sse_events(CHAT_USAGE)), {}),
    ("chat", 200, (), CHAT_JSON.encode(), {UPSTREAM_ERROR: "cut"}),
    ("chat", 200, (), CHAT_JSON.encode(), {CLIENT_DISCONNECTED: True}),
    ("research", 200, ((b"x-cost", b"17"),), b"{}", {}),  # a header cost: not a usage
    ("research", 200, (), b"{}", {}),
    ("/v1beta/models/g:generateContent", 200, (), wire.GEMINI_JSON, {}),
    ("/v1beta/models/g:generateContent", 200, (), wire.ANTHROPIC_JSON, {}),
    ("/v1beta/models/g:generateContent", 200, (), wire.OPENAI_RESPONSES_JSON, {}),
    ("/v1beta/models/g:streamGenerateContent", 200, (), wire.GEMINI_JSON, {}),
    # The headers' test, compiled (topscan.priced) or the tap's own for what it leaves.
    ("chat", 200, ((b"content-encoding", b"identity"),), CHAT_JSON.encode(), {}),
    ("chat", 200, ((b"content-encoding", b" Identity "),), CHAT_JSON.encode(), {}),
    ("chat", 200, ((b"content-encoding", b"gzip"),), CHAT_JSON.encode(), {}),
    ("chat", 200, ((b"content-type", b"Text/Event-Stream"),), CHAT_JSON.encode(), {}),
    ("chat", 200, ((b"content-type", b"text/plain"),), CHAT_JSON.encode(), {}),
]  # fmt: skip


def _whole_tap(feature: str, state: dict[str, Any]) -> tuple[ResponseTap, Sent]:
    if feature.startswith("/"):
        tap, sent, tap_state = _gem_path_tap(feature)
    else:
        tap, sent, tap_state = tap_for(feature)
    tap_state.update(state)
    return tap, sent


def _outcome(tap: ResponseTap, sent: Sent) -> tuple[Any, ...]:
    actual = tap.actual()
    messages = [{k: v for k, v in m.items() if k != "more_body" or v} for m in sent.messages]
    return messages, tap.status, tap.complete, tap.held, actual


@pytest.mark.parametrize("form", ["compiled", "counts", "pure"])
@pytest.mark.parametrize(("feature", "status", "extra", "data", "state"), WHOLE_CASES)
async def test_a_whole_answer_in_one_call_is_two_sends(
    feature: str,
    status: int,
    extra: tuple[tuple[bytes, bytes], ...],
    data: bytes,
    state: dict[str, Any],
    form: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """answer(start, body) gives the client, the tap and the settle what send(start) then
    send(body) give, with the compiled reading and without it."""
    if usage_tap._counts is None and form != "pure":
        pytest.skip("the C extension gateway.usage._topscan is not built")
    if form != "compiled":  # counts: the compiled reading priced in Python; pure: neither
        monkeypatch.setattr(usage_tap, "_priced", None)
    if form == "pure":
        monkeypatch.setattr(usage_tap, "_counts", None)

    def head() -> Message:
        return {**start(b"application/json", *extra), "status": status}

    tap, sent = _whole_tap(feature, state)
    await tap.send(head())
    await tap.send(body(data))
    two = _outcome(tap, sent)
    whole, sent_whole = _whole_tap(feature, state)
    start_message = head()
    target = whole.answer(start_message, data)  # then the caller's two sends, as the proxy's
    if target is not None:
        await target(start_message)
        await target({"type": "http.response.body", "body": data, "more_body": False})
    assert _outcome(whole, sent_whole) == two
    if whole.quiet is not None:  # the settle the middleware queues: settle_nowait's
        assert whole.quiet == quiet_extension(whole.actual())
        assert (whole.tokens, whole.missing) == (two[4].tokens, two[4].missing)
        usage = two[4].usage
        assert whole.model == ("" if usage is None or usage.model is None else usage.model)


def test_a_usage_read_by_counts_settles_as_its_actual() -> None:
    usage = Usage("openai", "gpt 4o", 5, 6, 7, 8)
    assert counts_value(30, "gpt 4o", 5, 6, 7, 8) == usage_value(Actual(30, usage))
    no_model = Usage("gemini", None, 0, 0, 0, 0)
    assert counts_value(0, None, 0, 0, 0, 0) == usage_value(Actual(0, no_model))


async def test_compressed_and_refunded_answers_are_not_read() -> None:
    tap, sent, _ = tap_for("chat")
    await tap.send(start(b"application/json", (b"content-encoding", b"gzip")))
    assert sent.told == b"30"  # no usage can be read: the policy, known now
    await tap.send(body(b"\x1f\x8b..."))
    assert tap.actual().missing
    refunded, sent, _ = tap_for("chat", refunded=True)
    await refunded.send(start())
    await refunded.send(body(CHAT_JSON.encode()))
    assert sent.messages[1]["body"] == CHAT_JSON.encode()  # passed, not held


@pytest.mark.parametrize(
    ("extra", "read"),
    [
        # The last of a repeated header decides, in any case of its value.
        (((b"content-encoding", b"gzip"), (b"content-encoding", b" Identity ")), True),
        (((b"content-encoding", b"identity"), (b"content-encoding", b"br")), False),
        (((b"content-type", b"application/json"), (b"content-type", b"Text/Event-Stream")), None),
        (((b"content-type", b"text/event-stream"), (b"content-type", b"application/json")), True),
    ],
)
async def test_the_last_content_type_and_encoding_decide(
    extra: tuple[tuple[bytes, bytes], ...], read: bool | None
) -> None:
    """``read``: the answer held and its usage read (True), not read (False), or tapped as
    an event stream (None)."""
    tap, sent, _ = tap_for("chat")
    await tap.send({"type": "http.response.start", "status": 200, "headers": list(extra)})
    if read is None:
        assert sent.told == b"reserved"
        return
    assert sent.messages == [] if read else sent.told == b"30"
    await tap.send(body(CHAT_JSON.encode()))
    assert tap.actual().missing is not read


@pytest.mark.parametrize(
    "given",
    [
        [(b"host", b"h"), (b"content-type", b"application/json")],
        [(b"accept-encoding", b"gzip, br"), (b"host", b"h")],
        [(b"host", b"h"), (b"accept-encoding", b"gzip"), (b"x", b"1"), (b"accept-encoding", b"br")],
    ],
)
def test_identity_encoding_replaces_every_accept_encoding(given: list[tuple[bytes, bytes]]) -> None:
    before = list(given)
    out = identity_encoding(given)
    assert out == [h for h in given if h[0] != b"accept-encoding"] + [
        (b"accept-encoding", b"identity")
    ]
    assert given == before  # the caller's list is not changed


async def test_an_upstream_failure_while_held_becomes_a_502() -> None:
    tap, sent, state = tap_for("chat")
    await tap.send(start())
    await tap.send(body(b'{"object":', more=True))
    state[UPSTREAM_ERROR] = "cut"
    await tap.close()
    assert sent.messages[0]["status"] == 502 and tap.status == 502


async def test_nothing_goes_to_a_client_that_left() -> None:
    tap, sent, state = tap_for("chat")
    await tap.send(start(b"text/event-stream"))
    state[CLIENT_DISCONNECTED] = True
    for event in sse_events(CHAT_USAGE):
        await tap.send(body(event, more=True))
    await tap.send(body(b""))
    assert len(sent.messages) == 1  # the start only
    assert tap.actual().tokens == CHAT_PRICE  # but the usage was read


@pytest.mark.parametrize(
    ("values", "state", "expected"),
    [
        ([b"17"], {}, (17, "header", False)),
        ([b"999"], {}, (50, "header", False)),  # capped by max
        ([b"0"], {}, (0, "header", False)),
        ([b"12", b"12"], {}, (12, "header", False)),
        ([b"12", b"13"], {}, (20, "policy", True)),  # copies that disagree: no report
        ([b"lots"], {}, (20, "policy", True)),
        ([], {"creditgate_cost": 9}, (9, "app", False)),
        ([], {"creditgate_cost": "junk"}, (20, "policy", True)),
        ([], {}, (20, "policy", True)),  # charge_reserve: the reserve
    ],
)
async def test_a_header_cost_is_taken_and_removed(
    values: list[bytes], state: dict[str, Any], expected: tuple[int, str, bool]
) -> None:
    tap, sent, _ = tap_for("research", dict(state))
    tap.hold = 20
    headers = [(b"X-Creditgate-Cost", v) for v in values]
    await tap.send(start(b"application/json", *headers, (b"x-other", b"1")))
    await tap.send(body(b"{}"))
    names = [name.lower() for name, _ in sent.messages[0]["headers"]]
    assert b"x-creditgate-cost" not in names and b"x-other" in names
    actual = tap.actual()
    assert (actual.tokens, actual.source, actual.missing) == expected
    said = sent.told
    assert said == (b"reserved" if expected[1] == "policy" else str(expected[0]).encode())


def test_usage_drain_seconds_is_checked() -> None:
    assert make_config().usage_drain_seconds == 15.0
    with pytest.raises(ConfigError, match="usage_drain_seconds"):
        make_config(usage_drain_seconds=-1)


# -- the middleware in front of a Starlette app -------------------------------------------------
async def research(request: Request) -> Response:
    how = request.query_params.get("report", "header")
    amount = request.query_params.get("cost", "17")
    if how == "header":
        return JSONResponse({"ok": True}, headers={"X-Creditgate-Cost": amount})
    request.state.creditgate_cost = int(amount)
    return JSONResponse({"ok": True})


async def research_stream(request: Request) -> Response:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        request.state.creditgate_cost = 11  # known only once the work is done
        yield b"data: 2\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


class Model:
    """Stands for the app's call to an LLM: streams once the test lets it go on."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()
        self.finished = False
        self.received: list[bytes] = []


async def chat(request: Request) -> Response:
    model: Model = request.app.state.model
    data = await request.body()
    model.received.append(data)
    doc = json.loads(data)
    if not doc.get("stream"):
        return Response(CHAT_JSON, media_type="application/json")
    ask_usage = (doc.get("stream_options") or {}).get("include_usage") is True

    async def events() -> AsyncIterator[bytes]:
        parts = sse_events(CHAT_USAGE if ask_usage else None)
        yield parts[0]
        await model.go_on.wait()
        for part in parts[1:]:
            yield part
        model.finished = True

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
async def app_gate() -> AsyncIterator[tuple[Starlette, CreditGate]]:
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    config = make_config(redis_url=redis_url(), key_prefix=prefix, usage_drain_seconds=0.5)
    gate = CreditGate(config)
    await gate.set_plan("acme", "pro")
    app = Starlette(
        routes=[
            Route("/research", research, methods=["POST"]),
            Route("/research/stream", research_stream, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
    app.state.model = Model()
    app.add_middleware(CreditGateMiddleware, gate=gate)
    try:
        yield app, gate
    finally:
        client = gate.redis.client
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(key)
        await gate.close()


WHO = {"X-Org-Id": "acme", "X-User-Id": "u1"}


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> SettleLog:
    return spy_on_settles(monkeypatch)


async def balance(gate: CreditGate, bucket: str) -> int:
    await gate.meter.drain()
    return (await gate.balance("acme")).buckets[bucket].balance


@pytest.mark.parametrize(("report", "cost"), [("header", 17), ("state", 9)])
async def test_the_app_reports_its_cost(
    app_gate: tuple[Starlette, CreditGate], settles: SettleLog, report: str, cost: int
) -> None:
    app, gate = app_gate
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", headers=WHO) as http:
        r = await http.post(f"/research?report={report}&cost={cost}")
    assert r.status_code == 200 and "x-creditgate-cost" not in r.headers
    assert r.headers["x-tokens-cost"] == str(cost) and "x-tokens-cost-status" not in r.headers
    assert r.headers["x-tokens-remaining"] == str(1000 - cost)
    (call,) = settles.calls
    assert call.hold == 20 and call.actual.tokens == cost
    assert call.actual.source == report.replace("state", "app")
    assert await balance(gate, "research") == 1000 - cost


async def test_an_app_that_reports_its_cost_after_the_headers(
    app_gate: tuple[Starlette, CreditGate], settles: SettleLog
) -> None:
    app, gate = app_gate
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", headers=WHO) as http:
        r = await http.post("/research/stream")
    assert r.headers["x-tokens-cost"] == "20" and r.headers["x-tokens-cost-status"] == "reserved"
    (call,) = settles.calls
    assert (call.actual.tokens, call.actual.source) == (11, "app")
    assert await balance(gate, "research") == 1000 - 11


async def test_a_usage_cost_in_middleware_mode(
    app_gate: tuple[Starlette, CreditGate], settles: SettleLog
) -> None:
    app, gate = app_gate
    app.state.model.go_on.set()
    by_model = METRICS.tokens_by_model().get(("chat", "gpt-4o"), 0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", headers=WHO) as http:
        plain = await http.post("/v1/chat/completions", json={"model": "gpt-4o", "max_tokens": 100})
        stream = await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "stream": True, "messages": []},
            headers={"accept-encoding": "gzip"},
        )
    assert plain.headers["x-tokens-cost"] == str(CHAT_PRICE)
    assert stream.headers["x-tokens-cost-status"] == "reserved"
    added = json.loads(app.state.model.received[1])
    assert added["stream_options"] == {"include_usage": True}  # asked for on the app's behalf
    assert [c.actual.tokens for c in settles.calls] == [CHAT_PRICE, CHAT_PRICE]
    assert METRICS.tokens_by_model()[("chat", "gpt-4o")] == by_model + 2 * CHAT_PRICE
    assert await balance(gate, "chat") == 1000 - 2 * CHAT_PRICE


async def call_and_leave(app: Starlette, *, leave_after: float) -> list[Message]:
    """A streamed chat request over raw ASGI whose client disconnects after the first chunk."""
    payload = json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode()
    left = asyncio.Event()
    sent: list[Message] = []
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            asyncio.get_running_loop().call_later(leave_after, left.set)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"x-org-id", b"acme"), (b"x-user-id", b"u1"), (b"host", b"app"),
                    (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1), "server": ("app", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    assert scope["state"][USAGE_DRAIN_SECONDS] == 0.5 and scope["state"][CLIENT_DISCONNECTED]
    return sent


async def test_the_app_sees_a_disconnect_late_and_finishes_its_stream(
    app_gate: tuple[Starlette, CreditGate], settles: SettleLog
) -> None:
    app, gate = app_gate
    model: Model = app.state.model
    task = asyncio.create_task(call_and_leave(app, leave_after=0.05))
    await asyncio.sleep(0.2)  # the client has left; the app has not been told
    assert not model.finished and not task.done()
    model.go_on.set()
    sent = await asyncio.wait_for(task, 5)
    assert model.finished  # the app streamed to the end
    assert [m.get("body") for m in sent[1:]] == [sse_events(CHAT_USAGE)[0]]  # nothing after
    (call,) = settles.calls
    assert call.actual.tokens == CHAT_PRICE and not call.actual.missing
    assert await balance(gate, "chat") == 1000 - CHAT_PRICE


async def test_the_late_disconnect_is_bounded(
    app_gate: tuple[Starlette, CreditGate], settles: SettleLog
) -> None:
    app, _ = app_gate
    model: Model = app.state.model
    missing = METRICS.usage_missing().get("chat", 0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(call_and_leave(app, leave_after=0.0), 5)
    assert 0.5 <= loop.time() - began < 2  # usage_drain_seconds: 0.5
    assert not model.finished
    (call,) = settles.calls
    assert call.actual.missing and call.actual.tokens == call.hold
    assert METRICS.usage_missing()["chat"] == missing + 1  # creditgate_usage_missing_total


async def test_the_proxy_drains_by_itself_so_it_sees_a_disconnect_at_once(
    app_gate: tuple[Starlette, CreditGate],
) -> None:
    """``UpstreamProxy`` keeps reading a usage-metered answer whose client left
    (``drains_usage``): the middleware in front of it must not hold the client's disconnect
    back too (it would wait out usage_drain_seconds before the proxy even knew)."""
    from gateway.proxy.app import UpstreamProxy

    _, gate = app_gate
    seen: list[tuple[Message, float]] = []

    class Recording(UpstreamProxy):
        async def _http(self, scope: Any, receive: Any, send: Any) -> None:
            loop = asyncio.get_running_loop()
            began = loop.time()
            for _ in range(2):  # the body, replayed; then the client's disconnect
                seen.append((await receive(), loop.time() - began))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    app = CreditGateMiddleware(Recording("http://127.0.0.1:9"), gate=gate)
    payload = json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode()
    receive = receiving(
        {"type": "http.request", "body": payload, "more_body": False}, {"type": "http.disconnect"}
    )
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("app", 80),
        "headers": [(b"x-org-id", b"acme"), (b"x-user-id", b"u1"), (b"host", b"app")],
        "state": {},
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 5)
    (body, _), (gone, waited) = seen
    # reserve: auto: read before the call (the hold depends on it), include_usage asked.
    assert json.loads(body["body"])["stream_options"] == {"include_usage": True}
    assert gone["type"] == "http.disconnect" and waited < 0.4  # usage_drain_seconds: 0.5
    assert scope["state"][USAGE_DRAIN_SECONDS] == 0.5  # the proxy is still asked to drain


@pytest.mark.parametrize("reads", [True, False], ids=["reads_usage_request", "plain app"])
@pytest.mark.parametrize("feature", ["/v1/chat5/completions", "/v1/chat/completions"])
async def test_the_request_body_is_left_only_to_an_app_that_reads_it(
    app_gate: tuple[Starlette, CreditGate], reads: bool, feature: str
) -> None:
    """An app that declares READS_USAGE_REQUEST (the proxy) gets the client's receive as it
    is and the tap's request side to apply; any other app gets the body read before the call
    with include_usage asked for, as before. A body the hold depends on (reserve: auto) is
    read before the call for any app."""
    _, gate = app_gate
    got: list[tuple[Any, Message, Any]] = []

    class App:  # like the proxy when it reads the request: it also drains by itself
        reads_usage_request = reads
        drains_usage = reads

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            got.append((receive, await receive(), scope["state"].get(USAGE_TAP)))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    app = CreditGateMiddleware(App(), gate=gate)
    payload = json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode()
    client = receiving({"type": "http.request", "body": payload, "more_body": False})

    async def send(message: Message) -> None:
        pass

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": feature, "raw_path": feature.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("app", 80),
        "headers": [(b"x-org-id", b"acme"), (b"x-user-id", b"u1"), (b"host", b"app")],
        "state": {},
    }  # fmt: skip
    await asyncio.wait_for(app(scope, client, send), 5)
    ((receive, first, tap),) = got
    if reads and feature == "/v1/chat5/completions":
        assert receive is client and first["body"] == payload
        assert tap is not None and tap[2] is not None
        assert json.loads(tap[2][0](first)["body"])["stream_options"] == {"include_usage": True}
    else:
        assert receive is not client and tap is not None and tap[2] is None
        assert json.loads(first["body"])["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("asks", [True, False], ids=["asks_identity_encoding", "plain app"])
@pytest.mark.parametrize("feature", ["/v1/chat5/completions", "/v1/chat/completions"])
async def test_identity_is_left_only_to_an_app_that_asks_for_it(
    app_gate: tuple[Starlette, CreditGate], asks: bool, feature: str
) -> None:
    """An app that declares ASKS_IDENTITY_ENCODING (the proxy) gets the client's
    Accept-Encoding as it came, and the scope's list is never changed; any other app gets
    ``identity`` in its place, as before."""
    _, gate = app_gate
    seen: list[list[tuple[bytes, bytes]]] = []
    receives: list[Any] = []

    class App:
        asks_identity_encoding = asks
        reads_usage_request = True
        drains_usage = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            seen.append(list(scope["headers"]))
            receives.append(receive)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    assert ASKS_IDENTITY_ENCODING == "asks_identity_encoding"
    app = CreditGateMiddleware(App(), gate=gate)
    payload = json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode()
    client = receiving({"type": "http.request", "body": payload, "more_body": False})

    async def send(message: Message) -> None:
        pass

    sent = [
        (b"x-org-id", b"acme"), (b"x-user-id", b"u1"), (b"host", b"app"),
        (b"accept-encoding", b"gzip"),
    ]  # fmt: skip
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": feature, "raw_path": feature.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("app", 80),
        "headers": list(sent), "state": {},
    }  # fmt: skip
    await asyncio.wait_for(app(scope, client, send), 5)
    assert scope["headers"] == sent
    ((headers,),) = [seen]
    encodings = [v for n, v in headers if n == b"accept-encoding"]
    assert encodings == ([b"gzip"] if asks else [b"identity"])
    # Nothing done before the call but for reserve: auto (its hold needs the body).
    assert (receives[0] is client) == (feature == "/v1/chat5/completions")
