"""The period calendar (when balances reset) and the clock the gateway reads time from.

Periods are calendar periods in UTC: ``monthly`` (id ``2026-11``), ``weekly`` (ISO week,
Monday 00:00 UTC, id ``2026-W48``) and ``daily`` (id ``2026-11-23``). A period's end is the
next reset, which is what clients see as ``refresh_at``.

Per-org periods (contract A12) are in :mod:`gateway.core.anchors`: a :class:`Calendar` may
move the calendar's midnight to a time zone and give each org its own anchor day.

All times are integer milliseconds since the Unix epoch. The gateway never calls
``time.time()`` directly: it reads a :class:`Clock`, so tests (and the simulator) can run it
on a :class:`FixedClock`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

PERIODS = ("monthly", "weekly", "daily")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS = 86_400_000


class Clock(Protocol):
    """A source of the current time in milliseconds since the epoch."""

    def now_ms(self) -> int:
        """The current time, integer milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        """The current time from ``time.time()``."""
        return time.time_ns() // 1_000_000


class FixedClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = int(start_ms)

    def now_ms(self) -> int:
        """The time last set."""
        return self._now

    def set(self, ms: int) -> None:
        """Jump to ``ms`` (backwards is allowed: tests may need it)."""
        self._now = int(ms)

    def advance(self, ms: int) -> None:
        """Move forward by ``ms`` milliseconds."""
        self._now += int(ms)


def _to_ms(dt: datetime) -> int:
    # timedelta arithmetic is exact for whole milliseconds, unlike timestamp() floats.
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _compute(period: str, now_ms: int) -> tuple[int, int, str]:
    day_start_ms = now_ms - now_ms % _DAY_MS
    day = (_EPOCH + timedelta(milliseconds=day_start_ms)).date()
    if period == "daily":
        return day_start_ms, day_start_ms + _DAY_MS, day.isoformat()
    if period == "weekly":
        year, week, weekday = day.isocalendar()
        start = day_start_ms - (weekday - 1) * _DAY_MS
        return start, start + 7 * _DAY_MS, f"{year}-W{week:02d}"
    if period == "monthly":
        first = datetime(day.year, day.month, 1, tzinfo=UTC)
        following = (
            datetime(day.year + 1, 1, 1, tzinfo=UTC)
            if day.month == 12
            else datetime(day.year, day.month + 1, 1, tzinfo=UTC)
        )
        return _to_ms(first), _to_ms(following), f"{day.year:04d}-{day.month:02d}"
    raise ValueError(f"unknown period {period!r} (known: {', '.join(PERIODS)})")


# The last period computed per kind: (start, end, id). Requests arrive in the same period
# almost always, so this makes the per-request lookup two comparisons. Replacing the tuple
# is atomic, so threads may share it.
_last: dict[str, tuple[int, int, str]] = {}


def _lookup(period: str, now_ms: int) -> tuple[int, int, str]:
    cached = _last.get(period)
    if cached is not None and cached[0] <= now_ms < cached[1]:
        return cached
    result = _compute(period, now_ms)
    _last[period] = result
    return result


def period_id(period: str, now_ms: int) -> str:
    """The id of the ``period`` (monthly/weekly/daily) containing ``now_ms``."""
    return _lookup(period, now_ms)[2]


def period_bounds(period: str, now_ms: int) -> tuple[int, int]:
    """``(start_ms, end_ms)`` of the period containing ``now_ms``; ``end_ms`` is the next reset."""
    start, end, _ = _lookup(period, now_ms)
    return start, end
