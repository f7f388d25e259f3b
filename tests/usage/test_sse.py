"""The stream tap on realistic streams: every split, every framing, every provider."""

from __future__ import annotations

import json

import pytest

from gateway.usage import StreamTap, Usage, usage_from_sse
from gateway.usage.sseframe import SseReader

from . import wire


def run(chunks: list[bytes], provider: str = "auto", **kw: int) -> tuple[Usage | None, bool]:
    tap = StreamTap(provider, **kw)
    for chunk in chunks:
        tap.feed(chunk)
    usage = tap.finish()
    return usage, tap.usage_reached_end


def reframe(body: bytes, eol: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n").replace(b"\n", eol)


@pytest.mark.parametrize("name", wire.STREAMS)
@pytest.mark.parametrize("provider", ["auto", "explicit"])
def test_whole_stream(name: str, provider: str) -> None:
    body, expected = wire.STREAMS[name]
    mode = wire.PROVIDER_OF[name] if provider == "explicit" else "auto"
    assert run([body], mode) == (expected, True)


@pytest.mark.parametrize("name", wire.STREAMS)
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_two_way_split(name: str, eol: bytes) -> None:
    body, expected = wire.STREAMS[name]
    body = reframe(body, eol)
    for cut in range(len(body) + 1):
        assert run([body[:cut], body[cut:]]) == (expected, True), cut


@pytest.mark.parametrize("name", wire.STREAMS)
def test_byte_at_a_time(name: str) -> None:
    body, expected = wire.STREAMS[name]
    for eol in (b"\n", b"\r\n", b"\r"):
        framed = reframe(body, eol)
        assert run([framed[i : i + 1] for i in range(len(framed))]) == (expected, True)


def test_bom_comments_ids_retry_and_multiline_data() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    doc = json.dumps(
        {"object": "chat.completion.chunk", "model": "m", "choices": [], "usage": usage}, indent=1
    )
    multiline = "".join(f"data:{line}\n" for line in doc.split("\n"))  # no space after colon
    body = (
        "\ufeff: keep-alive\n\nid: 1\nretry: 3000\nfoo: bar\ndata\n\n"
        + multiline
        + "\n: done soon\ndata: [DONE]\n\n"
    ).encode()
    expected = (Usage("openai", "m", 7, 0, 3, 0), True)
    assert run([body]) == expected
    for cut in range(len(body) + 1):
        assert run([body[:cut], body[cut:]]) == expected


def test_chat_without_include_usage_is_missing() -> None:
    body = b"".join(
        line + b"\n\n"
        for line in wire.OPENAI_CHAT_SSE.split(b"\n\n")
        if line and b'"choices":[]' not in line
    )
    assert run([body]) == (None, False)


def test_chat_usage_with_choices_is_final_only_after_done() -> None:
    chunk = {
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
    }
    body = wire.sse((None, chunk))
    assert run([body]) == (Usage("openai", "m", 4, 0, 2, 0), False)
    assert run([body + b"data: [DONE]\n\n"]) == (Usage("openai", "m", 4, 0, 2, 0), True)


def test_responses_incomplete_and_failed_carry_usage() -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 15},
    }
    for kind in ("response.incomplete", "response.failed"):
        body = wire.sse((kind, {"type": kind, "response": {"model": "o3", "usage": usage}}))
        assert run([body]) == (Usage("openai", "o3", 10, 0, 5, 15), True)
    failed = wire.sse(
        ("response.failed", {"type": "response.failed", "response": {"model": "o3", "usage": None}})
    )
    assert run([failed]) == (None, False)


def test_anthropic_cut_short_gives_partial_usage_not_final() -> None:
    body = wire.ANTHROPIC_SSE
    before_delta = body[: body.index(b"event: message_delta")]
    usage, final = run([before_delta])
    assert usage == Usage("anthropic", wire.ANTHROPIC_MODEL, 1672, 9000, 2, 0) and not final
    before_stop = body[: body.index(b"event: message_stop")]
    assert run([before_stop]) == (wire.ANTHROPIC_EXPECTED, False)


