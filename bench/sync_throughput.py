"""Sync job throughput and lag, against the real Redis and Postgres.

    .venv/bin/python bench/sync_throughput.py [--events 500000] [--shards 16] [--orgs 5000]
        [--batch-size 20000] [--concurrency 4] [--processes 2] [--lag-rate 2000]
        [--lag-seconds 20] [--lag-only] [--usage-ab ROUNDS] [--entry-format v2]

1. Throughput: pre-fill the shard streams with ``--events`` events, then time one worker
   from start until every event is a committed ledger row and acked (rows/s). The worker
   runs in this process with the settings ``creditgate sync`` uses (``tune_gc``). Two
   passes, each timed on its own: **cold**, on a fresh ledger (every org, ``ai_tokens``
   row and rollup key is new: a first start), then **warm**, the steady state: the same
   keys again event for event (``warm_pass``: new event ids, later seqs, the same days),
   drained by the same worker, so everything it writes but the ledger rows is an update,
   as in a deployment that has run all day. Then the cold pass with ``--processes``
   worker processes at once (0 to skip), on a fresh ledger, with their CPU per event;
   they split the shards as ``creditgate sync`` processes do (sync/leases.py) before the
   clock starts.
2. The floors, in the same run and on the same rows (already decoded, so no Redis and no
   Python decoding), cold and warm the same way (the warm pass's rows written after the
   cold pass's into the same table, and timed apart; each phase's ratio is to its own
   floors), each at concurrency 1 and at the worker's concurrency: (a) per
   batch, binary COPY into a temp table + ``INSERT ... ON CONFLICT ... DO NOTHING`` into
   a fresh copy of ai_token_usage_log: the ledger's shape (partitioned by month, key
   (event_id, created_at), migration 0010) and the shape before 0010 (one table, primary
   key id, unique event_id); (b) a plain COPY into another fresh copy (the ledger's
   shape). The best of each is the ratio's denominator.
3. Lag: a producer process XADDs at ``--lag-rate`` events/s for ``--lag-seconds`` while the
   worker's poll loop runs; lag = commit time - event ts; reports p50/p99/max and the rate
   the producer reached (``--lag-only``: only this part, on a fresh database).

Each part also reports CPU µs per event of this process (the worker, or the floor's
client) and of the Postgres backends serving it (``CpuMeter``), and the floor's CPU per
event over the end-to-end run's: the ratio to read on a loaded machine, where rows/s
swing with everything else that runs.

``--usage-ab R`` instead: R rounds of (1) on fixed-cost events and then on events that carry
the usage fields of a usage-charged request (contract A8: hold, model, token counts, cost
source), each round's two on an emptied ledger, and the ratio of their rows/s.

The events are XADDed as the scripts write them: v2 entries (gateway/core/events.py), or
v1 field/value pairs with ``--entry-format v1`` (the format before; an older tree's bench
writes v1 only).

Uses a throwaway database (``creditgate_bench_<hex>``, or ``$CREDITGATE_BENCH_DB_PREFIX`` for
``creditgate_bench``; dropped after) on the server of
``$CREDITGATE_BENCH_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres) and a
unique key prefix on ``$CREDITGATE_BENCH_REDIS`` (default redis://127.0.0.1:6379/0), whose
keys are deleted after. The machine should be otherwise idle: the numbers are CPU-bound.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.services import cpu_seconds
from gateway.core.events import decode, packed
from gateway.core.redis_keys import KeySpace
from gateway.ledger.migrate import migrate
from gateway.redisio.connect import connect_redis
from sync.leases import assignment
from sync.records import LOG_COLUMNS, TS
from sync.worker import DEFAULT_BATCH_SIZE, SyncWorker, tune_gc

# How the events are written (gateway/core/events.py): v2 as the scripts write them, or v1.
ENTRY_FORMAT = "v2"
ADMIN_DSN = os.environ.get("CREDITGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
# The throwaway database's name: this, "_", random hex.
DB_PREFIX = os.environ.get("CREDITGATE_BENCH_DB_PREFIX", "creditgate_bench")
REDIS_URL = os.environ.get("CREDITGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
FEATURES = [
    ("lead_generation", 5),
    ("goal_generation", 3),
    ("strategy_analysis", 2),
    ("revenue_forecast", 4),
    ("general_insights", 1),
]
MODELS = ("gpt-4o-mini-2024-07-18", "gpt-4.1", "claude-sonnet-4-5", "gemini-2.5-flash", "o3")
# The ledger's types, by column (LOG_COLUMNS gives the order).
_TYPES = {
    "tokens_deducted": "bigint", "upstream_status": "integer", "latency_ms": "integer",
    "balance_after": "bigint", "extra_after": "bigint", "seq": "bigint",
    "created_at": "timestamptz",
}  # fmt: skip
LOG_TYPES = tuple(_TYPES.get(name, "text") for name in LOG_COLUMNS)


def dsn_for(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


class ServerState(NamedTuple):
    """Server-wide readings (every database): WAL position in MiB, WAL segment files,
    CPU seconds of the checkpointer, background writer and WAL writer, the last
    checkpoint's redo point, buffers written out by backends themselves."""

    wal_mb: float
    segments: int
    checkpointer: float
    redo: str
    backend_written: int


