"""Idempotency-Key through the proxy (contract A9, issue 8 item 5): ``creditgate serve``'s
GatewayApp over TCP in front of an upstream over TCP, on the tests' Redis and on a 3-master
Redis Cluster.

The proxy is the metering middleware in front of ``UpstreamProxy``, so these are the
scenarios of tests/metering/test_middleware_idempotency.py (tests/support/idempotency_http.py)
with real sockets on both sides: the upstream is called once, a repeat is answered from
Redis byte for byte, a slow upstream's repeat is 409 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from gateway.config import Config
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import connect_redis
from tests.support import services
from tests.support.edge_apps import in_proxy_mode, outcomes
from tests.support.idempotency_http import (
    SCENARIOS,
    AppCalls,
    assert_replay_of,
    idempotency_app,
    idempotency_config,
    keyed,
)
from tests.support.redis_servers import Cluster, free_ports, start_cluster

Scenario = Callable[[httpx.AsyncClient, CreditGate, AppCalls], Awaitable[None]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7400, 7439, cluster=True)) as c:
        yield c


@pytest.fixture
async def redis_config() -> AsyncIterator[Config]:
    """The idempotency config on the tests' Redis, its keys deleted afterwards."""
    url = services.redis_url()
    config = idempotency_config(url)
    yield config
    client = connect_redis(url).client
    async for key in client.scan_iter(match=f"{config.key_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_through_the_proxy_on_redis(redis_config: Config, scenario: Scenario) -> None:
    calls = AppCalls()
    async with in_proxy_mode(redis_config, idempotency_app(calls)) as (http, gate):
        await scenario(http, gate, calls)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_through_the_proxy_on_a_redis_cluster(cluster: Cluster, scenario: Scenario) -> None:
    calls = AppCalls()
    config = idempotency_config(cluster.url.split(",")[0])  # one seed: it finds the rest
    async with in_proxy_mode(config, idempotency_app(calls)) as (http, gate):
        assert gate.redis.cluster
        await scenario(http, gate, calls)


async def test_a_chunked_request_body_is_forwarded_whole(redis_config: Config) -> None:
    """A body the client streams in chunks (no Content-Length) is read for its fingerprint
    and still reaches the upstream byte for byte; its repeat, chunked otherwise, replays."""
    calls = AppCalls()
    part = bytes(range(256)) * 64  # 16 KiB

    def chunks(sizes: list[int]) -> Callable[[], AsyncIterator[bytes]]:
        async def body() -> AsyncIterator[bytes]:
            data, at = part * 4, 0
            for size in sizes:
                yield data[at : at + size]
                at += size
            yield data[at:]

        return body

    async with in_proxy_mode(redis_config, idempotency_app(calls)) as (http, gate):
        first = await http.post("/generate", content=chunks([1, 4000, 20000])(), headers=keyed("c"))
        assert first.status_code == 201, first.text
        assert first.json()["len"] == len(part) * 4
        assert calls.bodies == [part * 4]
        await outcomes(gate, 1)
        again = await http.post("/generate", content=chunks([30000, 7])(), headers=keyed("c"))
        assert_replay_of(first, again)
        assert calls.total == 1
