"""A feature's cost mode (contract A8): fixed, by the model's usage, or from a response header.

In the file, ``features.<name>.cost`` is a positive integer (a fixed cost, as in contract A2)
or a mapping::

    cost: {usage: auto, reserve: auto, max: 2000, on_missing_usage: charge_reserve}
    cost: {header: X-Creditgate-Cost, reserve: 20, max: 500}

This module holds

- :class:`VariableCostConfig`, the mapping's structure (types only; pydantic, like the rest
  of :mod:`.schema`), and :func:`parse_cost`, the validator of the ``cost`` key, which keeps
  error paths as the file has them (``features.summarize.cost.max``) and suggests the key a
  misspelt one probably meant;
- :func:`variable_cost_errors` and :func:`price_table_errors`, the meaning checks that
  :mod:`.checks` runs (every error collected, each with its key path);
- :class:`CostSpec`, the typed view the metering and proxy layers read at request time
  (:meth:`gateway.config.Config.cost_spec`), and :func:`build_prices`, the ``models:``
  price table as a :class:`~gateway.usage.prices.PriceTable`.

Extensions of contract A8, each an addition that keeps its examples valid:

- ``header: true`` names the default header, ``X-Creditgate-Cost``;
- ``reserve`` may be left out: a usage cost then reserves ``auto``, a header cost its ``max``
  (the hold that can never fall short);
- ``max`` is required: a price typo, or an upstream's bad header, must not empty an org.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainValidator, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.config.source import fmt_loc, show_value
from gateway.usage.prices import PriceError, PriceTable
from gateway.usage.requests import estimate_reserve

__all__ = [
    "DEFAULT_COST_HEADER", "MAX_COST", "CostMode", "CostSpec", "MissingUsagePolicy", "UsageMode",
    "VariableCostConfig", "build_prices", "parse_cost", "price_table_errors",
    "variable_cost_errors",
]  # fmt: skip

CostMode = Literal["fixed", "usage", "header"]
"""How a feature's charge is decided: configured (``fixed``), from the model's usage in the
response priced with ``models:`` (``usage``), or from a response header (``header``)."""

UsageMode = Literal["auto", "openai", "anthropic", "gemini"]
"""Whose usage format to read (:data:`gateway.usage.PROVIDER_MODES`); ``auto`` tells by shape."""

MissingUsagePolicy = Literal["charge_reserve", "charge_fixed", "refund"]
"""What a variable-cost call is charged when its usage (or header) never arrives."""

DEFAULT_COST_HEADER: Final = "X-Creditgate-Cost"
"""The response header of ``header: true``."""

MAX_COST: Final = 2**53
"""The largest cost, reserve or maximum: Lua numbers are doubles, exact up to here."""

# RFC 9110 section 5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Response headers that cannot carry a cost: removing them would break the response's
# framing or meaning, or they are what creditgate itself tells the client.
_RESERVED_HEADERS: Final = frozenset(
    {"connection", "content-encoding", "content-length", "content-type", "keep-alive"}
    | {"proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"idempotent-replayed", "retry-after"}
)
_RESERVED_PREFIX: Final = "x-tokens-"  # X-Tokens-Cost, -Remaining, -Cost-Status (contract A8)
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _int_only(value: Any) -> Any:
    # YAML's `true` would otherwise pass as the integer 1 (as schema.Int, which this module
    # cannot import: schema imports it).
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


def _header_name(value: Any) -> Any:
    # `header: true` takes the default name; `false` is never meant (leave the key out).
    if value is True:
        return DEFAULT_COST_HEADER
    if value is False:
        raise ValueError(f"expected a header name (or true for {DEFAULT_COST_HEADER}), got false")
    return value


_Int = Annotated[int, BeforeValidator(_int_only)]


def _reserve(value: Any) -> int | Literal["auto"] | None:
    # A plain validator instead of `int | Literal["auto"]`: pydantic would report a bad
    # value once per branch of the union, under made-up keys (reserve.int, reserve.literal).
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None if value is None else "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)  # from ${VAR} expansion
    raise PydanticCustomError(
        "value_error", "expected an integer or auto, got " + show_value(value)
    )


class VariableCostConfig(BaseModel):
    """A ``cost:`` mapping as written (types only; :func:`variable_cost_errors` checks the
    meaning: exactly one of ``usage``/``header``, ranges, ``fixed`` with ``charge_fixed``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usage: UsageMode | None = None
    header: Annotated[str, BeforeValidator(_header_name)] | None = None
    reserve: Annotated[int | Literal["auto"] | None, PlainValidator(_reserve)] = None
    max: _Int | None = None
    on_missing_usage: MissingUsagePolicy = "charge_reserve"
    fixed: _Int | None = None

    @property
    def mode(self) -> Literal["usage", "header"]:
        """``usage`` unless only ``header`` is set (a config with both is invalid)."""
        return "header" if self.header is not None and self.usage is None else "usage"

    @property
    def reserve_setting(self) -> int | Literal["auto"] | None:
        """``reserve`` with its default: ``auto`` for a usage cost, ``max`` for a header cost."""
        if self.reserve is not None:
            return self.reserve
        return "auto" if self.mode == "usage" else self.max

    @property
    def hold(self) -> int:
        """The amount held by code that knows only fixed costs: the reserve when it is a
        number, else ``max`` (1 while ``max`` is missing, an error reported elsewhere)."""
        reserve = self.reserve_setting
        if isinstance(reserve, int):
            return reserve
        return self.max if self.max is not None else 1


_COST_KEYS: Final = tuple(VariableCostConfig.model_fields)


def parse_cost(value: Any) -> Any:
    """The ``cost`` key's validator: a mapping becomes its :attr:`~VariableCostConfig.hold`
    (the schema keeps the parsed mapping beside it); anything else goes on to be an integer.

    Raises a ``ValidationError`` whose paths are relative to ``cost`` (``max``, ``reserve``),
    so that pydantic reports them under the feature's key path; an unknown key says which
    key it probably meant (``on_missing: unknown key (did you mean 'on_missing_usage'?)``).
    """
    if isinstance(value, Mapping):
        return variable_cost(value).hold
    return _int_only(value)


def variable_cost(value: Mapping[Any, Any]) -> VariableCostConfig:
    """The mapping as a :class:`VariableCostConfig`; ``ValidationError`` listing every
    problem (unknown keys first, each with a "did you mean" when one is close)."""
    unknown = [key for key in value if key not in _COST_KEYS]
    if not unknown:
        return VariableCostConfig.model_validate(dict(value))
    errors: list[InitErrorDetails] = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), _COST_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        # value_error (not extra_forbidden): only a value error keeps the hint's words.
        message = PydanticCustomError("value_error", f"unknown key{hint}")
        errors.append(InitErrorDetails(type=message, loc=(key,), input=value[key]))
    try:
        VariableCostConfig.model_validate({k: v for k, v in value.items() if k not in unknown})
    except ValidationError as exc:
        for e in exc.errors():
            # Re-raised as custom errors of the same type and words: a built-in type would
            # need its exact context back (a value_error's exception object, for one).
            ctx = {k: v for k, v in e.get("ctx", {}).items() if not isinstance(v, Exception)}
            kind = PydanticCustomError(e["type"], e["msg"], ctx or None)
            errors.append(InitErrorDetails(type=kind, loc=e["loc"], input=e["input"]))
    raise ValidationError.from_exception_data("cost", errors)


