"""The Redis Lua scripts, one ``.lua`` file each under ``lua/``, loaded once per process.

Each script's header comment names its KEYS, ARGV and return value. Scripts are run by
SHA (EVALSHA); a client that gets NOSCRIPT loads the source and runs it again, which is
safe because NOSCRIPT means nothing ran.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

from gateway.core.resources import read_text

SCRIPT_NAMES = ("charge", "settle", "seed", "set_plan", "grant", "sweep_holds", "repair")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script's name, source and SHA1 (what EVALSHA takes)."""

    name: str
    source: str
    sha: str

    @classmethod
    def from_source(cls, name: str, source: str) -> LuaScript:
        """Build a script from its source text."""
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


@cache
def load(name: str) -> LuaScript:
    """Load ``lua/<name>.lua`` (cached for the life of the process)."""
    return LuaScript.from_source(name, read_text("lua", f"{name}.lua"))
