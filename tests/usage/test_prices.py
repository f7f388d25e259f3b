"""The price table: globs, exact decimals, rounding, caps and config errors."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.usage import Price, PriceError, PriceTable, Usage, charge

DESIGN_MODELS = {
    "gpt-4o-mini*": {"input": 1, "cached_input": 0.5, "output": 4},
    "claude-*": {"input": 3, "cached_input": 0.3, "output": 15},
    "gemini-*": {"input": 1, "output": 4},
    "default": {"input": 2, "output": 8},
}


def table(**entries: Any) -> PriceTable:
    return PriceTable.from_mapping({**entries, "default": {"input": 2, "output": 8}})


def test_design_table_parses_exactly() -> None:
    prices = PriceTable.from_mapping(DESIGN_MODELS)
    assert prices.patterns == ("gpt-4o-mini*", "claude-*", "gemini-*")
    assert prices.price_for("claude-sonnet-4") == Price(Fraction(3), Fraction(3, 10), Fraction(15))
    assert prices.price_for("gemini-2.5-pro").cached_input == 1  # defaults to input
    assert prices.price_for(None) == prices.default == Price(Fraction(2), Fraction(2), Fraction(8))
    assert prices.price_for("mistral-large") == prices.default


def test_first_matching_glob_wins_and_is_case_sensitive() -> None:
    prices = PriceTable.from_mapping(
        {
            "gpt-4o-mini*": {"input": 1, "output": 1},
            "gpt-4o*": {"input": 5, "output": 5},
            "gpt-?": {"input": 7, "output": 7},
            "o[134]-*": {"input": 9, "output": 9},
            "default": {"input": 2, "output": 2},
        }
    )
    assert prices.price_for("gpt-4o-mini-2024-07-18").input == 1
    assert prices.price_for("gpt-4o-2024-08-06").input == 5
    assert prices.price_for("gpt-5").input == 7
    assert prices.price_for("o4-mini").input == 9
    assert prices.price_for("GPT-4O").input == 2  # case-sensitive: no match
    assert prices.price_for("xgpt-4o").input == 2  # the whole name must match


@pytest.mark.parametrize(
    ("tokens", "expected"), [(1000, 1), (1, 1), (3333, 1), (3334, 2), (10000, 3), (0, 0)]
)
def test_exact_decimal_rounding(tokens: int, expected: int) -> None:
    prices = table(**{"m": {"input": 0.3, "output": 0.3}})
    assert prices.cost(Usage("openai", "m", input_tokens=tokens), None) == expected


def test_float_prices_are_exact_decimals() -> None:
    prices = table(**{"m": {"input": 0.1, "output": 0.2}})
    price = prices.price_for("m")
    assert price.input == Fraction(1, 10) and price.output == Fraction(1, 5)
    # 0.1 + 0.2 in floats is 0.30000000000000004 and would round 10000 tokens up to 4.
    assert prices.cost(Usage("openai", "m", input_tokens=5000, output_tokens=2500), None) == 1
    assert prices.cost(Usage("openai", "m", input_tokens=10000, output_tokens=10000), None) == 3


def test_every_count_at_its_price() -> None:
    prices = PriceTable.from_mapping(DESIGN_MODELS)
    usage = Usage("anthropic", "claude-x", 1000, 10000, 500, 500)
    # 1000*3 + 10000*0.3 + (500+500)*15 = 3000 + 3000 + 15000 = 21000 -> 21
    assert prices.cost(usage, None) == 21
    assert prices.cost(usage, 20) == 20
    assert prices.cost(usage, 0) == 0


def test_zero_usage_and_free_models_cost_nothing() -> None:
    prices = table(free={"input": 0, "output": 0})
    assert prices.cost(Usage("openai", "gpt"), 100) == 0
    assert prices.cost(Usage("openai", "free", 10**6, 10**6, 10**6, 10**6), 100) == 0


def test_any_priced_token_costs_at_least_one() -> None:
    prices = table(cheap={"input": 0.000001, "output": 0.000001})
    assert prices.cost(Usage("openai", "cheap", input_tokens=1), 5) == 1


def test_bad_maximum_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        charge(Price.of(1, 1), 1, 0, 0, -1)
    with pytest.raises(ValueError):
        charge(Price.of(1, 1), 1, 0, 0, True)


def test_decimal_and_fraction_prices() -> None:
    prices = table(a={"input": Decimal("0.3"), "output": Fraction(1, 3)})
    assert prices.price_for("a") == Price(Fraction(3, 10), Fraction(3, 10), Fraction(1, 3))
    assert Price.of(1, 2) == Price(Fraction(1), Fraction(1), Fraction(2))
    assert Price.of(1, 2, 0.5).cached_input == Fraction(1, 2)


@pytest.mark.parametrize(
    "bad", [True, False, "1", None, -1, -0.5, float("nan"), float("inf"), Decimal("NaN"), [1]]
)
def test_bad_numbers_name_their_key(bad: Any) -> None:
    with pytest.raises(PriceError) as err:
        table(**{"gpt-4o*": {"input": 1, "output": bad}})
    assert str(err.value) == 'models."gpt-4o*".output: must be a non-negative number'


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ([], "models: must be a mapping of model globs to prices"),
        (
            {"x": {"input": 1, "output": 1}},
            "models.default: required (the price of unmatched models)",
        ),
        ({"default": 5}, "models.default: must be a mapping with input, output and cached_input"),
        ({"default": {"output": 1}}, "models.default.input: required"),
        ({"default": {"input": 1}}, "models.default.output: required"),
        (
            {"default": {"input": 1, "output": 1, "cahced_input": 1}},
            "models.default.cahced_input: unknown key (expected input, cached_input, output)",
        ),
        (
            {"default": {"input": 1, "output": 1, "cached input": 1}},
            'models.default."cached input": unknown key (expected input, cached_input, output)',
        ),
        ({"default": {"input": 1, "output": 1, 3: 1}}, "models.default.3: unknown key"),
        ({"default": {"input": 1, "output": 1, "cached_input": -2}}, "models.default.cached_input"),
        ({"": {"input": 1, "output": 1}}, "models.'': a model glob must be a non-empty string"),
        ({4: {"input": 1, "output": 1}}, "models.4: a model glob must be a non-empty string"),
        ({"claude-*": {"input": "3", "output": 1}}, 'models."claude-*".input: must be a'),
    ],
)
def test_config_errors(mapping: Any, message: str) -> None:
    with pytest.raises(PriceError) as err:
        PriceTable.from_mapping(mapping)
    assert str(err.value).startswith(message)
    assert isinstance(err.value, ValueError)


def test_error_path_prefix_is_configurable() -> None:
    with pytest.raises(PriceError, match=r"^features\.summarize\.models\.default\.input"):
        PriceTable.from_mapping({"default": {"output": 1}}, path="features.summarize.models")


def test_memo_is_bounded() -> None:
    prices = table(**{"m-*": {"input": 1, "output": 1}})
    for i in range(5000):
        assert prices.price_for(f"m-{i}").input == 1
    assert prices.price_for("zzz") == prices.default


counts = st.integers(min_value=0, max_value=10**9)
prices_st = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False)


@given(counts, counts, counts, counts, prices_st, prices_st, prices_st)
def test_cost_is_the_exact_ceiling(
    i: int, c: int, o: int, r: int, pi: Decimal, pc: Decimal, po: Decimal
) -> None:
    prices = PriceTable.from_mapping({"default": {"input": pi, "cached_input": pc, "output": po}})
    exact = (i * Fraction(pi) + c * Fraction(pc) + (o + r) * Fraction(po)) / 1000
    cost = prices.cost(Usage("openai", None, i, c, o, r), None)
    assert exact <= cost < exact + 1
    assert (cost >= 1) == (exact > 0)
    assert prices.cost(Usage("openai", None, i, c, o, r), 7) == min(cost, 7)


MODELS = ["gpt-4o-mini-2024-07-18", "gpt-4o", "claude-3", "gemini-2.5-flash", "other", None]


@given(
    st.sampled_from(MODELS), counts, counts, counts, counts,
    st.none() | st.integers(min_value=0, max_value=10**6),
)  # fmt: skip
def test_cost_by_model_is_charge_at_the_models_price(
    model: str | None, i: int, c: int, o: int, r: int, maximum: int | None
) -> None:
    """PriceTable.cost keeps each model's price in integer form (memoised): the same charge
    as charge() at price_for(model), for every model, the first call and the next ones."""
    prices = PriceTable.from_mapping(
        {
            "gpt-4o-mini*": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
            "gpt-4o*": {"input": 2.5, "cached_input": 1.25, "output": 10},
            "claude-*": {"input": 3, "cached_input": 0.3, "output": 15},
            "default": {"input": Fraction(1, 3), "output": Decimal("0.7")},
        }
    )
    usage = Usage("openai", model, i, c, o, r)
    expected = charge(prices.price_for(model), i, c, o + r, maximum)
    assert prices.cost(usage, maximum) == expected
    assert prices.cost(usage, maximum) == expected  # memoised


def test_the_integer_price_memo_is_bounded() -> None:
    prices = table(**{"m-*": {"input": 1, "output": 3}})
    for i in range(5000):
        assert prices.cost(Usage("openai", f"m-{i}", 1000, 0, 1000, 0), None) == 4
    assert prices.cost(Usage("openai", "zzz", 1000, 0, 0, 0), None) == 2  # the default
    with pytest.raises(ValueError):
        prices.cost(Usage("openai", "m-1", 1, 0, 0, 0), -1)
