"""API key resolution (gateway.identity.api_key_resolver through
gateway.identity.identifier): the in-process
cache, the shared Redis cache, the store, outages, and revocation across processes.

Unit tests use a fresh fakeredis server per test and a fake key store that counts calls;
the integration tests use the real Redis (unique key prefix) and a throwaway Postgres.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.config import IdentityConfig
from gateway.core.errors import IdentityUnavailable
from gateway.core.redis_keys import KeySpace
from gateway.identity.api_key_resolver import REDIS_CACHE_SECONDS, TOMBSTONE, TOMBSTONE_SECONDS
from gateway.identity.api_keys import generate_api_key, hash_api_key
from gateway.identity.identifier import Identifier, Identity, IdentityFailure
from gateway.ledger.store import Store
from tests.support.identity_helpers import (
    Clock,
    CountingRedis,
    FakeStore,
    MakeIdentifier,
    bearer,
    closed_port,
    identifier_factory,
    new_clock,
    new_fake_redis,
    new_store,
    run_without_suspending,
    scope,
)
from tests.support.pg import requires_postgres, temp_database
from tests.support.services import redis_url

clock = pytest.fixture(new_clock)
store = pytest.fixture(new_store)
fake_redis = pytest.fixture(new_fake_redis)
make = pytest.fixture(identifier_factory)


# --- API key caching -------------------------------------------------------------------------


async def test_in_process_hit_does_no_io_and_never_suspends(
    make: MakeIdentifier, store: FakeStore, fake_redis: CountingRedis, clock: Clock
) -> None:
    key, row = store.add()
    ident = make(key_cache_seconds=5)
    first = await ident.identify(scope(bearer(key)))
    assert first == Identity("org-1", "user-1", "api_key", row.id)
    lookups, redis_calls = store.lookups, fake_redis.calls
    assert lookups == 1 and redis_calls >= 2  # GET miss, then SET NX
    for _ in range(100):
        clock.advance(0.04)
        assert run_without_suspending(ident.identify(scope(bearer(key)))) == first
    assert (store.lookups, fake_redis.calls) == (lookups, redis_calls)
    assert ident.stats.key_cache_hits == 100


async def test_expired_entry_is_refreshed_from_redis_not_the_store(
    make: MakeIdentifier, store: FakeStore, fake_redis: CountingRedis, clock: Clock
) -> None:
    key, _ = store.add()
    ident = make(key_cache_seconds=5)
    await ident.identify(scope(bearer(key)))
    cached = await fake_redis.inner.get(f"t:keys:{hash_api_key(key).hex()}")
    assert cached is not None and b"org-1" in cached
    assert 0 < await fake_redis.inner.ttl(f"t:keys:{hash_api_key(key).hex()}") <= 300
    clock.advance(5.01)
    before = fake_redis.calls
    assert isinstance(await ident.identify(scope(bearer(key))), Identity)
    assert store.lookups == 1 and fake_redis.calls == before + 1
    # A second process finds it in Redis too.
    assert isinstance(await make().identify(scope(bearer(key))), Identity)
    assert store.lookups == 1


async def test_in_process_cache_is_keyed_by_digest_and_bounded(
    clock: Clock, store: FakeStore
) -> None:
    ident = Identifier(
        IdentityConfig(), keyspace=KeySpace("t"), redis=None, store=store, clock=clock,
        max_cached_keys=3,
    )  # fmt: skip
    keys = [store.add(org=f"o{i}")[0] for i in range(5)]
    for key in keys:
        await ident.identify(scope(bearer(key)))
    cache = ident.keys._keys
    assert len(cache) == 3
    assert all(hash_api_key(k) in cache for k in keys[2:])
    assert not any(k in cache or k.encode() in cache for k in keys)
    # The evicted oldest is looked up again.
    await ident.identify(scope(bearer(keys[0])))
    assert store.lookups == 6


async def test_concurrent_misses_share_one_lookup(make: MakeIdentifier, store: FakeStore) -> None:
    key, _ = store.add()
    store.gate = asyncio.Event()
    ident = make()
    tasks = [asyncio.create_task(ident.identify(scope(bearer(key)))) for _ in range(50)]
    await asyncio.sleep(0.01)
    store.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r == results[0] and isinstance(r, Identity) for r in results)
    assert store.lookups == 1


async def test_unknown_key_is_negatively_cached_briefly(
    make: MakeIdentifier, store: FakeStore, clock: Clock
) -> None:
    ident = make()
    unknown = generate_api_key()
    for _ in range(5):
        result = await ident.identify(scope(bearer(unknown)))
        assert isinstance(result, IdentityFailure) and result.status == 401
    assert store.lookups == 1
    clock.advance(2.5)
    await ident.identify(scope(bearer(unknown)))
    assert store.lookups == 2


async def test_no_store_means_unknown_keys(make: MakeIdentifier) -> None:
    result = await make(store=None).identify(scope(bearer(generate_api_key())))
    assert isinstance(result, IdentityFailure) and result.status == 401


# --- outages ----------------------------------------------------------------------------------


async def test_store_down_without_cached_answer_is_unavailable(
    make: MakeIdentifier, store: FakeStore
) -> None:
    key, _ = store.add()
    store.down = True
    ident = make()
    with pytest.raises(IdentityUnavailable):
        await ident.identify(scope(bearer(key)))
    with pytest.raises(IdentityUnavailable):  # also for keys the store may not know
        await ident.identify(scope(bearer(generate_api_key())))
    assert ident.stats.bad_credentials == 0  # an outage is not the client's fault


async def test_store_down_but_redis_knows_the_key(
    make: MakeIdentifier, store: FakeStore, clock: Clock
) -> None:
    key, _ = store.add()
    await make().identify(scope(bearer(key)))  # populates Redis
    store.down = True
    assert isinstance(await make().identify(scope(bearer(key))), Identity)


async def test_redis_down_falls_through_to_the_store(
    make: MakeIdentifier, store: FakeStore
) -> None:
    key, _ = store.add()
    dead = aioredis.Redis(host="127.0.0.1", port=closed_port(), retry=Retry(NoBackoff(), 0))
    try:
        ident = make(redis=dead)
        assert isinstance(await ident.identify(scope(bearer(key))), Identity)
        assert store.lookups == 1
        store.down = True
        ident.forget(hash_api_key(key))
        with pytest.raises(IdentityUnavailable):
            await ident.identify(scope(bearer(key)))
    finally:
        await dead.aclose()


# --- revocation -----------------------------------------------------------------------------


async def test_revocation_reaches_another_process_within_key_cache_seconds(
    store: FakeStore, fake_redis: CountingRedis
) -> None:
    clock_a, clock_b = Clock(), Clock()
    config = IdentityConfig(key_cache_seconds=5)

    def process(clock: Clock) -> Identifier:
        return Identifier(
            config, keyspace=KeySpace("t"), redis=cast(Any, fake_redis), store=store, clock=clock
        )

    a, b = process(clock_a), process(clock_b)
    key, row = store.add()
    assert isinstance(await a.identify(scope(bearer(key))), Identity)
    assert isinstance(await b.identify(scope(bearer(key))), Identity)

    assert await a.revoke(row.id) is True
    refused = await a.identify(scope(bearer(key)))
    assert isinstance(refused, IdentityFailure) and refused.status == 401

    cache_key = f"t:keys:{row.key_hash.hex()}"
    assert await fake_redis.inner.get(cache_key) == TOMBSTONE.encode()
    assert REDIS_CACHE_SECONDS < await fake_redis.inner.ttl(cache_key) <= TOMBSTONE_SECONDS

    clock_b.advance(4.9)  # still inside b's in-process window
    assert isinstance(await b.identify(scope(bearer(key))), Identity)
    clock_b.advance(0.2)
    lookups = store.lookups
    refused = await b.identify(scope(bearer(key)))
    assert isinstance(refused, IdentityFailure) and refused.status == 401
    assert store.lookups == lookups  # the tombstone answered
    assert await a.revoke("key_does_not_exist") is False


async def test_lookup_racing_a_revocation_cannot_resurrect_the_key(
    make: MakeIdentifier, store: FakeStore, fake_redis: CountingRedis
) -> None:
    key, row = store.add()
    slow, admin = make(), make()
    released = asyncio.Event()
    store.gate = released
    pending = asyncio.create_task(slow.identify(scope(bearer(key))))
    for _ in range(500):  # until slow has read "valid" from the store (not yet written Redis)
        if store.lookups:
            break
        await asyncio.sleep(0.01)
    assert store.lookups == 1 and not pending.done()
    assert await admin.revoke(row.id)
    released.set()
    result = await pending
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert await fake_redis.inner.get(f"t:keys:{row.key_hash.hex()}") == TOMBSTONE.encode()


async def test_revoke_with_store_down_is_unavailable(
    make: MakeIdentifier, store: FakeStore
) -> None:
    _, row = store.add()
    store.down = True
    with pytest.raises(IdentityUnavailable):
        await make().revoke(row.id)


# --- integration: real Redis and the real Store ----------------------------------------------


@pytest.fixture
async def real_redis() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    # The tests' Redis: skips without one (fails under CI), see tests/support/services.py.
    client = aioredis.Redis.from_url(redis_url())
    prefix = f"cgt{uuid.uuid4().hex[:10]}"
    try:
        yield client, prefix
    finally:
        async for k in client.scan_iter(match=f"{prefix}:*", count=1000):
            await client.delete(k)
        await client.aclose()


async def test_revocation_with_real_redis(
    real_redis: tuple[aioredis.Redis, str], store: FakeStore
) -> None:
    client, prefix = real_redis
    clock_a, clock_b = Clock(), Clock()
    a, b = (
        Identifier(IdentityConfig(), keyspace=KeySpace(prefix), redis=client, store=store, clock=c)
        for c in (clock_a, clock_b)
    )
    key, row = store.add()
    assert isinstance(await a.identify(scope(bearer(key))), Identity)
    assert isinstance(await b.identify(scope(bearer(key))), Identity)
    assert store.lookups == 1  # b was answered by Redis
    assert await a.revoke(row.id)
    clock_b.advance(IdentityConfig().key_cache_seconds + 0.01)
    result = await b.identify(scope(bearer(key)))
    assert isinstance(result, IdentityFailure) and result.status == 401
    assert await client.get(f"{prefix}:keys:{row.key_hash.hex()}") == b"revoked"


@requires_postgres
async def test_real_store_and_redis_end_to_end(real_redis: tuple[aioredis.Redis, str]) -> None:
    client, prefix = real_redis
    async with temp_database(migrated=True) as dsn:
        store = await Store.connect(dsn, max_size=2)
        try:
            await store.set_plan("org-real", "pro")
            row, key = await store.create_api_key("org-real", "user-real", "ci")
            clock_a, clock_b = Clock(), Clock()
            a, b = (
                Identifier(
                    IdentityConfig(),
                    keyspace=KeySpace(prefix),
                    redis=client,
                    store=store,
                    clock=c,
                )
                for c in (clock_a, clock_b)
            )
            expected = Identity("org-real", "user-real", "api_key", row.id)
            assert await a.identify(scope([(b"x-api-key", key.encode())])) == expected
            assert await b.identify(scope(bearer(key))) == expected
            assert await a.revoke(row.id) is True
            assert await client.get(f"{prefix}:keys:{hash_api_key(key).hex()}") == b"revoked"
            refused = await a.identify(scope(bearer(key)))
            assert isinstance(refused, IdentityFailure) and refused.status == 401
            clock_b.advance(5.01)
            refused = await b.identify(scope(bearer(key)))
            assert isinstance(refused, IdentityFailure) and refused.status == 401
            unknown = await b.identify(scope(bearer(generate_api_key())))
            assert isinstance(unknown, IdentityFailure) and unknown.status == 401
        finally:
            await store.close()
