"""GET /metrics, GET /readyz and the log formatters."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.core.counters import METRICS, HotMetrics
from gateway.core.logs import REQUEST_ID, JsonFormatter, TextFormatter, uvicorn_log_config
from gateway.http.metrics import metrics_endpoint, readiness_endpoint
from gateway.metering.gate import CreditGate
from sync.worker import SyncWorker
from tests.support.pg import requires_postgres, temp_database
from tests.support.reference import reference_config

DOWN_PG = "postgresql://postgres@127.0.0.1:1/nowhere"


def ops_client(gate: CreditGate) -> httpx.AsyncClient:
    app = Starlette(
        routes=[
            Route("/metrics", metrics_endpoint(gate)),
            Route("/readyz", readiness_endpoint(gate, lag_threshold_s=60)),
        ]
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def hot() -> Any:
    METRICS.reset()
    yield METRICS
    METRICS.reset()


@pytest.fixture
async def memgate_nodb() -> AsyncIterator[CreditGate]:
    gate = CreditGate(reference_config(redis_url=f"memory://{uuid.uuid4().hex}", database_url=""))
    yield gate
    await gate.close()


async def test_counters_become_prometheus_metrics(
    hot: HotMetrics, memgate_nodb: CreditGate
) -> None:
    hot.count("goal_generation", "charged", 3)
    hot.count("goal_generation", "charged", 3)
    hot.count("goal_generation", "refunded")
    hot.count("lead_generation", "refused_insufficient")
    hot.count("goal_generation", "refused_insufficient")
    hot.count("lead_generation", "refused_rate_limited")
    hot.count("lead_generation", "fail_open")
    for seconds in (0.0001, 0.0004, 0.0015, 0.3, 9.0):
        hot.observe_admit(seconds)
    async with ops_client(memgate_nodb) as client:
        resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    got = samples(resp.text)
    req = "creditgate_requests_total"
    assert got[(req, (("feature", "goal_generation"), ("outcome", "charged")))] == 2
    assert got[(req, (("feature", "goal_generation"), ("outcome", "refunded")))] == 1
    assert got[("creditgate_tokens_charged_total", (("feature", "goal_generation"),))] == 6
    assert ("creditgate_tokens_charged_total", (("feature", "lead_generation"),)) not in got
    assert got[("creditgate_denials_total", (("reason", "insufficient"),))] == 2
    assert got[("creditgate_denials_total", (("reason", "rate_limited"),))] == 1
    assert got[("creditgate_fail_open_total", ())] == 1
    h = "creditgate_admit_seconds"
    assert got[(h + "_bucket", (("le", "0.00025"),))] == 1
    assert got[(h + "_bucket", (("le", "0.0005"),))] == 2
    assert got[(h + "_bucket", (("le", "0.002"),))] == 3
    assert got[(h + "_bucket", (("le", "2.5"),))] == 4
    assert got[(h + "_bucket", (("le", "+Inf"),))] == 5
    assert got[(h + "_count", ())] == 5
    assert got[(h + "_sum", ())] == pytest.approx(9.302)
    assert got[("creditgate_redis_up", ())] == 1
    assert got[("creditgate_sync_oldest_unsynced_seconds", ())] == 0
    assert ("process_cpu_seconds_total", ()) in got


async def test_metrics_survive_a_redis_outage(hot: HotMetrics) -> None:
    gate = CreditGate(reference_config(redis_url="redis://127.0.0.1:1/0", database_url=""))
    hot.count("general_insights", "refused_unavailable")
    try:
        async with ops_client(gate) as client:
            resp = await client.get("/metrics")
            ready = await client.get("/readyz")
    finally:
        await gate.close()
    got = samples(resp.text)
    assert got[("creditgate_redis_up", ())] == 0
    assert got[("creditgate_denials_total", (("reason", "unavailable"),))] == 1
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"


async def test_readyz_with_fail_open_stays_in_rotation() -> None:
    gate = CreditGate(
        reference_config(redis_url="redis://127.0.0.1:1/0", database_url="", fail_open=True)
    )
    try:
        async with ops_client(gate) as client:
            ready = await client.get("/readyz")
            strict = await client.get("/readyz?strict=1")
    finally:
        await gate.close()
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert strict.status_code == 503


async def test_readyz_ready_and_postgres_down_is_degraded(memgate_nodb: CreditGate) -> None:
    async with ops_client(memgate_nodb) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"redis": "ok"}}
    gate = CreditGate(
        reference_config(redis_url=f"memory://{uuid.uuid4().hex}", database_url=DOWN_PG)
    )
    try:
        async with ops_client(gate) as client:
            degraded = await client.get("/readyz")
            strict = await client.get("/readyz", params={"strict": "1"})
    finally:
        await gate.close()
    body = degraded.json()
    assert degraded.status_code == 200 and body["status"] == "degraded"
    assert body["checks"]["redis"] == "ok" and body["checks"]["postgres"].startswith("error")
    assert strict.status_code == 503


@requires_postgres
async def test_sync_lag_in_metrics_and_readyz() -> None:

    async with temp_database(migrated=True) as dsn:
        gate = CreditGate(
            reference_config(redis_url=f"memory://{uuid.uuid4().hex}", database_url=dsn)
        )
        try:
            await gate.set_plan("acme", "pro")
            await gate.charge("acme", "goal_generation")
            await gate.meter.drain()
            # An event written long ago and never synced: the ledger lags.
            stream = gate.keys.shard("globex").events
            await gate.redis.client.xadd(stream, {"id": "old", "k": "charge"}, id="1000-0")
            async with ops_client(gate) as client:
                got = samples((await client.get("/metrics")).text)
                backlog = sum(
                    v for (n, _), v in got.items() if n == "creditgate_sync_backlog_events"
                )
                assert backlog >= 3  # reset/plan events of acme, its charge, the old one
                assert got[("creditgate_sync_oldest_unsynced_seconds", ())] > 10**6
                ready = await client.get("/readyz")
                body = ready.json()
                assert ready.status_code == 200 and body["status"] == "degraded"
                assert body["checks"]["sync"]["status"] == "lagging"
                assert body["checks"]["sync"]["backlog"] == backlog

                await gate.redis.client.delete(stream)
                store = await gate.require_store()
                worker = SyncWorker(redis=gate.redis.client, pool=store.pool, keyspace=gate.keys)
                await worker.run_once()
                gate.sync_worker = worker
                await asyncio.sleep(1.01)  # past the lag cache
                got = samples((await client.get("/metrics")).text)
                ready = await client.get("/readyz")
            assert ready.json()["status"] == "ready"
            assert ready.json()["checks"]["sync"]["backlog"] == 0
            assert got[("creditgate_sync_events_total", (("result", "inserted"),))] >= 2
            assert got[("creditgate_sync_last_success_timestamp_seconds", ())] > 0
            assert got[("creditgate_sync_oldest_unsynced_seconds", ())] == 0
        finally:
            await gate.close()


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("creditgate.test", logging.WARNING, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_log_lines_carry_the_request_id() -> None:
    fmt = JsonFormatter()
    token = REQUEST_ID.set("req123")
    try:
        line = json.loads(fmt.format(_record("hello %s", org="acme")))
    finally:
        REQUEST_ID.reset(token)
    assert line["msg"] == "hello %s" and line["level"] == "warning"
    assert line["request_id"] == "req123" and line["org"] == "acme"
    assert line["logger"] == "creditgate.test" and line["ts"].endswith("+00:00")
    explicit = json.loads(fmt.format(_record("x", request_id="r2")))
    assert explicit["request_id"] == "r2"
    assert "request_id" not in json.loads(fmt.format(_record("y")))
    assert TextFormatter().format(_record("z", request_id="r3")).endswith("z [r3]")


def test_log_config_format_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITGATE_LOG_FORMAT", "json")
    assert uvicorn_log_config()["formatters"]["creditgate"]["()"].endswith("JsonFormatter")
    monkeypatch.setenv("CREDITGATE_LOG_FORMAT", "text")
    assert uvicorn_log_config()["formatters"]["creditgate"]["()"].endswith("TextFormatter")
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = [(logging.getLogger(n).handlers[:], logging.getLogger(n).level,
              logging.getLogger(n).propagate) for n in names]  # fmt: skip
    try:
        logging.config.dictConfig(uvicorn_log_config("debug", "json"))  # valid for dictConfig
        assert logging.getLogger("uvicorn").level == logging.DEBUG
        assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    finally:
        for n, (handlers, level, propagate) in zip(names, saved, strict=True):
            logger = logging.getLogger(n)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