def variable_cost_errors(cost: VariableCostConfig, *, has_models: bool) -> list[tuple[str, str]]:
    """Every meaning error of a ``cost:`` mapping, as ``(key path under cost, message)``:
    ``("", ...)`` is about the mapping, ``(".max", ...)`` about its ``max``."""
    return list(_cost_problems(cost, has_models))


def _bounded(where: str, value: int, maximum: int | None) -> Iterator[tuple[str, str]]:
    # The words of gateway.config.checks.Checker.number, so every range error reads alike.
    if value < 1:
        yield where, f"must be positive, got {value}"
    elif maximum is not None and 1 <= maximum < value:
        yield where, f"must be at most max ({maximum}), got {value}"
    elif value > MAX_COST:
        yield where, f"must be at most {MAX_COST}, got {value}"


_NEEDS_ONE = (
    "needs one of usage: auto|openai|anthropic|gemini (charge the model's usage in the"
    " response) or header: NAME (charge the integer the upstream puts in that response"
    f" header, e.g. {DEFAULT_COST_HEADER})"
)
_BOTH = "set only one of usage (the model's usage in the response) or header"
_NEEDS_MODELS = (
    "needs the top-level models: price table (creditgate tokens per 1,000 model tokens per"
    " model glob, and a default) to turn usage into tokens"
)
_NEEDS_MAX = (
    "required: the most one call may be charged, whatever the usage or header says (a price"
    " typo or a bad header must not empty an org)"
)
_AUTO_NEEDS_USAGE = (
    "auto needs usage (it is computed from the request's max tokens and the model's"
    " prices): give a number of tokens"
)
_NEEDS_FIXED = "required with on_missing_usage: charge_fixed (the tokens it charges)"


