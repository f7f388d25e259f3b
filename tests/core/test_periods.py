"""The period calendar (UTC months, ISO weeks, days) and the clocks."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.periods import FixedClock, SystemClock, period_bounds, period_id


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Milliseconds since the epoch of a UTC datetime."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("period", "now", "pid", "start", "end"),
    [
        ("monthly", ms(2026, 11, 23, 15, 4), "2026-11", ms(2026, 11, 1), ms(2026, 12, 1)),
        ("monthly", ms(2026, 12, 31, 23, 59, 59), "2026-12", ms(2026, 12, 1), ms(2027, 1, 1)),
        ("monthly", ms(2027, 1, 1), "2027-01", ms(2027, 1, 1), ms(2027, 2, 1)),
        ("monthly", ms(2028, 2, 29, 12), "2028-02", ms(2028, 2, 1), ms(2028, 3, 1)),  # leap
        ("monthly", ms(2026, 2, 28, 23), "2026-02", ms(2026, 2, 1), ms(2026, 3, 1)),
        ("monthly", ms(2100, 2, 28), "2100-02", ms(2100, 2, 1), ms(2100, 3, 1)),  # not leap
        ("weekly", ms(2026, 11, 23), "2026-W48", ms(2026, 11, 23), ms(2026, 11, 30)),
        ("weekly", ms(2026, 11, 29, 23, 59), "2026-W48", ms(2026, 11, 23), ms(2026, 11, 30)),
        # ISO years: 1 Jan 2027 is still in 2026's week 53; 30 Dec 2024 is in 2025-W01.
        ("weekly", ms(2027, 1, 1, 8), "2026-W53", ms(2026, 12, 28), ms(2027, 1, 4)),
        ("weekly", ms(2024, 12, 30), "2025-W01", ms(2024, 12, 30), ms(2025, 1, 6)),
        ("weekly", ms(2021, 1, 3), "2020-W53", ms(2020, 12, 28), ms(2021, 1, 4)),
        ("daily", ms(2026, 11, 23, 23, 59, 59), "2026-11-23", ms(2026, 11, 23), ms(2026, 11, 24)),
        ("daily", ms(2028, 2, 29, 1), "2028-02-29", ms(2028, 2, 29), ms(2028, 3, 1)),
        ("daily", ms(2026, 12, 31, 12), "2026-12-31", ms(2026, 12, 31), ms(2027, 1, 1)),
    ],
)
def test_period_calendar(period: str, now: int, pid: str, start: int, end: int) -> None:
    assert period_id(period, now) == pid
    assert period_bounds(period, now) == (start, end)


@pytest.mark.parametrize("period", ["monthly", "weekly", "daily"])
def test_boundaries_are_start_inclusive_end_exclusive(period: str) -> None:
    now = ms(2026, 11, 23, 10)
    start, end = period_bounds(period, now)
    assert period_bounds(period, start) == (start, end)
    assert period_bounds(period, end - 1) == (start, end)
    assert period_bounds(period, end)[0] == end
    assert period_id(period, end) != period_id(period, end - 1)
    # The per-kind cache must not answer for a time before the cached period.
    assert period_bounds(period, start - 1)[1] == start


def test_unknown_period() -> None:
    with pytest.raises(ValueError, match="unknown period 'yearly'"):
        period_id("yearly", 0)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.sampled_from(["monthly", "weekly", "daily"]),
    st.integers(min_value=ms(1971, 1, 1), max_value=ms(2999, 12, 1)),
)
def test_period_properties(period: str, now: int) -> None:
    start, end = period_bounds(period, now)
    assert start <= now < end
    assert period_id(period, start) == period_id(period, now) == period_id(period, end - 1)
    assert period_bounds(period, end)[0] == end
    span_days = (end - start) / 86_400_000
    assert span_days == {"daily": 1, "weekly": 7}.get(period, span_days)
    assert 28 <= span_days <= 31 if period == "monthly" else True
    start_dt = datetime.fromtimestamp(start / 1000, UTC)
    assert (start_dt.hour, start_dt.minute, start_dt.second) == (0, 0, 0)
    if period == "weekly":
        assert start_dt.isoweekday() == 1
    if period == "monthly":
        assert start_dt.day == 1


def test_fixed_clock() -> None:
    clock = FixedClock(1_000)
    assert clock.now_ms() == 1_000
    clock.advance(500)
    assert clock.now_ms() == 1_500
    clock.set(42)
    assert clock.now_ms() == 42
    assert FixedClock().now_ms() == 0


def test_system_clock() -> None:
    before = int(time.time() * 1000)
    now = SystemClock().now_ms()
    after = int(time.time() * 1000)
    assert before - 1 <= now <= after + 1
    assert isinstance(now, int)
