"""Instructions per event of the whole sync worker process, cold and warm, by callgrind.

    .venv/bin/python bench/sync_worker_instructions.py [--tree DIR ...] [--events 200000]

The load-independent form of bench/sync_throughput.py's "worker CPU µs/event": the same
worker (``SyncWorker``, one process, ``max_batches_per_pass=1000``, 16 shards, 5,000 orgs)
draining the same pre-filled streams into a fresh database, but counted in instructions
by valgrind's callgrind rather than timed, so a tree can be compared with another on a
loaded machine. Everything the worker process does is in the count: the Redis reads and
acks (hiredis and the pipelined client), the decode and reductions, asyncpg's encoding of
the statements' parameters and its protocol, asyncio, the collector.

Per tree, three children over identical inputs (one events file, written once, and the
same ``PYTHONHASHSEED``), each in a fresh database with the cold events pre-filled:
``0`` sets up and XADDs the warm events; ``1`` drains the cold pass, then XADDs the warm
events; ``2`` drains both. ``1 - 0`` is the cold pass, ``2 - 1`` the warm pass (the same
keys again, as bench/sync_throughput.py's steady state). What depends on timing (how many
event-loop turns a reply takes to arrive, the batches' linger) is the only non-determinism
left: rerun a tree to see its spread.

``CG_CALLGRIND_KEEP=DIR`` keeps each child's profile (``callgrind_annotate --inclusive=yes``
per function; the difference of two children's per-function counts says where a pass's
instructions went).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if sys.argv[1:2] != ["--child"]:  # a child imports the tree under test (its PYTHONPATH) only
    sys.path.insert(0, str(ROOT))

ADMIN_DSN = os.environ.get("CREDITGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = os.environ.get("CREDITGATE_BENCH_DB_PREFIX", "creditgate_bench")
REDIS_URL = os.environ.get("CREDITGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")


async def _child(
    dsn: str, prefix: str, shards: int, phase: int, warm: list[dict[str, str]]
) -> None:
    """The measured process: a worker as bench/sync_throughput.py runs one; drains the
    cold pass if ``phase >= 1``, XADDs the warm events, drains them if ``phase >= 2``."""
    import asyncpg

    from gateway.core.events import packed
    from gateway.core.redis_keys import KeySpace
    from gateway.redisio.connect import connect_redis
    from sync.worker import SyncWorker, tune_gc

    # A long timeout: under callgrind on a loaded machine a reply can take long to be read.
    handles = connect_redis(REDIS_URL, timeout=600)
    redis = handles.client
    ks = KeySpace(prefix, shards)
    pool = await asyncpg.create_pool(dsn, min_size=5, max_size=5)
    tune_gc()

    async def drain(worker: SyncWorker) -> int:
        done = 0
        while True:
            result = await worker.run_once()
            done += result.acked
            if result.read == 0:
                return done

    def make() -> SyncWorker:
        return SyncWorker(
            redis=redis, pool=pool, keyspace=ks, batch_size=20_000, concurrency=4,
            max_batches_per_pass=1000,
        )  # fmt: skip

    worker = make()
    if phase >= 1:
        await drain(worker)
    for first in range(0, len(warm), 10_000):
        pipe = redis.pipeline(transaction=False)
        for e in warm[first : first + 10_000]:
            pipe.xadd(ks.shard(e["o"]).events, packed(e))
        await pipe.execute()
    if phase >= 2:
        await drain(worker)
    await worker.close()
    await pool.close()
    await handles.close()


async def _prepare(tree: Path, events: dict[str, Any], shards: int) -> tuple[str, str, str]:
    """A fresh database migrated by ``tree``'s migrations and a fresh key prefix with the
    cold events XADDed: (dsn, database, prefix)."""
    import asyncpg

    from bench.sync_throughput import dsn_for, xadd_all
    from gateway.core.redis_keys import KeySpace
    from gateway.redisio.connect import connect_redis

    database = f"{DB_PREFIX}_{uuid.uuid4().hex[:10]}"
    dsn = dsn_for(database)
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import asyncio; from gateway.ledger.migrate import migrate;"
        f" asyncio.run(migrate({dsn!r}))",
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
    )  # fmt: skip
    assert await proc.wait() == 0, "migrate failed"
    prefix = f"cgbenchwi{uuid.uuid4().hex[:8]}"
    handles = connect_redis(REDIS_URL, timeout=30)
    await xadd_all(handles.client, KeySpace(prefix, shards), events["cold"])
    await handles.close()
    return dsn, database, prefix


async def _cleanup(database: str, prefix: str) -> None:
    import asyncpg

    from bench.sync_throughput import cleanup_redis
    from gateway.redisio.connect import connect_redis

    handles = connect_redis(REDIS_URL, timeout=30)
    await cleanup_redis(handles.client, prefix)
    await handles.close()
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.close()


def main() -> None:
    from bench.callgrind import child_instructions
    from bench.sync_throughput import Producer, make_events, warm_pass

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="another tree (repeatable)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--orgs", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs per tree, alternating")
    parser.add_argument("--skip-this", action="store_true", help="only the --tree trees")
    args = parser.parse_args()

    producer = Producer(args.orgs)
    cold = make_events(producer, args.events, 1_796_000_000_000)
    warm = warm_pass(producer, cold)
    trees = [Path(t).resolve() for t in args.tree] + ([] if args.skip_this else [ROOT])
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="cg-syncwi-") as tmp:
        path = Path(tmp) / "events.json"
        path.write_text(json.dumps({"warm": warm}))
        data = {"cold": cold}
        for rep in range(args.repeat):
            for tree in trees:
                counts = []
                for phase in (0, 1, 2):
                    dsn, database, prefix = asyncio.run(_prepare(tree, data, args.shards))
                    try:
                        counts.append(
                            child_instructions(
                                tree, script,
                                [dsn, prefix, str(args.shards), str(phase), str(path)],
                                fixed_hash=True,
                            )
                        )  # fmt: skip
                    finally:
                        asyncio.run(_cleanup(database, prefix))
                n = args.events
                print(
                    f"{tree} run {rep + 1}: cold {(counts[1] - counts[0]) / n:,.0f},"
                    f" warm {(counts[2] - counts[1]) / n:,.0f} instructions/event"
                    f" (setup {counts[0]:,})",
                    flush=True,
                )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        dsn, prefix, shards, phase, events_path = sys.argv[2:7]
        warm = json.loads(Path(events_path).read_text())["warm"]
        asyncio.run(_child(dsn, prefix, int(shards), int(phase), warm))
    else:
        main()
