"""Loading a config file: YAML and ``${VAR}`` expansion, schema, then meaning checks.

Loading happens in three steps, in the manner of envoy's ratelimit config:
1. YAML is parsed and every string value gets ``${VAR}`` / ``${VAR:-default}`` expansion
   (:mod:`gateway.config.source`);
2. the structure is validated by pydantic with unknown keys rejected everywhere
   (:mod:`gateway.config.schema`);
3. meaning is checked (features, plans and buckets referenced anywhere exist, rate strings
   parse, routes are unique and their templates compile), collecting every error
   (:mod:`gateway.config.checks`).

Every error names the file and the key path (``routes[3].feature``). ``ConfigError``
carries all of them; ``creditgate check-config`` prints them and exits 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from gateway.config.checks import Checker, describe
from gateway.config.schema import Config
from gateway.config.source import ConfigError, Expander, parse_yaml

__all__ = ["check_config", "load_config", "parse_config", "resolve_config_path"]


def resolve_config_path(option: str | None) -> Path:
    """The config file to use: the option, else ``$CREDITGATE_CONFIG``, else ./creditgate.yaml."""
    return Path(option or os.environ.get("CREDITGATE_CONFIG") or "creditgate.yaml")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand, validate and check a config file; raise :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, source)


def parse_config(text: str, source: str) -> Config:
    """Parse config text (``source`` names it in errors); raise :class:`ConfigError`."""
    tree = parse_yaml(text, source)
    unset: dict[str, list[str]] = {}
    problems: list[str] = []
    tree = Expander(os.environ, unset, problems).walk(tree, ())
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError([f"{source}: {describe(e)}" for e in exc.errors()]) from None
    errors = Checker(config, unset).run()
    if errors:
        raise ConfigError([f"{source}: {e}" for e in errors])
    return config


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """Every error of the config at ``path`` (empty when valid); never raises for bad input."""
    try:
        load_config(path)
    except ConfigError as exc:
        return list(exc.errors)
    return []
