"""What a request body says before the call: its model, its output cap, its reserve.

Also :func:`ensure_stream_usage`, which asks OpenAI Chat Completions to report usage at the
end of a stream (it does not unless told to).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gateway.usage.jsonload import loads
from gateway.usage.model import MAX_TOKENS, clean_model, is_count, provider_mode
from gateway.usage.prices import PriceTable
from gateway.usage.topscan import scan as _scan

DEFAULT_OUTPUT_TOKENS: Final = 4096
"""The output allowance reserved for a request that names no output cap."""

BYTES_PER_TOKEN: Final = 4
"""The prompt's size in bytes over this is its token estimate (JSON framing included, which
errs on the side of reserving a little more)."""

_MAX_CHOICES: Final = 128
_OUTPUT_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "openai": ("max_completion_tokens", "max_tokens", "max_output_tokens"),
    "anthropic": ("max_tokens",),
    "gemini": (),
    "auto": ("max_completion_tokens", "max_tokens", "max_output_tokens"),
}
# The top-level members estimate_reserve reads, per provider mode: what the compiled scan
# picks out of a request body (gateway/usage/topscan.py), so that only they are decoded.
_READ_KEYS: Final[dict[str, tuple[bytes, ...]]] = {
    "openai": (b"max_completion_tokens", b"max_tokens", b"max_output_tokens", b"n", b"model"),
    "anthropic": (b"max_tokens", b"model"),
    "gemini": (b"generationConfig", b"generation_config", b"model"),
    "auto": (
        b"max_completion_tokens", b"max_tokens", b"max_output_tokens", b"n",
        b"generationConfig", b"generation_config", b"model",
    ),
}  # fmt: skip
# Keys an Anthropic Messages body has and a Chat Completions body never does: their presence
# means the caller routed an Anthropic request here, and OpenAI-only fields must not be added.
_NOT_CHAT_KEYS: Final = ("system", "anthropic_version", "stop_sequences", "top_k", "thinking")
_INCLUDE_USAGE: Final = b'"stream_options":{"include_usage":true},'


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a request body says about its call (all ``None``/``False`` if it is not JSON)."""

    model: str | None
    """The ``model`` field (Gemini names the model in the URL, not the body)."""
    max_output_tokens: int | None
    """The output cap, times ``n``/``candidateCount`` choices; ``None`` if none is named."""
    choices: int
    """How many completions are asked for (``n``, ``candidateCount``; 1 if unnamed)."""
    stream: bool
    """``"stream": true`` (Gemini streams by URL instead)."""
    size: int
    """The body's length in bytes."""


def _decode(body: bytes, exact: bool = False) -> dict[str, object] | None:
    """The body's JSON object, else ``None``; ``exact``: by ``json.loads`` itself, for a
    document that is re-encoded (the fast decode may turn integers outside 64 bits into
    floats, which only reading counts may ignore: gateway/usage/jsonload.py)."""
    try:
        doc = json.loads(body) if exact else loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _members(body: bytes, mode: str) -> dict[str, object] | None:
    """The body's JSON object as :func:`estimate_reserve` reads it (``None`` when it is not
    one): with the compiled scan, only its members named in ``_READ_KEYS[mode]``, decoded
    from the small object the scan picks (the same values as in the whole body decoded:
    the last of each key at the top level, its bytes as they are), so that a long prompt's
    messages are never built into Python objects; else, and for a body the scan does not
    vouch for, the whole body decoded."""
    if _scan is not None and type(body) is bytes:
        picked = _scan(body, _READ_KEYS[mode])
        if picked is not None:
            return _decode(picked)
    return _decode(body)


def _positive(value: object) -> int | None:
    return value if is_count(value) and value > 0 else None


def _choices(value: object) -> int:
    """A choice count (``n``, ``candidateCount``) if sane, else 1."""
    return value if is_count(value) and 1 <= value <= _MAX_CHOICES else 1


def inspect_request(body: bytes, provider: str = "auto") -> RequestInfo:
    """Read ``body`` as a request to ``provider`` (``auto``: any API's field names)."""
    mode = provider_mode(provider)
    doc = _decode(body)
    if doc is None:
        return RequestInfo(None, None, 1, False, len(body))
    caps = [v for v in (_positive(doc.get(key)) for key in _OUTPUT_KEYS[mode]) if v is not None]
    choices = _choices(doc.get("n")) if mode in ("openai", "auto") else 1
    if mode in ("gemini", "auto"):
        # The REST API accepts the proto's snake_case names as well as camelCase.
        config = doc.get("generationConfig", doc.get("generation_config"))
        if isinstance(config, Mapping):
            cap = _positive(config.get("maxOutputTokens", config.get("max_output_tokens")))
            if cap is not None:
                caps.append(cap)
            count = config.get("candidateCount", config.get("candidate_count"))
            choices = max(choices, _choices(count))
    return RequestInfo(
        model=clean_model(doc.get("model")),
        max_output_tokens=max(caps) * choices if caps else None,
        choices=choices,
        stream=doc.get("stream") is True,
        size=len(body),
    )