def _cost_problems(cost: VariableCostConfig, has_models: bool) -> Iterator[tuple[str, str]]:
    if cost.usage is not None and cost.header is not None:
        yield "", _BOTH
    elif cost.usage is None and cost.header is None:
        yield "", _NEEDS_ONE
    if cost.usage is not None and not has_models:
        yield ".usage", _NEEDS_MODELS
    if cost.header is not None:
        name = cost.header.lower()
        if _TOKEN.fullmatch(cost.header) is None:
            yield ".header", f"not a valid header name: {cost.header!r}"
        elif name in _RESERVED_HEADERS or name.startswith(_RESERVED_PREFIX):
            yield ".header", f"{cost.header!r} cannot carry a cost (creditgate or HTTP needs it)"
    if cost.max is None:
        yield ".max", _NEEDS_MAX
    else:
        yield from _bounded(".max", cost.max, None)
    if cost.reserve == "auto":
        if cost.usage is None:
            yield ".reserve", _AUTO_NEEDS_USAGE
    elif cost.reserve is not None:
        yield from _bounded(".reserve", cost.reserve, cost.max)
    if cost.on_missing_usage == "charge_fixed":
        if cost.fixed is None:
            yield ".fixed", _NEEDS_FIXED
        else:
            yield from _bounded(".fixed", cost.fixed, cost.max)
    elif cost.fixed is not None:
        policy = cost.on_missing_usage
        yield ".fixed", f"only with on_missing_usage: charge_fixed (this cost has {policy})"


def _plain_numbers(price: object) -> object:
    # ${VAR} expansion gives strings; PriceTable wants numbers. Decimal keeps 0.3 exact.
    if not isinstance(price, Mapping):
        return price
    out: dict[Any, Any] = {}
    for key, value in price.items():
        # The pattern admits only what Decimal parses, so this cannot raise.
        out[key] = Decimal(value) if isinstance(value, str) and _DECIMAL.fullmatch(value) else value
    return out


def build_prices(models: Mapping[str, Any]) -> PriceTable:
    """The ``models:`` mapping as a :class:`PriceTable` (first matching glob wins, in the
    file's order); :class:`PriceError` if invalid (a checked config never is)."""
    return PriceTable.from_mapping({key: _plain_numbers(v) for key, v in models.items()})


