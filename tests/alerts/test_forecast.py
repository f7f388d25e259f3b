"""The burn-rate forecast on synthetic histories, and the sweep that fires it (Postgres)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from gateway.alerts.evaluation import AlertDefaults
from gateway.alerts.forecast import ALPHA, burn_rate, projected_exhaustion
from gateway.alerts.sweep import forecast_sweep
from tests.support.pg import requires_postgres

NOON_NOV_4 = datetime(2026, 11, 4, 12, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)


def history(now: datetime, per_day: list[int]) -> dict[date, int]:
    """``per_day`` for the days before ``now``'s, the last one yesterday."""
    today = now.date()
    return {today - timedelta(days=len(per_day) - i): t for i, t in enumerate(per_day)}


def test_a_steady_burn_is_its_own_rate() -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)  # midnight: today has no weight yet
    assert burn_rate(history(now, [10] * 7), now) == pytest.approx(10)


def test_no_history_is_no_rate_and_no_forecast() -> None:
    assert burn_rate({}, NOON_NOV_4) == 0
    assert projected_exhaustion(100, 0.0, NOON_NOV_4) is None


def test_only_today_is_extrapolated_from_at_least_an_hour() -> None:
    today = NOON_NOV_4.date()
    assert burn_rate({today: 30}, NOON_NOV_4) == pytest.approx(60)  # half a day: 60/day
    five_past = datetime(2026, 11, 4, 0, 5, tzinfo=UTC)
    assert burn_rate({today: 10}, five_past) == pytest.approx(240)  # as if an hour passed


def test_the_first_day_of_a_period_uses_the_days_before_it() -> None:
    # Dec 1, 06:00: the balance was just reset, last week's burn is the evidence.
    now = datetime(2026, 12, 1, 6, tzinfo=UTC)
    rate = burn_rate(history(now, [20] * 7) | {now.date(): 5}, now)
    assert rate == pytest.approx((1 - ALPHA / 4) * 20 + ALPHA * 5)
    assert projected_exhaustion(200, rate, now) < datetime(2026, 12, 31, tzinfo=UTC)


def test_a_spike_moves_the_rate_without_setting_it() -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    rate = burn_rate(history(now, [10, 10, 10, 10, 10, 10, 500]), now)
    assert rate == pytest.approx(ALPHA * 500 + (1 - ALPHA) * 10)
    assert 10 < rate < 500 / 2


def test_quiet_days_before_the_first_use_do_not_dilute() -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    assert burn_rate(history(now, [0, 0, 0, 0, 0, 40, 40]), now) == pytest.approx(40)
    # ...but quiet days after it do: the burn slowed down.
    assert burn_rate(history(now, [40, 40, 0, 0, 0, 0, 0]), now) < 10


def test_not_a_straight_line_from_the_first_of_the_month() -> None:
    # Slow for three days, then fast: the month's average (46/day) lags the recent burn.
    now = datetime(2026, 11, 6, tzinfo=UTC)
    daily = {date(2026, 11, d): t for d, t in ((1, 10), (2, 10), (3, 10), (4, 100), (5, 100))}
    rate = burn_rate(daily, now)
    assert rate == pytest.approx(100 - 90 * (1 - ALPHA) ** 2)
    assert rate > 1.2 * sum(daily.values()) / 5
    # A burn that stopped fades by (1 - ALPHA) a quiet day.
    quiet = burn_rate({date(2026, 11, 1): 600}, datetime(2026, 11, 4, tzinfo=UTC))
    assert quiet == pytest.approx(600 * (1 - ALPHA) ** 2)


# -- the sweep --------------------------------------------------------------------------


async def _bucket(pool: asyncpg.Pool, org: str, used: int, per_day: list[int]) -> None:
    await pool.execute("INSERT INTO organizations (id, plan) VALUES ($1, 'pro')", org)
    await pool.execute(
        "INSERT INTO ai_tokens (organization_id, token_type, balance, total_allocated, used,"
        " period, refresh_date, seq) VALUES ($1, 'lead_generation', $2, 1000, $3, '2026-11',"
        " $4, 1)",
        org, 1000 - used, used, DEC_1,
    )  # fmt: skip
    for i, tokens in enumerate(per_day):
        # The rollup the forecast reads, as the sync job writes it.
        await pool.execute(
            "INSERT INTO usage_daily_feature (organization_id, day, feature, token_type,"
            " requests, tokens) VALUES ($1, $2, 'lead_generation', 'lead_generation', 1, $3)",
            org, date(2026, 11, 1) + timedelta(days=i), tokens,
        )  # fmt: skip


@requires_postgres
async def test_the_sweep_fires_for_a_fast_burner_early_in_the_month_once(
    pool: asyncpg.Pool,
) -> None:
    defaults = AlertDefaults(pct=(Decimal(80),), abs=(), has_url=True, forecast=True)
    # On Nov 4 at noon: "fast" burns ~100/day (1000 lasts ~10 days), "slow" ~10/day.
    await _bucket(pool, "fast", 350, [100, 100, 100, 50])
    await _bucket(pool, "slow", 35, [10, 10, 10, 5])
    await _bucket(pool, "idle", 0, [])
    assert await forecast_sweep(pool, defaults, NOON_NOV_4) == 1
    row = await pool.fetchrow("SELECT * FROM alert_events")
    assert (row["organization_id"], row["kind"], row["period"]) == (
        "fast", "forecast_exhaustion", "2026-11"
    )  # fmt: skip
    data = json.loads(row["payload"])["data"]
    assert data["remaining"] == 650 and data["refresh_at"] == "2026-12-01T00:00:00Z"
    # 650 left at ~100/day: about 6.5 days from the 4th at noon.
    when = datetime.fromisoformat(data["projected_exhaustion_at"])
    assert datetime(2026, 11, 10, tzinfo=UTC) < when < datetime(2026, 11, 12, tzinfo=UTC)
    # Once per period, however often it sweeps.
    assert await forecast_sweep(pool, defaults, NOON_NOV_4 + timedelta(hours=1)) == 0
    # An org that turns forecasts off gets none.
    await _bucket(pool, "fast2", 350, [100, 100, 100, 50])
    await pool.execute(
        "INSERT INTO alert_rules (organization_id, forecast) VALUES ('fast2', false)"
    )
    assert await forecast_sweep(pool, defaults, NOON_NOV_4) == 0
