"""/metrics and /readyz read what their gate holds, with no process-global registry: the
gate's own counters (``gate.counters``) and the sync job it was given
(``gate.sync_worker``), so two gates in one process report apart."""

from __future__ import annotations

import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

import gateway.http.metrics as metrics_module
from gateway.core.counters import METRICS, HotMetrics
from gateway.http.metrics import SyncLagProbe, metrics_endpoint, readiness_endpoint
from gateway.metering.gate import CreditGate
from sync.results import SyncPassResult, SyncStats
from tests.support.reference import reference_config


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(gate: CreditGate, path: str = "/metrics") -> httpx.Response:
    app = Starlette(
        routes=[
            Route("/metrics", metrics_endpoint(gate)),
            Route("/readyz", readiness_endpoint(gate)),
        ]
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        return await client.get(path)


class FakeWorker:
    """A sync job as the endpoints see it (SyncWorker's stats() and totals)."""

    def __init__(self, inserted: int) -> None:
        self.totals = SyncPassResult(inserted=inserted, acked=inserted)
        self.calls = 0

    async def stats(self) -> SyncStats:
        self.calls += 1
        return SyncStats({0: 7}, 1500, 1_800_000_000.0, None, None, self.totals)


@pytest.fixture
async def gates() -> AsyncIterator[tuple[CreditGate, CreditGate]]:
    def gate(**kwargs: Any) -> CreditGate:
        config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}", database_url="")
        return CreditGate(config, **kwargs)

    own, default = gate(counters=HotMetrics()), gate()
    yield own, default
    await own.close()
    await default.close()


def test_no_module_level_registry_of_gates_or_workers() -> None:
    assert not hasattr(metrics_module, "track_sync_worker")
    registries = [
        name
        for name, value in vars(metrics_module).items()
        if not name.startswith("__") and isinstance(value, dict | set | weakref.WeakKeyDictionary)
    ]
    assert not registries


async def test_each_gate_reports_its_own_counters(gates: tuple[CreditGate, CreditGate]) -> None:
    own, default = gates
    assert default.counters is METRICS and own.counters is not METRICS
    before = METRICS.admit_histogram()[2]
    await own.set_plan("acme", "pro")
    await own.charge("acme", "goal_generation")  # one admission, timed into own.counters
    own.counters.count("goal_generation", "charged", 3)
    assert own.counters.admit_histogram()[2] == 1
    assert METRICS.admit_histogram()[2] == before
    got = samples((await scrape(own)).text)
    assert got[("creditgate_admit_seconds_count", ())] == 1
    assert got[("creditgate_tokens_charged_total", (("feature", "goal_generation"),))] == 3


async def test_the_sync_worker_is_the_gates_not_the_process(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    with_worker, without = gates
    worker = FakeWorker(inserted=42)
    with_worker.sync_worker = worker
    got = samples((await scrape(with_worker)).text)
    assert got[("creditgate_sync_events_total", (("result", "inserted"),))] == 42
    assert got[("creditgate_sync_backlog_events", (("shard", "0"),))] == 7
    assert got[("creditgate_sync_oldest_unsynced_seconds", ())] == 1.5
    assert got[("creditgate_sync_last_success_timestamp_seconds", ())] == 1_800_000_000.0
    other = samples((await scrape(without)).text)
    assert ("creditgate_sync_events_total", (("result", "inserted"),)) not in other
    with_worker.sync_worker = None  # stopped: no longer reported
    assert ("creditgate_sync_events_total", (("result", "inserted"),)) not in samples(
        (await scrape(with_worker)).text
    )


async def test_lag_probe_measures_at_most_once_per_max_age(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    gate, _ = gates
    worker = FakeWorker(inserted=1)
    gate.sync_worker = worker
    probe = SyncLagProbe(gate, max_age_s=60)
    first = await probe.measure()
    assert await probe.measure() is first and worker.calls == 1
    assert first.backlog == 7 and first.oldest_unsynced_age_s == 1.5
    assert (await SyncLagProbe(gate, max_age_s=0).measure()) is not first
    assert worker.calls == 2


async def test_the_middleware_counts_into_its_gates_counters(
    gates: tuple[CreditGate, CreditGate],
) -> None:
    """A request metered by the middleware of a gate with its own counters is counted there
    (and scraped there), not in the process's METRICS."""
    from starlette.responses import PlainTextResponse

    from gateway.metering.middleware import CreditGateMiddleware

    own, _ = gates
    await own.set_plan("acme", "pro")

    async def quest(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/v1/goals/{g}/quests", quest, methods=["POST"])])
    wrapped = CreditGateMiddleware(app, gate=own)
    before = METRICS.requests().get(("goal_generation", "charged"), (0, 0))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/api/v1/goals/g1/quests", headers={"X-Org-Id": "acme"})
    assert r.status_code == 200 and r.headers["x-tokens-cost"] == "3"
    await own.meter.drain()
    assert own.counters.requests()[("goal_generation", "charged")] == (1, 3)
    assert METRICS.requests().get(("goal_generation", "charged"), (0, 0)) == before