def test_anthropic_delta_with_input_counts_replaces_them() -> None:
    start = {
        "type": "message_start",
        "message": {
            "model": "claude-x",
            "usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1},
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {
            "input_tokens": 30,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 500,
            "output_tokens": 40,
            "server_tool_use": {"web_search_requests": 1},
        },
    }
    body = wire.sse(
        ("message_start", start),
        ("message_delta", delta),
        ("message_stop", {"type": "message_stop"}),
    )
    assert run([body]) == (Usage("anthropic", "claude-x", 35, 500, 40, 0), True)
    # A null in a later delta keeps the earlier count.
    delta2 = {"type": "message_delta", "usage": {"input_tokens": None, "output_tokens": 41}}
    body2 = wire.sse(
        ("message_start", start),
        ("message_delta", delta),
        ("message_delta", delta2),
        ("message_stop", {"type": "message_stop"}),
    )
    assert run([body2]) == (Usage("anthropic", "claude-x", 35, 500, 41, 0), True)


def test_anthropic_error_event_mid_stream() -> None:
    body = wire.ANTHROPIC_SSE[: wire.ANTHROPIC_SSE.index(b"event: content_block_stop")]
    body += wire.sse(
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    usage, final = run([body])
    assert usage is not None and usage.output_tokens == 2 and not final


def test_gemini_usage_before_finish_is_not_final() -> None:
    body = wire.GEMINI_SSE
    first_two = b"\r\n\r\n".join(body.split(b"\r\n\r\n")[:2]) + b"\r\n\r\n"
    usage, final = run([first_two])
    assert usage == Usage("gemini", wire.GEMINI_MODEL, 2200, 0, 60, 640) and not final


def test_gemini_finish_then_usage_only_chunk_is_final() -> None:
    finish = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}]}
    usage_only = {
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1},
        "modelVersion": "gemini-2.0-flash",
    }
    assert run([wire.sse((None, finish), (None, usage_only))]) == (
        Usage("gemini", "gemini-2.0-flash", 3, 0, 1, 0),
        True,
    )
    # The other way round, the usage may be stale: not final.
    assert run([wire.sse((None, usage_only), (None, finish))])[1] is False


def test_gemini_blocked_prompt() -> None:
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
        "modelVersion": "gemini-2.5-pro",
    }
    assert run([wire.sse((None, blocked))]) == (Usage("gemini", "gemini-2.5-pro", 12), True)


def test_explicit_zero_usage_is_not_missing() -> None:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    usage, final = run([wire.sse((None, chunk), (None, "[DONE]"))])
    assert usage == Usage("openai", None) and final


def test_auto_locks_onto_the_first_api_seen() -> None:
    gemini = wire.sse(
        (None, {"usageMetadata": {"promptTokenCount": 5}, "candidates": [{"finishReason": "STOP"}]})
    )
    assert run([wire.ANTHROPIC_SSE + gemini]) == (wire.ANTHROPIC_EXPECTED, True)


def test_explicit_provider_ignores_other_shapes() -> None:
    assert run([wire.GEMINI_SSE], "anthropic") == (None, False)
    assert run([wire.ANTHROPIC_SSE], "gemini") == (None, False)


def test_last_event_without_blank_line_counts_only_when_whole() -> None:
    body = wire.OPENAI_RESPONSES_SSE.rstrip(b"\n")
    assert run([body]) == (wire.OPENAI_RESPONSES_EXPECTED, True)
    assert run([body[:-1]]) == (None, False)


def test_finish_is_idempotent_and_feed_after_finish_is_ignored() -> None:
    tap = StreamTap()
    tap.feed(wire.ANTHROPIC_SSE)
    assert tap.finish() == wire.ANTHROPIC_EXPECTED
    tap.feed(b"data: garbage\n\n")
    assert tap.finish() == wire.ANTHROPIC_EXPECTED
    assert tap.usage == wire.ANTHROPIC_EXPECTED and tap.usage_reached_end


def test_accepts_bytearray_and_memoryview() -> None:
    body = wire.GEMINI_SSE
    tap = StreamTap("gemini")
    tap.feed(bytearray(body[:100]))
    tap.feed(memoryview(body)[100:])
    assert tap.finish() == wire.GEMINI_EXPECTED


def test_usage_from_sse() -> None:
    assert usage_from_sse(wire.OPENAI_CHAT_SSE) == wire.OPENAI_CHAT_EXPECTED
    assert usage_from_sse(wire.OPENAI_CHAT_SSE, "openai") == wire.OPENAI_CHAT_EXPECTED
    with pytest.raises(ValueError):
        StreamTap("cohere")


def test_reader_framing_directly() -> None:
    events: list[tuple[bytes, bytes]] = []
    reader = SseReader(lambda name, data: events.append((name, data)), 64)
    reader.feed(b"\xef\xbb\xbfevent: a\r\ndata: 1\rdata:2\n\r")
    reader.feed(b"\n: comment\ndata\n\nevent: b\n\ndata: x")  # "event: b" alone dispatches nothing
    reader.close()
    assert events == [(b"a", b"1\n2"), (b"", b""), (b"", b"x")]
    assert not reader.stopped
    reader.feed(b"data: " + b"x" * 100)
    assert reader.stopped
    reader.feed(b"\n\ndata: y\n\n")
    assert len(events) == 3


def test_overflow_while_closing_gives_up() -> None:
    tap = StreamTap(max_line=100)
    tap.feed(b"data: " + b"x" * 60 + b"\n")
    tap.feed(b"data: " + b"y" * 60)  # the unterminated line fits; the event does not
    assert not tap.gave_up
    assert tap.finish() is None and tap.gave_up
