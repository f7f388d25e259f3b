"""Prometheus metrics (``GET /metrics``) and the readiness report (``GET /readyz``).

The hot path only bumps plain integers in the gate's counters (``gate.counters``, a
:class:`~gateway.core.counters.HotMetrics`, see that module for why); a custom collector
turns them into Prometheus metrics when ``/metrics`` is scraped. The sync gauges are
measured from the shard streams, or asked of the sync job when one runs in this process
(``gate.sync_worker``, set by whoever starts it), at most once a second per endpoint.

Metrics (all prefixed ``creditgate_``):
- ``requests_total{feature, outcome}``: outcome is ``charged``, ``refunded``,
  ``fail_open``, ``replayed`` (an Idempotency-Key repeat given its stored response) or
  ``refused_<reason>`` (``refused_insufficient``, ``refused_not_in_plan``,
  ``refused_rate_limited``, ``refused_in_flight``, ``refused_replay`` (a repeat whose
  response cannot be replayed), ``refused_reused``, ``refused_unauthenticated``,
  ``refused_unavailable``, ...);
- ``tokens_charged_total{feature}``; ``denials_total{reason}``; ``fail_open_total``;
- ``tokens_by_model_total{feature, model}``: the actual charge (creditgate tokens, overage
  included) of requests whose cost came from the call, by the model the upstream named
  (``unknown`` when none; ``other`` past ``counters.MAX_MODELS`` series);
  ``usage_missing_total{feature}``: settles whose usage never came (the feature's
  ``on_missing_usage`` policy decided the charge);
- ``admit_seconds`` (histogram of the admission round trip to Redis);
- with ``alerts``: ``alert_deliveries{status}`` (gauge: pending and failed events in the
  outbox now), ``alert_deliveries_completed_total{outcome}`` (counter: deliveries that
  ended delivered or failed, kept in Postgres apart from the outbox, so retention never
  lowers it), ``alert_endpoints_disabled``; read without counting the outbox
  (gateway/alerts/deliveries.py ``delivery_counts``);
- ``sync_backlog_events{shard}``, ``sync_oldest_unsynced_seconds``; when a sync worker runs
  in this process, ``sync_last_success_timestamp_seconds`` and
  ``sync_events_total{result}`` (``swept_usage_missing``: expired holds of calls whose cost
  was to be read after them, whose usage therefore never came; the gateway's own
  ``usage_missing_total`` counts only the settles it ran); ``redis_up``.

Several worker processes (``serve --workers N``): every process has its own counters and
answers ``/metrics`` with them, so a scrape sees whichever worker took the connection.
Run one worker per container (scale with replicas) where the counters matter; the sync
and Redis gauges are the same from every worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.alerts.deliveries import DeliveryCounts, delivery_counts
from gateway.core.counters import ADMIT_BUCKETS, HotMetrics
from gateway.http.admin_auth import AdminAuth
from sync.results import SyncPassResult, SyncStats
from sync.streams import ShardStream

if TYPE_CHECKING:
    from gateway.metering.gate import CreditGate

__all__ = [
    "SyncLag",
    "SyncLagProbe",
    "metrics_endpoint",
    "readiness_endpoint",
    "sync_lag",
]

# The sync consumer group (sync.worker.SyncWorker's default).
SYNC_GROUP = "creditgate-sync"
# /readyz reports the sync as lagging when the oldest unsynced event is older than this.
SYNC_LAG_THRESHOLD_S = 60.0


# -- sync lag ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncLag:
    """How far the ledger is behind Redis, read from the shard streams."""

    backlog_per_shard: dict[int, int]
    oldest_unsynced_age_s: float | None
    measured_at: float  # time.monotonic()
    # Known only when the sync worker runs in this process (gate.sync_worker).
    last_success_at: float | None = None
    last_error: str | None = None

    @property
    def backlog(self) -> int:
        """Unsynced events over all shards."""
        return sum(self.backlog_per_shard.values())


async def sync_lag(gate: CreditGate) -> SyncLag:
    """Backlog and oldest unsynced event age of every shard, measured now.

    Asked of ``gate.sync_worker`` when a sync job runs in this process; otherwise read
    from the consumer group's state in Redis (a few commands per shard, sent
    concurrently), which works wherever the sync job runs.
    """
    now = time.monotonic()
    worker = gate.sync_worker
    if worker is not None:
        stats: SyncStats = await worker.stats()
        age_ms = stats.oldest_unsynced_age_ms
        return SyncLag(
            backlog_per_shard=dict(stats.backlog_per_shard),
            oldest_unsynced_age_s=None if age_ms is None else age_ms / 1000,
            measured_at=now,
            last_success_at=stats.last_success_at,
            last_error=stats.last_error,
        )
    streams = [
        ShardStream(gate.redis.client, keys, SYNC_GROUP, "metrics")
        for keys in gate.keys.all_shards()
    ]
    backlogs = await asyncio.gather(*(s.backlog() for s in streams))
    wall_ms = time.time() * 1000
    oldest = [b.oldest_ms for b in backlogs if b.oldest_ms is not None]
    return SyncLag(
        backlog_per_shard={b.shard: b.pending + b.undelivered for b in backlogs},
        oldest_unsynced_age_s=max(0.0, (wall_ms - min(oldest)) / 1000) if oldest else None,
        measured_at=now,
    )


class SyncLagProbe:
    """``sync_lag(gate)``, measured at most once per ``max_age_s`` (scrapers and load
    balancers may ask often; each endpoint keeps its own probe)."""

    def __init__(self, gate: CreditGate, *, max_age_s: float = 1.0) -> None:
        self.gate = gate
        self.max_age_s = max_age_s
        self._last: SyncLag | None = None

    async def measure(self) -> SyncLag:
        """The last measurement if recent enough, else a new one."""
        last = self._last
        if last is not None and time.monotonic() - last.measured_at < self.max_age_s:
            return last
        self._last = await sync_lag(self.gate)
        return self._last


# -- the collector ----------------------------------------------------------------------


class _Collector(Collector):
    """Turns HotMetrics and the last measured gauges into Prometheus metric families."""

    def __init__(self, hot: HotMetrics, gate: CreditGate) -> None:
        self.hot = hot
        self.gate = gate
        self.lag: SyncLag | None = None
        self.redis_up: bool | None = None
        self.alerts: DeliveryCounts | None = None  # measured per scrape when configured

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "creditgate_requests", "Metered requests by feature and outcome.",
            labels=["feature", "outcome"],
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "creditgate_tokens_charged", "Tokens charged, by feature.", labels=["feature"]
        )
        denials = CounterMetricFamily(
            "creditgate_denials", "Refused metered requests, by reason.", labels=["reason"]
        )
        fail_open = CounterMetricFamily(
            "creditgate_fail_open", "Metered requests let through uncharged (fail_open)."
        )
        by_feature: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        passed = 0
        for (feature, outcome), (n, charged) in sorted(self.hot.requests().items()):
            requests.add_metric([feature, outcome], n)
            if charged:
                by_feature[feature] = by_feature.get(feature, 0) + charged
            if outcome.startswith("refused_"):
                reason = outcome[len("refused_") :]
                by_reason[reason] = by_reason.get(reason, 0) + n
            elif outcome == "fail_open":
                passed += n
        for feature, charged in sorted(by_feature.items()):
            tokens.add_metric([feature], charged)
        for reason, n in sorted(by_reason.items()):
            denials.add_metric([reason], n)
        fail_open.add_metric([], passed)
        yield from (requests, tokens, denials, fail_open)

        by_model = CounterMetricFamily(
            "creditgate_tokens_by_model",
            "Tokens charged for requests whose cost came from the call, by feature and model.",
            labels=["feature", "model"],
        )
        for (feature, model), charged in sorted(self.hot.tokens_by_model().items()):
            by_model.add_metric([feature, model], charged)
        missing = CounterMetricFamily(
            "creditgate_usage_missing",
            "Settles whose usage never came (on_missing_usage decided), by feature.",
            labels=["feature"],
        )
        for feature, n in sorted(self.hot.usage_missing().items()):
            missing.add_metric([feature], n)
        yield from (by_model, missing)

        counts, total, n = self.hot.admit_histogram()
        cumulative, running = [], 0
        for bound, count in zip((*map(str, ADMIT_BUCKETS), "+Inf"), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "creditgate_admit_seconds",
            "Latency of the admission round trip to Redis (charge.lua).",
            buckets=cumulative, sum_value=total,
        )  # fmt: skip
        yield from self._gauges()

    def _alert_gauges(self) -> Iterable[Metric]:
        counts = self.alerts
        if counts is None:
            return
        deliveries = GaugeMetricFamily(
            "creditgate_alert_deliveries",
            "Alert webhook deliveries in the outbox now, by status (pending, failed).",
            labels=["status"],
        )
        for status in ("pending", "failed"):
            deliveries.add_metric([status], getattr(counts, status))
        yield deliveries
        completed = CounterMetricFamily(
            "creditgate_alert_deliveries_completed",
            "Alert webhook deliveries that ended, by outcome (delivered, failed), ever.",
            labels=["outcome"],
        )
        completed.add_metric(["delivered"], counts.delivered_total)
        completed.add_metric(["failed"], counts.failed_total)
        yield completed
        yield GaugeMetricFamily(
            "creditgate_alert_endpoints_disabled",
            "Webhook endpoints disabled after failing continuously (alerts.disable_after_days).",
            value=counts.disabled_endpoints,
        )

    def _gauges(self) -> Iterable[Metric]:
        yield from self._alert_gauges()
        if self.redis_up is not None:
            yield GaugeMetricFamily(
                "creditgate_redis_up", "1 when Redis answered the last scrape.",
                value=int(self.redis_up),
            )  # fmt: skip
        lag = self.lag
        if lag is not None:
            backlog = GaugeMetricFamily(
                "creditgate_sync_backlog_events",
                "Events in Redis not yet committed to the ledger, per shard.",
                labels=["shard"],
            )
            for shard, count in sorted(lag.backlog_per_shard.items()):
                backlog.add_metric([str(shard)], count)
            yield backlog
            yield GaugeMetricFamily(
                "creditgate_sync_oldest_unsynced_seconds",
                "Age of the oldest event not yet in the ledger (0 when all are synced).",
                value=lag.oldest_unsynced_age_s or 0.0,
            )
        worker = self.gate.sync_worker
        if worker is None:
            return
        totals: SyncPassResult = worker.totals
        events = CounterMetricFamily(
            "creditgate_sync_events",
            "What this process's sync worker did with events.",
            labels=["result"],
        )
        for name in (
            "inserted", "duplicates", "dead_lettered", "swept", "swept_usage_missing", "acked",
        ):  # fmt: skip
            events.add_metric([name], getattr(totals, name))
        yield events
        if lag is not None and lag.last_success_at is not None:
            yield GaugeMetricFamily(
                "creditgate_sync_last_success_timestamp_seconds",
                "Wall time of the sync worker's last successful pass.",
                value=lag.last_success_at,
            )


async def _alert_counts(gate: CreditGate) -> DeliveryCounts | None:
    """The outbox's counts, when alerts and a database are configured and answer."""
    if gate.config.alerts is None or not gate.config.database_url:
        return None
    try:
        store = await gate.store()
        if store is None:
            return None
        return await asyncio.wait_for(delivery_counts(store.pool), timeout=2)
    except Exception:  # the ledger down: the other metrics are still worth serving
        return None


