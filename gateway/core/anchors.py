"""Per-org periods (contract A12): calendar periods in a time zone, and anchored months.

A :class:`Calendar` is the config's ``period``: how long a period is (``month``, ``week``,
``day``), where an org's month starts (``anchor``: ``calendar`` = the 1st, or the org's own
anchor day with ``subscription`` / ``created``) and the time zone whose midnight periods
start at. ``period: monthly`` is ``Calendar("month", "calendar", "UTC")``, which takes the
cached path of :mod:`gateway.core.periods` unchanged.

An org's anchor is a string, ``"<day>:<since>"`` (e.g. ``"31:2027-01-31"``), kept in the
org's Redis hash (field ``pa``) and in ``organizations.period_anchor_day`` / ``_since``:

- ``day`` (1-31): the org's months start on that day, at local midnight; a month without
  that day starts on its last day (anchor 31: Jan 31, Feb 28/29, Mar 31, Apr 30), as
  Stripe renews.
- ``since``: the local date the anchor was set. Setting an anchor starts a new period that
  day (as a new Stripe subscription starts a paid period at once); it ends on the next
  anchor day. Later periods are plain anchored months. This keeps every org's period ids
  increasing: a period never starts before the one it replaces.

An org without an anchor (``""``) has calendar periods in the calendar's time zone.

Period ids: calendar periods keep their ids (``2026-11``, ``2026-W48``, ``2026-11-23``:
local dates); an anchored period is ``<start>..<end>`` in local dates
(``2027-01-31..2027-02-28``), unique and sortable per org, and self-describing: the sync
job and reconcile derive its end from the id alone (:func:`period_end`), with the time zone.
"""

from __future__ import annotations

import calendar as _cal
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from gateway.core.periods import period_bounds, period_id

__all__ = [
    "ANCHORS",
    "EVERY",
    "Calendar",
    "anchor_day_starts",
    "anchor_of",
    "format_anchor",
    "local_date",
    "org_period",
    "parse_anchor",
    "period_end",
]

