"""Metered streams on the splice fast path (gateway/core/splice.py), end to end: the
gateway served as ``creditgate serve`` serves it (its protocol offers the splice), real
Redis, real Postgres and the sync job in the server, so every outcome is checked where
money ends up: the request's ledger rows.

A fixed-cost route takes the fast path (checked by counting spliced pieces); a client that
leaves mid-stream is charged (the upstream answered 200: the fixed-cost policy, as on the
ASGI path), an upstream that breaks off or falls silent mid-stream is refunded and the
client sees a cut-off body, never a clean end; each request has exactly one ledger row.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from gateway.commands.server import GatewayApp
from gateway.commands.splice import UvicornSplice
from gateway.core.periods import FixedClock
from gateway.ledger.migrate import migrate
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support import upstream_app
from tests.support.pg import temp_database
from tests.support.reference import MID_NOVEMBER_MS, reference_config
from tests.support.served_gateway import served
from tests.support.services import redis_url
from tests.support.upstream_app import serve_in_thread

REDIS = redis_url()  # the tests' Redis; the module is skipped without one
HEADERS = {"X-Org-Id": "acme", "X-User-Id": "u1"}
COST, PLAN = 3, 20  # goal_generation in the reference config, plan pro


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with temp_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"cgt{uuid.uuid4().hex[:10]}"
    yield p
    client = connect_redis(REDIS).client
    async for key in client.scan_iter(match=f"{p}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of pieces written through the splice (one cell, so tests can read it)."""
    count = [0]
    original = UvicornSplice.write

    def write(splice: UvicornSplice, data: bytes) -> bool:
        count[0] += 1
        return original(splice, data)

    monkeypatch.setattr(UvicornSplice, "write", write)
    return count


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(upstream_app.app) as url:
        yield url


@dataclass
class Served:
    url: str
    gate: CreditGate
    ledger: asyncpg.Connection

    async def rows(self, request_id: str, within: float = 15.0) -> list[tuple[str, int]]:
        """The request's charge/refund rows, once the sync job wrote any; then a moment
        more, so that a second row would be seen too."""
        deadline = time.monotonic() + within
        while True:
            rows = await self._rows(request_id)
            if rows:
                await asyncio.sleep(0.5)
                return await self._rows(request_id)
            assert time.monotonic() < deadline, f"no ledger row for {request_id}"
            await asyncio.sleep(0.05)

    async def _rows(self, request_id: str) -> list[tuple[str, int]]:
        records = await self.ledger.fetch(
            "SELECT kind, tokens_deducted FROM ai_token_usage_log WHERE request_id = $1"
            " AND kind IN ('charge', 'refund', 'expired_hold') ORDER BY id",
            request_id,
        )
        return [(r["kind"], r["tokens_deducted"]) for r in records]

    async def balance(self) -> int:
        return (await self.gate.balance("acme")).buckets["goal_generation"].balance


@asynccontextmanager
async def gateway(upstream: str, prefix: str, pg_dsn: str) -> AsyncIterator[Served]:
    routes = [
        {"method": "GET", "path": path, "feature": "goal_generation"}
        for path in ("/sse", "/abort", "/stall")
    ]
    config = reference_config(
        redis_url=REDIS, key_prefix=prefix, upstream=upstream, database_url=pg_dsn,
        routes=routes, upstream_timeout_seconds=0.5,
    )  # fmt: skip
    clock = FixedClock(MID_NOVEMBER_MS)
    gate = CreditGate(config, clock=clock)
    await gate.set_plan("acme", "pro")
    ledger = await asyncpg.connect(pg_dsn)
    try:
        with served(GatewayApp(CreditGate(config, clock=clock), sync=True), config) as port:
            yield Served(f"http://127.0.0.1:{port}", gate, ledger)
    finally:
        await ledger.close()
        await gate.close()


async def test_a_complete_stream_is_spliced_and_charged_once(
    upstream: str, prefix: str, pg_dsn: str, spliced: list[int]
) -> None:
    async with gateway(upstream, prefix, pg_dsn) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/sse?n=5&delay=0.02", headers=HEADERS)
        assert r.status_code == 200
        assert r.content == b"".join(f"id: {i}\ndata: {i}\n\n".encode() for i in range(5))
        assert r.headers["x-tokens-cost"] == str(COST)
        assert spliced[0] >= 4
        assert await gw.rows(r.headers["x-creditgate-request-id"]) == [("charge", COST)]
        assert await gw.balance() == PLAN - COST


async def test_a_client_leaving_mid_stream_is_charged_once_and_the_upstream_stops(
    upstream: str, prefix: str, pg_dsn: str, spliced: list[int]
) -> None:
    gate = uuid.uuid4().hex
    async with gateway(upstream, prefix, pg_dsn) as gw:
        async with (
            httpx.AsyncClient(base_url=gw.url) as http,
            http.stream("GET", f"/sse?n=3&gate={gate}", headers=HEADERS) as response,
        ):
            assert response.status_code == 200
            request_id = response.headers["x-creditgate-request-id"]
            async for chunk in response.aiter_raw():
                assert chunk.startswith(b"id: 0\n")
                break
        # The client is gone while the upstream waits at its gate: the gateway must close
        # the upstream connection (the upstream's stream is cancelled), and charge once.
        deadline = time.monotonic() + 5
        while not upstream_app._progress.get(gate, {}).get("cancelled"):
            assert time.monotonic() < deadline, "the upstream stream was not abandoned"
            await asyncio.sleep(0.02)
        assert spliced[0] >= 1
        assert await gw.rows(request_id) == [("charge", COST)]
        assert await gw.balance() == PLAN - COST


@pytest.mark.parametrize("path", ["/abort?mode=chunked", "/stall?delay=3"])
async def test_an_upstream_failing_mid_stream_is_refunded_once_and_the_client_cut_off(
    upstream: str, prefix: str, pg_dsn: str, spliced: list[int], path: str
) -> None:
    """``/abort`` breaks the connection after a first piece; ``/stall`` falls silent for
    longer than ``upstream_timeout_seconds``. Either way the client gets the first piece
    and then a body without its final chunk (a cut-off answer must not look complete)."""
    async with gateway(upstream, prefix, pg_dsn) as gw:
        received = b""
        async with httpx.AsyncClient(base_url=gw.url) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                async with http.stream("GET", path, headers=HEADERS) as response:
                    assert response.status_code == 200
                    request_id = response.headers["x-creditgate-request-id"]
                    async for chunk in response.aiter_raw():
                        received += chunk
        assert received in (b"partial" * 10, b"first;")
        assert spliced[0] >= 1
        assert await gw.rows(request_id) == [("refund", 0)]
        assert await gw.balance() == PLAN
