"""Loading a config file: YAML and ``${VAR}`` expansion, schema, then meaning checks.

Loading happens in three steps, in the manner of envoy's ratelimit config:
1. YAML is parsed and every string value gets ``${VAR}`` / ``${VAR:-default}`` expansion
   (:mod:`gateway.config.source`; syntax errors in words, :mod:`gateway.config.yaml_errors`);
2. the structure is validated by pydantic with unknown keys rejected everywhere
   (:mod:`gateway.config.schema`), and the parts with errors are set aside
   (:mod:`gateway.config.structure`);
3. the meaning of the rest is checked (features, plans and buckets referenced anywhere
   exist, rate strings parse, routes are unique and their templates compile)
   (:mod:`gateway.config.checks`).

Every error of steps 2 and 3 is reported in one run, each naming the file and the key
path (``routes[3].feature``); a YAML syntax error stops at step 1 and names the line and
column. ``ConfigError`` carries all of them; ``creditgate check-config`` prints them and
exits 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.config.checks import Checker, Mode
from gateway.config.schema import Config
from gateway.config.source import ConfigError, Expander, parse_yaml
from gateway.config.structure import validate_structure

__all__ = [
    "ConfigLocation", "Mode", "check_config", "load_config", "locate_config", "parse_config",
    "resolve_config_path",
]  # fmt: skip

DEFAULT_CONFIG = "creditgate.yaml"
CONFIG_VARIABLE = "CREDITGATE_CONFIG"


@dataclass(frozen=True, slots=True)
class ConfigLocation:
    """The config file to use, and where that choice came from: the ``--config`` option,
    ``$CREDITGATE_CONFIG``, or the default ``./creditgate.yaml``."""

    path: Path
    origin: Literal["option", "environment", "default"]


def locate_config(option: str | os.PathLike[str] | None) -> ConfigLocation:
    """The option, else ``$CREDITGATE_CONFIG`` (when not empty), else ./creditgate.yaml."""
    if option:
        return ConfigLocation(Path(option), "option")
    if os.environ.get(CONFIG_VARIABLE):
        return ConfigLocation(Path(os.environ[CONFIG_VARIABLE]), "environment")
    return ConfigLocation(Path(DEFAULT_CONFIG), "default")


def resolve_config_path(option: str | os.PathLike[str] | None) -> Path:
    """The config file to use (see :func:`locate_config`)."""
    return locate_config(option).path


def load_config(path: str | os.PathLike[str], *, mode: Mode | None = None) -> Config:
    """Read, expand, validate and check a config file; raise :class:`ConfigError`.

    ``mode="proxy"`` also requires what ``creditgate serve`` needs (``upstream``).
    """
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, source, mode=mode)


def parse_config(text: str, source: str, *, mode: Mode | None = None) -> Config:
    """Parse config text (``source`` names it in errors); raise :class:`ConfigError`."""
    tree = parse_yaml(text, source)
    unset: dict[str, list[str]] = {}
    problems: list[str] = []
    tree = Expander(os.environ, unset, problems).walk(tree, ())
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    structure = validate_structure(tree)
    errors = list(structure.errors)
    if structure.config is not None:
        meaning = Checker(structure.config, unset, structure.unchecked, mode).run()
        errors += structure.meaning_errors(meaning)
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    assert structure.config is not None  # no errors: validated as a whole
    return structure.config


def check_config(path: str | os.PathLike[str], *, mode: Mode | None = None) -> list[str]:
    """Every error of the config at ``path`` (empty when valid); never raises for bad input."""
    try:
        load_config(path, mode=mode)
    except ConfigError as exc:
        return list(exc.errors)
    return []