EVERY = ("month", "week", "day")
ANCHORS = ("calendar", "subscription", "created")
_LEGACY = {"month": "monthly", "week": "weekly", "day": "daily"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ANCHOR = re.compile(r"^([1-9]|[12][0-9]|3[01]):(\d{4}-\d{2}-\d{2})$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
_SPAN = re.compile(r"^\d{4}-\d{2}-\d{2}\.\.(\d{4})-(\d{2})-(\d{2})$")

# (start ms, end ms, id) of a period.
Period = tuple[int, int, str]


@dataclass(frozen=True, slots=True)
class Calendar:
    """The config's ``period``: length, anchor mode and time zone."""

    every: str = "month"
    anchor: str = "calendar"
    timezone: str = "UTC"

    @property
    def kind(self) -> str:
        """The legacy name of the length: ``monthly``, ``weekly`` or ``daily``."""
        return _LEGACY[self.every]

    @property
    def anchored(self) -> bool:
        """True when orgs may have their own anchor day (``subscription`` or ``created``)."""
        return self.anchor != "calendar"

    @property
    def zone(self) -> ZoneInfo:
        """The time zone periods start at midnight in."""
        return _zone(self.timezone)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _to_ms(dt: datetime) -> int:
    # timedelta arithmetic is exact for whole milliseconds, unlike timestamp() floats.
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _midnight_ms(day: date, zone: ZoneInfo) -> int:
    """The instant local ``day`` begins: zoneinfo applies the offset in force at midnight,
    so a DST change moves it by the hour, never the date (a midnight skipped by a DST
    change maps to the instant the day begins)."""
    return _to_ms(datetime(day.year, day.month, day.day, tzinfo=zone))


def local_date(now_ms: int, zone: ZoneInfo) -> date:
    """The date in ``zone`` at ``now_ms``."""
    return (_EPOCH + timedelta(milliseconds=now_ms)).astimezone(zone).date()


def _clamp(year: int, month: int, day: int) -> date:
    """``day`` of the month, or the month's last day when it is shorter (as Stripe does)."""
    return date(year, month, min(day, _cal.monthrange(year, month)[1]))


def _shift(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + by
    return index // 12, index % 12 + 1


def _next_anchor(after: date, day: int) -> date:
    """The first anchor date strictly after ``after``."""
    here = _clamp(after.year, after.month, day)
    if here > after:
        return here
    return _clamp(*_shift(after.year, after.month, 1), day)


def parse_anchor(anchor: str) -> tuple[int, date] | None:
    """``(day, since)`` of an anchor string; None for ``""`` or a malformed one (treated as
    no anchor: calendar periods)."""
    m = _ANCHOR.match(anchor)
    if m is None:
        return None
    try:
        return int(m[1]), date.fromisoformat(m[2])
    except ValueError:
        return None


def format_anchor(day: int, since: date) -> str:
    """The anchor string of ``day`` set on ``since``."""
    return f"{day}:{since.isoformat()}"


def anchor_of(day: int, now_ms: int, cal: Calendar) -> str:
    """The anchor string for anchor ``day`` set at ``now_ms`` (since = today, locally)."""
    return format_anchor(day, local_date(now_ms, cal.zone))


def _calendar_period(cal: Calendar, now_ms: int) -> Period:
    if cal.timezone == "UTC":
        start, end = period_bounds(cal.kind, now_ms)  # cached: the default's path
        return start, end, period_id(cal.kind, now_ms)
    zone = cal.zone
    today = local_date(now_ms, zone)
    if cal.every == "day":
        first, following, pid = today, today + timedelta(days=1), today.isoformat()
    elif cal.every == "week":
        year, week, weekday = today.isocalendar()
        first = today - timedelta(days=weekday - 1)
        following, pid = first + timedelta(days=7), f"{year}-W{week:02d}"
    else:
        first = today.replace(day=1)
        following = date(*_shift(today.year, today.month, 1), 1)
        pid = f"{today.year:04d}-{today.month:02d}"
    return _midnight_ms(first, zone), _midnight_ms(following, zone), pid


def org_period(cal: Calendar, anchor: str, now_ms: int) -> Period:
    """``(start ms, end ms, id)`` of the org's period at ``now_ms``; ``anchor`` is the org's
    anchor string (``""``: calendar periods, also when the calendar is not anchored)."""
    parsed = parse_anchor(anchor) if anchor and cal.anchored else None
    if parsed is None:
        return _calendar_period(cal, now_ms)
    day, since = parsed
    zone = cal.zone
    today = local_date(now_ms, zone)
    start = _clamp(today.year, today.month, day)
    if start > today:
        start = _clamp(*_shift(today.year, today.month, -1), day)
    # The anchor's first period starts the day it was set. A since in the future (a
    # clock set back) is ignored rather than trusted: the periods are then plain months.
    if start < since <= today:
        start = since
    end = _next_anchor(start, day)
    return (
        _midnight_ms(start, zone),
        _midnight_ms(end, zone),
        f"{start.isoformat()}..{end.isoformat()}",
    )


def anchor_day_starts(cal: Calendar, now_ms: int) -> tuple[date, ...]:
    """The local date the current period starts on, for each anchor day 1..31 (index 0 is
    day 1), of an org whose anchor was set before that period: what the ledger's listings
    need to find every org's period start in SQL without a row per org. An org whose
    anchor was set later (``since`` after that date, and not in the future) starts on its
    ``since`` instead, as :func:`org_period` says."""
    zone = cal.zone
    return tuple(
        local_date(org_period(cal, format_anchor(day, date(1970, 1, 1)), now_ms)[0], zone)
        for day in range(1, 32)
    )


@lru_cache(maxsize=4096)
def period_end(period: str, timezone: str = "UTC") -> datetime | None:
    """When the period named ``period`` ends (its ``refresh_at``), from the id alone and
    the time zone: ``2026-11`` (month), ``2026-W48`` (ISO week), ``2026-11-23`` (day),
    ``2027-01-31..2027-02-28`` (anchored); None for anything else."""
    try:
        if m := _SPAN.match(period):
            end = date(int(m[1]), int(m[2]), int(m[3]))
        elif m := _MONTH.match(period):
            end = date(*_shift(*date(int(m[1]), int(m[2]), 1).timetuple()[:2], 1), 1)
        elif m := _DAY.match(period):
            end = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=1)
        elif m := _WEEK.match(period):
            end = date.fromisocalendar(int(m[1]), int(m[2]), 1) + timedelta(days=7)
        else:
            return None
        if timezone == "UTC":
            return datetime(end.year, end.month, end.day, tzinfo=UTC)
        return _EPOCH + timedelta(milliseconds=_midnight_ms(end, _zone(timezone)))
    except (ValueError, KeyError):
        return None
