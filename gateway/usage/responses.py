"""Usage from a whole (buffered) JSON response body.

``auto`` tells the API by the body's shape, in this order:

1. a JSON array: Gemini's ``streamGenerateContent`` without ``alt=sse`` (the last element
   with token counts wins);
2. ``usageMetadata`` present: Gemini;
3. ``"type": "message"``: Anthropic Messages;
4. ``"object"`` is ``chat.completion``, ``text_completion`` or ``response``: OpenAI;
5. otherwise by the keys of ``usage``: ``prompt_tokens``/``completion_tokens`` or a
   ``*_tokens_details``/``total_tokens`` key is OpenAI, a ``cache_*_input_tokens`` key is
   Anthropic. A bare ``{input_tokens, output_tokens}`` gives the same counts under either
   reading (there is no cached or reasoning part to separate), so only the label is
   guessed: OpenAI when the id starts with ``resp_``, else Anthropic.

Only the top-level members named in :data:`_TOP_KEYS` are ever read. Where the compiled
scan is in use (gateway/usage/topscan.py) it reads the usual answers' counts itself
(``topscan.counts``: no JSON decoded into Python objects), else picks the members out of the
body without decoding the rest, and only they are decoded; any body it does not vouch for is
decoded whole.
"""

from __future__ import annotations

from typing import Final

from gateway.usage.jsonload import loads
from gateway.usage.model import (
    PROVIDER_MODES,
    InvalidUsageError,
    Provider,
    Usage,
    checked_usage,
    provider_mode,
)
from gateway.usage.normalize import from_anthropic, from_gemini, from_openai
from gateway.usage.topscan import counts as _counts
from gateway.usage.topscan import scan as _scan

MODE_CODES: Final[dict[str, int]] = {"auto": 0, "openai": 1, "anthropic": 2, "gemini": 3}
"""A provider mode as the compiled reading (``topscan.counts``) takes it."""

_OPENAI_OBJECTS: Final = frozenset({"chat.completion", "text_completion", "response"})
_OPENAI_KEYS: Final = (
    "prompt_tokens",
    "completion_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "total_tokens",
)
_ANTHROPIC_KEYS: Final = ("cache_creation_input_tokens", "cache_read_input_tokens")
_MODES: Final = frozenset(PROVIDER_MODES)
_TOP_KEYS: Final = (
    b"usage",
    b"usageMetadata",
    b"modelVersion",
    b"model",
    b"type",
    b"object",
    b"id",
)
"""Every top-level member :func:`_from_document` and :func:`detect_provider` read."""


def usage_from_json(body: bytes, provider: str) -> Usage | None:
    """The usage in a JSON response ``body``; ``None`` when there is none to believe.

    ``provider`` is ``auto``, ``openai``, ``anthropic`` or ``gemini`` (anything else raises
    :class:`ValueError`). ``None`` means *missing*: no usage, a body that is not JSON, or
    counts that cannot be believed. An explicit zero usage is a :class:`Usage` of zeros.
    """
    # The mode checked without a call when it is a valid one (every usage-charged answer).
    mode = provider if provider in _MODES else provider_mode(provider)
    # The usual answer's counts, read by the compiled pass (None: it does not know).
    if _counts is not None:
        read = _counts(body, MODE_CODES[mode])
        if read is not None:
            return checked_usage(*read)
    # Cheap refusal: every shape we read has a "usage" or "usageMetadata" key. Searched
    # from the end, where answers put it: `in` costs ~30 µs on a 30 KB answer (its search
    # stumbles on every "e" of the text), rfind finds it at once.
    if body.rfind(b"usage") < 0:
        return None
    # The compiled scan vouches for the body and gives its few top-level members (a body
    # it does not vouch for, None, is decoded whole: that verdict is the authoritative one).
    members = _scan(body, _TOP_KEYS) if _scan is not None else None
    try:
        doc = loads(body if members is None else members)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or absurdly nested
        return None
    try:
        return _from_document(doc, mode)
    except InvalidUsageError:
        return None


def usage_from_document(doc: object, provider: str) -> Usage | None:
    """The usage in an already decoded response document (see :func:`usage_from_json`).

    Raises :class:`~gateway.usage.model.InvalidUsageError` for unbelievable counts.
    """
    return _from_document(doc, provider_mode(provider))


def _from_document(doc: object, mode: str) -> Usage | None:
    """:func:`usage_from_document` of a checked provider ``mode``."""
    if isinstance(doc, list):
        if mode not in ("auto", "gemini"):
            return None
        found: Usage | None = None
        for item in doc:
            if isinstance(item, dict):
                found = from_gemini(item.get("usageMetadata"), item.get("modelVersion")) or found
        return found
    if not isinstance(doc, dict):
        return None
    kind = detect_provider(doc) if mode == "auto" else mode
    if kind == "gemini":
        return from_gemini(doc.get("usageMetadata"), doc.get("modelVersion"))
    if kind == "openai":
        return from_openai(doc.get("usage"), doc.get("model"))
    if kind == "anthropic":
        return from_anthropic(doc.get("usage"), doc.get("model"))
    return None


def detect_provider(doc: dict[str, object]) -> Provider | None:
    """Which API a decoded response body came from, by its shape (see the module docstring)."""
    if "usageMetadata" in doc:
        return "gemini"
    if doc.get("type") == "message":
        return "anthropic"
    obj = doc.get("object")
    if isinstance(obj, str) and obj in _OPENAI_OBJECTS:
        return "openai"
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    if any(key in usage for key in _OPENAI_KEYS):
        return "openai"
    if any(key in usage for key in _ANTHROPIC_KEYS):
        return "anthropic"
    if "input_tokens" in usage or "output_tokens" in usage:
        ident = doc.get("id")
        return "openai" if isinstance(ident, str) and ident.startswith("resp_") else "anthropic"
    return None
