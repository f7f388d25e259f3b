"""Cost modes in the config (contract A8): fixed, usage and header costs, the ``models:`` price
table, the typed :class:`CostSpec` other layers read, and their errors.

Each rule's bad file is in ``configs/bad/`` (``cost_*.yaml``, ``models_*.yaml``,
``route_cost_on_variable_cost.yaml``) and is checked by ``test_config.test_bad_config``
with the errors its ``# expect:`` lines name; this file checks the good side, the exact
text of several errors at once, and the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from gateway.config import Config, ConfigError, FeatureConfig, check_config, parse_config
from gateway.config.costs import DEFAULT_COST_HEADER, CostSpec, VariableCostConfig
from gateway.usage.prices import Price, PriceTable
from gateway.usage.requests import estimate_reserve
from tests.support.reference import REFERENCE_YAML, reference_config

CONFIGS = Path(__file__).resolve().parent / "configs"
ALL_AT_ONCE = CONFIGS / "bad" / "cost_errors_all_at_once.yaml"

A8 = (CONFIGS / "good" / "design_a8.yaml").read_text()  # contract A8's example, verbatim


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CGTEST_"):
            monkeypatch.delenv(name)


def _config(features: str, models: str = "models: {default: {input: 1, output: 4}}") -> Config:
    return parse_config(f"{models}\nfeatures:\n{features}\nplans:\n  starter: {{}}\n", "c.yaml")


def test_design_a8_example_parses_to_specs() -> None:
    config = parse_config(A8, "a8.yaml")
    assert config.cost_spec("summarize") == CostSpec(
        mode="usage", maximum=2000, reserve=None, reserve_auto=True, fixed=None,
        provider="auto", header=None, header_key=None, on_missing="charge_reserve",
    )  # fmt: skip
    assert config.cost_spec("research") == CostSpec(
        mode="header", maximum=500, reserve=20, reserve_auto=False, fixed=None,
        provider=None, header="X-Creditgate-Cost", header_key=b"x-creditgate-cost",
        on_missing="charge_reserve",
    )  # fmt: skip
    assert config.cost_spec("goal_generation") == CostSpec(
        mode="fixed", maximum=3, reserve=3, reserve_auto=False, fixed=3,
        provider=None, header=None, header_key=None, on_missing="charge_reserve",
    )  # fmt: skip
    assert [config.is_variable(f) for f in config.features] == [True, True, False]
    assert [config.cost_spec(f).variable for f in config.features] == [True, True, False]
    # What code that knows only fixed costs holds: the numeric reserve, else max.
    assert config.cost_of("summarize") == 2000
    assert config.cost_of("research") == 20
    assert config.cost_of("goal_generation") == 3
    assert config.features["summarize"].cost == 2000  # the attribute other layers read
    # Buckets are as for fixed costs: the feature's name by default.
    assert config.bucket_of("summarize") == "summarize"
    assert config.buckets == ("goal_generation", "research", "summarize")


def test_design_a8_price_table_keeps_the_file_order() -> None:
    config = parse_config(A8, "a8.yaml")
    prices = config.prices
    assert isinstance(prices, PriceTable)
    assert prices.patterns == ("gpt-4o-mini*", "claude-*", "gemini-*")
    assert prices.price_for("gpt-4o-mini-2024-07-18") == Price(
        Fraction(1), Fraction(1, 2), Fraction(4)
    )
    assert prices.price_for("claude-sonnet-4") == Price(Fraction(3), Fraction(3, 10), Fraction(15))
    assert prices.price_for("gemini-2.0-flash") == Price(Fraction(1), Fraction(1), Fraction(4))
    assert (
        prices.price_for("gpt-4o") == prices.default == Price(Fraction(2), Fraction(2), Fraction(8))
    )
    assert config.prices is prices  # built once


def test_first_matching_glob_wins_in_file_order() -> None:
    models = 'models:\n  "gpt-4o*": {input: 5, output: 5}\n  "gpt-4o-mini*": {input: 1, output: 1}'
    models += "\n  default: {input: 2, output: 2}"
    config = _config("  a: {cost: {usage: openai, max: 10}}", models)
    assert config.prices is not None
    assert config.prices.price_for("gpt-4o-mini").input == 5


def test_reserve_for_a_request() -> None:
    config = parse_config(A8, "a8.yaml")
    body = b'{"model": "claude-sonnet-4", "max_tokens": 10000, "messages": []}'
    prices = config.prices
    assert prices is not None
    expected = estimate_reserve(body, "auto", prices, cap=2000)
    # ceil((ceil(size / 4) x 3 + 10000 x 15) / 1000): the output allowance dominates.
    assert expected == 151
    assert config.reserve_for("summarize", body) == expected
    assert config.cost_spec("summarize").reserve_for(body, prices) == expected
    # Capped by max, whatever the request asks for.
    huge = b'{"model": "claude-sonnet-4", "max_tokens": 100000000}'
    assert config.reserve_for("summarize", huge) == 2000
    # A model named outside the body (Gemini names it in the URL).
    gemini = b'{"generationConfig": {"maxOutputTokens": 1000}}'
    assert config.reserve_for("summarize", gemini, model="gemini-2.0-flash") == 5
    # A numeric reserve and a fixed cost do not look at the body.
    assert config.reserve_for("research", huge) == 20
    assert config.reserve_for("goal_generation", huge) == 3


def test_auto_reserve_without_prices_is_refused() -> None:
    spec = CostSpec.of(2000, VariableCostConfig(usage="auto", max=2000))
    with pytest.raises(ValueError, match="price table"):
        spec.reserve_for(b"{}", None)


def test_defaults_of_a_cost_mapping() -> None:
    config = _config(
        "  chat: {cost: {usage: openai, max: 300}}\n"
        "  research: {cost: {header: true, max: 50}}\n"
        "  lookup: {cost: {header: X-App-Cost, max: 7, on_missing_usage: refund}}"
    )
    chat = config.cost_spec("chat")
    # usage without a reserve reserves auto; on_missing_usage defaults to charge_reserve.
    assert (chat.mode, chat.provider, chat.reserve, chat.reserve_auto) == (
        "usage", "openai", None, True,
    )  # fmt: skip
    assert chat.on_missing == "charge_reserve" and chat.hold == 300
    # header: true is the default header; a header cost without a reserve holds its max.
    research = config.cost_spec("research")
    assert research.header == DEFAULT_COST_HEADER
    assert research.header_key == b"x-creditgate-cost"
    assert (research.reserve, research.reserve_auto, research.hold) == (50, False, 50)
    assert config.cost_of("research") == 50
    lookup = config.cost_spec("lookup")
    assert (lookup.header, lookup.header_key, lookup.on_missing) == (
        "X-App-Cost", b"x-app-cost", "refund",
    )  # fmt: skip


def test_missing_usage_policies_and_cap() -> None:
    config = _config(
        "  a: {cost: {usage: auto, reserve: 40, max: 100}}\n"
        "  b: {cost: {usage: auto, reserve: 40, max: 100, on_missing_usage: charge_fixed,"
        " fixed: 7}}\n"
        "  c: {cost: {header: X-Cost, reserve: 40, max: 100, on_missing_usage: refund}}\n"
        "  d: {cost: 5}"
    )
    assert config.cost_spec("a").missing_charge(40) == 40
    assert config.cost_spec("b").fixed == 7
    assert config.cost_spec("b").missing_charge(40) == 7
    assert config.cost_spec("c").missing_charge(40) == 0
    assert config.cost_spec("d").missing_charge(5) == 5
    spec = config.cost_spec("a")
    assert [spec.capped(n) for n in (-3, 0, 99, 100, 10**9)] == [0, 0, 99, 100, 100]


def test_numbers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGTEST_MAX", "250")
    monkeypatch.setenv("CGTEST_OUTPUT", "0.3")
    config = _config(
        "  a: {cost: {usage: auto, reserve: '${CGTEST_RESERVE:-25}', max: '${CGTEST_MAX}'}}",
        "models: {default: {input: '${CGTEST_INPUT:-1}', output: '${CGTEST_OUTPUT}'}}",
    )
    spec = config.cost_spec("a")
    assert (spec.reserve, spec.maximum) == (25, 250)
    assert config.prices is not None
    assert config.prices.default == Price(Fraction(1), Fraction(1), Fraction(3, 10))


def test_a_usage_cost_may_name_each_provider_and_auto() -> None:
    config = _config(
        "".join(f"  {p}: {{cost: {{usage: {p}, max: 9}}}}\n" for p in ("auto", "openai"))
        + "".join(f"  {p}: {{cost: {{usage: {p}, max: 9}}}}\n" for p in ("anthropic", "gemini"))
    )
    assert [config.cost_spec(f).provider for f in config.features] == [
        "auto", "openai", "anthropic", "gemini",
    ]  # fmt: skip


def test_reference_config_is_unchanged() -> None:
    """The reference config (all fixed costs) parses as before, with no price table."""
    config = reference_config()
    expected = {
        "lead_generation": 5, "goal_generation": 3, "strategy_analysis": 2,
        "revenue_forecast": 4, "general_insights": 1,
    }  # fmt: skip
    assert {f: config.cost_of(f) for f in config.features} == expected
    assert all(type(config.cost_of(f)) is int for f in config.features)
    assert {f: config.features[f].cost for f in config.features} == expected
    assert not any(config.is_variable(f) for f in config.features)
    assert all(config.features[f].variable is None for f in config.features)
    assert {f: config.cost_spec(f) for f in config.features} == {
        f: CostSpec.fixed_cost(cost) for f, cost in expected.items()
    }
    assert config.models is None and config.prices is None
    # The same file gives the same config whether loaded once or twice.
    assert parse_config(REFERENCE_YAML, "reference.yaml") == config


def test_a_models_table_alone_changes_nothing_for_fixed_costs() -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data["models"] = {"default": {"input": 1, "output": 2}}
    config = parse_config(yaml.safe_dump(data), "reference.yaml")
    assert config.cost_of("lead_generation") == 5
    assert config.prices is not None


def test_feature_built_in_code_keeps_its_cost_mapping() -> None:
    mapping = {"header": "X-Cost", "reserve": 4, "max": 9}
    config = Config(
        features={"a": FeatureConfig(cost=mapping), "b": FeatureConfig(cost=2)},  # type: ignore[arg-type]
        plans={"starter": {}},  # type: ignore[dict-item]
    )
    assert config.features["a"].variable == VariableCostConfig(header="X-Cost", reserve=4, max=9)
    assert config.cost_spec("a").mode == "header" and config.cost_of("a") == 4
    assert config.cost_spec("b") == CostSpec.fixed_cost(2)
    # A new integer cost makes a fixed cost; the config's derived specs follow a copy.
    fixed = config.features["a"].model_copy(update={"cost": 6})
    assert fixed.variable is None
    copied = config.model_copy(update={"features": {"a": fixed}})
    assert copied.cost_spec("a") == CostSpec.fixed_cost(6)
    assert not copied.is_variable("a")
    assert config.cost_spec("a").mode == "header"  # the original is untouched


def test_several_bad_cost_entries_are_all_reported() -> None:
    errors = check_config(ALL_AT_ONCE)
    path = str(ALL_AT_ONCE)
    assert errors == [
        f"{path}: features.chat.cost.reseve: unknown key (did you mean 'reserve'?)",
        f"{path}: features.chat.cost.usage: must be 'auto', 'openai', 'anthropic' or 'gemini',"
        " got 'gpt'",
        f'{path}: models["claude-*"].output: must be a non-negative number',
        f"{path}: features.summarize.cost.reserve: must be at most max (100), got 500",
        f"{path}: features.research.cost: needs one of usage: auto|openai|anthropic|gemini"
        " (charge the model's usage in the response) or header: NAME (charge the integer the"
        " upstream puts in that response header, e.g. X-Creditgate-Cost)",
        f"{path}: features.research.cost.max: required: the most one call may be charged,"
        " whatever the usage or header says (a price typo or a bad header must not empty an"
        " org)",
        f"{path}: features.translate.cost.fixed: required with on_missing_usage: charge_fixed"
        " (the tokens it charges)",
        f"{path}: features.fixed_one.cost: must be positive, got 0",
        f"{path}: routes[1].cost: feature 'summarize' has a usage cost"
        " (features.summarize.cost): a route cannot give it a fixed cost",
        f"{path}: routes[3].feature: unknown feature 'nope' (known: fixed_one, research,"
        " summarize, translate)",
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(ALL_AT_ONCE.read_text(), str(ALL_AT_ONCE))
    assert info.value.errors == errors


def test_check_config_cli_lists_every_cost_error(tmp_path: Path) -> None:
    path = tmp_path / "costs.yaml"
    path.write_text(ALL_AT_ONCE.read_text())
    environment = {k: v for k, v in os.environ.items() if k != "CREDITGATE_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.commands.cli", "check-config", str(path),
         "--mode", "middleware"],
        capture_output=True, text=True, timeout=60, env=environment,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines == [e.replace(str(ALL_AT_ONCE), str(path)) for e in check_config(ALL_AT_ONCE)]
    assert len(lines) == 10 and all(line.startswith(f"{path}: ") for line in lines)


def test_check_config_cli_accepts_the_design_example(tmp_path: Path) -> None:
    path = tmp_path / "a8.yaml"
    path.write_text(A8)
    environment = {k: v for k, v in os.environ.items() if k != "CREDITGATE_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.commands.cli", "check-config", str(path),
         "--mode", "middleware"],
        capture_output=True, text=True, timeout=60, env=environment,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{path}: ok\n", "")


def test_bad_models_section_type() -> None:
    with pytest.raises(ConfigError) as info:
        _config("  a: {cost: {header: X-Cost, max: 9}}", "models: [gpt-4o]")
    assert info.value.errors == ["c.yaml: models: expected a mapping, got a list"]


def test_a_malformed_cost_sets_the_feature_aside_not_its_references() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            "features:\n  a: {cost: {usage: auto, max: lots}}\nplans:\n  starter: {}\n"
            "  pro: {allocations: {a: 10}}\n"
            "routes:\n  - {method: POST, path: /a, feature: a}\n",
            "c.yaml",
        )
    # Neither "unknown bucket a" nor "unknown feature a", nor the missing models table:
    # what the malformed entry would have said is unknown.
    assert info.value.errors == ["c.yaml: features.a.cost.max: expected an integer, got 'lots'"]
