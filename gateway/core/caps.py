"""Caps inside an org (contract A10): what a team, a user or an API key may draw from the
org's pool per bucket per period.

A cap is an absolute number of tokens or a share of the org's allocation of the bucket
(``"30%"``). One rule for every place that reads one: the config's plan defaults
(``plans.<plan>.caps``), the admin API's overrides and the Redis mirror that charge.lua
reads. Redis keeps a cap in its *stored form*: ``"<N>"`` for N tokens, ``"p<H>"`` for H
hundredths of a percent, so the script computes a share in integers exactly as
:func:`cap_tokens` does.

The Redis fields of the levels live in the org's hash (one hash tag: atomic on Redis
Cluster) and are named here only (lua/charge.lua and lua/settle.lua spell the same names):

==========================  ==========================================================
``lv``                      the org's levels version, ``v<s>.<µs>.<n>``: present when
                            the org has teams, members or overrides in Redis or its
                            counters were reset; every change of them (lua/levels.lua),
                            a seed with levels and a reset of the counters write a new
                            one, which makes the levels cached in charge.lua's argument
                            templates stale (an older ``"1"`` and dots predates versions
                            and is replaced by charge.lua)
``lvn``                     the org's counter of versions (part of each version)
``lvp``                     128 dots: longer than hash-max-listpack-value, so the hash is
                            a hash table (see lua/levels.lua)
``Lm:k:<key id>``           the team of an API key (absent: none)
``Lm:u:<user>``             the team of a user (absent: none)
``Lc:<bucket>:<l>:<id>``    a cap override (stored form) of level l = t | u | k
``Lp:<bucket>``             the period the bucket's level counters count
``Ln:<bucket>:<l>:<id>``    what the level drew in that period, a hexadecimal integer
                            (absent: 0; hexadecimal because Lua's tonumber(s, 16) is
                            strtoul, half the cost of strtod); ``<used>@<period id>``
                            (decimal) in an org whose bucket has no ``Lp`` yet (written
                            before it), converted at its next charge
==========================  ==========================================================

Buckets never contain ``:`` (config names), so the id after it may be any valid id.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "LEVELS",
    "LEVEL_LETTER",
    "MAX_CAP",
    "Level",
    "cap_field",
    "cap_tokens",
    "counters_period_field",
    "membership_field",
    "parse_cap",
    "shown_cap",
    "used_field",
    "used_of",
]

Level = Literal["team", "user", "key"]
LEVELS: tuple[Level, ...] = ("team", "user", "key")
LEVEL_LETTER: dict[Level, str] = {"team": "t", "user": "u", "key": "k"}
MAX_CAP = 2**53  # Lua numbers are doubles: integers are exact up to here
LEVELS_FLAG = "lv"

_PERCENT = re.compile(r"(\d{1,3})(?:\.(\d{1,2}))?%")


def parse_cap(value: object) -> str:
    """The stored form of a cap given as ``N`` (tokens) or ``"N%"`` (of the allocation,
    at most two decimals, at most 100); ``ValueError`` saying why for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"a cap is a number of tokens or a percentage, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_CAP:
            raise ValueError(f"a cap must be between 0 and {MAX_CAP} tokens, got {value}")
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_cap(int(text))
        match = _PERCENT.fullmatch(text)
        if match is not None:
            hundredths = int(match[1]) * 100 + int((match[2] or "0").ljust(2, "0"))
            if hundredths > 10_000:
                raise ValueError(f"a percentage cap must be at most 100%, got {value!r}")
            return f"p{hundredths}"
    raise ValueError(f'a cap is a number of tokens or "N%" of the allocation, got {value!r}')


def cap_tokens(stored: str, allocation: int) -> int:
    """The cap in tokens of a stored cap for a bucket of ``allocation`` tokens (a share is
    rounded down)."""
    if stored.startswith("p"):
        return allocation * int(stored[1:]) // 10_000
    return int(stored)


def shown_cap(stored: str) -> int | str:
    """A stored cap as the admin API and the config spell it: ``N`` or ``"N%"``."""
    if not stored.startswith("p"):
        return int(stored)
    whole, frac = divmod(int(stored[1:]), 100)
    return f"{whole}%" if frac == 0 else f"{whole}.{frac:02d}".rstrip("0") + "%"


def membership_field(level: Literal["user", "key"], ident: str) -> str:
    """The org-hash field holding the team of a user or an API key."""
    return f"Lm:{LEVEL_LETTER[level]}:{ident}"


def cap_field(bucket: str, level: Level, ident: str) -> str:
    """The org-hash field holding a level's cap override for ``bucket``."""
    return f"Lc:{bucket}:{LEVEL_LETTER[level]}:{ident}"


def used_field(bucket: str, level: Level, ident: str) -> str:
    """The org-hash field holding what a level drew from ``bucket`` in the period of
    :func:`counters_period_field` (a hexadecimal integer)."""
    return f"Ln:{bucket}:{LEVEL_LETTER[level]}:{ident}"


def counters_period_field(bucket: str) -> str:
    """The org-hash field holding the period the level counters of ``bucket`` count."""
    return f"Lp:{bucket}"


def used_of(raw: str | None, period: str, counted: str | None) -> int:
    """A level's used tokens in ``period`` from its counter ``raw`` (hexadecimal) and the
    period its bucket's counters count (``counted``, field ``Lp:<bucket>``; ``None`` when
    absent): 0 when they counted another period (counters reset lazily, like the org's
    balance). A counter in the older form ``<used>@<period>`` (decimal) names its own
    period."""
    if not raw:
        return 0
    used, at, per = raw.partition("@")
    if at:
        return int(used) if per == period else 0
    return int(used, 16) if counted == period else 0