class ServerSpan(NamedTuple):
    """What the server did between a meter's ``start`` and ``stop``: WAL written (MiB),
    WAL segment files added (zero-filled by the backend that needed one, on its CPU,
    unless an old one was recycled), the background processes' CPU seconds (a checkpoint
    writing), whether a checkpoint completed, buffers backends had to write out
    themselves (the stats lag by up to a second)."""

    backends_system: float
    backends_faults: int
    wal_mb: float
    segments: int
    checkpointer: float
    checkpoint_done: bool
    backend_written: int

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"backends' system CPU {self.backends_system:.2f} s,"
            f" {self.backends_faults} minor faults,"
            f" WAL {self.wal_mb:.0f} MiB, +{self.segments} segment files,"
            f" checkpointer/bgwriter/walwriter CPU {self.checkpointer:.2f} s,"
            f" checkpoint completed: {'yes' if self.checkpoint_done else 'no'},"
            f" buffers written by backends {self.backend_written}"
        )


class CpuMeter:
    """CPU seconds used by this process plus the Postgres backends serving the bench
    database, between ``start`` and ``stop``: a load-robust measure on a shared machine.

    Wall-clock rates swing with whatever else runs on the machine; CPU time per event
    moves much less (it still rises somewhat with cache pressure). Backends are the
    ``client backend`` rows of ``pg_stat_activity`` for the database (their pids from
    there, CPU from ``/proc/<pid>/stat``); the pool should hold its connections open for
    the whole measurement (``min_size == max_size``), since the CPU of a backend that
    exits in between is not seen. A backend that appears in between counts from its start.
    Postgres's own background processes (WAL writer, checkpointer) serve every database
    on the server and are not counted in that figure; ``server`` gives them apart, with
    the WAL written and the segment files added (``ServerSpan``). With ``checkpoint``,
    ``start`` runs a ``CHECKPOINT`` before its readings: every measured phase (worker or
    floor) then starts from the same server state (clean shared buffers, a fresh redo
    point, old WAL segments to recycle) and no checkpoint begun before it runs into it.
    """

    def __init__(self, admin: asyncpg.Connection, database: str, checkpoint: bool = False) -> None:
        self._admin = admin
        self._database = database
        self.checkpoint = checkpoint
        self._base: dict[int, float] = {}
        self._proc0 = 0.0
        self._system0 = (0.0, 0)
        self._server0 = ServerState(0.0, 0, 0.0, "", 0)
        self.server = ServerSpan(0.0, 0, 0.0, 0, 0.0, False, 0)

    async def _backends(self) -> list[int]:
        rows = await self._admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            self._database,
        )
        return [r["pid"] for r in rows]

    @staticmethod
    def _cpu(pid: int) -> float | None:
        try:
            return cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            return None

    @staticmethod
    def _system(pids: list[int]) -> tuple[float, int]:
        """The kernel's share of these processes' CPU seconds so far (writes of WAL and
        of evicted buffers, WAL segment files zero-filled: what a checkpoint and the
        server's state change most), and their minor page faults (memory touched for the
        first time: shared buffers after a restart, a VM's pages handed back)."""
        total = faults = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += int(fields[12])
            faults += int(fields[7])
        return total / os.sysconf("SC_CLK_TCK"), faults

    async def start(self) -> None:
        """Take the starting readings (a CHECKPOINT first, if ``checkpoint``)."""
        if self.checkpoint:
            await self._admin.execute("CHECKPOINT")
        self._base = {}
        for pid in await self._backends():
            cpu = self._cpu(pid)
            if cpu is not None:
                self._base[pid] = cpu
        self._server0 = await self._server()
        self._system0 = self._system(list(self._base))
        self._proc0 = time.process_time()

    async def stop(self) -> tuple[float, float]:
        """(this process's CPU seconds, the backends' CPU seconds) since ``start``; the
        server's side of the same span in ``server``."""
        proc = time.process_time() - self._proc0
        backends = 0.0
        pids = await self._backends()
        for pid in pids:
            cpu = self._cpu(pid)
            if cpu is not None:
                backends += cpu - self._base.get(pid, 0.0)
        system, faults = self._system([p for p in pids if p in self._base])
        after = await self._server()
        self.server = ServerSpan(
            backends_system=system - self._system0[0],
            backends_faults=faults - self._system0[1],
            wal_mb=after.wal_mb - self._server0.wal_mb,
            segments=after.segments - self._server0.segments,
            checkpointer=after.checkpointer - self._server0.checkpointer,
            checkpoint_done=after.redo != self._server0.redo,
            backend_written=after.backend_written - self._server0.backend_written,
        )
        return proc, backends

    async def _server(self) -> ServerState:
        row = await self._admin.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 / 1048576 AS wal_mb,"
            " (SELECT count(*) FROM pg_ls_waldir()) AS segments,"
            " (SELECT redo_lsn::text FROM pg_control_checkpoint()) AS redo,"
            " (SELECT buffers_backend FROM pg_stat_bgwriter) AS backend_written,"
            " array(SELECT pid FROM pg_stat_activity WHERE backend_type IN"
            " ('checkpointer', 'background writer', 'walwriter')) AS aux"
        )
        aux = sum(self._cpu(pid) or 0.0 for pid in row["aux"])
        return ServerState(row["wal_mb"], row["segments"], aux, row["redo"], row["backend_written"])


