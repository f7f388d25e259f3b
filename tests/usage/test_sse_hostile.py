"""The stream tap against hostile, broken and lying streams: bounded, never raising."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage import MAX_TOKENS, StreamTap, Usage

from . import wire


def run(chunks: list[bytes], provider: str = "auto", **kw: int) -> tuple[Usage | None, bool]:
    tap = StreamTap(provider, **kw)
    for chunk in chunks:
        tap.feed(chunk)
    return tap.finish(), tap.usage_reached_end


@pytest.mark.parametrize("name", wire.STREAMS)
def test_every_truncation_is_safe(name: str) -> None:
    """Cut anywhere: no exception, and 'final' only ever with the full, true usage."""
    body, expected = wire.STREAMS[name]
    for cut in range(len(body)):
        usage, final = run([body[:cut]])
        if final:
            assert usage == expected, cut
        if usage is not None:
            assert usage.total_tokens <= expected.total_tokens, cut


def test_over_long_line_gives_up() -> None:
    tap = StreamTap(max_line=1000)
    tap.feed(b"data: " + b"x" * 500)
    assert not tap.gave_up
    tap.feed(b"x" * 600)  # still no line end: the partial line passes the bound
    assert tap.gave_up
    tap.feed(wire.OPENAI_CHAT_SSE)
    assert tap.finish() is None and not tap.usage_reached_end


def test_over_long_complete_line_in_one_chunk_gives_up() -> None:
    line = b'data: {"usage": {"prompt_tokens": 1}, "pad": "' + b"x" * 2000 + b'"}\n\n'
    assert run([line], max_line=1000) == (None, False)
    assert run([line], max_line=4000) == (Usage("openai", None, 1), False)


def test_default_bound_is_one_mebibyte() -> None:
    tap = StreamTap()
    piece = b"y" * 65536
    tap.feed(b"data: ")
    for _ in range(17):
        tap.feed(piece)
    assert tap.gave_up and tap.finish() is None


def test_many_short_data_lines_in_one_event_give_up() -> None:
    assert run([b"data: x\n" * 2000 + b"\n"], max_line=1000) == (None, False)
    # Comments and unknown fields are dropped, not held.
    tap = StreamTap(max_line=1000)
    tap.feed(b": ping\nfoo: bar\n" * 5000)
    tap.feed(wire.ANTHROPIC_SSE)
    assert tap.finish() == wire.ANTHROPIC_EXPECTED


def test_big_events_within_the_bound_are_fine() -> None:
    text = "z" * 200_000
    big = wire.sse(
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            },
        )
    )
    cut = wire.ANTHROPIC_SSE.index(b"event: message_delta")
    body = wire.ANTHROPIC_SSE[:cut] + big + wire.ANTHROPIC_SSE[cut:]
    assert run([body[i : i + 4096] for i in range(0, len(body), 4096)]) == (
        wire.ANTHROPIC_EXPECTED,
        True,
    )


LIES: list[Any] = [-1, 3.0, 2.5, True, "12", MAX_TOKENS + 1, 10**40, [], {}]


@pytest.mark.parametrize("lie", LIES)
def test_lying_counts_in_streams_are_missing(lie: Any) -> None:
    chat = {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": lie},
    }
    anthropic_delta = {"type": "message_delta", "usage": {"output_tokens": lie}}
    gemini = {
        "candidates": [{"finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": lie, "candidatesTokenCount": 1},
    }
    responses = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": 1, "output_tokens": lie}},
    }
    streams = [
        wire.sse((None, chat), (None, "[DONE]")),
        wire.ANTHROPIC_SSE.replace(
            b"event: message_stop",
            wire.sse(("message_delta", anthropic_delta)) + b"event: message_stop",
        ),
        wire.sse((None, gemini)),
        wire.sse(("response.completed", responses)),
    ]
    for body in streams:
        assert run([body]) == (None, False), body


def test_cached_more_than_prompt_is_missing() -> None:
    chat = {
        "choices": [],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 6},
        },
    }
    assert run([wire.sse((None, chat))]) == (None, False)


def test_non_count_containers_are_lies() -> None:
    chat = {"choices": [], "usage": {"prompt_tokens": [], "completion_tokens": 1}}
    assert run([wire.sse((None, chat))]) == (None, False)
    start = {"type": "message_start", "message": {"usage": {"input_tokens": {}}}}
    assert run([wire.sse(("message_start", start))]) == (None, False)


def test_lie_after_a_good_usage_still_poisons() -> None:
    lie = {"type": "message_delta", "usage": {"output_tokens": -3}}
    cut = wire.ANTHROPIC_SSE.index(b"event: message_stop")
    body = wire.ANTHROPIC_SSE[:cut] + wire.sse(("message_delta", lie)) + wire.ANTHROPIC_SSE[cut:]
    assert run([body]) == (None, False)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe\xfd" * 100,
        b'data: {"usage": {' + b"\xc3\x28" * 10 + b"}}\n\n",
        b'data: {"usage": {"prompt_tokens": 1' + b"\n\n",
        b"data: " + b'{"usage": {' + b"[" * 50_000 + b"\n\n",
        b'data: {"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n",
        b'data: ["usage", {"usage": {}}]\n\n',
        b'data: {"type": "message_stop"}\n\n',
        b'event: message_delta\ndata: {"type": "message_delta", "usage": "x"}\n\n',
        b"\r\r\r\n\n\n\r\n",
        b"::::\n:\n data: x\n\n",
    ],
)
def test_garbage_never_raises(garbage: bytes) -> None:
    assert run([garbage])[1] is False
    # Garbage before a real stream does not spoil it unless it lies about usage.
    tap = StreamTap()
    tap.feed(garbage + b"\n\n")
    tap.feed(wire.GEMINI_SSE)
    tap.finish()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    tap = StreamTap(max_line=512)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(points):
        tap.feed(data[a:b])
    result = tap.finish()
    assert result is None or isinstance(result, Usage)


sse_tokens = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"event: ",
        b"\n",
        b"\r",
        b"\r\n",
        b": c\n",
        b"[DONE]",
        b"{",
        b"}",
        b'"usage":',
        b'"usageMetadata":',
        b'"prompt_tokens":',
        b"1",
        b"-1",
        b"1e3",
        b"true",
        b'"choices":[]',
        b'"type":"message_stop"',
        b'"finishReason":"STOP"',
        b",",
        b"\xff",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(sse_tokens, max_size=60), st.sampled_from(["auto", "openai", "anthropic", "gemini"])
)
def test_sse_shaped_noise_never_raises_and_never_lies(parts: list[bytes], provider: str) -> None:
    body = b"".join(parts)
    tap = StreamTap(provider)
    tap.feed(body)
    usage = tap.finish()
    if usage is not None:
        for n in (
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
        ):
            assert type(n) is int and 0 <= n <= MAX_TOKENS


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(wire.STREAMS)),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_gives_the_same_answer(name: str, eol: bytes, cuts: list[int]) -> None:
    body, expected = wire.STREAMS[name]
    body = body.replace(b"\r\n", b"\n").replace(b"\n", eol)
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    assert run(chunks) == (expected, True)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, MAX_TOKENS),
    st.integers(0, MAX_TOKENS),
    st.integers(0, MAX_TOKENS),
    st.integers(0, MAX_TOKENS),
)
def test_openai_counts_round_trip_without_double_counting(
    prompt: int, cached: int, completion: int, reasoning: int
) -> None:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [],
        "model": "m",
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }
    usage, final = run([wire.sse((None, chunk), (None, "[DONE]"))])
    if cached > prompt or reasoning > completion:
        assert (usage, final) == (None, False)
    else:
        assert usage is not None and final
        assert usage.total_tokens == prompt + completion
        assert usage.cached_input_tokens == cached and usage.reasoning_tokens == reasoning


def test_json_with_usage_in_tool_arguments_is_not_taken() -> None:
    # Gemini function-call args are real JSON objects and may contain any key.
    chunk = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {
                            "functionCall": {
                                "name": "f",
                                "args": {"usageMetadata": {"promptTokenCount": 10**9}},
                            }
                        }
                    ]
                }
            }
        ]
    }
    body = wire.sse((None, chunk)) + wire.GEMINI_SSE
    assert run([body]) == (wire.GEMINI_EXPECTED, True)
    assert run([wire.sse((None, chunk))]) == (None, False)
    assert json.dumps(chunk)  # the fixture is valid JSON
