"""Usage and the per-provider normalisation: no token counted twice, lies refused."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage import MAX_TOKENS, InvalidUsageError, Usage
from gateway.usage.model import checked_usage
from gateway.usage.normalize import (
    _openai_any,
    _openai_chat,
    from_anthropic,
    from_gemini,
    from_openai,
    normalize,
)


def test_usage_rejects_bad_counts() -> None:
    for bad in (-1, 1.0, True, "1", MAX_TOKENS + 1, None):
        with pytest.raises(ValueError):
            Usage("openai", None, input_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Usage("mistral", None)  # type: ignore[arg-type]


def test_usage_totals() -> None:
    usage = Usage("openai", "m", 10, 20, 30, 40)
    assert usage.billed_output_tokens == 70
    assert usage.total_tokens == 100
    assert not usage.is_zero
    assert Usage("gemini", None).is_zero


def test_openai_chat_subtracts_cached_and_reasoning() -> None:
    usage = from_openai(
        {
            "prompt_tokens": 1486,
            "completion_tokens": 651,
            "total_tokens": 2137,
            "prompt_tokens_details": {"cached_tokens": 1408, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 512, "audio_tokens": 0},
        },
        "gpt-5",
    )
    assert usage == Usage("openai", "gpt-5", 78, 1408, 139, 512)
    assert usage is not None and usage.total_tokens == 2137


def test_openai_chat_without_details_and_null_details() -> None:
    plain = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
    assert from_openai(plain) == Usage("openai", None, 19, 0, 10, 0)
    nulls = {**plain, "prompt_tokens_details": None, "completion_tokens_details": None}
    assert from_openai(nulls) == Usage("openai", None, 19, 0, 10, 0)


def test_openai_responses_shape() -> None:
    usage = from_openai(
        {
            "input_tokens": 125,
            "input_tokens_details": {"cached_tokens": 98},
            "output_tokens": 48,
            "output_tokens_details": {"reasoning_tokens": 40},
            "total_tokens": 173,
        }
    )
    assert usage == Usage("openai", None, 27, 98, 8, 40)


def test_anthropic_adds_cache_writes_to_input_and_reads_to_cached() -> None:
    usage = from_anthropic(
        {
            "input_tokens": 50,
            "cache_creation_input_tokens": 1000,
            "cache_read_input_tokens": 3000,
            "output_tokens": 200,
        },
        "claude-3-7-sonnet-latest",
    )
    assert usage == Usage("anthropic", "claude-3-7-sonnet-latest", 1050, 3000, 200, 0)


def test_gemini_subtracts_cache_adds_tool_prompt_and_thoughts() -> None:
    usage = from_gemini(
        {
            "promptTokenCount": 1000,
            "cachedContentTokenCount": 600,
            "toolUsePromptTokenCount": 50,
            "candidatesTokenCount": 70,
            "thoughtsTokenCount": 300,
            "totalTokenCount": 1420,
        }
    )
    assert usage == Usage("gemini", None, 450, 600, 70, 300)
    # The documented total is prompt + candidates + tool-use prompt + thoughts.
    assert usage is not None and usage.total_tokens == 1420


@pytest.mark.parametrize(
    ("fn", "empty"),
    [
        (from_openai, {"total_tokens": None}),
        (from_anthropic, {"service_tier": "standard"}),
        (from_gemini, {"trafficType": "ON_DEMAND"}),
    ],
)
def test_no_counts_is_missing(fn: Any, empty: dict[str, Any]) -> None:
    assert fn(None) is None
    assert fn(empty) is None
    assert fn({}) is None


def test_explicit_zero_is_a_usage() -> None:
    zero = from_openai({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    assert zero == Usage("openai", None) and zero.is_zero


LIES: list[Any] = [-1, 1.5, 2.0, True, False, "12", [3], {"n": 1}, MAX_TOKENS + 1, 10**30]


@pytest.mark.parametrize("lie", LIES)
def test_lying_counts_raise(lie: Any) -> None:
    with pytest.raises(InvalidUsageError):
        from_openai({"prompt_tokens": lie, "completion_tokens": 1})
    with pytest.raises(InvalidUsageError):
        from_openai({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": lie}})
    with pytest.raises(InvalidUsageError):
        from_anthropic({"input_tokens": 1, "output_tokens": lie})
    with pytest.raises(InvalidUsageError):
        from_gemini({"promptTokenCount": 3, "thoughtsTokenCount": lie})


def test_parts_larger_than_their_whole_raise() -> None:
    with pytest.raises(InvalidUsageError):
        from_openai({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 6}})
    with pytest.raises(InvalidUsageError):
        from_openai({"output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 6}})
    with pytest.raises(InvalidUsageError):
        from_gemini(
            {"promptTokenCount": 5, "cachedContentTokenCount": 6, "toolUsePromptTokenCount": 9}
        )


def test_non_object_usage_and_details_raise() -> None:
    with pytest.raises(InvalidUsageError):
        from_openai("lots")
    with pytest.raises(InvalidUsageError):
        from_openai({"prompt_tokens": 5, "prompt_tokens_details": [1]})
    with pytest.raises(InvalidUsageError):
        from_gemini(7)


def test_sum_of_believable_parts_above_the_limit_raises() -> None:
    with pytest.raises(InvalidUsageError):
        from_anthropic({"input_tokens": MAX_TOKENS, "cache_creation_input_tokens": MAX_TOKENS})


def test_model_names_are_cleaned() -> None:
    counts = {"input_tokens": 1, "output_tokens": 1}
    assert from_anthropic(counts, "claude") is not None
    for bad in (7, "", "x" * 300, "bad\nname", None, ["m"]):
        usage = from_anthropic(counts, bad)
        assert usage is not None and usage.model is None


def test_normalize_dispatches() -> None:
    assert normalize("gemini", {"promptTokenCount": 4}) == Usage("gemini", None, 4)
    assert normalize("anthropic", {"input_tokens": 4}) == Usage("anthropic", None, 4)
    assert normalize("openai", {"prompt_tokens": 4}) == Usage("openai", None, 4)


# -- the fast path of from_openai (the usual Chat Completions usage) ---------------------------
_COUNT = st.one_of(
    st.none(),
    st.integers(min_value=-2, max_value=MAX_TOKENS + 2),
    st.sampled_from([True, False, 1.0, 2.5, "7", [], {}]),
)
_DETAILS = st.one_of(
    st.none(),
    st.sampled_from([[], "x", 3]),
    st.dictionaries(
        st.sampled_from(["cached_tokens", "reasoning_tokens", "audio_tokens"]), _COUNT, max_size=3
    ),
)
_USAGE = st.one_of(
    st.dictionaries(
        st.sampled_from(
            [
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "prompt_tokens_details",
                "completion_tokens_details",
                "input_tokens",
                "output_tokens",
            ]
        ),
        st.one_of(_COUNT, _DETAILS),
        max_size=7,
    ),
    st.fixed_dictionaries(
        {"prompt_tokens": _COUNT, "completion_tokens": _COUNT},
        optional={"prompt_tokens_details": _DETAILS, "completion_tokens_details": _DETAILS},
    ),
    st.sampled_from([None, [], "usage", 5]),
)
_MODEL = st.one_of(
    st.none(), st.text(max_size=3), st.sampled_from(["gpt-4o", "x" * 257, "a\nb", 7, ["m"]])
)


def _outcome(fn: Any, usage: object, model: object) -> object:
    try:
        return fn(usage, model)
    except InvalidUsageError as exc:
        return ("refused", str(exc))


@settings(max_examples=600, deadline=None)
@given(usage=_USAGE, model=_MODEL)
def test_the_openai_fast_path_reads_and_refuses_as_the_general_reading(
    usage: object, model: object
) -> None:
    """from_openai answers the usual shape without the general code: for any object, the
    same Usage (or the same refusal) as the general reading alone."""
    assert _outcome(from_openai, usage, model) == _outcome(_openai_any, usage, model)


def test_the_openai_fast_path_takes_the_usual_answer() -> None:
    usage = {
        "prompt_tokens": 41,
        "completion_tokens": 22,
        "total_tokens": 63,
        "prompt_tokens_details": {"cached_tokens": 5, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
    }
    fast = _openai_chat(usage, "gpt-4o-mini")
    assert fast == Usage("openai", "gpt-4o-mini", 36, 5, 20, 2) == _openai_any(usage, "gpt-4o-mini")
    assert _openai_chat({"input_tokens": 3, "output_tokens": 4}, None) is None  # Responses


def test_checked_usage_is_the_usage_the_constructor_builds() -> None:
    built = checked_usage("anthropic", "claude-x", 1, 2, 3, 4)
    assert built == Usage("anthropic", "claude-x", 1, 2, 3, 4)
    assert hash(built) == hash(Usage("anthropic", "claude-x", 1, 2, 3, 4))
    assert type(built) is Usage and built.total_tokens == 10
    with pytest.raises(FrozenInstanceError):
        built.input_tokens = 5  # type: ignore[misc]
