"""Request bodies: model, output cap, the reserve, and asking OpenAI for stream usage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage import (
    PriceTable,
    StreamTap,
    ensure_stream_usage,
    estimate_reserve,
    inspect_request,
    request_model,
    requests,
)
from gateway.usage.requests import DEFAULT_OUTPUT_TOKENS
from tests.usage.test_topscan import MUTATIONS, WS, mutate

PRICES = PriceTable.from_mapping(
    {
        "gpt-4o-mini*": {"input": 1, "cached_input": 0.5, "output": 4},
        "claude-*": {"input": 3, "cached_input": 0.3, "output": 15},
        "gemini-*": {"input": 1, "output": 4},
        "default": {"input": 2, "output": 8},
    }
)


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def expected(size: int, output: int, input_price: float, output_price: float) -> int:
    # ceil((ceil(size / 4) * input + output * output) / 1000), computed in integers.
    tokens = -(-size // 4)
    total_milli = tokens * round(input_price * 10) + output * round(output_price * 10)
    return max(1, -(-total_milli // 10_000))


def test_openai_chat_reserve_uses_max_completion_tokens() -> None:
    req = body(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi" * 500}],
            "max_completion_tokens": 2000,
        }
    )
    assert estimate_reserve(req, "openai", PRICES) == expected(len(req), 2000, 1, 4)
    assert estimate_reserve(req, "auto", PRICES) == expected(len(req), 2000, 1, 4)


def test_legacy_max_tokens_and_responses_max_output_tokens() -> None:
    chat = body({"model": "gpt-4o-mini-2024-07-18", "messages": [], "max_tokens": 300})
    assert inspect_request(chat, "openai").max_output_tokens == 300
    resp = body({"model": "o4-mini", "input": "hello", "max_output_tokens": 5000})
    info = inspect_request(resp, "openai")
    assert info.max_output_tokens == 5000 and info.model == "o4-mini"
    assert estimate_reserve(resp, "openai", PRICES) == expected(len(resp), 5000, 2, 8)


def test_anthropic_reserve() -> None:
    req = body(
        {
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
        }
    )
    info = inspect_request(req, "anthropic")
    assert (info.model, info.max_output_tokens, info.stream) == (
        "claude-sonnet-4-20250514",
        1024,
        True,
    )
    assert estimate_reserve(req, "anthropic", PRICES) == expected(len(req), 1024, 3, 15)
    # Only Anthropic's own field counts for Anthropic.
    other = body({"model": "claude-x", "max_completion_tokens": 10, "messages": []})
    assert inspect_request(other, "anthropic").max_output_tokens is None


def test_gemini_reserve_with_generation_config_and_url_model() -> None:
    req = body(
        {
            "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
            "generationConfig": {"maxOutputTokens": 800, "candidateCount": 2},
        }
    )
    info = inspect_request(req, "gemini")
    assert (info.model, info.max_output_tokens, info.choices) == (None, 1600, 2)
    assert estimate_reserve(req, "gemini", PRICES, model="gemini-2.5-flash") == expected(
        len(req), 1600, 1, 4
    )
    snake = body({"contents": [], "generation_config": {"max_output_tokens": 50}})
    assert inspect_request(snake, "auto").max_output_tokens == 50
    assert inspect_request(snake, "openai").max_output_tokens is None


def test_n_choices_multiply_output() -> None:
    req = body({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100, "n": 3})
    assert inspect_request(req).max_output_tokens == 300
    for bad_n in (0, -1, 1000, True, 2.0, "3"):
        req = body({"model": "m", "messages": [], "max_tokens": 100, "n": bad_n})
        assert inspect_request(req).max_output_tokens == 100


def test_default_output_when_none_named_and_cap() -> None:
    req = body({"model": "claude-opus", "messages": [{"role": "user", "content": "x"}]})
    assert estimate_reserve(req, "anthropic", PRICES) == expected(
        len(req), DEFAULT_OUTPUT_TOKENS, 3, 15
    )
    assert estimate_reserve(req, "anthropic", PRICES, default_output=100) == expected(
        len(req), 100, 3, 15
    )
    assert estimate_reserve(req, "anthropic", PRICES, cap=20) == 20
    assert estimate_reserve(req, "anthropic", PRICES, cap=1) == 1


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100", None, 10**13])
def test_bad_output_caps_are_ignored(bad: Any) -> None:
    req = body({"model": "m", "messages": [], "max_tokens": bad})
    assert inspect_request(req).max_output_tokens is None


def test_reserve_is_at_least_one() -> None:
    free = PriceTable.from_mapping({"default": {"input": 0, "output": 0}})
    assert estimate_reserve(b"{}", "auto", free) == 1
    assert estimate_reserve(b"", "auto", free, cap=5) == 1


def test_non_json_body_reserves_by_size() -> None:
    raw = b"\x00not json" * 100
    info = inspect_request(raw)
    assert (info.model, info.max_output_tokens, info.stream, info.size) == (
        None,
        None,
        False,
        len(raw),
    )
    assert estimate_reserve(raw, "auto", PRICES) == expected(len(raw), DEFAULT_OUTPUT_TOKENS, 2, 8)
    assert request_model(raw) is None
    assert request_model(b"[1]") is None
    assert request_model(b'{"model": "gpt-5"}') == "gpt-5"
    assert request_model(b'{"model": 5}') is None


def test_reserve_argument_checks() -> None:
    with pytest.raises(ValueError):
        estimate_reserve(b"{}", "auto", PRICES, cap=0)
    with pytest.raises(ValueError):
        estimate_reserve(b"{}", "auto", PRICES, default_output=-1)
    with pytest.raises(ValueError):
        estimate_reserve(b"{}", "bedrock", PRICES)


# -- ensure_stream_usage -------------------------------------------------------------------------

CHAT = {
    "model": "gpt-4o-mini",
    "stream": True,
    "temperature": 0.7,
    "messages": [{"role": "user", "content": "Héllo ✓"}],
}


def test_adds_include_usage_by_splicing() -> None:
    original = json.dumps(CHAT, ensure_ascii=False).encode()
    changed = ensure_stream_usage(original)
    assert changed is not None
    assert changed == b'{"stream_options":{"include_usage":true},' + original[1:]
    assert json.loads(changed) == {**CHAT, "stream_options": {"include_usage": True}}
    assert ensure_stream_usage(changed) is None  # already there


def test_splice_keeps_leading_whitespace() -> None:
    original = b"\n  " + body(CHAT)
    changed = ensure_stream_usage(original)
    assert changed is not None and changed.startswith(b'\n  {"stream_options":')
    assert json.loads(changed)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "options", [None, {}, {"include_usage": False}, {"include_obfuscation": False}]
)
def test_existing_stream_options_are_completed(options: Any) -> None:
    changed = ensure_stream_usage(body({**CHAT, "stream_options": options}))
    assert changed is not None
    doc = json.loads(changed)
    assert doc["stream_options"]["include_usage"] is True
    assert doc["messages"] == CHAT["messages"] and doc["temperature"] == 0.7
    if options:
        assert set(doc["stream_options"]) == {*options, "include_usage"}


@pytest.mark.parametrize(
    "doc",
    [
        {**CHAT, "stream": False},
        {k: v for k, v in CHAT.items() if k != "stream"},
        {**CHAT, "stream": "true"},
        {**CHAT, "stream_options": {"include_usage": True}},
        {**CHAT, "stream_options": "yes"},
        {"model": "o4-mini", "input": "hi", "stream": True},  # Responses API
        {
            "model": "claude-x",
            "max_tokens": 10,
            "stream": True,
            "system": "be brief",
            "messages": [],
        },  # Anthropic Messages
        [CHAT],
    ],
)
def test_nothing_to_change(doc: Any) -> None:
    assert ensure_stream_usage(body(doc)) is None


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"\xff\xfe", b'"stream"'])
def test_not_an_object(raw: bytes) -> None:
    assert ensure_stream_usage(raw) is None


def test_reencoded_body_keeps_unicode_and_lone_surrogates() -> None:
    raw = b'{"stream": true, "stream_options": null, "messages": [{"content": "\\ud800 \xc3\xa9"}]}'
    changed = ensure_stream_usage(raw)
    assert changed is not None
    assert json.loads(changed)["messages"][0]["content"] == "\ud800 é"


def test_the_added_usage_chunk_is_what_the_tap_reads() -> None:
    assert ensure_stream_usage(body(CHAT)) is not None
    tap = StreamTap("openai")
    tap.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
    tap.feed(b"data: [DONE]\n\n")
    usage = tap.finish()
    assert usage is not None and usage.total_tokens == 7 and tap.usage_reached_end


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_ensure_stream_usage_only_ever_adds_include_usage(extra: Any) -> None:
    doc = {**CHAT, "extra": extra}
    changed = ensure_stream_usage(body(doc))
    assert changed is not None
    assert json.loads(changed) == {**doc, "stream_options": {"include_usage": True}}


def _reserve_by_inspection(
    raw: bytes, provider: str, model: str | None, default_output: int, cap: int | None
) -> int:
    """estimate_reserve's documented reading, spelt out: inspect_request priced by charge()
    (what it computed before its plain-statement form)."""
    import math

    from gateway.usage import charge

    info = inspect_request(raw, provider)
    output = info.max_output_tokens
    if output is None:
        output = default_output * info.choices
    price = PRICES.price_for(model if model is not None else info.model)
    return max(1, charge(price, math.ceil(info.size / 4), 0, output, cap))


_COUNTS = st.one_of(
    st.integers(-3, 300),
    st.integers(10**12 - 2, 10**12 + 2),
    st.sampled_from([None, True, False, 1.0, 2.5, "7", [], {}]),
)
_OPTIONAL = st.dictionaries(
    st.sampled_from(
        ["max_tokens", "max_completion_tokens", "max_output_tokens", "n", "model", "stream"]
    ),
    _COUNTS | st.sampled_from(["gpt-4o-mini", "claude-x", "gemini-2.0-flash", "", "x" * 300]),
)
_GEMINI_CONFIG = st.dictionaries(
    st.sampled_from(
        ["maxOutputTokens", "max_output_tokens", "candidateCount", "candidate_count", "other"]
    ),
    _COUNTS,
)


@settings(max_examples=600, deadline=None)
@given(
    _OPTIONAL,
    st.none() | _GEMINI_CONFIG | _COUNTS,
    st.sampled_from(["generationConfig", "generation_config"]),
    st.sampled_from(["auto", "openai", "anthropic", "gemini"]),
    st.sampled_from([None, "gpt-4o-mini", "gemini-2.5-flash", "unknown"]),
    st.sampled_from([DEFAULT_OUTPUT_TOKENS, 0, 7]),
    st.sampled_from([None, 1, 3, 50, 10**9]),
    st.sampled_from([b"", b"not json", b"[1, 2]", b'"text"']),
)
def test_estimate_reserve_equals_the_inspected_reading(
    fields: dict[str, Any],
    config: Any,
    config_key: str,
    provider: str,
    model: str | None,
    default_output: int,
    cap: int | None,
    junk: bytes,
) -> None:
    doc = {"messages": [{"role": "user", "content": "hello " * 40}], **fields}
    if config is not None:
        doc[config_key] = config
    for raw in (body(doc), junk):
        got = estimate_reserve(
            raw, provider, PRICES, model=model, default_output=default_output, cap=cap
        )
        assert got == _reserve_by_inspection(raw, provider, model, default_output, cap)


# -- the request read through the compiled scan (only the members it reads decoded) ----------

_REQUEST_MEMBERS = st.sampled_from(
    [
        "max_tokens", "max_completion_tokens", "max_output_tokens", "n", "model",
        "generationConfig", "generation_config", "messages", "stream", "max\\u005ftokens",
    ]
)  # fmt: skip
_MEMBER_VALUES = st.one_of(
    _COUNTS.map(json.dumps),
    st.sampled_from(['"gpt-4o-mini"', '"claude-x"', '"gemini-2.5-flash"', '"x\\u0000"']),
    st.sampled_from(["1e400", "-0", "300.0", "99999999999999999999999", "[300]", "{}"]),
    _GEMINI_CONFIG.map(json.dumps),
    st.just('[{"role":"user","content":"hi","max_tokens":7,"model":"claude-x"}]'),
)


@st.composite
def _request_bodies(draw: st.DrawFn) -> bytes:
    """A request object with the read members (some repeated, some spelt with an escape,
    some nested where they do not count), then perhaps cut, flipped or grown."""
    ws = draw(WS)
    pairs = draw(st.lists(st.tuples(_REQUEST_MEMBERS, _MEMBER_VALUES), max_size=8))
    text = "{" + ws + ("," + ws).join(f'"{k}"{ws}:{ws}{v}' for k, v in pairs) + ws + "}"
    body = text.encode()
    for how in draw(st.lists(MUTATIONS, max_size=2)):
        body = mutate(body, how)
    return body


@pytest.mark.skipif(
    requests._scan is None,  # type: ignore[attr-defined]
    reason="gateway.usage._topscan not built",
)
@settings(max_examples=1500, deadline=None)
@given(_request_bodies(), st.sampled_from(["auto", "openai", "anthropic", "gemini"]))
def test_the_scanned_request_reserves_as_the_whole_one(raw: bytes, provider: str) -> None:
    """estimate_reserve with the compiled scan (only the members it reads decoded) and
    without it (the whole body decoded) hold the same, on any body."""
    compiled = estimate_reserve(raw, provider, PRICES, cap=10**9)
    scan = requests._scan  # type: ignore[attr-defined]
    try:
        requests._scan = None  # type: ignore[attr-defined]
        pure = estimate_reserve(raw, provider, PRICES, cap=10**9)
    finally:
        requests._scan = scan  # type: ignore[attr-defined]
    assert compiled == pure, raw
