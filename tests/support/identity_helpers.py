"""Shared pieces of the identity tests: a hand-moved clock, a fake key store that counts
calls, a call-counting Redis wrapper, ASGI scope builders, and fixture functions.

    from tests.support.identity_helpers import new_clock, new_store, new_fake_redis
    clock = pytest.fixture(new_clock)           # and likewise for the others
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import fakeredis

from gateway.config import IdentityConfig
from gateway.core.redis_keys import KeySpace
from gateway.identity.api_keys import generate_api_key, hash_api_key
from gateway.identity.identifier import Identifier


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Row:
    """An API key row as the fake store keeps it (with its hash, unlike ApiKeyRow)."""

    id: str
    org: str
    user: str | None
    key_hash: bytes


class FakeStore:
    """The two KeyLookup methods over a dict, counting calls; ``down`` makes them fail."""

    def __init__(self) -> None:
        self.rows: dict[bytes, Row] = {}
        self.revoked: set[str] = set()
        self.lookups = 0
        self.down = False
        self.gate: asyncio.Event | None = None  # when set, lookups wait for it

    def add(self, org: str = "org-1", user: str | None = "user-1") -> tuple[str, Row]:
        key = generate_api_key()
        row = Row(f"key_{len(self.rows):016x}", org, user, hash_api_key(key))
        self.rows[row.key_hash] = row
        return key, row

    async def lookup_api_key(self, key_hash: bytes) -> Row | None:
        self.lookups += 1
        if self.down:
            raise ConnectionRefusedError("store down")
        row = self.rows.get(key_hash)
        result = None if row is None or row.id in self.revoked else row
        gate = self.gate
        if gate is not None:
            await gate.wait()  # the answer was read before the wait: a slow query
        return result

    async def revoke_api_key(self, key_id: str) -> Row | None:
        if self.down:
            raise ConnectionRefusedError("store down")
        for row in self.rows.values():
            if row.id == key_id:
                self.revoked.add(key_id)
                return row
        return None


class CountingRedis:
    """Wraps a redis client, counting every command method called on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            self.calls += 1
        return attr


def scope(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    client: tuple[str, int] | None = ("10.0.0.1", 40000),
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "headers": [(b"host", b"example.com"), *(headers or [])],
        "client": client,
    }
    if state is not None:
        s["state"] = state
    return s


def bearer(token: str | bytes) -> list[tuple[bytes, bytes]]:
    raw = token.encode() if isinstance(token, str) else token
    return [(b"authorization", b"Bearer " + raw)]


def run_without_suspending(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must finish without ever yielding to the event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MakeIdentifier = Callable[..., Identifier]


def new_clock() -> Clock:
    """Fixture function: a fresh Clock."""
    return Clock()


def new_store() -> FakeStore:
    """Fixture function: an empty FakeStore."""
    return FakeStore()


def new_fake_redis() -> CountingRedis:
    """Fixture function: a counting client on a fresh fakeredis server."""
    return CountingRedis(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()))


def identifier_factory(clock: Clock, store: FakeStore, fake_redis: CountingRedis) -> MakeIdentifier:
    """Fixture function: builds Identifiers from IdentityConfig fields (prefix ``t``);
    ``redis=`` and ``store=`` override the shared fakes."""

    def build(**config: Any) -> Identifier:
        redis = config.pop("redis", fake_redis)
        key_store = config.pop("store", store)
        return Identifier(
            IdentityConfig(**config),
            keyspace=KeySpace("t"),
            redis=redis,
            store=key_store,
            clock=clock,
        )

    return build
