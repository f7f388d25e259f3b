"""API key hash -> Identity, through three tiers, and revocation across processes.

1. In process: a bounded cache by SHA-256 digest (never the plaintext key), each entry
   trusted for ``key_cache_seconds``. A hit is a dict lookup and a clock read.
2. Redis, shared by every process: ``KeySpace.api_key_cache(hex)`` holds a small JSON
   value for REDIS_CACHE_SECONDS, or the tombstone ``revoked``.
3. The store (Postgres), the source of truth: non-revoked keys only.

Failure rules: a Redis error falls through to the store (Redis is only a cache here); a
store error with no cached answer raises IdentityUnavailable, never "unknown key".

Revocation marks the key in the store, then overwrites the Redis entry with a tombstone
that outlives any cache entry. Lookups write the cache with SET NX, so a lookup that read
the store just before the revocation cannot put the key back. Other processes stop
accepting the key when their in-process entry expires (within ``key_cache_seconds``).
Revoke keys through ApiKeyResolver.revoke (or write the tombstone): a revocation made in
the database alone takes up to REDIS_CACHE_SECONDS to be noticed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from gateway.core.errors import IdentityUnavailable
from gateway.core.redis_keys import KeySpace
from gateway.core.ttlcache import TtlCache
from gateway.identity.principal import Identity, IdentityStats, valid_id

log = logging.getLogger(__name__)

REDIS_CACHE_SECONDS = 300
# Longer than REDIS_CACHE_SECONDS, so it outlives the SET NX of any lookup that read the
# store just before the revocation.
TOMBSTONE_SECONDS = 2 * REDIS_CACHE_SECONDS
TOMBSTONE = "revoked"
# Unknown keys are remembered this long in process, so a client repeating a bad key does
# not cost a Redis and a Postgres query per request.
UNKNOWN_KEY_SECONDS = 2.0

_REVOKED = object()


class KeyRow(Protocol):
    """What identification needs from an API key row (gateway.ledger.store.ApiKeyRow has it)."""

    @property
    def id(self) -> str: ...
    @property
    def org(self) -> str: ...
    @property
    def user(self) -> str | None: ...


class KeyLookup(Protocol):
    """The part of gateway.ledger.store.Store that API key resolution uses."""

    async def lookup_api_key(self, key_hash: bytes) -> KeyRow | None: ...
    async def revoke_api_key(self, key_id: str) -> KeyRow | None: ...


class ApiKeyResolver:
    """Resolves API key digests to Identities (see the module docstring)."""

    def __init__(
        self,
        *,
        keyspace: KeySpace,
        redis: Redis | RedisCluster | None,
        store: KeyLookup | None,
        key_cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        stats: IdentityStats | None = None,
        max_cached_keys: int = 100_000,
    ) -> None:
        self._keyspace = keyspace
        self._redis = redis
        self._store = store
        self._ttl = key_cache_seconds
        self._clock = clock
        self.stats = stats if stats is not None else IdentityStats()
        self._keys: TtlCache[bytes, Identity] = TtlCache(max_cached_keys)
        self._unknown: TtlCache[bytes, bool] = TtlCache(10_000)
        self._inflight: dict[bytes, asyncio.Future[Identity | None]] = {}
        self._redis_warned_at = -1e18
        # cached(digest, now): the in-process answer for a known good key (no I/O). Bound
        # to the cache's own get rather than a forwarding method: every metered request
        # calls it, and a Python call costs ~1,000 instructions (BENCHMARKS.md section 1,
        # "Where a metered request's CPU goes").
        self.cached: Callable[[bytes, float], Identity | None] = self._keys.get

    def known_unknown(self, digest: bytes, now: float) -> bool:
        """Whether the key was found unknown or revoked moments ago (no I/O)."""
        return self._unknown.get(digest, now) is not None

    async def resolve(self, digest: bytes) -> Identity | None:
        """Look a key up in Redis, then the store; concurrent requests share one lookup.

        Raises IdentityUnavailable when the store fails and Redis had no answer.
        """
        future = self._inflight.get(digest)
        if future is None:
            future = asyncio.ensure_future(self._lookup(digest))
            self._inflight[digest] = future
            future.add_done_callback(functools.partial(self._lookup_done, digest))
        # shield: a disconnecting client must not cancel the lookup others wait for.
        return await asyncio.shield(future)

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key in the store and stop every process from accepting it.

        False when the store has no such key. If Redis cannot take the tombstone, the
        revocation still stands (logged): other processes may then accept the key for up
        to REDIS_CACHE_SECONDS.
        """
        if self._store is None:
            raise IdentityUnavailable("no API key store is configured")
        try:
            row = await self._store.revoke_api_key(key_id)
        except Exception as exc:
            raise IdentityUnavailable("API key store unavailable") from exc
        if row is None:
            return False
        digest = await self._hash_of(row)
        if digest is None:
            log.error("key %s revoked, but its hash is unknown: caches not invalidated", key_id)
            return True
        self.forget(digest)
        if self._redis is not None:
            try:
                await self._redis.set(
                    self._keyspace.api_key_cache(digest.hex()), TOMBSTONE, ex=TOMBSTONE_SECONDS
                )
            except (RedisError, OSError) as exc:
                log.error(
                    "key %s revoked, but the Redis tombstone failed (%s): other processes "
                    "may accept it for up to %d s",
                    key_id,
                    exc,
                    REDIS_CACHE_SECONDS,
                )
        return True

    def forget(self, digest: bytes) -> None:
        """Drop a key from this process's caches."""
        self._keys.discard(digest)
        self._unknown.discard(digest)

    def _lookup_done(self, digest: bytes, future: asyncio.Future[Identity | None]) -> None:
        self._inflight.pop(digest, None)
        if not future.cancelled():
            future.exception()  # marks it retrieved even when every waiter has gone

    async def _lookup(self, digest: bytes) -> Identity | None:
        cache_key = self._keyspace.api_key_cache(digest.hex())
        redis = self._redis
        if redis is not None:
            self.stats.redis_lookups += 1
            try:
                found = _decode(await redis.get(cache_key))
            except (RedisError, OSError) as exc:
                self._warn_redis(exc)
                redis = None  # do not try to write it either
            else:
                if found is _REVOKED:
                    self._remember_unknown(digest)
                    return None
                if isinstance(found, Identity):
                    self._remember(digest, found)
                    return found
        identity = None
        if self._store is not None:
            self.stats.store_lookups += 1
            try:
                row = await self._store.lookup_api_key(digest)
            except Exception as exc:
                raise IdentityUnavailable("API key store unavailable") from exc
            if row is not None:
                identity = _from_row(row)
        if identity is None:
            self._remember_unknown(digest)
            return None
        if redis is not None:
            value = json.dumps(
                {"org": identity.org, "user": identity.user, "key_id": identity.key_id}
            )
            try:
                written = await redis.set(cache_key, value, nx=True, ex=REDIS_CACHE_SECONDS)
                # Someone wrote first; a tombstone means the key was revoked after our read.
                if not written and _decode(await redis.get(cache_key)) is _REVOKED:
                    self._remember_unknown(digest)
                    return None
            except (RedisError, OSError) as exc:
                self._warn_redis(exc)
        self._remember(digest, identity)
        return identity

    def _remember(self, digest: bytes, identity: Identity) -> None:
        self._keys.put(digest, identity, self._clock() + self._ttl)

    def _remember_unknown(self, digest: bytes) -> None:
        self._unknown.put(digest, True, self._clock() + UNKNOWN_KEY_SECONDS)

    async def _hash_of(self, row: KeyRow) -> bytes | None:
        """The SHA-256 of a key given its row (to find its Redis cache entry)."""
        digest = getattr(row, "key_hash", None)
        # gateway.ledger.store.ApiKeyRow carries it; a row without it has no cache entry
        # this process could find (the in-process entries are dropped by id below).
        return digest if isinstance(digest, bytes) and digest else None

    def _warn_redis(self, exc: BaseException) -> None:
        now = self._clock()
        if now - self._redis_warned_at >= 30.0:  # one line per 30 s, not one per request
            self._redis_warned_at = now
            log.warning("Redis key cache unavailable, using the store: %s", exc)


def _from_row(row: KeyRow) -> Identity | None:
    if not valid_id(row.org) or (row.user is not None and not valid_id(row.user)):
        log.error("API key %s has an invalid org or user id; refusing it", row.id)
        return None
    return Identity(row.org, row.user, "api_key", row.id)


def _decode(raw: object) -> Identity | object | None:
    """A cached value as an Identity, _REVOKED, or None when missing or unreadable."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        return None
    if raw == TOMBSTONE:
        return _REVOKED
    try:
        data = json.loads(raw)
        org, user, key_id = data["org"], data.get("user"), data.get("key_id")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not valid_id(org) or (user is not None and not valid_id(user)):
        return None
    if key_id is not None and not isinstance(key_id, str):
        return None
    return Identity(org, user, "api_key", key_id)
