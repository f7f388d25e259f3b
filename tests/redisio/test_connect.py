"""Redis URLs and connect_redis (gateway/redisio/connect.py). Servers on ports 7150-7159."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio

from gateway.core.errors import RedisUnavailable
from gateway.redisio.connect import RedisPyRunner, RedisURL, connect_redis, parse_redis_url
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import FastRedis
from gateway.redisio.pipelined_cluster import FastRedisCluster
from tests.support.redis_servers import RedisServer, free_ports, make_tls_files, start_redis

INCR = LuaScript.from_source("t", f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])")


def port() -> int:
    return free_ports(1, 7150, 7159)[0]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisURL("single", nodes=(("127.0.0.1", 6379),))),
        ("redis://cache", RedisURL("single", nodes=(("cache", 6379),))),
        (
            "rediss://app:p%40ss@cache.example:6380/2?timeout=0.5&connections=2",
            RedisURL(
                "single",
                True,
                (("cache.example", 6380),),
                db=2,
                username="app",
                password="p@ss",
                timeout=0.5,
                connections=2,
            ),
        ),
        (
            "redis://:secret@[::1]:7000/",
            RedisURL("single", nodes=(("::1", 7000),), password="secret"),
        ),
        (
            "redis-cluster://a:7000,b,[::1]:7002",
            RedisURL("cluster", nodes=(("a", 7000), ("b", 6379), ("::1", 7002))),
        ),
        (
            "rediss-cluster://:pw@a:7000?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
            RedisURL(
                "cluster",
                True,
                (("a", 7000),),
                password="pw",
                ssl_cert_reqs="none",
                ssl_ca_certs="/ca.pem",
            ),
        ),
        ("memory://", RedisURL("memory")),
        ("memory://tenant-a", RedisURL("memory", name="tenant-a")),
    ],
)
def test_parse_good_urls(url: str, expected: RedisURL) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:6379", "missing scheme"),
        ("http://127.0.0.1", "unknown scheme 'http'"),
        ("redis://", "missing host"),
        ("redis://:6379", "missing host"),
        ("redis://host:port", "bad port 'port'"),
        ("redis://host:70000", "bad port '70000'"),
        ("redis://host/zero", "database must be a number"),
        ("redis://a:1,b:2", "several hosts need redis-cluster://"),
        ("redis-cluster://a:1/3", "only database 0"),
        ("redis://user@host", "user name without a password"),
        ("redis://host?retries=3", "unknown option 'retries'"),
        ("redis://host?timeout=soon", "bad value 'soon' for option 'timeout'"),
        ("redis://host?timeout=-1", "bad value '-1' for option 'timeout'"),
        ("redis://host?connections=0", "bad value '0' for option 'connections'"),
        ("redis://host?ssl_cert_reqs=none", "needs rediss://"),
        ("rediss://host?ssl_cert_reqs=maybe", "bad value 'maybe'"),
        ("redis://[::1:6379", "bad IPv6 address"),
        ("memory://x?timeout=1", "unknown option 'timeout'"),
    ],
)
def test_parse_bad_urls(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="redis URL .*" + problem.replace("?", r"\?")):
        parse_redis_url(url)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url("redis://app:hunter2@host:bad/0")
    assert "hunter2" not in str(info.value) and "app:***@host" in str(info.value)


def test_construction_is_lazy_and_picks_the_runner() -> None:
    dead = port()  # nothing listens: building handles must not connect
    single = connect_redis(f"redis://127.0.0.1:{dead}/1?timeout=0.5&connections=2")
    assert isinstance(single.runner, FastRedis) and not single.cluster
    assert len(single.runner.links) == 2 and single.runner.settings.timeout == 0.5
    assert single.runner.settings.db == 1
    cluster = connect_redis(f"redis-cluster://127.0.0.1:{dead}")
    assert isinstance(cluster.runner, FastRedisCluster) and cluster.cluster
    assert isinstance(cluster.client, redis.asyncio.RedisCluster)
    slow = connect_redis(f"redis://127.0.0.1:{dead}", fast=False)
    assert isinstance(slow.runner, RedisPyRunner)
    memory = connect_redis("memory://lazy")
    assert isinstance(memory.runner, RedisPyRunner) and not memory.cluster
    for handles in (single, cluster, slow, memory):
        asyncio.run(handles.close())


async def test_memory_urls_share_a_server_per_name() -> None:
    name = uuid.uuid4().hex
    first, second = connect_redis(f"memory://{name}"), connect_redis(f"memory://{name}")
    other = connect_redis(f"memory://{name}-other")
    assert await first.runner.run(INCR, ["k"], []) == 1
    assert await second.runner.run(INCR, ["k"], []) == 2
    assert await second.client.get("k") == "2"
    assert await other.client.get("k") is None
    await first.client.script_flush()  # NOSCRIPT recovery on fakeredis too
    assert await other.runner.run(INCR, ["k"], []) == 1
    assert await first.runner.run(INCR, ["k"], []) == 3
    for handles in (first, second, other):
        await handles.close()


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    with start_redis(port(), password="s3cret") as server:
        yield server


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("auth", [":s3cret", "default:s3cret"])
async def test_auth_and_database(secured: RedisServer, fast: bool, auth: str) -> None:
    handles = connect_redis(f"redis://{auth}@127.0.0.1:{secured.port}/3", fast=fast)
    assert await handles.runner.run(INCR, ["db3"], []) == 1
    assert await handles.client.get("db3") == "1"
    with secured.client(db=3) as db3, secured.client(db=0) as db0:
        assert db3.get("db3") == "1" and db0.get("db3") is None
    await handles.close()


@pytest.mark.parametrize("fast", [True, False])
async def test_wrong_password_is_unavailable(secured: RedisServer, fast: bool) -> None:
    handles = connect_redis(f"redis://:wrong@127.0.0.1:{secured.port}/0", fast=fast)
    with pytest.raises(RedisUnavailable, match=r"WRONGPASS|invalid"):
        await handles.runner.run(INCR, ["x"], [])
    await handles.close()


@pytest.mark.parametrize("fast", [True, False])
async def test_nothing_listening_is_unavailable(fast: bool) -> None:
    handles = connect_redis(f"redis://127.0.0.1:{port()}/0", fast=fast)
    with pytest.raises(RedisUnavailable):
        await handles.runner.run(INCR, ["x"], [])
    await handles.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    with start_redis(port(), tls=make_tls_files(tmp_path)) as server:
        yield server


@pytest.mark.parametrize("fast", [True, False])
async def test_tls(tls_server: RedisServer, fast: bool) -> None:
    assert tls_server.tls is not None
    base = f"rediss://127.0.0.1:{tls_server.port}/0"
    handles = connect_redis(f"{base}?ssl_ca_certs={tls_server.tls.ca}", fast=fast)
    assert await handles.runner.run(INCR, ["tls"], []) == 1
    assert await handles.client.get("tls") == "1"
    await handles.close()
    untrusted = connect_redis(base, fast=fast)  # the system CAs don't know this server
    with pytest.raises(RedisUnavailable, match=r"(?i)certificate"):
        await untrusted.runner.run(INCR, ["tls"], [])
    await untrusted.close()


async def test_pool_of_connections_spreads_calls(secured: RedisServer) -> None:
    handles = connect_redis(f"redis://:s3cret@127.0.0.1:{secured.port}/0?connections=3")
    runner = handles.runner
    assert isinstance(runner, FastRedis)
    results = await asyncio.gather(*(runner.run(INCR, ["p"], []) for _ in range(300)))
    assert sorted(results) == list(range(1, 301))
    assert all(link.protocol is not None for link in runner.links)
    await handles.close()
