"""Model prices (DESIGN A8 ``models:``) and what a usage costs under them.

Prices are creditgate tokens per 1,000 model tokens and are held as exact fractions, so
``0.3`` is three tenths and never ``0.29999999999999998``: a charge is computed once, exactly,
and rounded up once at the end.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

from gateway.usage.model import Usage

_PRICE_KEYS: Final = ("input", "cached_input", "output")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Model names come from upstream responses, so the memo of name -> price must not grow
# without bound; past this size lookups still work, they just are not remembered.
_MEMO_LIMIT: Final = 4096


class PriceError(ValueError):
    """A price table that cannot be used; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class Price:
    """Per 1,000 model tokens: ``input``, ``cached_input`` (cache reads) and ``output``
    (visible output and reasoning alike)."""

    input: Fraction
    cached_input: Fraction
    output: Fraction

    @classmethod
    def of(cls, input: object, output: object, cached_input: object = None) -> Price:
        """A price from plain numbers; ``cached_input`` defaults to ``input``.

        Raises :class:`PriceError` for anything but finite non-negative numbers.
        """
        inp = _number(input, "input")
        cached = inp if cached_input is None else _number(cached_input, "cached_input")
        return cls(inp, cached, _number(output, "output"))


def _number(value: object, where: str) -> Fraction:
    """``value`` as an exact fraction, or :class:`PriceError` naming ``where``."""
    bad = PriceError(f"{where}: must be a non-negative number")
    # bool is an int to Python, but ``output: true`` in a config is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | Fraction):
        raise bad
    if isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise bad
        # str() gives the shortest text that round-trips, so 0.3 becomes 3/10 exactly.
        value = Fraction(str(value))
    result = Fraction(value)
    if result < 0:
        raise bad
    return result


def _key(key: str) -> str:
    """A mapping key as it appears in error paths: bare when plain, else JSON-quoted."""
    return key if _PLAIN_KEY.fullmatch(key) else json.dumps(key)


def _parse_price(value: object, where: str) -> Price:
    if not isinstance(value, Mapping):
        raise PriceError(f"{where}: must be a mapping with input, output and cached_input")
    for key in value:
        if key not in _PRICE_KEYS:
            shown = _key(key) if isinstance(key, str) else repr(key)
            raise PriceError(f"{where}.{shown}: unknown key (expected input, cached_input, output)")
    for key in ("input", "output"):
        if key not in value:
            raise PriceError(f"{where}.{key}: required")
    inp = _number(value["input"], f"{where}.input")
    out = _number(value["output"], f"{where}.output")
    cached_raw = value.get("cached_input")
    cached = inp if cached_raw is None else _number(cached_raw, f"{where}.cached_input")
    return Price(inp, cached, out)


