"""The alert outbox's /metrics figures without counting it, and its retention (issue 9).

- ``delivery_counts``: pending and failed events now, and the delivered / failed outcomes
  as counters kept by migration 0012's trigger: each status change counts once, a resend
  that is delivered again counts again, a repeated update to the same status does not,
  and deleting events never lowers them.
- ``prune_outbox`` (run by the deliverer's loop and ``creditgate deliver --once``):
  delivered and failed events older than ``retention_days`` whose period ended are
  deleted with their attempts; pending ones, recent ones and those of a period still
  running stay.

Real Postgres (a migrated throwaway database) and a real HTTP receiver.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.alerts.deliverer import Deliverer
from gateway.alerts.deliveries import DeliveryCounts, delivery_counts, resend
from gateway.alerts.retention import prune_outbox
from gateway.config.alerts import AlertsConfig, alerts_errors
from tests.alerts.test_deliverer import SECRET, free_port, settings
from tests.support.pg import requires_postgres
from tests.support.webhook_receiver import Receiver

pytestmark = requires_postgres

NOW = datetime.now(UTC)


ENDED = "2020-01-31..2020-02-29"  # an anchored period long over


async def put(
    pool: asyncpg.Pool, event_id: str, *, period: str | None = None, status: str = "pending",
    age_days: float = 0, attempts: int = 0,
) -> None:  # fmt: skip
    """An outbox row created ``age_days`` ago in ``status``, with ``attempts`` attempts, of
    ``period`` (default: the calendar month it was created in)."""
    if period is None:
        period = f"{NOW - timedelta(days=age_days):%Y-%m}"
    payload = {"id": event_id, "type": "balance.threshold_crossed", "data": {"org": "acme"}}
    await pool.execute(
        "INSERT INTO alert_events (id, organization_id, level, token_type, period, kind,"
        " threshold, payload, created_at) VALUES ($1, 'acme', 'org', 'b', $2,"
        " 'threshold_crossed', $3, $4, $5)",
        event_id, period, event_id, json.dumps(payload), NOW - timedelta(days=age_days),
    )  # fmt: skip
    for _ in range(attempts):
        await pool.execute(
            "INSERT INTO alert_attempts (event_id, organization_id, url, outcome)"
            " VALUES ($1, 'acme', 'http://x', 'failed')",
            event_id,
        )
    if status != "pending":  # as the deliverer records an outcome: an UPDATE
        await pool.execute("UPDATE alert_events SET status = $2 WHERE id = $1", event_id, status)


async def ids(pool: asyncpg.Pool) -> set[str]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM alert_events")}


async def test_counts_are_gauges_of_the_outbox_and_counters_of_outcomes(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    assert await delivery_counts(pool) == DeliveryCounts(0, 0, 0, 0, 0)
    for n in range(3):
        await put(pool, f"msg_p{n}")
    await put(pool, "msg_f", status="failed")
    assert await delivery_counts(pool) == DeliveryCounts(3, 1, 0, 1, 0)
    # The same status again is no new outcome.
    await pool.execute("UPDATE alert_events SET status = 'failed' WHERE id = 'msg_f'")
    assert (await delivery_counts(pool)).failed_total == 1

    receiver = Receiver(free_port(), SECRET, tmp_path / "log")
    await receiver.start()
    try:
        assert (await Deliverer(pool, settings(receiver.url)).run_once()).delivered == 3
        assert await delivery_counts(pool) == DeliveryCounts(0, 1, 3, 1, 0)
        # A resend of the failed one, delivered: one more delivered; the failed outcome
        # it had stays counted (a counter never goes down), the gauge of failed drops.
        assert await resend(pool, "msg_f", receiver.url)
        assert await delivery_counts(pool) == DeliveryCounts(1, 0, 3, 1, 0)
        assert (await Deliverer(pool, settings(receiver.url)).run_once()).delivered == 1
        assert await delivery_counts(pool) == DeliveryCounts(0, 0, 4, 1, 0)
    finally:
        await receiver.stop()
    # Deleting events (retention) leaves the counters as they are.
    await pool.execute("DELETE FROM alert_events")
    assert await delivery_counts(pool) == DeliveryCounts(0, 0, 4, 1, 0)


async def test_the_counts_read_no_delivered_row(pool: asyncpg.Pool) -> None:
    """With many delivered events, the statement's plan never scans alert_events in
    full: only index ranges of pending and failed rows (what makes a scrape cheap)."""
    await pool.execute(
        "INSERT INTO alert_events (id, organization_id, level, token_type, period, kind,"
        " threshold, payload, status)"
        " SELECT 'msg_' || g, 'acme', 'org', 'b', '2026-11', 'threshold_crossed', g::text,"
        " '{}', 'delivered' FROM generate_series(1, 20000) AS g"
    )
    await pool.execute("ANALYZE alert_events")
    from gateway.alerts.deliveries import _COUNTS

    plan = "\n".join(r[0] for r in await pool.fetch("EXPLAIN " + _COUNTS))
    assert "Seq Scan on alert_events" not in plan, plan
    assert "alert_events_status" in plan or "alert_events_due" in plan, plan


async def test_retention_deletes_old_finished_events_of_ended_periods_only(
    pool: asyncpg.Pool,
) -> None:
    old, recent = 45, 5
    running = f"{NOW:%Y-%m}"  # the current calendar month: still running
    await put(pool, "msg_old_delivered", status="delivered", age_days=old, attempts=2)
    await put(pool, "msg_old_failed", status="failed", age_days=old, attempts=1)
    await put(pool, "msg_old_anchored", period=ENDED, status="delivered", age_days=old)
    await put(pool, "msg_old_pending", age_days=old)  # still being retried: kept
    await put(pool, "msg_recent", period=ENDED, status="delivered", age_days=recent)
    await put(pool, "msg_running", period=running, status="delivered", age_days=old)
    await put(pool, "msg_unknown", period="not-a-period", status="delivered", age_days=old)
    before = await delivery_counts(pool)

    assert await prune_outbox(pool, timedelta(days=30), NOW, batch=1) == 3
    assert await ids(pool) == {"msg_old_pending", "msg_recent", "msg_running", "msg_unknown"}
    assert await pool.fetchval(  # their attempts went with them
        "SELECT count(*) FROM alert_attempts WHERE event_id LIKE 'msg_old_%'"
    ) == 0  # fmt: skip
    assert await delivery_counts(pool) == DeliveryCounts(
        before.pending, before.failed - 1, before.delivered_total, before.failed_total, 0
    )
    assert await prune_outbox(pool, timedelta(days=30), NOW) == 0  # nothing more
    # A shorter window reaches the recent one (its period ended); never the others.
    assert await prune_outbox(pool, timedelta(days=1), NOW) == 1
    assert await ids(pool) == {"msg_old_pending", "msg_running", "msg_unknown"}


async def test_the_deliverer_prunes_in_its_loop_as_configured(pool: asyncpg.Pool) -> None:
    await put(pool, "msg_old", period=ENDED, status="delivered", age_days=40)
    await put(pool, "msg_new", period=ENDED, status="delivered", age_days=10)
    keep = settings("http://127.0.0.1:9/hook", retention_days=None)
    assert (await Deliverer(pool, keep).run_once()).pruned == 0
    assert await ids(pool) == {"msg_old", "msg_new"}
    assert (await Deliverer(pool, settings("http://127.0.0.1:9/hook")).run_once()).pruned == 1
    assert await ids(pool) == {"msg_new"}  # the default window: 30 days
    week = settings("http://127.0.0.1:9/hook", retention_days=7)
    deliverer = Deliverer(pool, week)
    assert (await deliverer.run_once()).pruned == 1
    assert await ids(pool) == set()
    # At most hourly within one running deliverer.
    await put(pool, "msg_more", period=ENDED, status="delivered", age_days=10)
    assert (await deliverer.run_once()).pruned == 0


@pytest.mark.parametrize("bad", [0, -1, float("inf")])
def test_retention_days_must_be_positive_or_null(bad: Any) -> None:
    config = AlertsConfig(webhook_secret=SECRET, retention_days=bad)
    assert [k for k, _ in alerts_errors(config)] == ["alerts.retention_days"]
    assert alerts_errors(AlertsConfig(webhook_secret=SECRET, retention_days=None)) == []
    assert AlertsConfig(webhook_secret=SECRET).retention_days == 30
