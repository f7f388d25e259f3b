"""The cluster script runner (gateway/redisio/pipelined_cluster.py) on a real 3-master
Redis Cluster.

The cluster is started once for the module (ports 7110-7139 and their bus ports) and torn
down even when a test fails. Slots are migrated while runners are live, to show that MOVED,
ASK and TRYAGAIN are followed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio

from gateway.core.errors import RedisUnavailable
from gateway.redisio.connect import connect_redis
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined_cluster import FastRedisCluster, slot_of
from tests.support.redis_servers import Cluster, RedisServer, free_ports, start_cluster

RUNNERS = ["fast", "redispy"]


def script(body: str) -> LuaScript:
    """A script with a unique SHA, so no node has it cached yet."""
    return LuaScript.from_source("t", f"-- {uuid.uuid4().hex}\n{body}")


INCR_ALL = script(
    "local out = {}\nfor i, key in ipairs(KEYS) do out[i] = redis.call('INCR', key) end\nreturn out"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with start_cluster(free_ports(3, 7110, 7139, cluster=True)) as c:
        yield c


def tag_on(cluster: Cluster, server: RedisServer) -> str:
    """A fresh hash tag whose slot is served by ``server``."""
    while True:
        tag = uuid.uuid4().hex[:8]
        if cluster.node_for_slot(slot_of(f"{{{tag}}}")) is server:
            return tag


def other(cluster: Cluster, server: RedisServer) -> RedisServer:
    return next(s for s in cluster.servers if s is not server)


@pytest.mark.parametrize("kind", RUNNERS)
async def test_scripts_route_to_each_slots_master(cluster: Cluster, kind: str) -> None:
    handles = connect_redis(cluster.url, fast=kind == "fast")
    assert handles.cluster
    tags = [tag_on(cluster, server) for server in cluster.servers]
    calls = [[f"{{{tag}}}:a", f"{{{tag}}}:b"] for tag in tags] * 100
    results = await asyncio.gather(*(handles.runner.run(INCR_ALL, keys, []) for keys in calls))
    for tag in tags:
        counts = sorted(r[0] for keys, r in zip(calls, results, strict=True) if tag in keys[0])
        assert counts == list(range(1, 101))
    for tag, server in zip(tags, cluster.servers, strict=True):
        with server.client() as node:  # the keys really live on the slot's master
            assert node.get(f"{{{tag}}}:a") == "100" and node.get(f"{{{tag}}}:b") == "100"
    await handles.close()


@pytest.mark.parametrize("kind", RUNNERS)
async def test_slot_migration_ask_then_moved(cluster: Cluster, kind: str) -> None:
    handles = connect_redis(cluster.url, fast=kind == "fast")
    runner = handles.runner
    source = cluster.servers[0]
    tag = tag_on(cluster, source)
    key, slot = f"{{{tag}}}:n", slot_of(f"{{{tag}}}")
    target = other(cluster, source)
    incr = script("return redis.call('INCR', KEYS[1])")
    assert await runner.run(incr, [key], []) == 1

    migration = cluster.begin_migration(slot, target)
    assert migration.move_keys() == 1
    # The map still says source; source answers ASK; target runs it after ASKING
    # (and after loading the script, which it has never seen).
    assert await runner.run(incr, [key], []) == 2
    if isinstance(runner, FastRedisCluster):
        assert runner.stats["ask"] == 1 and runner.stats["moved"] == 0
        assert runner.node_for_slot(slot).port == source.port  # type: ignore[union-attr]

    migration.finish()
    # Source now answers MOVED: the map is patched and the call goes to target.
    assert await runner.run(incr, [key], []) == 3
    assert await runner.run(incr, [key], []) == 4
    if isinstance(runner, FastRedisCluster):
        assert runner.stats["moved"] == 1
        assert runner.node_for_slot(slot).port == target.port  # type: ignore[union-attr]
    with target.client() as node:
        assert node.get(key) == "4"
    with source.client() as node:
        assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    await handles.close()


async def test_tryagain_while_a_multikey_slot_is_half_moved(cluster: Cluster) -> None:
    runner = FastRedisCluster(cluster.seeds)
    source = cluster.servers[1]
    tag = tag_on(cluster, source)
    keys, slot = [f"{{{tag}}}:x", f"{{{tag}}}:y"], slot_of(f"{{{tag}}}")
    assert await runner.run(INCR_ALL, keys, []) == [1, 1]
    migration = cluster.begin_migration(slot, other(cluster, source))
    migration.move_keys(keys[:1])
    # Source has one key of two: TRYAGAIN until the other moves too, then ASK.
    call = asyncio.create_task(runner.run(INCR_ALL, keys, []))
    await asyncio.sleep(0.1)
    assert not call.done()
    migration.move_keys(keys[1:])
    assert await call == [2, 2]
    assert runner.stats["tryagain"] >= 2 and runner.stats["ask"] == 1
    migration.finish()
    await runner.close()


async def test_redis_py_cluster_client_from_connect_redis(cluster: Cluster) -> None:
    handles = connect_redis(cluster.url)
    client = handles.client
    assert isinstance(client, redis.asyncio.RedisCluster)
    tags = [tag_on(cluster, server) for server in cluster.servers]
    for tag in tags:
        await client.set(f"{{{tag}}}:c", tag)
    assert [await client.get(f"{{{tag}}}:c") for tag in tags] == tags
    await handles.close()


async def test_dead_seed_is_skipped_and_clusterdown_is_unavailable(cluster: Cluster) -> None:
    dead = free_ports(1, 7140, 7149)[0]
    runner = FastRedisCluster([("127.0.0.1", dead), *cluster.seeds])
    server = cluster.servers[2]
    tag = tag_on(cluster, server)
    assert await runner.run(INCR_ALL, [f"{{{tag}}}:d"], []) == [1]
    slot = slot_of(f"{{{tag}}}")
    with server.client() as node:
        node.execute_command("CLUSTER", "DELSLOTS", slot)
        try:
            with pytest.raises(RedisUnavailable, match="CLUSTERDOWN"):
                await runner.run(INCR_ALL, [f"{{{tag}}}:d"], [])
        finally:
            node.execute_command("CLUSTER", "ADDSLOTS", slot)
    cluster.wait_until_consistent()
    assert await runner.run(INCR_ALL, [f"{{{tag}}}:d"], []) == [2]
    await runner.close()


async def test_unreachable_cluster_is_unavailable() -> None:
    runner = FastRedisCluster([("127.0.0.1", free_ports(1, 7140, 7149)[0])])
    with pytest.raises(RedisUnavailable, match="CLUSTER SLOTS"):
        await runner.run(INCR_ALL, ["{t}:k"], [])
    await runner.close()
