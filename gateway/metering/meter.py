"""The meter: admission (charge.lua) and settlement (settle.lua) of metered requests.

``admit`` is the only network round trip on a request's latency path: one EVALSHA that
checks idempotency, rate limits, plan and balance, applies a lazy period reset and takes
the tokens as a hold. Settlement runs after the response ends and is batched: the settles
of one shard queued within ``SETTLE_WINDOW_S`` (``settle_nowait``, the middleware's) or
within one event-loop iteration (``settle``, which returns a future) go to Redis in one
script call, so the second step costs a fraction of the first.

Everything per feature that does not depend on the request (each plan's allocation and
limiters) is turned into script arguments once, at construction; script keys are cached
per org and per (org, user, feature). Measured with bench/middleware_cpu.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from gateway.config import Config
from gateway.core.counters import METRICS
from gateway.core.errors import RedisUnavailable
from gateway.core.periods import period_bounds, period_id
from gateway.core.redis_keys import KeySpace, ShardKeys
from gateway.redisio.connect import RedisHandles
from gateway.redisio.lua_scripts import LuaScript, load
from gateway.redisio.pipelined import encode_args

log = logging.getLogger("creditgate.meter")

# Settles per script call; large batches keep Redis busy in one go for too long.
_SETTLE_BATCH = 256
# How long fire-and-forget settles (settle_nowait) are collected before they go to Redis.
# Each script call costs a fixed ~5 µs of Redis CPU and ~10 µs of ours; with many orgs
# spread over the shards, one loop iteration holds about one settle per shard, so a short
# window is what makes batching work. Off every client's latency path.
SETTLE_WINDOW_S = 0.002
_SETTLE_RETRIES = 5
# Per-(org, user, feature) script keys kept for reuse; the cache is emptied when full
# (a rebuild costs under a microsecond, so nothing smarter is worth its own overhead).
_KEY_CACHE_SIZE = 20_000
# charge.lua's ARGV values that change with every request (ARGV[1..8]).
_PER_REQUEST_ARGS = 8
_NO_IDEM_TTL_ARG = encode_args(("0",))


class _RequestIds:
    """Request ids: 32 hex characters, unique across processes and time, and cheap.

    A random 80-bit prefix per process (drawn again in a forked child and when the
    counter runs out) followed by a 48-bit counter: one ``next()`` and one format per id,
    where ``uuid4()`` costs a ``getrandom`` syscall and a UUID object. Ids are unique, not
    unguessable; nothing relies on a request id being secret (holds are settled by the
    process that took them, from its own memory).
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = ""
        self._counter: Iterator[int] = iter(())
        self.reseed()
        # A child forked with this module loaded (gunicorn --preload) must not repeat ids.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        """Draw a new process prefix and restart the counter."""
        self._prefix = os.urandom(10).hex()
        self._counter = iter(range(1 << 48))

    def __call__(self) -> str:
        return self.next_id()

    def next_id(self) -> str:
        """A new request id (``new_request_id`` is this bound method: cheaper to call)."""
        for n in self._counter:
            return f"{self._prefix}{n:012x}"
        self.reseed()  # 2**48 ids from one prefix: take a new one
        return self.next_id()


new_request_id = _RequestIds().next_id
"""Return a new request id (32 lowercase hex characters, like ``uuid4().hex``)."""


@dataclass(slots=True)
class Admission:
    """The outcome of ``Meter.admit`` for one request."""

    status: str  # ok | not_in_plan | rate_limited | insufficient | in_flight | replay
    request_id: str
    org: str
    feature: str
    bucket: str
    cost: int
    plan: str | None = None
    remaining: int | None = None
    limit: int | None = None
    limit_remaining: int | None = None
    limit_reset_ms: int | None = None
    retry_after_ms: int | None = None
    replay_status: str | None = None
    refresh_at_ms: int = 0

    @property
    def ok(self) -> bool:
        """True when the tokens are held and the request may proceed."""
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class _FeatureArgs:
    """Per-feature script arguments, precomputed for requests with and without a user."""

    bucket: str
    cost: int
    tail_user: tuple[str | int, ...]
    limiters_user: tuple[str, ...]  # per-user limiter ids: the only limiters with keys
    tail_anon: tuple[str | int, ...]