def price_table_errors(models: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every error of the ``models:`` mapping as ``(key path, message)``, one per model
    entry (``models["gpt-4o*"].output``), then a missing ``default``.

    :meth:`PriceTable.from_mapping` stops at the first bad entry, so each entry is parsed
    alone, as a one-entry table's default, and its error's path is put back as the file
    has it.
    """
    errors: list[tuple[str, str]] = []
    for key, value in models.items():
        where = fmt_loc(("models", key))
        if not key:
            errors.append((where, "a model glob must not be empty"))
            continue
        try:
            PriceTable.from_mapping({"default": _plain_numbers(value)}, path="models")
        except PriceError as exc:
            path, _, message = str(exc).partition(": ")
            # The entry's own path, then the price key if the error names one (the table
            # JSON-quotes keys that are not plain; the config's paths bracket them).
            inner = path.removeprefix("models.default").removeprefix(".")
            if inner.startswith('"'):
                inner = json.loads(inner)
            errors.append((fmt_loc(("models", key, inner)) if inner else where, message))
    if not errors:
        try:
            build_prices(models)
        except PriceError as exc:  # no default (the only error left for the whole table)
            path, _, message = str(exc).partition(": ")
            errors.append((path, message))
    return errors


@dataclass(frozen=True, slots=True)
class CostSpec:
    """How one feature is charged: :meth:`gateway.config.Config.cost_spec` (one per feature,
    built once).

    The hold before the call is :attr:`reserve` when it is a number; with ``reserve: auto``
    (:attr:`reserve_auto`, usage costs only) the caller computes it per request from the
    body: :meth:`reserve_for` (``estimate_reserve(body, provider, prices, cap=maximum)`` of
    :mod:`gateway.usage.requests`). After the response the charge is the actual cost, at
    most :attr:`maximum` (:meth:`capped`); without a usage or header, :meth:`missing_charge`.
    """

    mode: CostMode
    """``fixed``, ``usage`` or ``header``."""
    maximum: int
    """The most one call is charged (a fixed cost's own amount)."""
    reserve: int | None
    """Tokens held before the call; ``None`` exactly when :attr:`reserve_auto`. A fixed
    cost's reserve is the cost itself."""
    reserve_auto: bool
    """The reserve is computed per request (:meth:`reserve_for`)."""
    fixed: int | None
    """A fixed cost's amount; for a variable cost, what ``on_missing_usage: charge_fixed``
    charges (``None`` under the other policies)."""
    provider: UsageMode | None
    """Whose usage format to read (``usage`` mode only)."""
    header: str | None
    """The response header that carries the cost, as configured (``header`` mode only)."""
    header_key: bytes | None
    """:attr:`header` lower-cased as ASCII bytes: the form ASGI header lists use."""
    on_missing: MissingUsagePolicy
    """What a call is charged when its usage (or header) never arrives; a fixed cost always
    has ``charge_reserve`` (its reserve is its cost)."""

    @classmethod
    def fixed_cost(cls, cost: int) -> CostSpec:
        """The spec of ``cost: N``."""
        return cls("fixed", cost, cost, False, cost, None, None, None, "charge_reserve")

    @classmethod
    def of(cls, cost: int, variable: VariableCostConfig | None) -> CostSpec:
        """The spec of a feature whose ``cost`` is ``cost`` (its hold) and, for a variable
        cost, the mapping ``variable`` (valid: see :func:`variable_cost_errors`)."""
        if variable is None:
            return cls.fixed_cost(cost)
        setting = variable.reserve_setting
        reserve = setting if isinstance(setting, int) else None
        header = variable.header if variable.mode == "header" else None
        return cls(
            mode=variable.mode,
            maximum=variable.max if variable.max is not None else cost,
            reserve=reserve,
            reserve_auto=reserve is None,
            fixed=variable.fixed if variable.on_missing_usage == "charge_fixed" else None,
            provider=variable.usage if variable.mode == "usage" else None,
            header=header,
            header_key=None if header is None else header.lower().encode("latin-1", "replace"),
            on_missing=variable.on_missing_usage,
        )

    @property
    def variable(self) -> bool:
        """Whether the charge is decided after the response (``usage`` or ``header``)."""
        return self.mode != "fixed"

    @property
    def hold(self) -> int:
        """What code that knows only fixed costs holds (:meth:`Config.cost_of`): the reserve
        when it is a number, else :attr:`maximum`, the most the call can cost."""
        return self.maximum if self.reserve is None else self.reserve

    def reserve_for(
        self, body: bytes, prices: PriceTable | None, *, model: str | None = None
    ) -> int:
        """The tokens to hold before this request: :attr:`reserve`, or for ``reserve: auto``
        the estimate from ``body`` (its max output tokens and size at the price of ``model``,
        default the body's ``model``; Gemini names it in the URL), capped by :attr:`maximum`.

        ``prices`` is :attr:`gateway.config.Config.prices` (never ``None`` for a checked
        config with a usage cost); ``ValueError`` when an auto reserve has none.
        """
        if self.reserve is not None:
            return self.reserve
        if prices is None or self.provider is None:
            raise ValueError("reserve: auto needs a usage cost and the models: price table")
        return estimate_reserve(body, self.provider, prices, model=model, cap=self.maximum)

    def capped(self, actual: int) -> int:
        """``actual`` (a usage's or a header's cost) as charged: at least 0, at most
        :attr:`maximum`."""
        return min(max(actual, 0), self.maximum)

    def missing_charge(self, held: int) -> int:
        """The charge of a call whose usage (or header) never arrived, ``held`` tokens having
        been reserved: ``held`` (``charge_reserve``), :attr:`fixed` (``charge_fixed``) or 0
        (``refund``)."""
        if self.on_missing == "refund":
            return 0
        if self.on_missing == "charge_fixed" and self.fixed is not None:
            return self.fixed
        return held
