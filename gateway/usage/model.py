"""The provider-neutral token usage of one AI call (contract A8).

Every provider counts tokens its own way (some include cache reads in the input count, some
include reasoning in the output count); :mod:`gateway.usage.normalize` turns each into a
:class:`Usage` whose four counts never overlap, so a price table can simply multiply and add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, TypeGuard

Provider = Literal["openai", "anthropic", "gemini"]
"""The upstream API families whose usage we read."""

PROVIDERS: Final[tuple[Provider, ...]] = ("openai", "anthropic", "gemini")

PROVIDER_MODES: Final[tuple[str, ...]] = ("auto", *PROVIDERS)
"""What a feature's ``usage:`` setting may name: a provider, or ``auto`` to tell by shape."""

MAX_TOKENS: Final = 10**12
"""The largest count believed. No single call comes near it; a bigger number is a lie or a
bug upstream, and charging it would empty a balance, so it makes the usage invalid."""

MAX_MODEL_LENGTH: Final = 256
"""Longer model names are dropped (the model becomes unknown) rather than stored."""


class InvalidUsageError(ValueError):
    """A usage object that is present but cannot be believed (negative, fractional, boolean,
    textual or absurdly large counts, or parts larger than their whole)."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call, normalised so that no token is counted twice.

    - ``input_tokens``: prompt tokens read at the full input price (cache *writes* included).
    - ``cached_input_tokens``: prompt tokens read from the provider's prompt cache.
    - ``output_tokens``: generated tokens, excluding reasoning.
    - ``reasoning_tokens``: hidden reasoning ("thinking") tokens; they bill as output.

    A :class:`Usage` whose counts are all zero is an explicit zero (the provider said so),
    which callers must keep apart from ``None`` (no usage was reported at all).
    """

    provider: Provider
    model: str | None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider: must be one of {', '.join(PROVIDERS)}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError("model: must be a string or None")
        # One Usage per usage-charged request: the four counts checked in one expression
        # (the loop with getattr below only names the bad one).
        a, b, c, d = (
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        )
        if (
            type(a) is int
            and type(b) is int
            and type(c) is int
            and type(d) is int
            and 0 <= a <= MAX_TOKENS
            and 0 <= b <= MAX_TOKENS
            and 0 <= c <= MAX_TOKENS
            and 0 <= d <= MAX_TOKENS
        ):
            return
        for name in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"):
            if not is_count(getattr(self, name)):
                raise ValueError(f"{name}: must be an integer from 0 to {MAX_TOKENS}")

    @property
    def billed_output_tokens(self) -> int:
        """Output as billed: visible output plus reasoning."""
        return self.output_tokens + self.reasoning_tokens

    @property
    def total_tokens(self) -> int:
        """Every token of the call, each counted once."""
        return self.input_tokens + self.cached_input_tokens + self.billed_output_tokens

    @property
    def is_zero(self) -> bool:
        """True when the provider reported usage and every count is zero."""
        return self.total_tokens == 0


def is_count(value: object) -> TypeGuard[int]:
    """True for an ``int`` (not a ``bool``) from 0 to :data:`MAX_TOKENS`."""
    # bool is a subclass of int, and JSON ``true`` must not pass for 1 token.
    return type(value) is int and 0 <= value <= MAX_TOKENS


_new = object.__new__
# The slots' own setters (member descriptors), which a frozen dataclass's __setattr__ does
# not guard: called directly they skip object.__setattr__'s lookup of the name on every
# field (about 40 % of checked_usage's time).
_SLOTS: Final = Usage.__dict__
_set_provider = _SLOTS["provider"].__set__
_set_model = _SLOTS["model"].__set__
_set_input = _SLOTS["input_tokens"].__set__
_set_cached = _SLOTS["cached_input_tokens"].__set__
_set_output = _SLOTS["output_tokens"].__set__
_set_reasoning = _SLOTS["reasoning_tokens"].__set__


def checked_usage(
    provider: Provider,
    model: str | None,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    reasoning_tokens: int,
) -> Usage:
    """A :class:`Usage` of values the caller has already checked (a provider of
    :data:`PROVIDERS`, a model from :func:`clean_model`, four ``int`` counts from 0 to
    :data:`MAX_TOKENS`), without ``__post_init__`` checking them again: the same object,
    for a fraction of the CPU (one is built on every usage-charged request)."""
    usage: Usage = _new(Usage)
    _set_provider(usage, provider)
    _set_model(usage, model)
    _set_input(usage, input_tokens)
    _set_cached(usage, cached_input_tokens)
    _set_output(usage, output_tokens)
    _set_reasoning(usage, reasoning_tokens)
    return usage


def clean_model(value: object) -> str | None:
    """The model name if it is a plausible one, else ``None`` (unknown model)."""
    if isinstance(value, str) and 0 < len(value) <= MAX_MODEL_LENGTH and value.isprintable():
        return value
    return None


def provider_mode(value: str) -> str:
    """``value`` if it is one of :data:`PROVIDER_MODES`, else :class:`ValueError`.

    An unknown mode is a configuration bug, so it fails loudly instead of reading nothing.
    """
    if value not in PROVIDER_MODES:
        raise ValueError(f"provider: must be one of {', '.join(PROVIDER_MODES)}, not {value!r}")
    return value
