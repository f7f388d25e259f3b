"""The proxy's upstream connection limit (issue 10, item 3): ``upstream_max_connections``
and ``upstream_pool_wait_seconds``.

A request that finds every upstream connection busy waits at most the configured time for
one to free; then it gets 503 ``unavailable`` with ``Retry-After`` (problem+json), nothing
goes upstream and its tokens are refunded. Before this, the limit was a fixed 1,000 and a
request past it waited without end. Also: the config keys' checks, and the open-files
limit that ``serve`` raises to carry the connections.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import yaml

from gateway.commands.server import GatewayApp
from gateway.config import ConfigError, parse_config
from gateway.core.events import decode
from gateway.core.periods import FixedClock
from gateway.metering.gate import CreditGate
from gateway.proxy.lean_client import LeanBackend, PoolBusy
from gateway.redisio.connect import connect_redis
from tests.support.reference import MID_NOVEMBER_MS, REFERENCE_YAML, reference_config
from tests.support.services import redis_url
from tests.support.upstream_app import app as echo_upstream
from tests.support.upstream_app import serve_in_thread

COST = 5  # lead_generation in the reference config
PRO = 60  # the pro plan's lead_generation allocation


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(echo_upstream) as url:
        yield url


# -- the lean client's pool ----------------------------------------------------------------


async def test_the_wait_for_a_connection_is_bounded(upstream: str) -> None:
    client = LeanBackend(5.0, 1.0, 1, pool_wait=0.3)
    try:
        held = await client.open("GET", f"{upstream}/echo/held", [], None)  # the only one
        started = time.monotonic()
        with pytest.raises(PoolBusy, match=r"all 1 upstream connections stayed busy for 0\.3 s"):
            await client.open("GET", f"{upstream}/echo/second", [], None)
        assert 0.25 < time.monotonic() - started < 1.5
        await held.read()
        await held.aclose()
        # The slot was not lost to the request that gave up.
        resp = await client.open("GET", f"{upstream}/echo/third", [], None)
        assert resp.status == 200 and json.loads(await resp.read())["path"] == "/echo/third"
        await resp.aclose()
        assert client.pool.size == 1
    finally:
        await client.aclose()


async def test_a_connection_freed_within_the_wait_is_handed_over(upstream: str) -> None:
    client = LeanBackend(5.0, 1.0, 1, pool_wait=5.0)
    try:
        held = await client.open("GET", f"{upstream}/echo/held", [], None)
        second = asyncio.create_task(client.open("GET", f"{upstream}/echo/second", [], None))
        await asyncio.sleep(0.2)
        assert not second.done()  # waiting for the one connection
        await held.read()
        await held.aclose()
        resp = await asyncio.wait_for(second, 2)
        assert json.loads(await resp.read())["path"] == "/echo/second"
        await resp.aclose()
    finally:
        await client.aclose()


async def test_no_wait_refuses_at_once(upstream: str) -> None:
    client = LeanBackend(5.0, 1.0, 1, pool_wait=0)
    try:
        held = await client.open("GET", f"{upstream}/echo/held", [], None)
        started = time.monotonic()
        with pytest.raises(PoolBusy):
            await client.open("GET", f"{upstream}/echo/second", [], None)
        assert time.monotonic() - started < 0.1
        await held.aclose()
    finally:
        await client.aclose()


# -- through the gateway -------------------------------------------------------------------

REDIS = redis_url()  # the tests' Redis; skipped without one


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of the test's own; its keys are removed afterwards."""
    p = f"cgt{uuid.uuid4().hex[:10]}"
    yield p

    async def cleanup() -> None:
        client = connect_redis(REDIS).client
        async for key in client.scan_iter(match=f"{p}:*", count=1000):
            await client.delete(key)
        await client.aclose()

    asyncio.run(cleanup())


@contextmanager
def gateway(prefix: str, **overrides: Any) -> Iterator[tuple[str, CreditGate]]:
    """GatewayApp, built from the config as ``serve`` builds it, over TCP; and a gate on
    the same Redis for inspection."""
    config = reference_config(
        redis_url=REDIS, key_prefix=prefix,
        routes=[{"method": "GET", "path": "/slow", "feature": "lead_generation"}], **overrides,
    )  # fmt: skip
    clock = FixedClock(MID_NOVEMBER_MS)
    with serve_in_thread(GatewayApp(CreditGate(config, clock=clock), sync=False)) as url:
        yield url, CreditGate(config, clock=clock)


async def timed_get(http: httpx.AsyncClient, delay: float) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await http.get(f"/slow?delay={delay}", headers={"X-Org-Id": "acme", "X-User-Id": "u1"})
    return r, time.monotonic() - started


async def settled(gate: CreditGate) -> list[tuple[str, int | None, int]]:
    """(kind, upstream status, tokens) of acme's request events, once all three are in."""
    stream = gate.keys.shard("acme").events
    for _ in range(100):
        entries: Any = await gate.redis.client.xrange(stream)
        rows = [decode(fields) for _, fields in entries]
        found = sorted(
            (e.kind, e.upstream_status, e.tokens)
            for e in rows
            if e.org == "acme" and e.kind in ("charge", "refund")
        )
        if len(found) == 3:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled: {found}")


