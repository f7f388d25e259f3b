"""The sync worker: a poll loop moving every shard's events into the Postgres ledger.

Per shard and pass (docs/ARCHITECTURE.md, "One metered request", step 7): claim entries
left idle by crashed workers, re-read our own un-acked entries, read new ones, decode,
write the batch in one transaction, ack, trim. Entries are acked only after their batch
committed, so a crash anywhere redelivers them, and the ledger's unique event id makes the
redelivery write nothing twice.

At a steady rate each shard's read of new entries is small, and a transaction per shard
made the commits (16 per pass, each with its fsync and its statements' planning) most of
the cost of an event. So the short reads of all shards without a backlog are folded into
one transaction (``SyncWorker._sync_shards``, ``fold``), which takes every shard's lock;
a backlogged shard is still drained in full batches of its own.

Several workers (processes) split the shards: ``run`` passes over only the shards this
worker holds a lease on (sync/leases.py), so a shard's events stay in one worker's
batches; ``run_once`` passes over every shard.

New entries take the writer's fast path (COPY straight into the ledger); re-read and
claimed entries, which may be in the ledger already, take its safe path (sync/writer.py).

Malformed entries (undecodable, or rejected by Postgres as data) are copied to the
shard's dead-letter stream ``P:{sN}:events:dead`` and acked, so they cannot wedge the
stream. Failures of Redis or Postgres themselves fail the pass; ``run`` backs off
(0.1 s doubling to 5 s) and tries again, and nothing is acked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from gateway.alerts.evaluation import AlertDefaults
from gateway.core.redis_keys import KeySpace
from gateway.redisio.lua_scripts import load as load_script
from sync.batch import Entry, Rows, decode_entries
from sync.leases import DEFAULT_LEASE_MS, ShardLeases, check_lease_ms
from sync.records import Fields, Times
from sync.results import SyncPassResult, SyncStats
from sync.streams import (
    Backlog,
    FastClient,
    RedisClient,
    ShardStream,
    fast_client_for,
    is_nogroup,
    streams_in,
)
from sync.writer import DATA_ERRORS, BatchWriter

log = logging.getLogger("creditgate.sync")

DEFAULT_BATCH_SIZE = 20_000
_WAKE_COUNT = 1000
# A shard whose read of new entries returns fewer than this has no backlog: such reads of
# several shards are written in one transaction (see SyncWorker._sync_shards).
_FOLD_BELOW = 1000
_MAX_BACKOFF_S = 5.0
_MIN_BACKOFF_S = 0.1
_SWEEP_MAX = 1000
_TRIM_EVERY_S = 1.0


@dataclass(slots=True)
class _Shard:
    stream: ShardStream
    group_ready: bool = False
    own_pending: bool = True  # we may hold un-acked entries: re-read from id 0 first
    last_claim: float = float("-inf")
    untrimmed: int = 0  # entries acked since the stream was last trimmed
    last_trim: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    takeover: bool = False  # just taken from another process: claim its pending entries


def tune_gc() -> None:
    """Garbage-collector settings for a process that runs only the sync job.

    A batch of 20,000 events is ~100,000 lists alive until its commit; with the default
    thresholds (700, 10, 10) the collector rescans them over and over, a quarter of the
    worker's CPU. What startup allocated is frozen out of the collector's sight, and
    collections run every 200,000 net allocations. (The reference cycles the worker
    makes are few; they are still collected, just later.)
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 100, 100)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def default_consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class SyncWorker:
    """Moves events from the shard streams to the ledger; several may run at once.

    ``fast_redis``: True (default) derives a pipelined client (gateway/redisio/pipelined.py) from
    ``redis`` for the bulk stream commands when ``redis`` is a plain TCP client, False
    keeps everything on ``redis``, or pass a client to use (it is not closed here).
    ``now_ms`` is the clock holds expire by (the gate's clock; default: wall time).
    ``alerts`` (the config's alert defaults) turns on the alert evaluation in each batch's
    transaction (gateway/alerts/evaluation.py); None: no alerts are evaluated.
    ``timezone`` is the config's ``period.timezone`` (contract A12): snapshots'
    ``refresh_date`` (and so alerts' and forecasts' ``refresh_at``) is local midnight there.
    ``variable_features`` is the config's ``Config.variable_features`` (contract A8): the
    sweep records an expired hold of one of them with its usage missing (its reserve,
    ``usage_missing``), as a settle whose usage never came; other expired holds are plain
    charges of their cost.
    ``linger_ms``: after a pass that found a little but no backlog, ``run`` waits this long
    before the next one, so that a steady trickle is written in fewer, larger transactions
    (each costs about a millisecond of Postgres CPU whatever its size); it adds at most
    this much to the sync lag. 0 turns it off.
    ``lease_ms``: ``run`` owns only the shards it holds a lease on (sync/leases.py), so
    several processes split the shards, and a dead one's shards are taken over after
    this long; 0 turns ownership off (every process reads every shard, as ``run_once``
    always does).
    ``run`` and ``run_once`` close the connection the worker opened when they return.
    """

    def __init__(
        self,
        *,
        redis: RedisClient,
        pool: asyncpg.Pool,
        keyspace: KeySpace,
        consumer: str | None = None,
        group: str = "creditgate-sync",
        batch_size: int = DEFAULT_BATCH_SIZE,
        block_ms: int = 200,
        linger_ms: int = 20,
        claim_idle_ms: int = 30000,
        sweep_every_s: float = 1.0,
        concurrency: int = 4,
        max_batches_per_pass: int = 8,
        default_plan: str = "starter",
        fast_redis: FastClient | bool = True,
        now_ms: Callable[[], int] | None = None,
        alerts: AlertDefaults | None = None,
        timezone: str = "UTC",
        variable_features: Collection[str] = (),
        lease_ms: int = DEFAULT_LEASE_MS,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.consumer = consumer or default_consumer_name()
        self.group = group
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.linger_ms = linger_ms
        self.claim_idle_ms = claim_idle_ms
        self.sweep_every_s = sweep_every_s
        self._variable_features = tuple(sorted(set(variable_features)))
        self.max_batches_per_pass = max_batches_per_pass
        self._now_ms = now_ms or _wall_ms
        self._own_fast: FastClient | None = None
        fast: FastClient | None = None
        if fast_redis is True:
            fast = self._own_fast = fast_client_for(redis)
        elif fast_redis is not False:
            fast = fast_redis
        self._times = Times()
        self._writer = BatchWriter(
            pool,
            times=self._times,
            prefix=keyspace.prefix,
            default_plan=default_plan,
            alerts=alerts,
            timezone=timezone,
        )
        self._shards = [
            _Shard(ShardStream(redis, keys, group, self.consumer, fast))
            for keys in keyspace.all_shards()
        ]
        self._by_stream = {s.stream.key: s for s in self._shards}
        self._leases = (
            ShardLeases(redis, keyspace, self.consumer, lease_ms)
            if check_lease_ms(lease_ms)
            else None
        )
        self._keeper: asyncio.Task[None] | None = None  # the leases' heartbeat, while owning
        self._beats_seen = -1  # the heartbeat the shards were last rebalanced after
        self._first = secrets.randbelow(len(self._shards)) if self._shards else 0
        self._concurrency = max(1, concurrency)
        self._sem = asyncio.Semaphore(self._concurrency)
        self._stop = asyncio.Event()
        self._sweep_script = redis.register_script(load_script("sweep_holds").source)
        self._next_sweep = float("-inf")
        # Claim checks need not run every pass: an entry must be idle claim_idle_ms anyway.
        self._claim_every_s = min(claim_idle_ms / 2000, 5.0)
        self.totals = SyncPassResult()
        self._last_success_at: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    # -- control --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to return; the batch in flight is committed and acked first."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stop.is_set()

    async def run(self) -> None:
        """Poll until ``stop``: passes back to back, blocking briefly when all is synced."""
        backoff = _MIN_BACKOFF_S
        idle = False
        while not self.stopping:
            try:
                result = await self._pass(block=idle, owned_only=True)
            except Exception as exc:  # Redis or Postgres unavailable: retry, ack nothing
                self._record_error(exc)
                log.warning(
                    "sync pass failed (%s: %s); retrying in %.1f s",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                idle = False
                continue
            if backoff > _MIN_BACKOFF_S:
                log.info("sync resumed")
            backoff = _MIN_BACKOFF_S
            idle = result.read == 0
            if self.linger_ms and 0 < result.read < _FOLD_BELOW:
                # A trickle, not a backlog: let entries gather for the next transaction.
                await self._sleep(self.linger_ms / 1000)
        await self._leave_group()
        await self.release_shards()
        await self.close()
        log.info("sync worker %s stopped", self.consumer)

    async def close(self) -> None:
        """Close the pipelined Redis client the worker derived (a later pass reopens it)."""
        if self._own_fast is not None:
            await self._own_fast.close()

    async def run_once(self, *, owned_only: bool = False) -> SyncPassResult:
        """One pass over every shard (sweep included when due); raises if it fails.

        ``owned_only``: over the shards this process owns, as a pass of ``run`` (the
        leases are then kept by a heartbeat task until ``release_shards``).
        The connection the worker opened for it is closed again (the next call reopens
        it), so callers need not ``close`` the worker.
        """
        try:
            return await self._pass(block=False, eager_trim=True, owned_only=owned_only)
        except Exception as exc:
            self._record_error(exc)
            raise
        finally:
            await self.close()

    async def own_shards(self) -> list[int]:
        """Join the sync processes (first call), take or give back shards as the live
        processes' assignment says, and return the shards this process owns."""
        leases = self._leases
        if leases is None:
            return [s.stream.keys.shard for s in self._shards]
        if self._keeper is None or self._keeper.done():
            await leases.heartbeat()
            self._keeper = asyncio.create_task(self._keep_leases(leases), name="sync-leases")
        if leases.beats != self._beats_seen:  # what is wanted may have changed
            self._beats_seen = leases.beats
            taken, _ = await leases.rebalance()
            for n in taken:
                shard = self._shards[n]
                # Another process may have left entries pending (it died): claim them now,
                # not after claim_idle_ms; they go the safe way, so none is written twice.
                shard.takeover = shard.own_pending = True
        return leases.owned()

    async def release_shards(self) -> None:
        """Stop the leases' heartbeat and give back every lease (clean shutdown)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._leases is not None:
            try:
                await self._leases.leave()
            except Exception as exc:  # the leases expire on their own
                log.warning("could not give back the shard leases: %s", exc)
        self._beats_seen = -1

    async def _keep_leases(self, leases: ShardLeases) -> None:
        """Heartbeat every ``lease_ms / 5`` while owning, also during a long pass."""
        while True:
            await asyncio.sleep(leases.heartbeat_every_s)
            try:
                await leases.heartbeat()
            except Exception as exc:  # the leases lapse on their own: batches stop
                log.warning("sync lease heartbeat failed (%s: %s)", type(exc).__name__, exc)

    def _keeps(self, shard: _Shard) -> bool:
        """Whether to read on from ``shard``: always without ownership, else while we own
        and still want it (a shard being handed over is left after the batch in hand)."""
        if self._leases is None or self._keeper is None:
            return True
        return self._leases.keeps(shard.stream.keys.shard)

    async def stats(self) -> SyncStats:
        """Backlog per shard and the age of the oldest unsynced event (queries Redis)."""
        backlogs: list[Backlog] = await asyncio.gather(*(s.stream.backlog() for s in self._shards))
        now_ms = int(time.time() * 1000)
        oldest = [b.oldest_ms for b in backlogs if b.oldest_ms is not None]
        return SyncStats(
            backlog_per_shard={b.shard: b.pending + b.undelivered for b in backlogs},
            oldest_unsynced_age_ms=max(0, now_ms - min(oldest)) if oldest else None,
            last_success_at=self._last_success_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            totals=self.totals,
        )

    # -- one pass -------------------------------------------------------------------

    async def _pass(
        self, *, block: bool, eager_trim: bool = False, owned_only: bool = False
    ) -> SyncPassResult:
        result = SyncPassResult()
        mine = self._shards
        if owned_only and self._leases is not None:
            mine = [self._shards[n] for n in await self.own_shards()]
        if time.monotonic() >= self._next_sweep:
            result.swept, result.swept_usage_missing = await self._sweep(mine)
            # A full sweep means more holds are due: sweep again next pass.
            full = result.swept >= _SWEEP_MAX
            self._next_sweep = time.monotonic() + (0 if full else self.sweep_every_s)
        try:
            await asyncio.gather(*(self._ensure_group(s) for s in mine))
            if block and not result.swept:
                await self._wait_for_entries(result, mine)
        except Exception as exc:
            self._check_nogroup(exc)
            self.totals.add(result)
            raise
        # Each worker starts its passes at its own shard, so that several workers at once
        # mostly write different shards (a shard's writers take turns, see sync/writer.py).
        first = self._first % len(mine) if mine else 0
        shards = mine[first:] + mine[:first]
        parts = await self._sync_shards(shards, eager_trim)
        lost = [i for i, p in enumerate(parts) if isinstance(p, BaseException) and is_nogroup(p)]
        if lost:
            # The streams of these shards vanished with their groups (Redis lost its data
            # since the last pass): create the groups again and read what is there now.
            again = [shards[i] for i in lost]
            for shard in again:
                shard.group_ready = False
            await asyncio.gather(*(self._ensure_group(shard) for shard in again))
            for i, part in zip(lost, await self._sync_shards(again, eager_trim), strict=True):
                parts[i] = part
        errors = [p for p in parts if isinstance(p, BaseException)]
        for part in parts:
            if isinstance(part, SyncPassResult):
                result.add(part)
        self.totals.add(result)
        for error in errors:
            self._check_nogroup(error)
        if errors:
            raise errors[0]
        self._last_success_at = time.time()
        self._last_error = None
        return result

    async def _sync_shards(
        self, shards: list[_Shard], eager_trim: bool
    ) -> list[SyncPassResult | BaseException]:
        """One pass over ``shards``: the result of each, or the error that stopped it.

        Each shard first takes over idle entries and re-reads its own un-acked ones (the
        safe path, on its own). Then every shard is read for new entries with a probe of
        at most ``_FOLD_BELOW`` entries: a shard whose probe came back short has no
        backlog, and the short reads of all such shards are written in one transaction
        (``fold``: a pass then costs one commit, not one per shard, which is what sync
        lag at a steady rate is made of); a shard whose probe came back full is drained
        in full-size batches of its own, as before. Both kinds run ``concurrency`` at a
        time.
        """
        results = [SyncPassResult() for _ in shards]
        errors: dict[int, BaseException] = {}

        def failed(i: int, exc: BaseException) -> None:
            shards[i].own_pending = True  # what it read may be un-acked: re-read it first
            errors.setdefault(i, exc)

        async with contextlib.AsyncExitStack() as stack:
            # In shard order, as everywhere: no two holders of several locks wait in a cycle.
            for shard in sorted(shards, key=lambda s: s.stream.keys.shard):
                await stack.enter_async_context(shard.lock)
            recovered = await asyncio.gather(
                *(self._recover(s, r) for s, r in zip(shards, results, strict=True)),
                return_exceptions=True,
            )
            live = []
            for i, outcome in enumerate(recovered):
                if isinstance(outcome, BaseException):
                    failed(i, outcome)
                elif not self.stopping and not shards[i].own_pending and self._keeps(shards[i]):
                    # A shard whose re-read stopped early (being handed over) is not read
                    # for new entries: their commit would clear own_pending with entries
                    # of ours still pending.
                    live.append(i)
            probe = min(self.batch_size, _FOLD_BELOW)
            reads = await asyncio.gather(
                *(shards[i].stream.read(">", probe) for i in live), return_exceptions=True
            )
            got: dict[int, list[Entry]] = {}
            for i, read in zip(live, reads, strict=True):
                if isinstance(read, BaseException):
                    failed(i, read)
                elif read:
                    shards[i].own_pending = True  # until acked
                    got[i] = read
            short = [i for i, read in got.items() if len(read) < probe]
            jobs: list[tuple[list[int], Awaitable[None]]] = []
            for group in self._groups([(i, len(got[i])) for i in short]):
                pairs = [(shards[i], got[i]) for i in group]
                handle = self._handle_group(pairs, results[group[0]])
                jobs.append((group, self._limited(handle)))
            for i, read in got.items():
                if len(read) >= probe:
                    jobs.append(([i], self._limited(self._drain(shards[i], read, results[i]))))
            outcomes = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
            for (group, _), outcome in zip(jobs, outcomes, strict=True):
                for i in group:
                    if isinstance(outcome, BaseException):
                        failed(i, outcome)
                    else:  # committed and acked: nothing of ours to re-read next pass
                        shards[i].own_pending = False
            ok = [i for i in range(len(shards)) if i not in errors]
            trimmed = await asyncio.gather(
                *(self._trim(shards[i], eager_trim) for i in ok), return_exceptions=True
            )
            for i, trim in zip(ok, trimmed, strict=True):
                if isinstance(trim, BaseException):
                    failed(i, trim)
                else:
                    results[i].trimmed += trim
        return [errors.get(i, result) for i, result in enumerate(results)]

    def _groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Reads (key, entries) folded into transactions (``fold``, ``fold_limit``)."""
        total = sum(n for _, n in sizes)
        return fold(sizes, fold_limit(total, self.batch_size, self._concurrency))

    async def _limited(self, job: Awaitable[None]) -> None:
        """Run ``job`` once fewer than ``concurrency`` batches are being written."""
        async with self._sem:
            await job

    def _check_nogroup(self, exc: BaseException) -> None:
        if is_nogroup(exc):
            # A stream (and its group) vanished, e.g. Redis lost its data: create the
            # groups again before the next read.
            for shard in self._shards:
                shard.group_ready = False

    async def _ensure_group(self, shard: _Shard) -> None:
        if not shard.group_ready:
            await shard.stream.ensure_group()
            shard.group_ready = True

    async def _sweep(self, shards: list[_Shard]) -> tuple[int, int]:
        """Sweep ``shards``' expired holds; returns (swept, of which usage missing)."""
        now_ms = self._now_ms()
        replies = await asyncio.gather(
            *(
                self._sweep_script(
                    keys=[s.stream.keys.holds, s.stream.keys.holdexp, s.stream.keys.events],
                    args=[now_ms, _SWEEP_MAX, *self._variable_features],
                )
                for s in shards
            ),
            return_exceptions=True,
        )
        swept = missing = 0
        for shard, reply in zip(shards, replies, strict=True):
            if isinstance(reply, ResponseError):
                # A script error (say, a hold that is not JSON) must not stop the sync.
                log.error("shard %d: sweep_holds failed: %s", shard.stream.keys.shard, reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                swept += int(reply[0])
                missing += int(reply[1])
        if swept:
            log.info("swept %d expired holds (%d with their usage missing)", swept, missing)
        return swept, missing

    async def _wait_for_entries(self, result: SyncPassResult, shards: list[_Shard]) -> None:
        """Block up to block_ms for new entries on any of ``shards``, and handle what
        arrives."""
        # Shards with entries of ours to re-read first wait for the next pass: handling
        # new entries would clear their own_pending.
        shards = [s for s in shards if not s.own_pending and self._keeps(s)]
        if isinstance(self.redis, RedisCluster) or not shards:
            # Streams of different shards live in different slots: no multi-key block.
            await self._sleep(self.block_ms / 1000)
            return
        # This read only wakes the worker up (through redis-py, which parses slowly): the
        # passes after it read any backlog in full-size batches.
        reply = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {s.stream.key: ">" for s in shards},
            count=min(self.batch_size, _WAKE_COUNT),
            block=self.block_ms,
        )
        pairs = sorted(
            ((self._by_stream[name], entries) for name, entries in streams_in(reply)),
            key=lambda pair: pair[0].stream.keys.shard,
        )
        async with contextlib.AsyncExitStack() as stack:
            for shard, _ in pairs:
                await stack.enter_async_context(shard.lock)
                shard.own_pending = True  # until acked
            # What a wake-up brings is small: the shards' entries share transactions.
            groups = self._groups([(k, len(e)) for k, (_, e) in enumerate(pairs)])
            outcomes = await asyncio.gather(
                *(self._limited(self._handle_group([pairs[k] for k in g], result)) for g in groups),
                return_exceptions=True,
            )
            for outcome in outcomes:  # every group finished first: none is left running
                if isinstance(outcome, BaseException):
                    raise outcome
            for shard, _ in pairs:
                shard.own_pending = False

    async def _trim(self, shard: _Shard, eager_trim: bool) -> int:
        """Trim the shard's stream if due; returns the entries trimmed."""
        now = time.monotonic()
        # Trimming costs three commands: at low rates, once a second is enough.
        if shard.untrimmed and (
            eager_trim
            or shard.untrimmed >= self.batch_size
            or now - shard.last_trim >= _TRIM_EVERY_S
        ):
            trimmed = await shard.stream.trim()
            shard.untrimmed, shard.last_trim = 0, now
            return trimmed
        return 0

    async def _recover(self, shard: _Shard, result: SyncPassResult) -> None:
        """Take over entries left idle by other consumers (when due) and re-read our own
        un-acked ones; both go the safe way, one batch per read."""
        stream, n = shard.stream, self.batch_size
        now = time.monotonic()
        async with self._sem:
            if shard.takeover or now - shard.last_claim >= self._claim_every_s:
                shard.last_claim = now
                # Taken over from another process: everything it left pending, at once
                # (it may hold more than a batch); else what is idle, a batch at a time.
                idle_ms = 0 if shard.takeover else self.claim_idle_ms
                while True:
                    claimed = await stream.claim(idle_ms, n)
                    if claimed:
                        shard_n = stream.keys.shard
                        log.info("shard %d: claimed %d idle entries", shard_n, len(claimed))
                        result.claimed += len(claimed)
                        shard.own_pending = True
                        await self._handle(shard, claimed, result, direct=False)
                    if not shard.takeover or len(claimed) < n or self.stopping:
                        break
                shard.takeover = False
            while shard.own_pending and not self.stopping and self._keeps(shard):
                entries = await stream.read("0", n)
                if entries:
                    await self._handle(shard, entries, result, direct=False)
                if len(entries) < n:
                    shard.own_pending = False

    async def _drain(self, shard: _Shard, first: list[Entry], result: SyncPassResult) -> None:
        """Write a backlogged shard's new entries in full batches: ``first`` (a full probe
        read) completed to ``batch_size``, then up to ``max_batches_per_pass`` in all."""
        stream, n = shard.stream, self.batch_size
        entries = first
        if len(entries) < n:
            entries = entries + await stream.read(">", n - len(entries))
        for batch in range(self.max_batches_per_pass):
            # Read the next batch only when it will be written in this pass: one read when
            # the quota has run out would stay pending, its own_pending cleared by the
            # caller, until claimed back after claim_idle_ms.
            if batch:
                if len(entries) < n or self.stopping or not self._keeps(shard):
                    break
                entries = await stream.read(">", n)
                if not entries:
                    break
                shard.own_pending = True
            await self._handle(shard, entries, result)
            shard.own_pending = False

    # -- one batch ------------------------------------------------------------------

    async def _handle(
        self, shard: _Shard, entries: list[Entry], result: SyncPassResult, *, direct: bool = True
    ) -> None:
        """Decode, write, dead-letter what is malformed, then ack every entry.

        ``direct=False`` for entries read before (re-read or claimed): likely in the
        ledger already, so they skip the fast path that would fail on them.
        """
        result.read += len(entries)
        decoded = decode_entries(entries, self._times)
        result.vanished += decoded.vanished
        rows = decoded.rows
        bad = decoded.bad
        inserted, rejected = await self._write_isolating(shard, rows, direct, result)
        bad.extend(rejected)
        result.inserted += inserted
        result.duplicates += len(rows) - len(rejected) - inserted
        await self._settle(shard, entries, bad, result)

    async def _handle_group(
        self, pairs: list[tuple[_Shard, list[Entry]]], result: SyncPassResult
    ) -> None:
        """Like ``_handle``, for the new entries of several shards (``fold``): decoded per
        shard, written in one transaction, then each shard's dead-lettered and acked.

        If Postgres rejects the batch's content, nothing was written: each shard's entries
        are then handled on their own, where ``_write_isolating`` finds the culprits and
        they are dead-lettered in their own shard.
        """
        if len(pairs) == 1:
            await self._handle(pairs[0][0], pairs[0][1], result)
            return
        decoded = [decode_entries(entries, self._times) for _, entries in pairs]
        rows = Rows.concat([d.rows for d in decoded])
        if len(rows):
            shards = [shard.stream.keys.shard for shard, _ in pairs]
            try:
                res = await self._writer.write(rows, shard=shards)
            except DATA_ERRORS:
                for shard, entries in pairs:
                    await self._handle(shard, entries, result)
                return
            result.inserted += res.inserted
            result.duplicates += len(rows) - res.inserted
            result.fallbacks += res.fallback
            result.alerts += res.alerts
        for (_, entries), one in zip(pairs, decoded, strict=True):
            result.read += len(entries)
            result.vanished += one.vanished
        await asyncio.gather(
            *(
                self._settle(shard, entries, one.bad, result)
                for (shard, entries), one in zip(pairs, decoded, strict=True)
            )
        )

    async def _settle(
        self,
        shard: _Shard,
        entries: list[Entry],
        bad: list[tuple[str, Fields, str]],
        result: SyncPassResult,
    ) -> None:
        """After the batch committed: dead-letter the shard's malformed entries, then ack
        every entry read (only now: a crash before this redelivers them)."""
        if bad:
            for entry_id, _, error in bad:
                n = shard.stream.keys.shard
                log.error("shard %d: dead-lettering entry %s: %s", n, entry_id, error)
            await shard.stream.dead_letter(bad)
            result.dead_lettered += len(bad)
        await shard.stream.ack([entry_id for entry_id, _ in entries])
        result.acked += len(entries)
        shard.untrimmed += len(entries)

    async def _write_isolating(
        self, shard: _Shard, rows: Rows, direct: bool, result: SyncPassResult
    ) -> tuple[int, list[tuple[str, Fields, str]]]:
        """Write ``rows``; if Postgres rejects their content, bisect to find the culprits.

        Returns (rows inserted, rejected entries with their error). Writes are
        idempotent, so halves that succeed before a culprit is found stay written.
        """
        if not len(rows):
            return 0, []
        try:
            res = await self._writer.write(rows, shard=shard.stream.keys.shard, direct=direct)
        except DATA_ERRORS as exc:
            if len(rows) == 1:
                error = f"ledger: {type(exc).__name__}: {exc}"
                return 0, [(rows.entry_ids[0], rows.fields[0], error)]
            mid = len(rows) // 2
            left = await self._write_isolating(shard, rows.slice(0, mid), direct, result)
            right = await self._write_isolating(shard, rows.slice(mid, len(rows)), direct, result)
            return left[0] + right[0], left[1] + right[1]
        result.fallbacks += res.fallback
        result.alerts += res.alerts
        return res.inserted, []

    # -- helpers ----------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on ``stop``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    def _record_error(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._last_error_at = time.time()

    async def _leave_group(self) -> None:
        """On a clean stop, drop our consumer from each group if it holds nothing."""
        for shard in self._shards:
            try:
                if shard.group_ready:
                    await shard.stream.delete_consumer_if_idle()
            except Exception as exc:  # best effort: a leftover empty consumer is harmless
                log.debug("could not remove consumer %s: %s", self.consumer, exc)
                return


def fold_limit(total: int, batch_size: int, concurrency: int) -> int:
    """The most entries one folded transaction takes when ``total`` are to be folded: all
    of them up to ``_FOLD_BELOW`` (at low rates the commits are the cost), else spread
    over ``concurrency`` transactions (one transaction is one Postgres backend: a larger
    backlog keeps both cores busy); never more than ``batch_size``."""
    spread = -(-total // max(1, concurrency))
    return min(batch_size, max(_FOLD_BELOW, spread))


def fold(sizes: list[tuple[int, int]], limit: int) -> list[list[int]]:
    """Pack reads (key, entries) into groups of at most ``limit`` entries in all, each
    written in one transaction; keys keep their order, and a read larger than ``limit``
    (none is: reads ask for at most ``limit``) would still get a group of its own."""
    groups: list[list[int]] = []
    total = 0
    for key, size in sizes:
        if groups and total + size <= limit:
            groups[-1].append(key)
            total += size
        else:
            groups.append([key])
            total = size
    return groups


async def run_worker(
    *,
    redis_url: str,
    database_url: str,
    keyspace: KeySpace,
    redis_timeout_s: float = 2.0,
    **worker_options: Any,
) -> None:
    """Connect, run a ``SyncWorker`` until SIGTERM/SIGINT (which only set its stop flag).

    Meant for a process of its own (``creditgate sync``): it tunes the garbage collector
    (``tune_gc``).
    """
    from gateway.redisio.connect import connect_redis

    handles = connect_redis(redis_url, timeout=redis_timeout_s, fast=False)
    concurrency = int(worker_options.get("concurrency", 4))
    # min_size=0: the worker starts (and backs off) even while Postgres is down.
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=concurrency + 1)
    worker = SyncWorker(redis=handles.client, pool=pool, keyspace=keyspace, **worker_options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info(
        "sync worker %s: %d shards under %r", worker.consumer, keyspace.shards, keyspace.prefix
    )
    tune_gc()
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await pool.close()
        await handles.close()


async def run_sync(config_path: str, *, lease_ms: int = DEFAULT_LEASE_MS) -> None:
    """``creditgate sync --config F``: load the config and run a worker until signalled.

    ``lease_ms`` is the shard lease TTL (``--lease-ms``; sync/leases.py): how long a dead
    process's shards wait before the others take them over.
    """
    from gateway.config import load_config

    config = load_config(config_path)
    if not config.database_url:
        raise SystemExit(f"{config_path}: database_url is required to run the sync job")
    await run_worker(
        redis_url=config.redis_url,
        database_url=config.database_url,
        keyspace=KeySpace(config.key_prefix, config.shards),
        redis_timeout_s=config.redis_timeout_seconds,
        default_plan=config.default_plan,
        alerts=None if config.alerts is None else AlertDefaults.of(config.alerts),
        timezone=config.period.timezone,
        variable_features=config.variable_features,
        lease_ms=lease_ms,
    )