def charge(
    price: Price,
    input_tokens: int,
    cached_input_tokens: int,
    output_tokens: int,
    maximum: int | None = None,
) -> int:
    """ceil(sum of count x price / 1000), capped at ``maximum`` (``None``: no cap).

    Any positive sum rounds up to at least 1; a zero sum (no tokens, or free prices) is 0.
    """
    if maximum is not None and (type(maximum) is not int or maximum < 0):
        raise ValueError("maximum: must be a non-negative integer or None")
    # The same exact sum in integers over a common denominator: Fraction arithmetic costs
    # ~30 µs per charge, this ~1 µs (it runs once per usage-charged request).
    inp, cached, out = price.input, price.cached_input, price.output
    d_in, d_cached, d_out = inp.denominator, cached.denominator, out.denominator
    common = math.lcm(d_in, d_cached, d_out)
    numerator = (
        input_tokens * inp.numerator * (common // d_in)
        + cached_input_tokens * cached.numerator * (common // d_cached)
        + output_tokens * out.numerator * (common // d_out)
    )
    cost = -(-numerator // (1000 * common))  # ceil(numerator / (1000 x common))
    return cost if maximum is None else min(cost, maximum)


_Terms = tuple[int, int, int, int]
"""A price as :func:`charge` computes with it: the input, cached input and output prices
as integers over one common denominator, and 1000 x that denominator."""


def _terms(price: Price) -> _Terms:
    inp, cached, out = price.input, price.cached_input, price.output
    common = math.lcm(inp.denominator, cached.denominator, out.denominator)
    return (
        inp.numerator * (common // inp.denominator),
        cached.numerator * (common // cached.denominator),
        out.numerator * (common // out.denominator),
        1000 * common,
    )


class PriceTable:
    """Ordered ``(glob, Price)`` entries and a default; the first glob that matches wins.

    Globs are :mod:`fnmatch` patterns matched case-sensitively against the whole model name.
    A call whose model is unknown (``None``) or matches no glob is priced at the default.
    """

    __slots__ = ("_default", "_default_terms", "_entries", "_memo", "_terms_memo")

    def __init__(self, entries: Iterable[tuple[str, Price]], default: Price) -> None:
        self._entries: tuple[tuple[str, re.Pattern[str], Price], ...] = tuple(
            (pattern, re.compile(fnmatch.translate(pattern)), price) for pattern, price in entries
        )
        self._default = default
        self._memo: dict[str, Price] = {}
        # Per model, the price in charge()'s integer form, so that pricing a usage (once
        # per usage-charged request) is a dict lookup and a few multiplications.
        self._default_terms = _terms(default)
        self._terms_memo: dict[str, _Terms] = {}

    @classmethod
    def from_mapping(cls, mapping: object, *, path: str = "models") -> PriceTable:
        """A table from the config's ``models:`` mapping (glob -> price, plus ``default``).

        Raises :class:`PriceError` whose message starts with the offending key's path, e.g.
        ``models."gpt-4o*".output: must be a non-negative number``.
        """
        if not isinstance(mapping, Mapping):
            raise PriceError(f"{path}: must be a mapping of model globs to prices")
        entries: list[tuple[str, Price]] = []
        default: Price | None = None
        for key, value in mapping.items():
            if not isinstance(key, str) or not key:
                raise PriceError(f"{path}.{key!r}: a model glob must be a non-empty string")
            price = _parse_price(value, f"{path}.{_key(key)}")
            if key == "default":
                default = price
            else:
                entries.append((key, price))
        if default is None:
            raise PriceError(f"{path}.default: required (the price of unmatched models)")
        return cls(entries, default)

    @property
    def default(self) -> Price:
        """The price of a model no glob matches."""
        return self._default

    @property
    def patterns(self) -> tuple[str, ...]:
        """The globs, in the order they are tried."""
        return tuple(pattern for pattern, _, _ in self._entries)

    def price_for(self, model: str | None) -> Price:
        """The price of ``model``: the first matching glob's, else the default."""
        if model is None:
            return self._default
        price = self._memo.get(model)
        if price is None:
            price = next((p for _, rx, p in self._entries if rx.match(model)), self._default)
            if len(self._memo) < _MEMO_LIMIT:
                self._memo[model] = price
        return price

    def terms_for(self, model: str | None) -> tuple[int, int, int, int]:
        """The price of ``model`` (:meth:`price_for`) in :func:`charge`'s integer form: the
        input, cached input and output prices over one common denominator, and 1000 x that
        denominator, so that ``ceil((input x i + cached x c + output x o) / scale)`` is the
        exact charge. Remembered per model (up to a bound)."""
        if model is None:
            return self._default_terms
        found = self._terms_memo.get(model)
        if found is None:
            found = _terms(self.price_for(model))
            if len(self._terms_memo) < _MEMO_LIMIT:
                self._terms_memo[model] = found
        return found

    def terms_memo(self) -> dict[str, tuple[int, int, int, int]]:
        """The terms :meth:`terms_for` remembered per model, which the compiled pricing
        (gateway/usage/topscan.py ``priced``) looks a model up in before it calls
        :meth:`terms_for`: the table's own dict, to be read, never written."""
        return self._terms_memo

    def cost(self, usage: Usage, maximum: int | None) -> int:
        """What ``usage`` costs in creditgate tokens, at most ``maximum`` (``None``: no cap).

        ceil((input x input price + cached x cached_input price + (output + reasoning) x
        output price) / 1000): at least 1 for any priced non-zero usage, 0 for a zero usage.
        """
        if maximum is not None and (type(maximum) is not int or maximum < 0):
            raise ValueError("maximum: must be a non-negative integer or None")
        return self.cost_of(
            usage.model,
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens + usage.reasoning_tokens,
            maximum,
        )

    def cost_of(
        self,
        model: str | None,
        input_tokens: int,
        cached_input_tokens: int,
        output_tokens: int,
        maximum: int | None,
    ) -> int:
        """:meth:`cost` of a usage given by its counts (``output_tokens``: the billed output,
        reasoning included) and a ``maximum`` already checked (a config's ``max``): the
        usage tap prices a complete answer's counts this way, without building a
        :class:`Usage` (gateway/metering/usage_tap.py)."""
        if model is None:
            terms = self._default_terms
        else:
            found = self._terms_memo.get(model)
            terms = self.terms_for(model) if found is None else found
        inp, cached, out, scale = terms
        numerator = input_tokens * inp + cached_input_tokens * cached + output_tokens * out
        cost = -(-numerator // scale)  # ceil: the same exact sum as charge()
        return cost if maximum is None else min(cost, maximum)
