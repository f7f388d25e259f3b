"""Each provider's usage object turned into a :class:`~gateway.usage.model.Usage`.

The providers overlap their counts differently, which is what these functions undo:

- OpenAI Chat Completions: ``prompt_tokens`` *includes* ``prompt_tokens_details.cached_tokens``
  and ``completion_tokens`` *includes* ``completion_tokens_details.reasoning_tokens``.
- OpenAI Responses: ``input_tokens`` includes ``input_tokens_details.cached_tokens`` and
  ``output_tokens`` includes ``output_tokens_details.reasoning_tokens``, the same way.
- Anthropic Messages: ``input_tokens`` *excludes* both ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``; cache writes bill here as ordinary input, cache reads as
  cached input. Extended thinking is inside ``output_tokens`` (no separate count exists).
- Gemini ``usageMetadata``: ``promptTokenCount`` includes ``cachedContentTokenCount``;
  ``candidatesTokenCount`` excludes ``thoughtsTokenCount``; ``toolUsePromptTokenCount`` is
  extra input (the documented total is prompt + candidates + tool-use prompt + thoughts).

Every function returns ``None`` when the object carries no token count at all (``null``, or
Vertex's ``{"trafficType": "ON_DEMAND"}`` on intermediate stream chunks) and raises
:class:`~gateway.usage.model.InvalidUsageError` when a count is present but not believable.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.usage.model import (
    MAX_MODEL_LENGTH,
    MAX_TOKENS,
    InvalidUsageError,
    Provider,
    Usage,
    checked_usage,
    clean_model,
)

_EMPTY: Mapping[str, object] = {}
_NO_COUNTS = (None, None, None, None, None)


def _object(value: object, where: str) -> Mapping[str, object] | None:
    """A JSON object, ``None`` for absent/``null``; anything else is a lie."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    raise InvalidUsageError(f"{where}: not an object")


def _count(obj: Mapping[str, object], key: str) -> int | None:
    """The count under ``key``; ``None`` when absent or ``null``."""
    value = obj.get(key)
    if value is None:
        return None
    # is_count, inline: this runs a few times on every usage-charged request.
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise InvalidUsageError(f"{key}: {value!r} is not a token count")
    return value


def _make(
    provider: Provider, model: object, input_: int, cached: int, output: int, reasoning: int
) -> Usage:
    if cached < 0 or output < 0 or input_ < 0:
        # A part larger than the whole it is said to be part of.
        raise InvalidUsageError("a detail count exceeds the count that includes it")
    try:
        return Usage(provider, clean_model(model), input_, cached, output, reasoning)
    except ValueError as exc:  # e.g. a sum of believable parts above MAX_TOKENS
        raise InvalidUsageError(str(exc)) from exc


def from_openai(usage: object, model: object = None) -> Usage | None:
    """An OpenAI ``usage`` object, Chat Completions or Responses shape (told by its keys)."""
    fast = _openai_chat(usage, model)
    return fast if fast is not None else _openai_any(usage, model)


def _openai_any(usage: object, model: object) -> Usage | None:
    """:func:`from_openai` of any object: the general reading (and refusals)."""
    obj = _object(usage, "usage")
    if obj is None:
        return None
    prompt = _count(obj, "prompt_tokens")
    completion = _count(obj, "completion_tokens")
    if prompt is not None or completion is not None:
        in_details = _object(obj.get("prompt_tokens_details"), "prompt_tokens_details")
        out_details = _object(obj.get("completion_tokens_details"), "completion_tokens_details")
    else:
        prompt = _count(obj, "input_tokens")
        completion = _count(obj, "output_tokens")
        if prompt is None and completion is None:
            return None
        in_details = _object(obj.get("input_tokens_details"), "input_tokens_details")
        out_details = _object(obj.get("output_tokens_details"), "output_tokens_details")
    cached = _count(in_details or _EMPTY, "cached_tokens") or 0
    reasoning = _count(out_details or _EMPTY, "reasoning_tokens") or 0
    prompt = prompt or 0
    completion = completion or 0
    return _make("openai", model, prompt - cached, cached, completion - reasoning, reasoning)


def _openai_chat(usage: object, model: object) -> Usage | None:
    """:func:`from_openai` of the usual Chat Completions usage (both counts, details absent
    or objects with believable counts, a plain model name) in plain statements, as it
    comes on every usage-charged request; ``None`` for anything else, which the general
    code reads (and refuses) the same way as before."""
    if type(usage) is not dict:
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if (
        type(prompt) is not int
        or type(completion) is not int
        or not 0 <= prompt <= MAX_TOKENS
        or not 0 <= completion <= MAX_TOKENS
    ):
        return None
    # The two details are read by the same lines, written out twice on purpose: a helper
    # call per detail costs more than the rest of this fast path (bench/usage_instructions.py).
    details = usage.get("prompt_tokens_details")
    if details is None:
        cached = 0
    elif type(details) is dict:
        cached = details.get("cached_tokens", 0)
        if cached is None:
            cached = 0
    else:
        return None
    details = usage.get("completion_tokens_details")
    if details is None:
        reasoning = 0
    elif type(details) is dict:
        reasoning = details.get("reasoning_tokens", 0)
        if reasoning is None:
            reasoning = 0
    else:
        return None
    # Parts within their wholes (so every difference is a count too).
    if type(cached) is not int or type(reasoning) is not int:
        return None
    if not 0 <= cached <= prompt or not 0 <= reasoning <= completion:
        return None
    if model is not None and not (
        isinstance(model, str) and 0 < len(model) <= MAX_MODEL_LENGTH and model.isprintable()
    ):
        model = None  # clean_model's answer for anything else
    return checked_usage(
        "openai", model, prompt - cached, cached, completion - reasoning, reasoning
    )


def from_anthropic(usage: object, model: object = None) -> Usage | None:
    """An Anthropic Messages ``usage`` object (a whole message's, or a stream's merged one)."""
    obj = _object(usage, "usage")
    if obj is None:
        return None
    # Plain statements, not a loop over the keys: about half the CPU.
    uncached = _count(obj, "input_tokens")
    written = _count(obj, "cache_creation_input_tokens")
    read = _count(obj, "cache_read_input_tokens")
    output = _count(obj, "output_tokens")
    if uncached is None and written is None and read is None and output is None:
        return None
    return _make("anthropic", model, (uncached or 0) + (written or 0), read or 0, output or 0, 0)


def from_gemini(usage: object, model: object = None) -> Usage | None:
    """A Gemini ``usageMetadata`` object."""
    obj = _object(usage, "usageMetadata")
    if obj is None:
        return None
    counts = (
        _count(obj, "promptTokenCount"),
        _count(obj, "cachedContentTokenCount"),
        _count(obj, "toolUsePromptTokenCount"),
        _count(obj, "candidatesTokenCount"),
        _count(obj, "thoughtsTokenCount"),
    )
    if counts == _NO_COUNTS:
        return None
    prompt, cached, tool, candidates, thoughts = [c or 0 for c in counts]
    if cached > prompt:
        raise InvalidUsageError("cachedContentTokenCount exceeds promptTokenCount")
    return _make("gemini", model, prompt - cached + tool, cached, candidates, thoughts)


def normalize(provider: Provider, usage: object, model: object = None) -> Usage | None:
    """The provider's usage object as a :class:`Usage` (see the module docstring)."""
    if provider == "openai":
        return from_openai(usage, model)
    if provider == "anthropic":
        return from_anthropic(usage, model)
    return from_gemini(usage, model)