# One queued settle: org key, idempotency key, request id, outcome ("c" charge | "r"
# refund), upstream status, latency, and the future of settle() (None for settle_nowait).
_Settle = tuple[str, str, str, str, str, str, "asyncio.Future[int] | None"]


def _feature_args(config: Config, feature: str) -> _FeatureArgs:
    bucket = config.bucket_of(feature)
    cost = config.features[feature].cost

    def build(with_user: bool) -> tuple[tuple[str | int, ...], tuple[str, ...]]:
        limiter_ids: list[str] = []
        tail: list[str | int] = [len(config.plans)]
        for plan in config.plans:
            alloc = config.allocation(plan, bucket)
            limits = [rl for rl in config.rate_limits_of(plan) if with_user or rl.per != "user"]
            tail += [plan, -1 if alloc is None else alloc, len(limits)]
            for rl in limits:
                if rl.per == "org":
                    # KEYS index 0: charge.lua keeps per-org limiters in the org's hash.
                    tail += [0, rl.count, rl.period_ms]
                    continue
                if rl.id not in limiter_ids:
                    limiter_ids.append(rl.id)
                # KEYS index: 5 fixed keys come first (Lua is 1-based).
                tail += [6 + limiter_ids.index(rl.id), rl.count, rl.period_ms]
        return tuple(tail), tuple(limiter_ids)

    tail_user, lim_user = build(True)
    tail_anon, _ = build(False)  # without a user, only per-org limiters: no keys
    # As strings: the client encodes str arguments faster than int ones.
    return _FeatureArgs(
        bucket, cost, tuple(map(str, tail_user)), lim_user, tuple(map(str, tail_anon))
    )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Meter:
    """Admits and settles metered requests against Redis."""

    def __init__(
        self,
        config: Config,
        redis: RedisHandles,
        *,
        now_ms: Callable[[], int],
        seeder: Callable[[str], Any] | None = None,
    ) -> None:
        self.config = config
        self.redis = redis
        self.keys = KeySpace(config.key_prefix, config.shards)
        self._now_ms = now_ms
        # Called with an org whose state is missing in Redis; must run seed.lua (the gate
        # wires it to the ledger). Without one, new orgs start on the default plan.
        self._seeder = seeder
        self._charge: LuaScript = load("charge")
        self._settle: LuaScript = load("settle")
        self._features = {name: _feature_args(config, name) for name in config.features}
        self._hold_ms = config.hold_ttl_seconds * 1000
        self._idem_ms = config.idempotency_ttl_seconds * 1000
        self._idem_ms_s = str(self._idem_ms)
        self._idem_ttl_arg = encode_args((self._idem_ms_s,))
        self._period: tuple[str, int, int] = ("", 0, -1)  # id, start, end (ms)
        self._period_args = b""  # charge.lua's ARGV[2..3] (period id, end), encoded
        self._shards = self.keys.all_shards()
        # org -> (its shard, its state key, its no-idempotency placeholder key), and
        # (org, user, feature) -> charge.lua's KEYS for a request without Idempotency-Key.
        self._org_cache: dict[str, tuple[ShardKeys, str, str]] = {}
        self._key_cache: dict[tuple[str, str | None, str], tuple[str, ...]] = {}
        # (org, user, feature, method, route) -> charge.lua's encoded static arguments.
        self._encoded: dict[
            tuple[str, str | None, str, str, str], tuple[int, bytes, bytes, bytes]
        ] = {}
        self._pending: dict[int, list[_Settle]] = {}
        self.settle_window_s = SETTLE_WINDOW_S
        # The scheduled flush of _pending (None: none), its loop, and whether it waits for
        # the settle window (settle() wants its future answered at the next iteration).
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_delayed = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._seeding: dict[str, asyncio.Future[None]] = {}

    # -- periods -----------------------------------------------------------------------

    def period(self, now: int) -> tuple[str, int, int]:
        """The current period (id, start ms, end ms), cached until it ends."""
        current = self._period
        if not current[1] <= now < current[2]:
            start, end = period_bounds(self.config.period, now)
            current = (period_id(self.config.period, now), start, end)
            self._period = current
            self._period_args = encode_args((current[0], str(end)))
        return current

    # -- admission ---------------------------------------------------------------------

    async def admit(
        self,
        org: str,
        feature: str,
        *,
        user: str | None = None,
        quantity: int = 1,
        cost: int | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        method: str = "",
        route: str = "",
    ) -> Admission:
        """Run charge.lua for one request; seeds the org's state first if Redis has none.

        Raises ``RedisUnavailable`` when Redis cannot be reached or timed out. Never
        retried: a timed-out debit may have committed (its hold then expires into a charge).
        """
        fa = self._features[feature]
        total = (fa.cost if cost is None else cost) * quantity
        rid = request_id or new_request_id()
        now = self._now_ms()
        current = self._period
        if not current[1] <= now < current[2]:
            current = self.period(now)
        end = current[2]
        runner = self.redis.runner
        run_encoded = getattr(runner, "run_encoded", None)
        if run_encoded is not None:
            # The pipelined client takes arguments pre-encoded: everything but the request's
            # own values (time, id, cost, idempotency) is encoded once per org, user and route.
            static = self._encoded.get((org, user, feature, method, route))
            if static is None:
                static = self._encode_static(org, user, feature, method, route, fa)
            count, head, bucket, tail = static
            if idempotency_key:
                keys = list(
                    self._key_cache.get((org, user, feature))
                    or self._script_keys(org, user, feature, fa)
                )
                keys[4] = self.keys.idempotency(org, idempotency_key)
                head = encode_args((len(keys), *keys))
                idem_arg = self._idem_ttl_arg
            else:
                idem_arg = _NO_IDEM_TTL_ARG
            # The per-request values by hand: digits, and a request id that is hex unless a
            # caller chose its own (then hiredis encodes it).
            now_s, total_s, hold_s = str(now), str(total), str(now + self._hold_ms)
            if rid.isascii():
                rid_arg = f"${len(rid)}\r\n{rid}\r\n"
            else:
                rid_arg = encode_args((rid,)).decode("utf-8", "surrogateescape")
            varying = (
                f"${len(total_s)}\r\n{total_s}\r\n{rid_arg}${len(hold_s)}\r\n{hold_s}\r\n"
            ).encode("utf-8", "surrogateescape")
            encoded = b"".join((
                head, b"$%d\r\n%b\r\n" % (len(now_s), now_s.encode()), self._period_args,
                bucket, varying, idem_arg, tail,
            ))  # fmt: skip
            started = perf_counter()
            reply = await run_encoded(self._charge, count, encoded)
        else:
            keys_: Sequence[str] = self._key_cache.get((org, user, feature)) or self._script_keys(
                org, user, feature, fa
            )
            if idempotency_key:
                keys_ = list(keys_)
                keys_[4] = self.keys.idempotency(org, idempotency_key)
                idem_ttl = self._idem_ms_s
            else:
                idem_ttl = "0"
            args: tuple[str | int, ...] = (
                now, current[0], end, fa.bucket, total, rid, now + self._hold_ms, idem_ttl,
                org, user or "", feature, method, route,
            )  # fmt: skip
            args += fa.tail_user if user else fa.tail_anon
            started = perf_counter()
            reply = await runner.run(self._charge, keys_, args)
        METRICS.observe_admit(perf_counter() - started)
        status = reply[0]
        if status.__class__ is not str:
            status = _s(status)
        if status == "missing":
            await self.seed(org)
            if run_encoded is not None:
                reply = await run_encoded(self._charge, count, encoded)
            else:
                reply = await runner.run(self._charge, keys_, args)
            status = _s(reply[0])
            if status == "missing":
                raise RedisUnavailable(f"state of org {org!r} vanished while seeding")
        adm = Admission(status, rid, org, feature, fa.bucket, total, refresh_at_ms=end)
        if status == "ok":
            adm.remaining = int(reply[1])
            limit = int(reply[2])
            if limit >= 0:
                adm.limit, adm.limit_remaining = limit, int(reply[3])
                adm.limit_reset_ms = int(reply[4])
        elif status == "rate_limited":
            adm.retry_after_ms, adm.limit = int(reply[1]), int(reply[2])
            adm.limit_remaining, adm.limit_reset_ms = 0, int(reply[3])
        elif status == "insufficient":
            adm.remaining, adm.plan = int(reply[1]), _s(reply[2])
        elif status == "not_in_plan":
            adm.plan = _s(reply[1])
        elif status == "replay":
            adm.replay_status = _s(reply[1])
        return adm

    def _encode_static(
        self, org: str, user: str | None, feature: str, method: str, route: str, fa: _FeatureArgs
    ) -> tuple[int, bytes, bytes, bytes]:
        """charge.lua's arguments that only depend on the org, user and route, encoded for
        ``run_encoded`` (and cached): (argument count, KEYS with their count, the bucket
        (ARGV[4]), ARGV[9..])."""
        keys = self._key_cache.get((org, user, feature))
        if keys is None:
            keys = self._script_keys(org, user, feature, fa)
        tail = (org, user or "", feature, method, route, *(fa.tail_user if user else fa.tail_anon))
        static = (
            1 + len(keys) + _PER_REQUEST_ARGS + len(tail),
            encode_args((len(keys), *keys)),
            encode_args((fa.bucket,)),
            encode_args(tail),
        )
        if len(self._encoded) >= _KEY_CACHE_SIZE:
            self._encoded.clear()
        self._encoded[(org, user, feature, method, route)] = static
        return static

    def _org_keys(self, org: str) -> tuple[ShardKeys, str, str]:
        """(shard, state key, no-idempotency placeholder) of ``org``, cached."""
        entry = self._org_cache.get(org)
        if entry is None:
            shard = self.keys.shard(org)
            entry = (shard, f"{shard.tag}:org:{org}", f"{shard.tag}:idem:-")
            if len(self._org_cache) >= _KEY_CACHE_SIZE:
                self._org_cache.clear()
            self._org_cache[org] = entry
        return entry

    def _script_keys(
        self, org: str, user: str | None, feature: str, fa: _FeatureArgs
    ) -> tuple[str, ...]:
        """Build (and cache) charge.lua's KEYS for a request without an Idempotency-Key."""
        shard, org_key, no_idem = self._org_keys(org)
        tag = shard.tag
        keys = [org_key, shard.holds, shard.holdexp, shard.events, no_idem]
        # Only per-user limiters have keys (per-org ones are fields of the org hash), keyed
        # by the user inside the org; without a user there are none.
        if user:
            for lid in fa.limiters_user:
                keys.append(f"{tag}:rl:{org}:u:{user}:{lid[2:]}")
        if len(self._key_cache) >= _KEY_CACHE_SIZE:
            self._key_cache.clear()
        result = self._key_cache[(org, user, feature)] = tuple(keys)
        return result

    async def seed(self, org: str) -> None:
        """Create the org's Redis state (once per process at a time; seed.lua is set-if-absent)."""
        pending = self._seeding.get(org)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seeding[org] = fut
        try:
            if self._seeder is not None:
                await self._seeder(org)
            else:
                await self.seed_state(org, self.config.default_plan, 0, [])
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._seeding[org]

    async def seed_state(
        self, org: str, plan: str, seq: int, buckets: Sequence[Sequence[str | int]]
    ) -> bool:
        """Run seed.lua with explicit state: buckets are 7-tuples (see lua/seed.lua)."""
        args: list[str | int] = [plan, seq, len(buckets)]
        for b in buckets:
            args.extend(b)
        reply = await self.redis.runner.run(load("seed"), [self.keys.org(org)], args)
        return int(reply) == 1

    # -- settlement --------------------------------------------------------------------

    def settle(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
    ) -> asyncio.Future[int]:
        """Queue the hold of an admitted request for charge (ok) or refund.

        Returns a future with the tokens charged (-1 if the hold was already gone). The
        middleware, which never waits for it, uses ``settle_nowait`` instead.
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue(adm, ok, status, latency_ms, idempotency_key, done)
        return done

    def settle_nowait(
        self,
        adm: Admission,
        *,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None = None,
    ) -> None:
        """``settle`` without a future to wait on (the proxy path: fire and forget).

        Must be called from a coroutine on the event loop the meter runs on.
        """
        self._queue(adm, ok, status, latency_ms, idempotency_key, None)

    def _queue(
        self,
        adm: Admission,
        ok: bool,
        status: int | None,
        latency_ms: int | None,
        idempotency_key: str | None,
        done: asyncio.Future[int] | None,
    ) -> None:
        org = adm.org
        shard, org_key, no_idem = self._org_keys(org)
        item: _Settle = (
            org_key,
            self.keys.idempotency(org, idempotency_key) if idempotency_key else no_idem,
            adm.request_id,
            "c" if ok else "r",
            "" if status is None else str(status),
            "" if latency_ms is None else str(latency_ms),
            done,
        )
        queue = self._pending.get(shard.shard)
        if queue is None:
            self._pending[shard.shard] = [item]
        else:
            queue.append(item)
        handle, loop = self._flush_handle, self._flush_loop
        if handle is None or loop is None or loop.is_closed():
            # (A flush left scheduled on a loop that has since closed is replaced.)
            self._schedule_flush(self.settle_window_s if done is None else 0.0)
        elif done is not None and self._flush_delayed:
            handle.cancel()  # someone waits: flush at the next iteration instead
            self._schedule_flush(0.0)

    def _schedule_flush(self, delay: float) -> None:
        # One callback flushes every shard queued meanwhile.
        loop = self._flush_loop = asyncio.get_running_loop()
        self._flush_delayed = delay > 0
        self._flush_handle = (
            loop.call_later(delay, self._flush) if delay > 0 else loop.call_soon(self._flush)
        )

    def _flush(self) -> None:
        self._flush_handle = self._flush_loop = None
        pending, self._pending = self._pending, {}
        shards = self._shards
        loop = asyncio.get_running_loop()
        for number, items in pending.items():
            shard = shards[number]
            for start in range(0, len(items), _SETTLE_BATCH):
                task = loop.create_task(
                    self._run_settle(shard, items[start : start + _SETTLE_BATCH])
                )
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _run_settle(self, shard: ShardKeys, items: list[_Settle]) -> None:
        keys = [shard.holds, shard.holdexp, shard.events]
        args: list[str | int] = [self._now_ms(), len(items)]
        for it in items:
            keys += it[:2]
            args += it[2:6]
        delay = 0.05
        for attempt in range(_SETTLE_RETRIES):
            try:
                reply = await self.redis.runner.run(self._settle, keys, args)
            except RedisUnavailable as exc:
                # Settling twice is harmless (the hold is gone the second time), so unlike a
                # debit it can be retried. If Redis stays away the hold expires into a charge.
                if attempt == _SETTLE_RETRIES - 1:
                    log.error(
                        "settle failed for %d holds on shard %d: %s", len(items), shard.shard, exc
                    )
                    for it in items:
                        done = it[6]
                        if done is not None and not done.done():
                            done.set_exception(exc)
                    return
                await asyncio.sleep(delay)
                delay *= 2
                continue
            for it, charged in zip(items, reply, strict=True):
                done = it[6]
                if done is not None and not done.done():
                    done.set_result(int(charged))
            return

    async def drain(self) -> None:
        """Wait until every queued settle has reached Redis (shutdown, tests)."""
        await asyncio.sleep(0)
        while self._pending or self._inflight:
            if self._pending:
                # Now, not after the settle window (or on a loop that is gone).
                handle, loop = self._flush_handle, self._flush_loop
                if handle is not None and loop is not None and not loop.is_closed():
                    handle.cancel()
                self._flush()
            if self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)
            else:
                await asyncio.sleep(0)