def request_model(body: bytes) -> str | None:
    """The model a request body names, if any."""
    doc = _decode(body)
    return None if doc is None else clean_model(doc.get("model"))


def estimate_reserve(
    body: bytes,
    provider: str,
    prices: PriceTable,
    *,
    model: str | None = None,
    default_output: int = DEFAULT_OUTPUT_TOKENS,
    cap: int | None = None,
) -> int:
    """The creditgate tokens to hold before the call (contract A8 ``reserve: auto``).

    ceil((size / 4 x input price + max output x output price) / 1000) at the price of
    ``model`` (default: the body's ``model``), where max output is the request's cap
    (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens`` or
    ``generationConfig.maxOutputTokens``) or ``default_output``, times its choices. The result
    is at least 1 and at most ``cap`` (``None``: uncapped); ``cap`` must be at least 1.

    The same reading as :func:`inspect_request` priced by :func:`charge`, in plain statements
    (every ``reserve: auto`` request comes here: no :class:`RequestInfo`, no list of caps,
    the price in :meth:`PriceTable.terms_for`'s integer form); tests/usage/test_requests.py
    checks both give the same answer on random bodies.
    """
    if cap is not None and (type(cap) is not int or cap < 1):
        raise ValueError("cap: must be a positive integer or None")
    if not is_count(default_output):
        raise ValueError("default_output: must be a non-negative integer")
    mode = provider_mode(provider)
    keys = _OUTPUT_KEYS[mode]
    doc = _members(body, mode)
    top: int | None = None  # the largest positive output cap named
    choices = 1
    if doc is not None:
        for key in keys:
            value = doc.get(key)
            if type(value) is int and 0 < value <= MAX_TOKENS and (top is None or value > top):
                top = value
        if provider != "anthropic" and provider != "gemini":  # openai, auto: n
            value = doc.get("n")
            if type(value) is int and 1 <= value <= _MAX_CHOICES:
                choices = value
        if provider == "gemini" or provider == "auto":
            config = doc.get("generationConfig", doc.get("generation_config"))
            if isinstance(config, Mapping):
                value = config.get("maxOutputTokens", config.get("max_output_tokens"))
                if type(value) is int and 0 < value <= MAX_TOKENS and (top is None or value > top):
                    top = value
                value = config.get("candidateCount", config.get("candidate_count"))
                if type(value) is int and 1 <= value <= _MAX_CHOICES and value > choices:
                    choices = value
        if model is None:
            model = clean_model(doc.get("model"))
    output = default_output * choices if top is None else top * choices
    prompt = -(-len(body) // BYTES_PER_TOKEN)  # ceil(size / 4)
    inp, _, out, scale = prices.terms_for(model)
    cost = -(-(prompt * inp + output * out) // scale)  # ceil: charge()'s exact sum
    if cap is not None and cost > cap:
        cost = cap
    return cost if cost > 1 else 1


def ensure_stream_usage(body: bytes) -> bytes | None:
    """The body with ``stream_options.include_usage = true`` added, or ``None`` if unchanged.

    Only for OpenAI Chat Completions requests (the caller knows the route; a body with
    Anthropic-only keys is left alone): ``"stream": true`` and a ``messages`` list, without
    ``include_usage`` already true. ``None`` also for a body that is not a JSON object.

    When ``stream_options`` is absent, the new key is spliced in after the opening brace and
    every other byte is kept; otherwise the body is re-encoded (same values, compact form).
    The caller must fix ``Content-Length``.

    What the client then sees: every chunk gains ``"usage": null``, and one extra chunk with
    ``"choices": []`` and the ``usage`` arrives just before ``data: [DONE]``. A client that
    reads ``chunk.choices[0]`` without checking may stumble on that chunk; one that asked for
    usage itself sees no difference.
    """
    doc = _decode(body, exact=True)
    if doc is None or doc.get("stream") is not True or not isinstance(doc.get("messages"), list):
        return None
    if any(key in doc for key in _NOT_CHAT_KEYS):
        return None
    options: dict[str, object] = {}
    if "stream_options" not in doc:
        start = len(body) - len(body.lstrip(b" \t\r\n"))
        if body[start : start + 1] == b"{":
            return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]
    else:
        given = doc["stream_options"]
        if isinstance(given, dict):
            if given.get("include_usage") is True:
                return None
            options = given
        elif given is not None:
            return None  # malformed: the upstream's own error is the better answer
    doc["stream_options"] = {**options, "include_usage": True}
    # ensure_ascii: a lone surrogate escape in the input must stay an escape, not break UTF-8.
    return json.dumps(doc, separators=(",", ":")).encode("ascii")
