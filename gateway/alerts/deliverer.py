"""The deliverer: sends the outbox's alert events as signed webhooks, at least once.

A poll loop in a process of its own (``creditgate deliver``), in the manner of arq: each
pass sweeps forecasts when due (gateway/alerts/sweep.py), claims due events, sends them
concurrently and records every attempt; ``run_once`` is one pass; SIGTERM/SIGINT only set
the stop flag, and the pass in flight finishes. It is not a task of the sync process: a
slow or dead receiver then costs the sync job nothing (no shared event loop, pool or
CPU), and the two scale and restart independently.

- **Claim**: ``FOR UPDATE SKIP LOCKED`` on due pending rows, which are then leased (their
  ``next_attempt_at`` moved past the send's timeout) and committed before any HTTP call,
  so no transaction stays open across the network and several deliverers never send one
  event at once. A deliverer killed mid-send leaves the lease to expire: the event is sent
  again (at least once; it keeps its ``webhook-id``, which receivers dedupe on).
- **Send**: a POST of the stored payload, signed per Standard Webhooks with the
  ``standardwebhooks`` library (``webhook-id``, ``webhook-timestamp`` of this attempt,
  ``webhook-signature`` v1 HMAC-SHA256 with the ``whsec_`` secret); redirects are not
  followed; a 2xx answer within ``timeout_seconds`` is delivered.
- **Retry**: exponential backoff with jitter, ``retry_first_seconds * 2**(n-1)`` capped at
  ``retry_max_seconds``, each delay drawn from [50%, 100%] of that; an event still not
  delivered ``retry_hours`` after it was created (or resent) is ``failed``.
- **Retention**: at most hourly (and on every ``run_once``), delivered and failed events
  older than ``retention_days`` whose period ended are deleted
  (gateway/alerts/retention.py); the /metrics counters are kept apart and never drop.
- **Endpoints**: one failing continuously (no success since) for ``disable_after_days``
  is disabled, logged, shown by the admin API and counted in /metrics; its events fail
  without being sent until ``PUT /admin/orgs/{org}/alerts`` or a resend enables it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
from standardwebhooks import Webhook

from gateway.alerts.evaluation import AlertDefaults
from gateway.alerts.retention import PRUNE_EVERY_S, prune_outbox
from gateway.alerts.sweep import forecast_sweep
from gateway.config.alerts import AlertsConfig

__all__ = ["Deliverer", "DeliveryPass", "backoff_seconds", "run_deliverer"]

log = logging.getLogger("creditgate.alerts")

_CLAIM = """
WITH due AS (
    SELECT id FROM alert_events
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE alert_events e SET next_attempt_at = now() + $2 * interval '1 second'
FROM due WHERE e.id = due.id
RETURNING e.id, e.organization_id, e.payload::text AS payload, e.attempts,
    coalesce((SELECT r.webhook_url FROM alert_rules r
              WHERE r.organization_id = e.organization_id), $3) AS url,
    (SELECT p.disabled_at FROM alert_endpoints p
     WHERE p.url = coalesce((SELECT r.webhook_url FROM alert_rules r
                             WHERE r.organization_id = e.organization_id), $3)) AS disabled_at
"""

# One attempt's outcome: the attempt row, the event's state, the endpoint's state. $6 is
# NULL when nothing was sent (no URL, endpoint disabled): the endpoint is left as it is.
_RECORD = """
WITH attempt AS (
    INSERT INTO alert_attempts (event_id, organization_id, url, outcome, response_code,
        error, duration_ms)
    VALUES ($1, $2, $3, CASE WHEN $4 THEN 'delivered' ELSE 'failed' END, $5, $7, $8)
),
event AS (
    UPDATE alert_events SET
        attempts = attempts + 1,
        status = CASE WHEN $4 THEN 'delivered'
                      WHEN NOT $6 OR now() + $9 * interval '1 second'
                           > retry_from + $10 * interval '1 hour' THEN 'failed'
                      ELSE 'pending' END,
        delivered_at = CASE WHEN $4 THEN now() END,
        next_attempt_at = now() + $9 * interval '1 second',
        last_error = CASE WHEN $4 THEN NULL ELSE $7 END
    WHERE id = $1
)
INSERT INTO alert_endpoints AS p (url, failing_since, last_success_at, last_failure_at,
    last_error)
SELECT $3, CASE WHEN $4 THEN NULL ELSE now() END, CASE WHEN $4 THEN now() END,
    CASE WHEN $4 THEN NULL ELSE now() END, CASE WHEN $4 THEN NULL ELSE $7 END
WHERE $6::boolean AND $3 <> ''
ON CONFLICT (url) DO UPDATE SET
    failing_since = CASE WHEN $4 THEN NULL ELSE coalesce(p.failing_since, now()) END,
    last_success_at = CASE WHEN $4 THEN now() ELSE p.last_success_at END,
    last_failure_at = CASE WHEN $4 THEN p.last_failure_at ELSE now() END,
    last_error = CASE WHEN $4 THEN p.last_error ELSE $7 END,
    disabled_at = CASE
        WHEN NOT $4 AND p.disabled_at IS NULL AND p.failing_since IS NOT NULL
             AND p.failing_since <= now() - $11 * interval '1 day' THEN now()
        ELSE p.disabled_at END
RETURNING p.disabled_at = now() AS newly_disabled, p.failing_since
"""


def backoff_seconds(attempt: int, first: float, cap: float, rand: float) -> float:
    """The delay after failed attempt number ``attempt`` (1, 2, ...), ``rand`` in [0, 1)."""
    base = min(first * 2.0 ** min(attempt - 1, 60), cap)
    return base * (0.5 + rand / 2)


@dataclass(slots=True)
class DeliveryPass:
    """What one pass did."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0  # attempts that failed (the event may be retried)
    forecast: int = 0  # forecast alerts the sweep put in the outbox
    pruned: int = 0  # old delivered/failed events deleted (retention)


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    code: int | None
    error: str | None
    ms: int
    sent: bool = True


@dataclass(slots=True)
class Deliverer:
    """Delivers due alert events from ``pool``'s outbox (see the module docstring)."""

    pool: asyncpg.Pool
    alerts: AlertsConfig
    batch: int = 64
    rand: random.Random = field(default_factory=random.Random)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _next_forecast: float = float("-inf")
    _next_prune: float = float("-inf")
    _session: aiohttp.ClientSession | None = None

    def stop(self) -> None:
        """Ask ``run`` to return after the pass in flight (signal handlers call only this)."""
        self._stop.set()

    async def close(self) -> None:
        """Close the HTTP session (a later pass opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self) -> None:
        """Passes until ``stop``; sleeps ``poll_seconds`` when nothing was due."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                done = await self._pass()
            except Exception as exc:  # Postgres unavailable: back off, lose nothing
                log.warning("delivery pass failed (%s: %s); retrying", type(exc).__name__, exc)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if done.claimed == 0:
                await self._sleep(self.alerts.poll_seconds)
        await self.close()

    async def run_once(self) -> DeliveryPass:
        """One pass: the forecast sweep if due, then one claim of due events."""
        try:
            return await self._pass()
        finally:
            await self.close()

    async def _pass(self) -> DeliveryPass:
        result = DeliveryPass()
        if time.monotonic() >= self._next_forecast:
            defaults = AlertDefaults.of(self.alerts)
            if defaults.forecast or await self._any_forecast_override():
                result.forecast = await forecast_sweep(self.pool, defaults, datetime.now(UTC))
            self._next_forecast = time.monotonic() + self.alerts.forecast_every_seconds
        days = self.alerts.retention_days
        if days is not None and time.monotonic() >= self._next_prune:
            result.pruned = await prune_outbox(self.pool, timedelta(days=days), datetime.now(UTC))
            if result.pruned:
                log.info("deleted %d alert events older than %s days", result.pruned, days)
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
        lease = self.alerts.timeout_seconds + 60
        rows = await self.pool.fetch(_CLAIM, self.batch, lease, self.alerts.webhook_url)
        result.claimed = len(rows)
        if not rows:
            return result
        sem = asyncio.Semaphore(self.alerts.concurrency)

        async def one(row: asyncpg.Record) -> bool:
            async with sem:
                outcome = await self._attempt(row)
                await self._record(row, outcome)
                return outcome.ok

        for ok in await asyncio.gather(*(one(r) for r in rows)):
            if ok:
                result.delivered += 1
            else:
                result.failed += 1
        return result

    async def _any_forecast_override(self) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM alert_rules WHERE forecast)"
        return bool(await self.pool.fetchval(query))

    async def _attempt(self, row: asyncpg.Record) -> _Outcome:
        url, payload = row["url"], row["payload"]
        if not url:
            return _Outcome(False, None, "no webhook_url for this org", 0, sent=False)
        if row["disabled_at"] is not None:
            since = row["disabled_at"].isoformat()
            return _Outcome(False, None, f"endpoint disabled since {since}", 0, sent=False)
        msg_id = row["id"]
        now = datetime.now(UTC)
        signature = Webhook(self.alerts.webhook_secret).sign(msg_id, now, payload)
        headers = {
            "content-type": "application/json",
            "user-agent": "creditgate-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        started = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.alerts.timeout_seconds)
            )
        try:
            async with self._session.post(
                url, data=payload.encode("utf-8"), headers=headers, allow_redirects=False
            ) as response:
                await response.read()
                ms = int((time.monotonic() - started) * 1000)
                if 200 <= response.status < 300:
                    return _Outcome(True, response.status, None, ms)
                return _Outcome(False, response.status, f"HTTP {response.status}", ms)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ms = int((time.monotonic() - started) * 1000)
            what = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            return _Outcome(False, None, what[:500], ms)

    async def _record(self, row: asyncpg.Record, outcome: _Outcome) -> None:
        a = self.alerts
        delay = backoff_seconds(
            row["attempts"] + 1, a.retry_first_seconds, a.retry_max_seconds, self.rand.random()
        )
        done = await self.pool.fetchrow(
            _RECORD, row["id"], row["organization_id"], row["url"] or "", outcome.ok,
            outcome.code, outcome.sent, outcome.error, outcome.ms, delay, a.retry_hours,
            a.disable_after_days,
        )  # fmt: skip
        if outcome.ok:
            log.info("alert %s delivered to %s", row["id"], row["url"])
            return
        log.info("alert %s: attempt %d failed (%s)", row["id"], row["attempts"] + 1, outcome.error)
        if done is not None and done["newly_disabled"]:
            log.warning(
                "webhook endpoint %s disabled: failing continuously since %s (%s days or more)",
                row["url"], done["failing_since"], a.disable_after_days,
            )  # fmt: skip

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)


async def run_deliverer(database_url: str, alerts: AlertsConfig) -> None:
    """Connect and deliver until SIGTERM/SIGINT (which only set the stop flag)."""
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=4)
    deliverer = Deliverer(pool, alerts)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, deliverer.stop)
    try:
        await deliverer.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await pool.close()
