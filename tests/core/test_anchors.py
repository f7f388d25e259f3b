"""Per-org periods (contract A12): anchored months, clamping, time zones, DST, ids."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.core.anchors import (
    Calendar,
    anchor_of,
    format_anchor,
    org_period,
    parse_anchor,
    period_end,
)

SUB = Calendar("month", "subscription", "UTC")


def ms(y: int, m: int, d: int, h: int = 0, mi: int = 0, tz: str = "UTC") -> int:
    """Milliseconds since the epoch of a wall-clock time in ``tz``."""
    return int(datetime(y, m, d, h, mi, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def test_anchor_31_clamps_to_the_months_last_day_and_comes_back() -> None:
    anchor = format_anchor(31, date(2027, 1, 31))
    # Jan 31 -> Feb 28 (2027 is not a leap year) -> Mar 31 -> Apr 30.
    assert org_period(SUB, anchor, ms(2027, 2, 27, 23, 59)) == (
        ms(2027, 1, 31),
        ms(2027, 2, 28),
        "2027-01-31..2027-02-28",
    )
    assert org_period(SUB, anchor, ms(2027, 2, 28)) == (
        ms(2027, 2, 28),
        ms(2027, 3, 31),
        "2027-02-28..2027-03-31",
    )
    assert org_period(SUB, anchor, ms(2027, 4, 15))[2] == "2027-03-31..2027-04-30"
    assert org_period(SUB, anchor, ms(2027, 5, 1))[2] == "2027-04-30..2027-05-31"


def test_leap_february_ends_on_the_29th() -> None:
    anchor = format_anchor(31, date(2028, 1, 31))
    assert org_period(SUB, anchor, ms(2028, 2, 28, 12))[2] == "2028-01-31..2028-02-29"
    assert org_period(SUB, anchor, ms(2028, 2, 29))[:2] == (ms(2028, 2, 29), ms(2028, 3, 31))
    # Anchor 30: Feb 29 in a leap year, Feb 28 otherwise.
    assert org_period(SUB, format_anchor(30, date(2027, 1, 30)), ms(2028, 3, 1))[2] == (
        "2028-02-29..2028-03-30"
    )


def test_the_anchor_starts_a_period_the_day_it_is_set() -> None:
    # Set on Dec 10 with day 15: Dec 10 -> Dec 15, then plain months from the 15th.
    anchor = anchor_of(15, ms(2026, 12, 10, 14), SUB)
    assert anchor == "15:2026-12-10"
    assert org_period(SUB, anchor, ms(2026, 12, 12))[2] == "2026-12-10..2026-12-15"
    assert org_period(SUB, anchor, ms(2026, 12, 15))[2] == "2026-12-15..2027-01-15"
    assert org_period(SUB, anchor, ms(2027, 3, 20))[2] == "2027-03-15..2027-04-15"


def test_ids_increase_through_every_change() -> None:
    # Calendar month, then an anchor, across a year: each id sorts after the one before.
    ids = [org_period(SUB, "", ms(2026, 12, 3))[2]]
    anchor = anchor_of(31, ms(2026, 12, 5), SUB)
    now = ms(2026, 12, 5)
    while now < ms(2027, 12, 31):
        start, end, pid = org_period(SUB, anchor, now)
        assert start <= now < end
        if pid != ids[-1]:
            assert pid > ids[-1]
            ids.append(pid)
        now += 6 * 3_600_000
    assert ids[:4] == ["2026-12", "2026-12-05..2026-12-31", "2026-12-31..2027-01-31",
                       "2027-01-31..2027-02-28"]  # fmt: skip
    assert len(ids) == len(set(ids)) == 14


@pytest.mark.parametrize(
    ("tz", "utc_start", "utc_end"),
    [
        # West of UTC: local midnight is later in UTC.
        ("America/New_York", datetime(2026, 11, 1, 4, tzinfo=UTC),
         datetime(2026, 12, 1, 5, tzinfo=UTC)),  # DST ended Nov 1: -4 then -5
        # East of UTC: local midnight is the previous UTC day.
        ("Asia/Tokyo", datetime(2026, 10, 31, 15, tzinfo=UTC),
         datetime(2026, 11, 30, 15, tzinfo=UTC)),
        ("Pacific/Kiritimati", datetime(2026, 10, 31, 10, tzinfo=UTC),
         datetime(2026, 11, 30, 10, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_calendar_months_start_at_local_midnight(
    tz: str, utc_start: datetime, utc_end: datetime
) -> None:
    cal = Calendar("month", "calendar", tz)
    start, end, pid = org_period(cal, "", ms(2026, 11, 15, 12, tz=tz))
    assert (start, end, pid) == (
        int(utc_start.timestamp() * 1000),
        int(utc_end.timestamp() * 1000),
        "2026-11",
    )
    # One millisecond before local midnight is still the previous month.
    assert org_period(cal, "", start - 1)[2] == "2026-10"
    assert period_end(pid, tz) == utc_end


def test_anchored_period_across_a_dst_change_keeps_local_midnight() -> None:
    # Europe/Paris leaves summer time on Oct 25, 2026: a period Oct 15 -> Nov 15 is one
    # hour longer than 31 days, and both ends are local midnight.
    cal = Calendar("month", "subscription", "Europe/Paris")
    anchor = format_anchor(15, date(2026, 1, 15))
    start, end, pid = org_period(cal, anchor, ms(2026, 10, 30, tz="Europe/Paris"))
    assert pid == "2026-10-15..2026-11-15"
    assert start == ms(2026, 10, 14, 22)  # 00:00 CEST (+2)
    assert end == ms(2026, 11, 14, 23)  # 00:00 CET (+1)
    assert end - start == 31 * 86_400_000 + 3_600_000
    assert period_end(pid, "Europe/Paris") == datetime(2026, 11, 14, 23, tzinfo=UTC)


def test_the_anchor_day_is_local_east_and_west() -> None:
    # 2027-01-31 20:00 UTC is already Feb 1 in Tokyo, still Jan 31 in Los Angeles.
    now = ms(2027, 1, 31, 20)
    tokyo = Calendar("month", "subscription", "Asia/Tokyo")
    la = Calendar("month", "subscription", "America/Los_Angeles")
    assert anchor_of(1, now, tokyo) == "1:2027-02-01"
    assert anchor_of(31, now, la) == "31:2027-01-31"
    assert org_period(la, "31:2027-01-31", now)[2] == "2027-01-31..2027-02-28"
    assert org_period(tokyo, "1:2027-02-01", now)[2] == "2027-02-01..2027-03-01"


def test_calendar_deployments_ignore_anchors_and_keep_utc_ids() -> None:
    cal = Calendar()
    assert org_period(cal, "15:2026-12-10", ms(2026, 12, 12)) == (
        ms(2026, 12, 1),
        ms(2027, 1, 1),
        "2026-12",
    )


def test_malformed_anchors_are_calendar_periods() -> None:
    for bad in ("", "0:2026-01-01", "32:2026-01-01", "15", "15:2026-02-30", "x:y"):
        assert parse_anchor(bad) is None
        assert org_period(SUB, bad, ms(2026, 12, 12))[2] == "2026-12"


def test_period_end_of_every_id_form() -> None:
    assert period_end("2026-12") == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_end("2026-W53") == datetime(2027, 1, 4, tzinfo=UTC)
    assert period_end("2026-11-23") == datetime(2026, 11, 24, tzinfo=UTC)
    assert period_end("2027-01-31..2027-02-28") == datetime(2027, 2, 28, tzinfo=UTC)
    assert period_end("nonsense") is None
    assert period_end("2026-13") is None
