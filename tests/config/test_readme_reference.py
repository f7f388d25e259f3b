"""The README's configuration reference and YAML snippets against the schema.

A new user configures creditgate from README.md: every key the schema accepts must have a
row in its "Configuration reference" table (or be covered by a parent row such as
``identity.jwt`` or ``billing.stripe``), every row must name a real key, a row's default
must be the schema's, and every ``yaml`` snippet of the README, merged into
examples/creditgate.yaml as a user would paste it, must pass ``check-config``.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "creditgate.yaml"

# Rows that describe a whole mapping (its members in the row's text) rather than one key.
WHOLE_ROWS = (
    "identity.jwt", "features.<name>", "plans.<name>", "billing.stripe", "alerts", "routes",
    "models",
)  # fmt: skip

# Environment for examples/creditgate.yaml and the README's alerts snippet.
ENV = {
    "CREDITGATE_ADMIN_TOKEN": "t",
    "SUPABASE_JWT_SECRET": "s",
    "STRIPE_WEBHOOK_SECRET": "whsec_x",
    "CREDITGATE_ALERT_URL": "https://hooks.example.com/creditgate",
    "CREDITGATE_ALERT_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}


def reference_rows() -> dict[str, str]:
    """``key -> default cell`` of the README's configuration reference table."""
    section = README.split("## Configuration reference", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", section, re.M)
    assert rows, "no configuration reference table in README.md"
    return {key: default.strip() for key, default in rows}


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]


def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, Any]:
    """Every key path the schema accepts with its default (``...`` when required);
    members of a mapping of models are written ``<name>``."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        path = prefix + name
        keys[path] = ... if field.is_required() else default
        origin = typing.get_origin(field.annotation)
        for sub in _models_of(field.annotation):
            if origin is dict:  # a mapping of named members: features.<name>, plans.<name>
                keys[path + ".<name>"] = ...
                keys.update(schema_keys(sub, path + ".<name>."))
            else:
                keys.update(schema_keys(sub, path + "."))
    return keys


def _covered(key: str, rows: dict[str, str]) -> bool:
    """A row of its own, a whole-mapping row above it, or (a section) rows below it."""
    return (
        key in rows
        or any(key.startswith(whole + ".") for whole in WHOLE_ROWS)
        or any(row.startswith(key + ".") for row in rows)
    )


def test_every_schema_key_has_a_row() -> None:
    rows = reference_rows()
    missing = [k for k in schema_keys() if not _covered(k, rows)]
    assert not missing, f"keys the schema accepts but README.md does not document: {missing}"


def test_every_row_is_a_schema_key() -> None:
    keys = schema_keys()
    unknown = [row for row in reference_rows() if row not in keys]
    assert not unknown, f"README.md documents keys the schema does not accept: {unknown}"


def _readme_default(cell: str) -> Any:
    """The value of a default cell: `x` parsed as YAML; — or none: no default."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    if match is None:
        return None
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("key", sorted(reference_rows()))
def test_row_default_is_the_schema_default(key: str) -> None:
    keys = schema_keys()
    cell = reference_rows()[key]
    if key not in keys or isinstance(keys[key], BaseModel):
        return  # a section row (its default is a whole model) or reported above
    if key == "period":  # the name of the default, `monthly`, is {every: month, ...}
        assert cell == "`monthly`" and keys["period.every"] == "month"
        return
    expected = keys[key]
    documented = _readme_default(cell)
    if expected in (None, ..., {}) and documented is None:
        return  # no default, written — or none
    if isinstance(expected, list) and key.endswith("refund_on"):
        expected = [str(v) for v in expected]
    assert documented == expected, f"README.md: {key} defaults to {cell}; the schema: {expected!r}"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def readme_snippets() -> list[tuple[str, dict[str, Any]]]:
    """Each YAML snippet of the README; a block of alternatives (several lines setting
    the same top-level key, as in Periods) gives one snippet per line."""
    snippets = []
    for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", README, re.S)):
        tops = re.findall(r"^([a-z_]+):", block, re.M)
        if len(tops) != len(set(tops)):
            for i, line in enumerate(block.splitlines()):
                if line.strip():
                    snippets.append((f"block {n} line {i}", yaml.safe_load(line)))
        else:
            snippets.append((f"block {n}", yaml.safe_load(block)))
    assert snippets, "no yaml snippet in README.md"
    return snippets


SNIPPETS = readme_snippets()


@pytest.mark.parametrize(("name", "snippet"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_readme_snippet_merged_into_the_example_is_valid(
    name: str, snippet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    config = yaml.safe_load(EXAMPLE.read_text())
    merged = copy.deepcopy(config)
    _merge(merged, snippet)
    parse_config(yaml.safe_dump(merged), f"README.md {name}", mode="proxy")


def test_the_example_file_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in ENV.items():
        monkeypatch.setenv(var, value)
    parse_config(EXAMPLE.read_text(), str(EXAMPLE), mode="proxy")
