"""Postgres CPU per event of each statement of the sync job's batch transaction, cold and warm.

    .venv/bin/python bench/sync_statements.py [--tree DIR] [--events 100000]
        [--batch 20000] [--rounds 2] [--shards 16]

The per-statement companion of bench/sync_throughput.py's CPU per event: a child process
(run with ``PYTHONPATH`` set to the tree under test, so its ``sync`` package and its
migrations are the ones measured) creates a throwaway database (``creditgate_bench_<hex>``,
dropped after), decodes ``--events`` v2 entries of bench/sync_throughput.py's
``Producer`` (5,000 orgs) with ``sync.batch.decode_entries`` and writes them with
``sync.writer.BatchWriter`` in batches of ``--batch`` on one pooled connection: the cold
pass (every key new), then the warm pass (the same keys again: ``warm_pass``). Around
every call the writer makes on the connection (``execute``, ``fetch``, ``fetchrow``,
``fetchval``, ``copy_to_table``), the backend's CPU time is read from
``/proc/<pid>/schedstat`` (nanoseconds on the CPU, so a statement's own time whatever the
machine's load does to its wall time) and charged to the statement, named by what its
SQL writes. Also printed: this process's CPU per event over the writes (the writer's
Python work and asyncpg's, not the decode). Redis is not involved.

``--shards N``: the events grouped by shard first (``crc32(org) % N``, as the worker
reads them: bench/sync_throughput.py's batches, each of one shard's ~N-th of the orgs, so
fewer rollup and snapshot rows per event than a batch over every org); 0 (the default):
batches over every org, as before.

The database is ``$CREDITGATE_BENCH_DB_PREFIX`` (default ``creditgate_bench``), ``_``,
random hex.

With ``--tree DIR`` (an older tree, ``git -C /work/main archive <base> | tar -x -C DIR``)
the children alternate: DIR, this tree, this tree, DIR, ... ``--rounds`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("CREDITGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = os.environ.get("CREDITGATE_BENCH_DB_PREFIX", "creditgate_bench")

# A statement's name: the first of these found in its SQL (order matters).
NAMES = (
    ("BEGIN", "begin"),
    ("COMMIT", "commit"),
    ("pg_advisory_xact_lock", "lock"),
    ("creditgate_usage_log_partition", "partitions"),
    ("lock_timeout", "partitions"),
    ("usage_daily_model", "model rollup"),
    ("WITH ORDINALITY AS p(org, day", "fresh days"),
    ("usage_daily_user", "rollup"),
    ("ins AS (", "orgs and new buckets"),
    ("INSERT INTO organizations", "orgs and placeholders"),
    ("UPDATE ai_tokens", "snapshots"),
    ("CREATE TEMP", "temp table"),
)


def _name(query: str) -> str:
    for needle, name in NAMES:
        if needle in query:
            return name
    return query.split(None, 2)[0].lower()


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _by_shard(events: list[dict[str, str]], shards: int) -> list[dict[str, str]]:
    """``events`` ordered by shard (stable), or as they are for 0 shards."""
    if not shards:
        return events
    from gateway.core.redis_keys import shard_of

    return sorted(events, key=lambda e: shard_of(e["o"], shards))


async def _child(events_n: int, batch: int, shards: int) -> dict[str, Any]:
    import asyncpg

    # After the tree's own packages: bench.sync_throughput puts this tree's root first.
    from bench.sync_throughput import Producer, make_events, warm_pass
    from gateway.core.events import packed
    from gateway.ledger.migrate import migrate
    from sync.batch import decode_entries
    from sync.records import Times
    from sync.worker import tune_gc
    from sync.writer import BatchWriter

    tune_gc()
    database = f"{DB_PREFIX}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + database
    per: dict[str, dict[str, int]] = {"cold": defaultdict(int), "warm": defaultdict(int)}
    client: dict[str, float] = {}
    try:
        await migrate(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        async with pool.acquire() as c:
            pid = c.get_server_pid()
        phase = "cold"
        conn_cls = asyncpg.connection.Connection
        originals = {}

        def timed(method: str) -> Any:
            original = getattr(conn_cls, method)
            originals[method] = original

            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                query = args[0] if args and isinstance(args[0], str) else ""
                name = "ledger COPY" if method == "copy_to_table" else _name(query)
                before = _cpu_ns(pid)
                try:
                    return await original(self, *args, **kwargs)
                finally:
                    per[phase][name] += _cpu_ns(pid) - before

            return wrapper

        for method in ("execute", "fetch", "fetchrow", "fetchval", "copy_to_table"):
            setattr(conn_cls, method, timed(method))
        writer = BatchWriter(pool, times=Times())
        producer = Producer(5000)
        cold = make_events(producer, events_n, int(time.time() * 1000))
        warm = warm_pass(producer, cold)
        for phase, events in (("cold", cold), ("warm", warm)):
            events = _by_shard(events, shards)
            decoded = [
                decode_entries(
                    [(f"{i}-0", [x for kv in packed(e).items() for x in kv]) for i, e in
                     enumerate(events[start:stop])],
                    Times(),
                ).rows
                for start, stop in _batches(events, batch, shards)
            ]  # fmt: skip
            started = time.process_time()
            for rows in decoded:
                await writer.write(rows, shard=0)
            client[phase] = time.process_time() - started
        for method, original in originals.items():
            setattr(conn_cls, method, original)
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    return {
        phase: {
            "statements": {k: v / 1000 / events_n for k, v in per[phase].items()},
            "client": client[phase] * 1e6 / events_n,
        }
        for phase in ("cold", "warm")
    }


def _batches(events: list[dict[str, str]], batch: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of ``events`` (shard-ordered if ``shards``): at most
    ``batch`` each, and never two shards in one (the worker reads one shard at a time)."""
    from gateway.core.redis_keys import shard_of

    shard = [shard_of(e["o"], shards) for e in events] if shards else [0] * len(events)
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(events) + 1):
        if i == len(events) or i - start == batch or shard[i] != shard[start]:
            out.append((start, i))
            start = i
    return out


