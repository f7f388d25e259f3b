"""A feature's ``refund_on``: the response statuses after which its tokens are refunded.

Entries are status codes (``429``, or ``"429"``) or classes (``"4xx"``, ``"5xx"``, any
case). Every 5xx (the proxy's own 502/504 included) always refunds; ``refund_on`` adds
statuses to that (contract A3: "can refund more", e.g. a provider's 429), and everything
else, 4xx included, is charged. Whatever the list, a request whose upstream failed
(unreachable, timed out, cut off mid-body) or that got no response at all is refunded:
the app never answered it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["DEFAULT_REFUND_ON", "parse_refund_entry", "refund_statuses"]

DEFAULT_REFUND_ON: tuple[int | str, ...] = ("5xx",)

_CLASS = re.compile(r"([1-5])xx", re.IGNORECASE)
_CODE = re.compile(r"[1-5][0-9][0-9]")


def parse_refund_entry(entry: object) -> range:
    """The statuses one entry names; ``ValueError`` (in the config's words) if malformed."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        if 100 <= entry <= 599:
            return range(entry, entry + 1)
    elif isinstance(entry, str):
        text = entry.strip()
        if match := _CLASS.fullmatch(text):
            low = int(match.group(1)) * 100
            return range(low, low + 100)
        if _CODE.fullmatch(text):
            return range(int(text), int(text) + 1)
    raise ValueError(f"expected a status code (100-599) or a class (1xx..5xx), got {entry!r}")


def refund_statuses(entries: Iterable[object]) -> frozenset[int]:
    """Every 5xx plus every status ``entries`` name (the config is validated: no malformed
    entry is left). A success is never refunded by accident of a short list: the 5xx
    default cannot be dropped, only added to."""
    named = (status for entry in entries for status in parse_refund_entry(entry))
    return frozenset(range(500, 600)).union(named)
