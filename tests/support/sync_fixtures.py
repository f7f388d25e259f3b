"""Fixtures shared by the sync job's test modules: the tests' Redis (unique key prefix,
cleaned after), a migrated throwaway Postgres and a pool on it (servers from
tests/support/services.py).

Registered for the whole suite by ``pytest_plugins`` in tests/conftest.py; a module that
defines a fixture of the same name keeps its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.core.redis_keys import KeySpace
from gateway.redisio.connect import connect_redis
from tests.support.pg import migrated_database
from tests.support.services import redis_url

pg_dsn = pytest.fixture(migrated_database)


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    client = connect_redis(redis_url()).client
    yield client
    await client.aclose()


@pytest.fixture
async def keyspace(redis: Any) -> AsyncIterator[KeySpace]:
    ks = KeySpace(f"cgt{uuid.uuid4().hex[:10]}", 4)
    yield ks
    async for key in redis.scan_iter(match=f"{ks.prefix}:*", count=1000):
        await redis.delete(key)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=6)
    yield p
    await p.close()


def orgs_on_every_shard(ks: KeySpace, per_shard: int = 2) -> list[str]:
    """Org ids covering every shard of ``ks``, ``per_shard`` each."""
    found: dict[int, list[str]] = {s.shard: [] for s in ks.all_shards()}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        org = f"org{i}"
        shard = ks.shard(org).shard
        if len(found[shard]) < per_shard:
            found[shard].append(org)
        i += 1
    return [o for orgs in found.values() for o in orgs]