def metrics_endpoint(gate: CreditGate) -> Any:
    """The Starlette endpoint of ``GET /metrics`` for ``gate``."""
    from prometheus_client import PlatformCollector, ProcessCollector

    collector = _Collector(gate.counters, gate)
    probe = SyncLagProbe(gate)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(ProcessCollector(registry=None))
    registry.register(PlatformCollector(registry=None))

    async def metrics(request: Request) -> Response:
        try:
            collector.lag = await asyncio.wait_for(probe.measure(), timeout=2)
            collector.redis_up = True
        except Exception:  # Redis down or slow: the counters are still worth serving
            collector.lag = None
            collector.redis_up = False
        collector.alerts = await _alert_counts(gate)
        return Response(
            generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return metrics


# -- readiness --------------------------------------------------------------------------


def readiness_endpoint(
    gate: CreditGate,
    *,
    lag_threshold_s: float = SYNC_LAG_THRESHOLD_S,
    admin: AdminAuth | None = None,
) -> Any:
    """The Starlette endpoint of ``GET /readyz`` for ``gate``.

    Ready (200) when Redis answers: that is all a gateway needs to serve metered requests
    of orgs it has seen. Postgres being down or the sync lagging makes the status
    ``degraded`` but keeps 200: taking every gateway out of rotation for a ledger outage
    would turn a delayed ledger into a full outage. ``?strict=1`` answers 503 for
    ``degraded`` too. With ``fail_open: true`` a Redis outage is ``degraded`` as well,
    since requests are still served (uncharged).

    The status and each check's verdict are public (load balancers call this without
    credentials); error texts (hostnames, ports, driver messages) and the sync job's last
    error only go to requests with the admin token (``admin``, default: the config's).
    """
    auth = admin if admin is not None else AdminAuth.of(gate.config)
    probe = SyncLagProbe(gate)

    async def readyz(request: Request) -> Response:
        checks: dict[str, Any] = {}
        redis_ok = True
        degraded = False
        try:
            await asyncio.wait_for(gate.redis.client.ping(), timeout=2)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {exc}"
            redis_ok = False
        if gate.config.database_url:
            try:
                store = await gate.require_store()
                await asyncio.wait_for(store.pool.fetchval("SELECT 1"), timeout=2)
                checks["postgres"] = "ok"
            except Exception as exc:
                checks["postgres"] = f"error: {exc}"
                degraded = True
        if redis_ok and gate.config.database_url:
            try:
                lag = await asyncio.wait_for(probe.measure(), timeout=2)
                age = lag.oldest_unsynced_age_s
                lagging = age is not None and age > lag_threshold_s
                checks["sync"] = {
                    "status": "lagging" if lagging else "ok",
                    "backlog": lag.backlog,
                    "oldest_unsynced_seconds": None if age is None else round(age, 3),
                    "threshold_seconds": lag_threshold_s,
                }
                if lag.last_error:
                    checks["sync"]["last_error"] = lag.last_error
                degraded = degraded or lagging
            except Exception as exc:
                checks["sync"] = {"status": f"error: {exc}"}
                degraded = True
        if not redis_ok and not gate.config.fail_open:
            status, code = "not ready", 503
        elif not redis_ok or degraded:
            status = "degraded"
            code = 503 if request.query_params.get("strict") in ("1", "true") else 200
        else:
            status, code = "ready", 200
        if not auth.allows(request):
            checks = _without_error_texts(checks)
        return JSONResponse({"status": status, "checks": checks}, status_code=code)

    return readyz


def _without_error_texts(checks: dict[str, Any]) -> dict[str, Any]:
    """The checks as anyone may see them: ``error`` instead of ``error: <text>``."""
    public: dict[str, Any] = {}
    for name, verdict in checks.items():
        if isinstance(verdict, dict):
            verdict = {k: _verdict(v) for k, v in verdict.items() if k != "last_error"}
        public[name] = _verdict(verdict)
    return public


def _verdict(value: Any) -> Any:
    return "error" if isinstance(value, str) and value.startswith("error") else value