async def test_past_the_limit_503_with_retry_after_after_the_wait_and_refunded(
    upstream: str, prefix: str
) -> None:
    with gateway(
        prefix, upstream=upstream, upstream_max_connections=2, upstream_pool_wait_seconds=0.5,
        retry_after_unavailable_seconds=7,
    ) as (url, gate):  # fmt: skip
        await gate.set_plan("acme", "pro")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            results = await asyncio.gather(*(timed_get(http, 2.0) for _ in range(3)))
        by_status = sorted(results, key=lambda rs: rs[0].status_code)
        (ok1, t1), (ok2, t2), (busy, waited) = by_status
        assert [ok1.status_code, ok2.status_code, busy.status_code] == [200, 200, 503]
        assert t1 >= 1.9 and t2 >= 1.9  # the two that had the connections
        assert 0.45 <= waited < 1.5  # the wait, not the upstream's 2 s, and never endless
        assert busy.headers["retry-after"] == "7"
        assert busy.headers["content-type"] == "application/problem+json"
        problem = busy.json()
        assert problem["status"] == 503 and problem["code"] == "unavailable"
        assert problem["retry_after"] == 7
        assert busy.headers["x-tokens-cost"] == "0"  # the middleware refunded the hold
        # In Redis: two charges, one refund with the 503; the balance shows it.
        assert await settled(gate) == [("charge", 200, COST), ("charge", 200, COST),
                                       ("refund", 503, 0)]  # fmt: skip
        assert (await gate.balance("acme")).buckets["lead_generation"].balance == PRO - 2 * COST
        await gate.close()


async def test_a_connection_that_frees_within_the_wait_serves_the_third(
    upstream: str, prefix: str
) -> None:
    with gateway(
        prefix, upstream=upstream, upstream_max_connections=2, upstream_pool_wait_seconds=3,
    ) as (url, gate):  # fmt: skip
        await gate.set_plan("acme", "pro")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            results = await asyncio.gather(*(timed_get(http, 0.5) for _ in range(3)))
        assert [r.status_code for r, _ in results] == [200, 200, 200]
        # One of them waited for a connection: about two upstream calls long.
        assert max(t for _, t in results) >= 0.95
        assert await settled(gate) == [("charge", 200, COST)] * 3
        assert (await gate.balance("acme")).buckets["lead_generation"].balance == PRO - 3 * COST
        await gate.close()


# -- configuration -------------------------------------------------------------------------


def test_defaults_are_sized_for_streaming() -> None:
    config = reference_config()
    assert config.upstream_max_connections == 10_000
    assert config.upstream_pool_wait_seconds == 5.0
    proxy = GatewayApp(CreditGate(config.model_copy(update={"upstream": "http://h"}))).proxy
    assert proxy is not None and proxy._client_args[2:] == (10_000, 5.0)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("upstream_max_connections", -1, "must be positive, got -1"),
        ("upstream_max_connections", 0, "must be positive, got 0"),
        ("upstream_max_connections", 1.5, "expected an integer, got float 1.5"),
        ("upstream_max_connections", "many", "expected an integer, got 'many'"),
        ("upstream_max_connections", True, "expected an integer, got true"),
        ("upstream_max_connections", 2_000_000, "must be at most 1000000, got 2000000"),
        ("upstream_pool_wait_seconds", -1, "must be 0 or more (and finite), got -1.0"),
        ("upstream_pool_wait_seconds", "soon", "expected a number, got 'soon'"),
    ],
)
def test_bad_values_name_the_file_and_the_key(key: str, value: object, error: str) -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data[key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), "limits.yaml")
    assert info.value.errors == [f"limits.yaml: {key}: {error}"]


def test_check_config_reports_both_keys(tmp_path: Any) -> None:
    data = yaml.safe_load(REFERENCE_YAML)
    data.update(upstream_max_connections=0, upstream_pool_wait_seconds=-2, bogus_pool_key=1)
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.commands.cli", "check-config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    # Unknown keys first (the structure), then the meaning of the rest.
    assert proc.stderr.splitlines() == [
        f"{path}: bogus_pool_key: unknown key",
        f"{path}: upstream_max_connections: must be positive, got 0",
        f"{path}: upstream_pool_wait_seconds: must be 0 or more (and finite), got -2.0",
    ]


# -- open files ----------------------------------------------------------------------------

_RAISE = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))
from gateway.commands.open_files import raise_open_files_limit
print(raise_open_files_limit(int(sys.argv[1])), resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def run_raise(connections: int) -> subprocess.CompletedProcess[str]:
    """``raise_open_files_limit`` in a process whose limits are soft 256, hard 1,024."""
    return subprocess.run(
        [sys.executable, "-c", _RAISE, str(connections)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serve_raises_the_soft_open_files_limit_to_the_hard_one() -> None:
    proc = run_raise(300)  # 2 x 300 + 256 = 856 descriptors: fits under 1,024
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "(1024, 856) (1024, 1024)\n"
    assert proc.stderr == ""  # no warning


def test_a_limit_that_cannot_hold_the_connections_is_a_warning() -> None:
    proc = run_raise(10_000)  # 20,256 needed, 1,024 allowed
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "(1024, 20256) (1024, 1024)\n"
    assert proc.stderr == (
        "WARNING the open-files limit (1024, hard limit 1024) cannot hold"
        " upstream_max_connections=10000: each upstream connection and its client socket"
        " take a descriptor, 20256 in all with 256 to spare; past the limit new connections"
        " fail. Raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, docker run --ulimit"
        " nofile=N:N) or lower upstream_max_connections to 384\n"
    )


def test_serve_warns_at_start_when_the_limit_is_too_low(tmp_path: Any, upstream: str) -> None:
    import os
    import resource
    import socket

    data = yaml.safe_load(REFERENCE_YAML)
    data["upstream"] = upstream  # memory:// Redis, default upstream_max_connections
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITGATE_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.commands.cli", "serve", "--config", str(path),
             "--port", str(port), "--no-sync", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # It starts (a warning, not a refusal) and says what to change.
        text = log.read_text()
        assert "the open-files limit (1024, hard limit 1024) cannot hold" in text
        assert "upstream_max_connections=10000" in text and "lower" in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
