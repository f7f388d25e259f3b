"""``creditgate serve`` tunes the cycle collector when its lifespan starts.

A served gateway holds ~90k tracked objects after startup (modules, config, gate, pools),
nearly all alive for the whole process, which every full pass of the cycle collector
walked; and every 700 net new objects a young pass walked the requests in flight
(BENCHMARKS.md section 2c). serve's app (``create_app``) collects once, freezes the heap
and raises the first threshold to 2,000; any other GatewayApp leaves the collector alone.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.commands.server import GEN0_THRESHOLD, GatewayApp, create_app
from gateway.metering.gate import CreditGate
from tests.support.reference import REFERENCE_YAML, reference_config


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, *thresholds[1:])
    yield
    gc.unfreeze()  # the rest of the test run keeps its collector as it was
    gc.set_threshold(*thresholds)


async def test_serves_app_tunes_the_collector_at_startup(
    unfrozen: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data["upstream"] = "http://127.0.0.1:9"
    path = tmp_path / "creditgate.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CREDITGATE_CONFIG", str(path))
    monkeypatch.setenv("CREDITGATE_NO_SYNC", "1")
    app = create_app()
    try:
        assert gc.get_freeze_count() == 0
        await app.startup()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the modules, the config, the gate...
        # Frozen objects are still freed by their reference counts; new garbage cycles are
        # still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
    finally:
        await app.gate.close()


async def test_another_gateway_app_leaves_the_collector_alone(unfrozen: None) -> None:
    config = reference_config(upstream="http://127.0.0.1:9")
    app = GatewayApp(CreditGate(config), sync=False)
    try:
        await app.startup()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold()[0] == 700
    finally:
        await app.gate.close()


async def test_a_higher_threshold_is_kept(unfrozen: None) -> None:
    from gateway.commands.server import tune_collector

    gc.set_threshold(50_000, 10, 10)
    tune_collector()
    assert gc.get_threshold() == (50_000, 10, 10)