def main(args: argparse.Namespace) -> None:
    trees = [("this", ROOT)]
    if args.tree:
        old = ("old", Path(args.tree).resolve())
        trees = [old, trees[0], trees[0], old]
    results: list[tuple[str, dict[str, Any]]] = []
    for _ in range(args.rounds):
        for name, tree in trees:
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child",
                 str(args.events), str(args.batch), str(args.shards)],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            got = json.loads(out.strip().splitlines()[-1])
            results.append((name, got))
            total = {p: sum(got[p]["statements"].values()) for p in ("cold", "warm")}
            print(f"{name}: Postgres cold {total['cold']:.1f}, warm {total['warm']:.1f} µs/event")
    print()
    for phase in ("cold", "warm"):
        names = sorted({k for _, r in results for k in r[phase]["statements"]})
        print(f"{phase}: Postgres CPU µs/event per statement (runs in order)")
        print(f"{'statement':24}" + "".join(f"{n:>9}" for n, _ in results))
        for stmt in names:
            cells = "".join(f"{r[phase]['statements'].get(stmt, 0):>9.2f}" for _, r in results)
            print(f"{stmt:24}{cells}")
        totals = "".join(f"{sum(r[phase]['statements'].values()):>9.2f}" for _, r in results)
        print(f"{'all statements':24}{totals}")
        print(
            f"{'client (writer) CPU':24}"
            + "".join(f"{r[phase]['client']:>9.2f}" for _, r in results)
        )
        print()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        shards = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        print(json.dumps(asyncio.run(_child(int(sys.argv[2]), int(sys.argv[3]), shards))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="an older tree: alternated with this one")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--shards", type=int, default=0)
    main(parser.parse_args())
