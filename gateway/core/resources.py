"""Locate the Lua scripts and SQL migrations shipped with creditgate.

In a wheel they live inside the package (``gateway/lua``, ``gateway/migrations``; see the
``force-include`` table in pyproject.toml). In a source checkout or an editable install they
stay at the top of the repository, one level above the package.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path


def resource_dir(name: str) -> Traversable:
    """Return the directory of shipped resources called ``name`` ("lua" or "migrations")."""
    packaged = files("gateway") / name
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parents[2] / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"creditgate resource directory {name!r} is missing from the install")


def read_text(name: str, filename: str) -> str:
    """Read one shipped resource file as UTF-8 text."""
    return (resource_dir(name) / filename).read_text(encoding="utf-8")
