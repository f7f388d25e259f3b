"""The deliverer against a real HTTP receiver that verifies with ``standardwebhooks``."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.alerts.deliverer import Deliverer, backoff_seconds
from gateway.config.alerts import AlertsConfig
from gateway.core.periods import period_bounds, period_id
from tests.support.pg import requires_postgres
from tests.support.webhook_receiver import Receiver

pytestmark = requires_postgres

SECRET = "whsec_" + base64.b64encode(b"creditgate-test-secret-32-bytes!").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings(url: str, **kw: Any) -> AlertsConfig:
    base: dict[str, Any] = {
        "webhook_url": url, "webhook_secret": SECRET, "forecast": False,
        "retry_first_seconds": 0.05, "retry_max_seconds": 0.2, "timeout_seconds": 2,
    }  # fmt: skip
    return AlertsConfig(**(base | kw))


async def put_event(pool: asyncpg.Pool, org: str = "acme", threshold: str = "80%") -> str:
    """An outbox row as the sync job writes it."""
    event_id = f"msg_{org}_{threshold.rstrip('%')}"
    payload = {"id": event_id, "type": "balance.threshold_crossed", "data": {"org": org}}
    await pool.execute(
        "INSERT INTO alert_events (id, organization_id, level, token_type, period, kind,"
        " threshold, payload) VALUES ($1, $2, 'org', 'b', '2026-11', 'threshold_crossed', $3,"
        " $4)",
        event_id, org, threshold, json.dumps(payload),
    )  # fmt: skip
    return event_id


async def state(pool: asyncpg.Pool, event_id: str) -> tuple[str, int]:
    row = await pool.fetchrow("SELECT status, attempts FROM alert_events WHERE id = $1", event_id)
    return row["status"], row["attempts"]


async def make_due(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE alert_events SET next_attempt_at = now() WHERE status = 'pending'")


def test_backoff_doubles_with_jitter_up_to_the_cap_for_about_a_day() -> None:
    assert [backoff_seconds(n, 30, 14400, 0.999999) for n in (1, 2, 3)] == pytest.approx(
        [30, 60, 120], rel=1e-5
    )
    assert backoff_seconds(1, 30, 14400, 0.0) == 15  # jitter: half to all of the step
    assert backoff_seconds(40, 30, 14400, 0.0) == 7200  # capped
    # The defaults: a 24-hour window holds 14 to 20 attempts, whatever the jitter draws.
    for rand in (0.0, 0.5, 0.999):
        total, n = 0.0, 0
        while total < 24 * 3600:
            n += 1
            total += backoff_seconds(n, 30, 14400, rand)
        assert 14 <= n <= 20


async def test_delivered_signed_once_with_its_attempt_recorded(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    receiver = Receiver(free_port(), SECRET, tmp_path / "log")
    await receiver.start()
    try:
        event_id = await put_event(pool)
        result = await Deliverer(pool, settings(receiver.url)).run_once()
        assert (result.claimed, result.delivered) == (1, 1)
        got = receiver.received()
        assert [(r["id"], r["verified"]) for r in got] == [(event_id, True)]
        assert got[0]["payload"]["data"] == {"org": "acme"}
        assert await state(pool, event_id) == ("delivered", 1)
        attempt = await pool.fetchrow("SELECT * FROM alert_attempts")
        assert (attempt["outcome"], attempt["response_code"], attempt["url"]) == (
            "delivered", 204, receiver.url
        )  # fmt: skip
        assert (await Deliverer(pool, settings(receiver.url)).run_once()).claimed == 0
    finally:
        await receiver.stop()


async def test_a_receiver_down_then_up_gets_the_same_webhook_id(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    port = free_port()
    config = settings(f"http://127.0.0.1:{port}/hook")
    event_id = await put_event(pool)
    assert (await Deliverer(pool, config).run_once()).failed == 1  # nobody listens
    assert await state(pool, event_id) == ("pending", 1)
    error = await pool.fetchval("SELECT error FROM alert_attempts")
    assert "Connect" in error or "connect" in error
    # Not due yet: the backoff holds it back.
    assert (await Deliverer(pool, config).run_once()).claimed == 0
    receiver = Receiver(port, SECRET, tmp_path / "log", fail_first=1)
    await receiver.start()
    try:
        await asyncio.sleep(0.11)  # the first retry is due within 0.05 s
        assert (await Deliverer(pool, config).run_once()).failed == 1  # answered 500
        await make_due(pool)
        assert (await Deliverer(pool, config).run_once()).delivered == 1
        got = receiver.received()
        assert [(r["id"], r["verified"], r["answered"]) for r in got] == [
            (event_id, True, 500), (event_id, True, 204),
        ]  # fmt: skip
        assert await state(pool, event_id) == ("delivered", 3)
    finally:
        await receiver.stop()


async def test_retries_end_after_the_window_and_an_endpoint_failing_for_days_is_disabled(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    port = free_port()
    receiver = Receiver(port, SECRET, tmp_path / "log", fail_first=10**6)
    await receiver.start()
    # 0.2 s of retries; disabled after failing continuously for 0.5 s ("days").
    config = settings(receiver.url, retry_hours=0.2 / 3600, disable_after_days=0.5 / 86400)
    try:
        first = await put_event(pool, threshold="80%")
        await Deliverer(pool, config).run_once()
        await asyncio.sleep(0.3)
        await make_due(pool)
        await Deliverer(pool, config).run_once()
        assert await state(pool, first) == ("failed", 2)  # past its retry window
        assert await pool.fetchval("SELECT disabled_at FROM alert_endpoints") is None

        await asyncio.sleep(0.3)
        second = await put_event(pool, threshold="100%")
        await Deliverer(pool, config).run_once()  # fails 0.6 s after the first failure
        assert await pool.fetchval("SELECT disabled_at FROM alert_endpoints") is not None
        third = await put_event(pool, threshold="50%")
        await make_due(pool)
        await Deliverer(pool, config).run_once()
        assert len(receiver.received()) == 3  # the third was never sent
        assert await state(pool, third) == ("failed", 1)
        error = await pool.fetchval("SELECT last_error FROM alert_events WHERE id = $1", third)
        assert error.startswith("endpoint disabled since")
        assert (await state(pool, second))[0] in ("pending", "failed")
    finally:
        await receiver.stop()


async def test_an_org_without_any_url_fails_without_sending(pool: asyncpg.Pool) -> None:
    event_id = await put_event(pool)
    config = settings("http://127.0.0.1:9/hook").model_copy(update={"webhook_url": None})
    assert (await Deliverer(pool, config).run_once()).failed == 1
    assert await state(pool, event_id) == ("failed", 1)


async def test_a_pass_sweeps_forecasts_and_delivers_them(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Now, in the current calendar month: 800 of 1000 tokens left, burning ~200 a day.
    now = datetime.now(UTC)
    _, end = period_bounds("monthly", int(now.timestamp() * 1000))
    refresh = datetime.fromtimestamp(end / 1000, tz=UTC)
    if refresh - now < timedelta(days=5):
        pytest.skip("too close to the month's end for a forecast to matter")
    await pool.execute("INSERT INTO organizations (id, plan) VALUES ('acme', 'pro')")
    await pool.execute(
        "INSERT INTO ai_tokens (organization_id, token_type, balance, total_allocated, used,"
        " period, refresh_date, seq) VALUES ('acme', 'b', 800, 1000, 200, $1, $2, 1)",
        period_id("monthly", int(now.timestamp() * 1000)), refresh,
    )  # fmt: skip
    for days_ago in (1, 2, 3):
        # The rollup the forecast reads, as the sync job writes it.
        await pool.execute(
            "INSERT INTO usage_daily_feature (organization_id, day, feature, token_type,"
            " requests, tokens) VALUES ('acme', $1, 'f', 'b', 1, 200)",
            now.date() - timedelta(days=days_ago),
        )  # fmt: skip
    receiver = Receiver(free_port(), SECRET, tmp_path / "log")
    await receiver.start()
    try:
        result = await Deliverer(pool, settings(receiver.url, forecast=True)).run_once()
        assert (result.forecast, result.delivered) == (1, 1)
        (got,) = receiver.received()
        assert got["payload"]["type"] == "balance.forecast_exhaustion"
        assert got["payload"]["data"]["remaining"] == 800
        assert "projected_exhaustion_at" in got["payload"]["data"]
    finally:
        await receiver.stop()
