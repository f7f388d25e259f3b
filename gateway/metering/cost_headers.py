"""The ``X-Tokens-*`` headers an admitted request's response carries, as the outcome changes
them: the one place both the fixed-cost path (gateway/metering/middleware.py) and the usage
tap (gateway/metering/usage_tap.py) build them from.

``charged`` is the list the middleware builds once per admitted request: ``X-Tokens-Cost``
(the hold) first, then ``X-Tokens-Remaining`` (when the balance is known), the request id
and the rate-limit headers. The functions here only replace its first one or two entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from gateway.metering.admission import Admission

Header = tuple[bytes, bytes]

COST_NAME: Final = b"x-tokens-cost"
REMAINING_NAME: Final = b"x-tokens-remaining"
REFUNDED_COST: Final[Header] = (COST_NAME, b"0")
RESERVED: Final[Header] = (b"x-tokens-cost-status", b"reserved")
"""Marks a response whose ``X-Tokens-Cost`` is the hold: the actual charge comes after the
body (a stream's usage)."""


def refunded_headers(charged: list[Header], adm: Admission) -> list[Header]:
    """``charged`` as a refund tells it: nothing charged, the held tokens back."""
    if adm.remaining is None:
        return [REFUNDED_COST, *charged[1:]]
    restored = (REMAINING_NAME, str(adm.remaining + adm.cost).encode())
    return [REFUNDED_COST, restored, *charged[2:]]


def actual_headers(
    charged: list[Header], adm: Admission, actual: int, head: Iterable[Header] = ()
) -> list[Header]:
    """``charged`` as the actual charge tells it: ``actual`` instead of the hold, and what is
    left once the difference is refunded or taken (never below zero); after ``head`` (the
    answer's own headers: one list built, not two). The usage tap's complete answer gets
    the same list from the values its compiled pricing made (usage_tap.py ``_whole``)."""
    # b"%d" % n: one bytes object, where str(n).encode() makes a str first (every held
    # usage-cost answer comes here).
    cost = (COST_NAME, b"%d" % actual)
    remaining = adm.remaining
    if remaining is None:
        return [*head, cost, *charged[1:]]
    left = remaining + adm.cost - actual
    return [*head, cost, (REMAINING_NAME, b"%d" % left if left > 0 else b"0"), *charged[2:]]
