"""Shared fixtures: the reference config (contract A2) and gates on fakeredis or real Redis.

Also the session's servers: Redis and PostgreSQL are found or started when a test first
needs them (see tests/support/services.py), stopped when the session ends, and named in
the run's closing lines, with what to install when one could not be had.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support import services
from tests.support.needs import under_ci
from tests.support.reference import MID_NOVEMBER_MS, reference_config

# The sync tests' fixtures (redis, keyspace, pg_dsn, pool); modules that define their own
# fixtures of those names keep them.
pytest_plugins = ["tests.support.sync_fixtures"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``requires_postgres`` / ``requires_redis`` get the server before their
    fixtures run, or are skipped with what to install (failed under CI)."""
    if item.get_closest_marker("requires_postgres"):
        services.database_url()
    if item.get_closest_marker("requires_redis"):
        services.redis_url()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per server the run used (or could not have, and what to install)."""
    for service in services.used():
        for note in service.notes:
            terminalreporter.write_line(f"creditgate tests: {service.name}: {note}")
        if service.url is not None:
            terminalreporter.write_line(
                f"creditgate tests: {service.name}: {service.url}, {service.origin}"
            )
        else:
            if under_ci():
                outcome = "CI is set, so the tests that need it failed"
            else:
                skipped = sum(
                    1
                    for report in terminalreporter.stats.get("skipped", [])
                    if service.problem and service.problem in str(report.longrepr)
                )
                outcome = f"{skipped} tests skipped"
            terminalreporter.write_line(
                f"creditgate tests: {service.problem} ({outcome})", yellow=True
            )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the private servers the session started."""
    services.stop()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(MID_NOVEMBER_MS)


@pytest.fixture
async def memgate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    """A gate on a fresh in-process fakeredis server, no database."""
    config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}")
    gate = CreditGate(config, clock=clock)
    yield gate
    await gate.close()


@pytest.fixture
async def redisgate(clock: FixedClock) -> AsyncIterator[CreditGate]:
    """A gate on the tests' Redis (services.redis_url()) under a unique key prefix, no
    database."""
    url = services.redis_url()
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    config = reference_config(redis_url=url, key_prefix=prefix)
    gate = CreditGate(config, clock=clock)
    yield gate
    await gate.meter.drain()
    client = connect_redis(url).client
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
    await gate.close()