class Producer:
    """Builds realistic charge events: per org a running seq and balance per bucket."""

    def __init__(self, orgs: int, seed: int = 1, usage: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.usage = usage  # events of usage-charged requests: the A8 fields too
        self.orgs = [f"org{i:05d}" for i in range(orgs)]
        self.seq = dict.fromkeys(self.orgs, 0)
        self.bal: dict[tuple[str, str], int] = {}

    def event(self, ts_ms: int) -> dict[str, str]:
        org = self.rng.choice(self.orgs)
        bucket, cost = self.rng.choice(FEATURES)
        usage: dict[str, str] = {}
        if self.usage:
            # What settle.lua writes for a cost read from the call (contract A8): the hold,
            # the model and the four counts; the charge is the actual.
            model = self.rng.choice(MODELS)
            ui, uo = self.rng.randrange(50, 4000), self.rng.randrange(10, 1500)
            uc, ur = self.rng.choice((0, 0, ui // 2)), self.rng.choice((0, 0, uo // 3))
            cost = 1 + (ui + uc // 2 + 4 * (uo + ur)) // 1000
            usage = {
                "rs": str(cost + self.rng.randrange(0, 20)), "ov": "0", "mdl": model,
                "ui": str(ui), "uc": str(uc), "uo": str(uo), "ur": str(ur), "cs": "usage",
                "um": "0",
            }  # fmt: skip
        self.seq[org] += 1
        bal = self.bal.get((org, bucket), 1_000_000) - cost
        self.bal[(org, bucket)] = bal
        rid = uuid.uuid4().hex
        return {
            "id": rid,
            "k": "charge",
            "o": org,
            "u": f"user{self.rng.randrange(20)}",
            "f": bucket,
            "b": bucket,
            "t": str(cost),
            "bal": str(bal),
            "x": "0",
            "a": "1000000",
            "used": str(1_000_000 - bal),
            "per": "2026-11",
            "s": str(self.seq[org]),
            "ts": str(ts_ms),
            "rq": rid,
            "st": "200",
            "lat": "42",
            "m": "POST",
            "r": f"/api/v1/{bucket}",
            "p": "enterprise",
            "ref": "",
            **usage,
        }


def log_record(fields: dict[str, str]) -> tuple[Any, ...]:
    """The ledger row of an event, as Python values (what a binary COPY sends), in the
    order of ``LOG_COLUMNS``."""
    ev = decode(fields)
    row = {
        "event_id": ev.event_id, "organization_id": ev.org, "user_id": ev.user,
        "feature_used": ev.feature, "token_type": ev.bucket, "tokens_deducted": ev.tokens,
        "kind": ev.kind, "request_id": ev.request_id, "method": ev.method, "route": ev.route,
        "upstream_status": ev.upstream_status, "latency_ms": ev.latency_ms,
        "balance_after": ev.balance_after, "extra_after": ev.extra_after, "seq": ev.seq or 0,
        "plan": ev.plan, "reference": ev.reference, "created_at": ev.created_at,
    }  # fmt: skip
    return tuple(row[name] for name in LOG_COLUMNS)


def make_events(producer: Producer, n: int, start: int) -> list[dict[str, str]]:
    """``n`` events of ``producer``, timestamps spread from ``start`` as if produced at 100k
    events/s."""
    return [producer.event(start + i // 100) for i in range(n)]


def written(fields: dict[str, str]) -> dict[str, str]:
    """The entry as the scripts write it: v2 (``--entry-format``, the default), else v1."""
    return packed(fields) if ENTRY_FORMAT == "v2" else fields


async def xadd_all(redis: Any, ks: KeySpace, events: list[dict[str, str]]) -> None:
    """XADD ``events`` to their shards' streams, 10,000 per pipeline."""
    for first in range(0, len(events), 10_000):
        pipe = redis.pipeline(transaction=False)
        for e in events[first : first + 10_000]:
            pipe.xadd(ks.shard(e["o"]).events, written(e))
        await pipe.execute()


async def prefill(
    redis: Any, ks: KeySpace, n: int, orgs: int, usage: bool = False
) -> list[dict[str, str]]:
    """XADD ``n`` events (``usage``: with the A8 usage fields); their timestamps spread as
    if produced at 100k events/s."""
    producer = Producer(orgs, usage=usage)
    events = make_events(producer, n, int(time.time() * 1000) - n // 100)
    await xadd_all(redis, ks, events)
    return events


def warm_pass(producer: Producer, cold: list[dict[str, str]]) -> list[dict[str, str]]:
    """The steady-state pass: the cold pass's keys again, event for event (the same org,
    bucket, feature, user and timestamp, so the same UTC day), with new event ids and the
    orgs' seqs and balances continuing after the cold pass. Written after the cold pass,
    it finds every ``ai_tokens`` row, every org and every rollup key there already, as a
    deployment that has run all day does (its writes are updates, not insertions)."""
    producer.rng = random.Random(producer.seed)
    return [producer.event(int(e["ts"])) for e in cold]


async def drain(worker: SyncWorker, owned_only: bool = False) -> int:
    """Passes until one reads nothing (of the shards the worker owns, if ``owned_only``);
    returns the entries acked."""
    done = 0
    while True:
        result = await worker.run_once(owned_only=owned_only)
        done += result.acked
        if result.read == 0:
            return done


async def run_throughput(
    redis: Any,
    pool: asyncpg.Pool,
    ks: KeySpace,
    n: int,
    args: argparse.Namespace,
    meter: CpuMeter | None = None,
    worker: SyncWorker | None = None,
    total_rows: int | None = None,
) -> tuple[float, SyncWorker, tuple[float, float]]:
    """Drain ``n`` pre-filled events with one worker in this process (``worker``: go on
    with that one, as a long-running worker would; ``total_rows``: the ledger's rows
    expected after, default ``n``): (seconds, the worker, the CPU seconds of this process
    and of the Postgres backends if ``meter``)."""
    if worker is None:
        worker = SyncWorker(
            redis=redis,
            pool=pool,
            keyspace=ks,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            max_batches_per_pass=1000,
        )
    if meter is not None:
        await meter.start()
    started = time.perf_counter()
    await drain(worker)
    elapsed = time.perf_counter() - started
    cpu = await meter.stop() if meter is not None else (0.0, 0.0)
    await worker.close()
    async with pool.acquire() as c:
        rows = await c.fetchval("SELECT count(*) FROM ai_token_usage_log")
    expected = n if total_rows is None else total_rows
    assert rows == expected, f"{rows} rows, {expected} expected"
    return elapsed, worker, cpu


def _process_worker(
    dsn: str, prefix: str, shards: int, args: Any, events: Any, cpu_out: Any
) -> None:
    ready, go, done, release = events

    async def main() -> None:
        tune_gc()
        handles = connect_redis(REDIS_URL, timeout=30)
        pool = await asyncpg.create_pool(dsn, min_size=args.concurrency, max_size=args.concurrency)
        worker = SyncWorker(
            redis=handles.client,
            pool=pool,
            keyspace=KeySpace(prefix, shards),
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            max_batches_per_pass=1000,
        )
        for shard in worker._shards:  # connect and create groups before the clock starts
            await worker._ensure_group(shard)
        # Split the shards as `creditgate sync` processes do (sync/leases.py), also before
        # the clock starts: until every process is a member and owns its share.
        leases = worker._leases
        assert leases is not None
        while True:
            owned = await worker.own_shards()
            members = leases.members
            if len(members) == args.processes and set(owned) == assignment(
                members, worker.consumer, shards
            ):
                break
            await asyncio.sleep(0.05)
        ready.set()
        await asyncio.to_thread(go.wait)
        cpu0 = time.process_time()
        await drain(worker, owned_only=True)
        cpu_out.put(time.process_time() - cpu0)
        # Keep the pool's backends alive until the parent has read their CPU time.
        done.set()
        await asyncio.to_thread(release.wait)
        await worker.release_shards()
        await worker.close()
        await pool.close()
        await handles.close()

    asyncio.run(main())


async def run_processes(
    dsn: str, ks: KeySpace, n: int, args: argparse.Namespace, meter: CpuMeter
) -> tuple[float, tuple[float, float]]:
    """Drain with ``--processes`` worker processes at once: (seconds, CPU seconds of the
    worker processes and of their Postgres backends)."""
    ctx = multiprocessing.get_context("spawn")
    go, release = ctx.Event(), ctx.Event()
    cpu_out = ctx.Queue()
    signals = [(ctx.Event(), go, ctx.Event(), release) for _ in range(args.processes)]
    procs = [
        ctx.Process(target=_process_worker, args=(dsn, ks.prefix, ks.shards, args, e, cpu_out))
        for e in signals
    ]
    for p in procs:
        p.start()
    for ready, _, _, _ in signals:
        await asyncio.to_thread(ready.wait)
    await meter.start()
    started = time.perf_counter()
    go.set()
    for _, _, done, _ in signals:
        await asyncio.to_thread(done.wait)
    elapsed = time.perf_counter() - started
    _, backends = await meter.stop()
    workers = sum(cpu_out.get() for _ in procs)
    release.set()
    for p in procs:
        await asyncio.to_thread(p.join)
    return elapsed, (workers, backends)


async def _floor_table(c: asyncpg.Connection, table: str, shape: str) -> str:
    """A fresh, empty copy of the ledger; returns its ON CONFLICT target."""
    await c.execute(f"DROP TABLE IF EXISTS {table}")
    like = "LIKE ai_token_usage_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
    if shape == "unpartitioned":  # the ledger before migration 0010
        await c.execute(f"CREATE TABLE {table} ({like})")
        await c.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id), ADD UNIQUE (event_id)")
        await c.execute(f"CREATE INDEX ON {table} (organization_id, created_at DESC, id DESC)")
        return "(event_id)"
    await c.execute(f"CREATE TABLE {table} ({like}) PARTITION BY RANGE (created_at)")
    await c.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (event_id, created_at)")
    await c.execute(f"CREATE INDEX ON {table} (organization_id, created_at DESC, id DESC)")
    parts = await c.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'ai_token_usage_log'::regclass AND c.relkind = 'r'"
    )
    for part in parts:
        name = table + part["relname"].removeprefix("ai_token_usage_log")
        await c.execute(f"CREATE TABLE {name} PARTITION OF {table} {part['bound']}")
    return "(event_id, created_at)"


async def floor(
    pool: asyncpg.Pool,
    phases: list[list[tuple[Any, ...]]],
    batch: int,
    concurrency: int,
    mode: str,
    shape: str = "partitioned",
    meter: CpuMeter | None = None,
    fresh_dsn: str | None = None,
) -> list[tuple[float, tuple[float, float]]]:
    """Write each phase's records into one fresh copy of the log, the bare way, one phase
    after the other (the second finds the first's rows there: the steady state's ledger);
    per phase, the seconds and the CPU seconds of this process and of the Postgres
    backends if ``meter``. With ``fresh_dsn``, on connections of its own opened before the
    first phase, as the worker's cold pass starts on new ones (a backend's first touch of
    each shared buffer page costs it a page fault: section 11j); else on ``pool``'s."""
    table = f"floor_{mode}_{shape}_{concurrency}"
    async with pool.acquire() as c:
        target = await _floor_table(c, table, shape)
    own = None
    if fresh_dsn is not None:
        own = await asyncpg.create_pool(fresh_dsn, min_size=concurrency, max_size=concurrency)
    writers = own if own is not None else pool
    cols = ", ".join(LOG_COLUMNS)
    shape_sql = ", ".join(f"{c} {t}" for c, t in zip(LOG_COLUMNS, LOG_TYPES, strict=True))
    out: list[tuple[float, tuple[float, float]]] = []
    for records in phases:
        batches = [records[i : i + batch] for i in range(0, len(records), batch)]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(batches)):
            queue.put_nowait(i)

        async def one(
            batches: list[list[tuple[Any, ...]]] = batches,
            queue: asyncio.Queue[int] = queue,
        ) -> None:
            async with writers.acquire() as c:
                while not queue.empty():
                    i = queue.get_nowait()
                    if mode == "copy":
                        await c.copy_records_to_table(
                            table, records=batches[i], columns=LOG_COLUMNS
                        )
                        continue
                    async with c.transaction():
                        await c.execute(f"CREATE TEMP TABLE floor_in ({shape_sql}) ON COMMIT DROP")
                        await c.copy_records_to_table(
                            "floor_in", records=batches[i], columns=LOG_COLUMNS
                        )
                        await c.execute(
                            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM floor_in"
                            f" ON CONFLICT {target} DO NOTHING"
                        )

        if meter is not None:
            await meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = await meter.stop() if meter is not None else (0.0, 0.0)
        if meter is not None:
            SPANS.append((f"{table}", meter.server))
        out.append((elapsed, cpu))
    if own is not None:
        await own.close()
    async with pool.acquire() as c:
        count = await c.fetchval(f"SELECT count(*) FROM {table}")
        await c.execute(f"DROP TABLE {table}")
    assert count == sum(len(p) for p in phases)
    return out


def _produce(
    url: str, prefix: str, shards: int, rate: int, seconds: float, orgs: int, fmt: str
) -> None:
    global ENTRY_FORMAT
    ENTRY_FORMAT = fmt
    import redis as sync_redis

    ks = KeySpace(prefix, shards)
    client = sync_redis.Redis.from_url(url)
    producer = Producer(orgs, seed=2)
    tick = 0.005
    sent = 0
    start = time.perf_counter()
    next_at = start
    while (elapsed := time.perf_counter() - start) < seconds:
        # What is owed by now, from the clock (not per tick): on a loaded machine a late
        # tick sends more, so the rate holds as long as this process gets the CPU for it.
        owed = int(rate * elapsed) - sent
        pipe = client.pipeline(transaction=False)
        for _ in range(owed):
            e = producer.event(int(time.time() * 1000))
            pipe.xadd(ks.shard(e["o"]).events, written(e))
        pipe.execute()
        sent += max(owed, 0)
        next_at += tick
        time.sleep(max(0.0, next_at - time.perf_counter()))
    client.close()


async def run_lag(
    redis: Any, pool: asyncpg.Pool, ks: KeySpace, args: argparse.Namespace
) -> list[float]:
    worker = SyncWorker(
        redis=redis,
        pool=pool,
        keyspace=ks,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    lags: list[float] = []
    real_write = worker._writer.write

    async def timed_write(rows: Any, **kw: Any) -> Any:
        result = await real_write(rows, **kw)
        now = time.time()
        lags.extend(now - int(f[TS]) / 1000 for f in rows.flats)
        return result

    worker._writer.write = timed_write  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_produce,
        args=(
            REDIS_URL,
            ks.prefix,
            ks.shards,
            args.lag_rate,
            args.lag_seconds,
            args.orgs,
            ENTRY_FORMAT,
        ),
    )
    proc.start()
    await asyncio.to_thread(proc.join)
    await asyncio.sleep(1.0)
    worker.stop()
    await task
    return lags


async def measure_lag(
    redis: Any, pool: asyncpg.Pool, ks: KeySpace, args: argparse.Namespace, meter: CpuMeter
) -> None:
    """Print the sync lag at ``--lag-rate`` events/s (the rate reached too: the producer
    shares the machine) and the CPU per event of the worker and its Postgres backends."""
    await meter.start()
    lags = await run_lag(redis, pool, ks, args)
    lag_cpu = await meter.stop()
    lags_ms = sorted(x * 1000 for x in lags)
    p = statistics.quantiles(lags_ms, n=100)
    print(
        f"\nlag at {args.lag_rate} events/s for {args.lag_seconds} s "
        f"({len(lags_ms)} events, {len(lags_ms) / args.lag_seconds:,.0f}/s):"
        f" p50 {p[49]:.1f} ms, p99 {p[98]:.1f} ms, "
        f"max {lags_ms[-1]:.1f} ms; CPU us/event: worker"
        f" {lag_cpu[0] / len(lags_ms) * 1e6:.1f}, Postgres backends"
        f" {lag_cpu[1] / len(lags_ms) * 1e6:.1f}; load average {os.getloadavg()[0]:.2f};"
        f" server: {meter.server.describe()}"
    )


async def cleanup_redis(redis: Any, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        await redis.delete(key)


PHASES = ("cold", "warm")


def table(
    rows: list[tuple[str, str, float]],
    insert_floor: dict[str, float],
    copy_floor: dict[str, float],
) -> str:
    """A Markdown table: rows/s of each (name, phase) and its ratio to the same phase's
    best floors."""
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"| {'measured in this run':<{width}} | phase |    rows/s | vs COPY+INSERT floor"
        " | vs plain COPY |",
        f"|{'-' * (width + 2)}|-------|----------:|---------------------:|--------------:|",
    ]
    for name, phase, rate in rows:
        lines.append(
            f"| {name:<{width}} | {phase:<5} | {rate:>9,.0f}"
            f" | {rate / insert_floor[phase]:>19.2f}x | {rate / copy_floor[phase]:>12.2f}x |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[tuple[str, str, int, tuple[float, float]]]) -> str:
    """A Markdown table: CPU µs per event of the client (the worker, or the floor's
    client) and of the Postgres backends for each (name, phase, events, CPU seconds), and
    the ratio of the same phase's cheapest COPY + INSERT floor's total to each row's (the
    load-robust counterpart of the rows/s ratio)."""

    def per_event(n: int, cpu: tuple[float, float]) -> tuple[float, float, float]:
        return cpu[0] / n * 1e6, cpu[1] / n * 1e6, (cpu[0] + cpu[1]) / n * 1e6

    cheapest = {
        phase: min(
            per_event(n, c)[2] for name, ph, n, c in rows if ph == phase and "INSERT" in name
        )
        for phase in PHASES
    }
    width = max(len(name) for name, _, _, _ in rows)
    lines = [
        f"| {'CPU us/event':<{width}} | phase | client | Postgres | total | floor/this |",
        f"|{'-' * (width + 2)}|-------|-------:|---------:|------:|-----------:|",
    ]
    for name, phase, n, cpu in rows:
        client, backends, total = per_event(n, cpu)
        lines.append(
            f"| {name:<{width}} | {phase:<5} | {client:>6.1f} | {backends:>8.1f} | {total:>5.1f}"
            f" | {cheapest[phase] / total:>9.2f}x |"
        )
    return "\n".join(lines)


async def usage_ab(redis: Any, pool: asyncpg.Pool, prefix: str, args: argparse.Namespace) -> None:
    """``--usage-ab R``: R rounds of the 1-process throughput on fixed-cost events, then on
    events with usage fields (model, counts, hold: a per-model rollup too), each on an
    emptied ledger; rows/s and the ratio per round, and their median."""
    ratios: list[float] = []
    for round_ in range(args.usage_ab):
        rates: dict[bool, float] = {}
        for usage in (False, True):
            ks = KeySpace(f"{prefix}ab{round_}{int(usage)}", args.shards)
            async with pool.acquire() as c:
                await c.execute(
                    "TRUNCATE ai_token_usage_log, usage_daily_user, usage_daily_feature,"
                    " usage_daily_model, ai_tokens,"
                    " organizations CASCADE"
                )
            await prefill(redis, ks, args.events, args.orgs, usage=usage)
            try:
                elapsed, _, _ = await run_throughput(redis, pool, ks, args.events, args)
            finally:
                await cleanup_redis(redis, ks.prefix)
            rates[usage] = args.events / elapsed
        ratios.append(rates[True] / rates[False])
        print(
            f"  round {round_ + 1}: fixed {rates[False]:,.0f} rows/s, with usage fields"
            f" {rates[True]:,.0f} rows/s, ratio {ratios[-1]:.2f};"
            f" load average {os.getloadavg()[0]:.2f}"
        )
    print(f"  median ratio {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")


# What the server did in each measured span (name, span), printed after the tables.
SPANS: list[tuple[str, ServerSpan]] = []


def report_pass(
    phase: str, n: int, elapsed: float, cpu: tuple[float, float], worker: SyncWorker
) -> None:
    print(
        f"  1 process, {phase}: {elapsed:.2f} s; worker CPU {cpu[0]:.2f} s"
        f" ({cpu[0] / elapsed:.0%} of a core, {cpu[0] / n * 1e6:.1f} us/event);"
        f" Postgres backends {cpu[1] / n * 1e6:.1f} us/event; fast-path fallbacks:"
        f" {worker._writer.fallbacks}; load average {os.getloadavg()[0]:.2f}"
    )


async def main(args: argparse.Namespace) -> None:
    database = f"{DB_PREFIX}_{uuid.uuid4().hex[:10]}"
    dsn = dsn_for(database)
    handles = connect_redis(REDIS_URL, timeout=30)
    redis = handles.client
    ks = KeySpace(f"cgbench{uuid.uuid4().hex[:8]}", args.shards)
    multi_ks = KeySpace(ks.prefix + "mp", args.shards)
    lag_ks = KeySpace(ks.prefix + "lag", args.shards)
    admin = await asyncpg.connect(ADMIN_DSN)
    pool: asyncpg.Pool | None = None
    try:
        await migrate(dsn)
        # Every connection open from the start: the CPU meter sees all their backends.
        size = args.concurrency + 1
        pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
        print(
            f"{args.events:,} events, {args.shards} shards, {args.orgs} orgs, batch"
            f" {args.batch_size}, concurrency {args.concurrency};"
            f" load average {os.getloadavg()[0]:.2f}"
        )
        if args.lag_only:
            await measure_lag(
                redis, pool, lag_ks, args, CpuMeter(admin, database, not args.no_checkpoint)
            )
            return
        t = time.perf_counter()
        producer = Producer(args.orgs)
        events = make_events(producer, args.events, int(time.time() * 1000) - args.events // 100)
        await xadd_all(redis, ks, events)
        # The garbage collector as `creditgate sync` sets it (this also keeps it from
        # rescanning the pre-filled events, kept in memory for the floors).
        tune_gc()
        print(f"  XADD: {args.events / (time.perf_counter() - t):,.0f} events/s")
        if args.usage_ab:
            await cleanup_redis(redis, ks.prefix)
            tune_gc()
            await usage_ab(redis, pool, ks.prefix, args)
            return

        meter = CpuMeter(admin, database, checkpoint=not args.no_checkpoint)
        n = args.events
        rates: list[tuple[str, str, float]] = []
        cpus: list[tuple[str, str, int, tuple[float, float]]] = []
        headline = "end-to-end sync, 1 worker process (headline)"
        # Cold: a fresh ledger; every org, bucket and rollup key is new.
        elapsed, worker, e2e_cpu = await run_throughput(redis, pool, ks, n, args, meter)
        report_pass("cold", n, elapsed, e2e_cpu, worker)
        SPANS.append(("end-to-end, cold", meter.server))
        rates.append((headline, "cold", n / elapsed))
        cpus.append((headline, "cold", n, e2e_cpu))
        # Warm (the steady state): the same keys again with the same worker.
        warm_events = warm_pass(producer, events)
        await xadd_all(redis, ks, warm_events)
        elapsed, worker, e2e_cpu = await run_throughput(
            redis, pool, ks, n, args, meter, worker=worker, total_rows=2 * n
        )
        report_pass("warm", n, elapsed, e2e_cpu, worker)
        SPANS.append(("end-to-end, warm", meter.server))
        rates.append((headline, "warm", n / elapsed))
        cpus.append((headline, "warm", n, e2e_cpu))
        if args.processes > 0:
            async with pool.acquire() as c:
                await c.execute(
                    "TRUNCATE ai_token_usage_log, usage_daily_user,"
                    " usage_daily_feature, ai_tokens, organizations CASCADE"
                )
            await xadd_all(redis, multi_ks, events)
            secs, multi_cpu = await run_processes(dsn, multi_ks, n, args, meter)
            async with pool.acquire() as c:
                count = await c.fetchval("SELECT count(*) FROM ai_token_usage_log")
            assert count == n, f"{count} rows for {n} events"
            name = f"end-to-end sync, {args.processes} worker processes"
            rates.append((name, "cold", n / secs))
            cpus.append((name, "cold", n, multi_cpu))
            print(
                f"  {args.processes} processes (cold): {secs:.2f} s; CPU us/event: workers"
                f" {multi_cpu[0] / n * 1e6:.1f}, Postgres {multi_cpu[1] / n * 1e6:.1f};"
                f" load average {os.getloadavg()[0]:.2f}"
            )

        phases = [[log_record(e) for e in events], [log_record(e) for e in warm_events]]
        del events, warm_events
        insert_floor = dict.fromkeys(PHASES, 0.0)
        copy_floor = dict.fromkeys(PHASES, 0.0)
        for mode, shape in (("insert", "partitioned"), ("insert", "unpartitioned"),
                            ("copy", "partitioned")):  # fmt: skip
            for conc in sorted({1, args.concurrency}):
                what = (
                    "floor: COPY to temp + INSERT ON CONFLICT" if mode == "insert" else "plain COPY"
                )
                name = f"{what}, {shape}, concurrency {conc}"
                runs = await floor(
                    pool, phases, args.batch_size, conc, mode, shape, meter,
                    fresh_dsn=None if args.warm_floor_connections else dsn,
                )  # fmt: skip
                for phase, (secs, cpu) in zip(PHASES, runs, strict=True):
                    rate = n / secs
                    best = insert_floor if mode == "insert" else copy_floor
                    # The best floor of either shape: the ratio never flatters the worker.
                    best[phase] = max(best[phase], rate)
                    rates.append((name, phase, rate))
                    cpus.append((name, phase, n, cpu))
        print()
        print(table(rates, insert_floor, copy_floor))
        print(f"load average {os.getloadavg()[0]:.2f} after the floors")
        print()
        print(cpu_table(cpus))
        print()
        print("server side of each span (the floors: cold, then warm):")
        for name, span in SPANS:
            print(f"  {name}: {span.describe()}")

        if args.lag_seconds > 0:
            await measure_lag(redis, pool, lag_ks, args, meter)
    finally:
        if pool is not None:
            await pool.close()
        for prefix in (ks.prefix, multi_ks.prefix, lag_ks.prefix):
            await cleanup_redis(redis, prefix)
        await handles.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--orgs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--lag-rate", type=int, default=2000)
    parser.add_argument("--lag-seconds", type=float, default=20)
    parser.add_argument(
        "--lag-only", action="store_true", help="only the lag run (no pre-fill, no floors)"
    )
    parser.add_argument(
        "--usage-ab",
        type=int,
        default=0,
        help="only compare fixed-cost events with usage-field events, this many rounds",
    )
    parser.add_argument(
        "--warm-floor-connections",
        action="store_true",
        help="the floors on the pool the worker used (the method before 11j)",
    )
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="no CHECKPOINT before each measured phase (the method before 11j)",
    )
    parser.add_argument(
        "--entry-format",
        choices=("v1", "v2"),
        default="v2",
        help="stream entries as the scripts write them (v2) or as before (v1)",
    )
    parsed = parser.parse_args()
    ENTRY_FORMAT = parsed.entry_format
    asyncio.run(main(parsed))
