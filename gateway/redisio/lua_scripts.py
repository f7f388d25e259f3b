"""The Redis Lua scripts, one ``.lua`` file each under ``lua/``, loaded once per process.

Each script's header comment names its KEYS, ARGV and return value. Scripts are run by
SHA (EVALSHA); a client that gets NOSCRIPT loads the source and runs it again, which is
safe because NOSCRIPT means nothing ran.

The audit event every script writes is defined once, in ``lua/_prelude.lua``
(``audit_event``). The loader puts the prelude's code in front of each script that calls
it, joined into one line that precedes the script's first line: line numbers in Redis
error messages still match the script's file. A script's SHA and the source sent on
NOSCRIPT are those of the assembled text, prelude included.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache

from gateway.core.resources import read_text

__all__ = ["PRELUDE", "SCRIPT_NAMES", "LuaScript", "assemble", "load", "prelude_code"]

SCRIPT_NAMES = (
    "charge", "settle", "seed", "set_plan", "grant", "sweep_holds", "repair", "levels",
    "shard_lease", "sync_members",
)  # fmt: skip
PRELUDE = "_prelude"
# A script needs the prelude when it calls what the prelude defines.
_USES_PRELUDE = re.compile(r"\baudit_event\s*\(")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script's name, source and SHA1 (what EVALSHA takes)."""

    name: str
    source: str
    sha: str

    @classmethod
    def from_source(cls, name: str, source: str) -> LuaScript:
        """Build a script from its complete source text (nothing is prepended)."""
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


@cache
def prelude_code() -> str:
    """The prelude's code on one line: its comment and blank lines dropped (comments stand
    on lines of their own there, so nothing else is cut)."""
    lines = read_text("lua", f"{PRELUDE}.lua").splitlines()
    code = [line.strip() for line in lines if line.strip() and not line.strip().startswith("--")]
    return " ".join(code)


def assemble(name: str, source: str) -> LuaScript:
    """The script ``name`` from its file's text, the prelude's code in front when it uses
    it (on the first line, which keeps every line number of ``source``)."""
    if _USES_PRELUDE.search(source):
        source = f"{prelude_code()} {source}"
    return LuaScript.from_source(name, source)


@cache
def load(name: str) -> LuaScript:
    """Load ``lua/<name>.lua``, assembled (cached for the life of the process)."""
    return assemble(name, read_text("lua", f"{name}.lua"))
