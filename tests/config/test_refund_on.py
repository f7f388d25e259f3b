"""A feature's ``refund_on`` (gateway/config/refunds.py): parsing, default, validation."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from gateway.config.refunds import parse_refund_entry, refund_statuses
from tests.support.reference import REFERENCE_YAML


def test_default_refunds_5xx_only() -> None:
    config = parse_config(REFERENCE_YAML, "reference.yaml")
    statuses = refund_statuses(config.features["goal_generation"].refund_on)
    assert statuses == frozenset(range(500, 600))


@pytest.mark.parametrize(
    ("entry", "statuses"),
    [
        (429, {429}), ("429", {429}), (" 404 ", {404}), ("4xx", set(range(400, 500))),
        ("5XX", set(range(500, 600))), ("1xx", set(range(100, 200))), (599, {599}),
    ],
)  # fmt: skip
def test_entries(entry: object, statuses: set[int]) -> None:
    assert set(parse_refund_entry(entry)) == statuses


@pytest.mark.parametrize("entry", [99, 600, "6xx", "4x", "xx", "", "4xx,5xx", True, 4.5, None])
def test_malformed_entries(entry: object) -> None:
    with pytest.raises(ValueError, match="expected a status code"):
        parse_refund_entry(entry)


def test_a_list_adds_to_the_5xx_that_always_refund() -> None:
    assert refund_statuses(["5xx", 429, "404"]) == frozenset({404, 429, *range(500, 600)})
    assert refund_statuses([429]) == frozenset({429, *range(500, 600)})
    # An empty list cannot make a 5xx chargeable (contract A3: refund_on "can refund more").
    assert refund_statuses([]) == frozenset(range(500, 600))


def test_bad_entries_are_errors_naming_the_file_and_key() -> None:
    text = REFERENCE_YAML.replace(
        "goal_generation:   {cost: 3}", "goal_generation:   {cost: 3, refund_on: [5xx, 4xy]}"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gate.yaml")
    assert info.value.errors == [
        "gate.yaml: features.goal_generation.refund_on[1]: expected a status code (100-599)"
        " or a class (1xx..5xx), got '4xy'"
    ]
