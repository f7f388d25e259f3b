"""Time as creditgate shows it: ISO 8601 UTC with a ``Z``, and dates by a clock's now."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

__all__ = ["iso", "iso_ms", "utc_date"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso_z(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (``2026-11-15T12:00:00Z``)."""
    return _iso_z(_EPOCH + timedelta(milliseconds=ms))


def iso(when: datetime | None) -> str | None:
    """A datetime as ISO 8601 UTC with a ``Z``; None stays None."""
    return None if when is None else _iso_z(when)


def utc_date(ms: int) -> date:
    """The UTC calendar date of a time in milliseconds since the epoch."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).date()
