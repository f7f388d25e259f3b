"""The burn-rate forecast behind ``balance.forecast_exhaustion`` (contract A11).

Method (tokens per day, from the daily rollups of the bucket's features):

1. History: the totals of the last ``WINDOW_DAYS`` (7) complete UTC days, whatever period
   they belong to (a habit does not reset with the balance, and on the first day of a
   period the previous days are the only evidence there is). The series starts at the
   first of those days with any usage, so a new org's empty days do not dilute its rate;
   quiet days after that count as zeros.
2. Smoothing: an exponentially weighted moving average, ``s = a*d + (1 - a)*s`` from the
   oldest day, with ``a = ALPHA`` (0.3: a day's weight halves in about two days), so a
   spike moves the rate without setting it and a steady burn converges to itself.
3. Today, a partial day: it enters as an observation of weight ``a*f`` (``f`` the elapsed
   fraction of the day) of its extrapolated total ``today/f``, which is
   ``s = (1 - a*f)*s + a*today``: no division by a tiny ``f`` early in the day, and at
   midnight exactly the step of a complete day.
4. No complete day with usage (a new org, or the first day of its use): today alone,
   extrapolated from at least an hour (``today / max(f, 1/24)``). No usage at all: rate 0,
   never a forecast.

Projected exhaustion = now + remaining / rate; the alert fires when that is before the
period's end (its ``refresh_at``), once per (org, bucket, period).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta

__all__ = ["ALPHA", "WINDOW_DAYS", "burn_rate", "projected_exhaustion"]

ALPHA = 0.3
WINDOW_DAYS = 7
_MIN_FRACTION = 1 / 24


def burn_rate(daily: Mapping[date, int], now: datetime) -> float:
    """Smoothed tokens per day at ``now`` (UTC) from tokens used per UTC day."""
    today = now.date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=now.tzinfo)
    fraction = (now - midnight) / timedelta(days=1)
    days = [today - timedelta(days=n) for n in range(WINDOW_DAYS, 0, -1)]
    first = next((i for i, d in enumerate(days) if daily.get(d, 0) > 0), None)
    today_tokens = daily.get(today, 0)
    if first is None:
        return today_tokens / max(fraction, _MIN_FRACTION) if today_tokens > 0 else 0.0
    rate = float(daily[days[first]])
    for d in days[first + 1 :]:
        rate = ALPHA * daily.get(d, 0) + (1 - ALPHA) * rate
    return (1 - ALPHA * fraction) * rate + ALPHA * today_tokens


def projected_exhaustion(remaining: int, rate: float, now: datetime) -> datetime | None:
    """When ``remaining`` tokens run out at ``rate`` per day (None: never)."""
    if remaining <= 0 or rate <= 0:
        return None
    days = remaining / rate
    if days > 36_500:  # far beyond any period: never
        return None
    return now + timedelta(days=days)
