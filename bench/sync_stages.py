"""The sync worker's per-event work before Postgres, stage by stage, in CPU time.

    .venv/bin/python bench/sync_stages.py [--tree DIR] [--rounds 3] [--events 12500]
        [--orgs 312]

One shard's read as bench/sync_throughput.py makes it (``--events`` v2 entries of
``--orgs`` orgs: that bench's batch per shard, 200k events over 16 shards and 5,000 orgs),
parsed by hiredis as the worker's client does, then each step of sync/writer.py's fast
path timed on its own with ``time.thread_time`` (CPU time of this thread: on a loaded
machine far steadier than wall time): the decode, the org ordering and the reordered
lists, the ``COPY`` payload, the snapshot and rollup reductions, the plans (a cold batch's:
every org new), the packed parameters. Each stage 8 times per round, the median per event.
With ``--tree DIR`` (an older tree, e.g. ``git archive`` of main with its C extensions
compiled), each round runs it and this tree in turn, each in a child process of its own.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(events: int, orgs: int) -> None:
    """Time the stages in this process (the tree under test first on sys.path)."""
    import hiredis

    from bench.sync_decode_instructions import reply_bytes
    from bench.sync_throughput import Producer, make_events
    from gateway.core.events import packed
    from sync import aggregate, sql
    from sync.batch import decode_entries
    from sync.records import Times, fast_payload, in_order, org_order
    from sync.worker import tune_gc

    data = reply_bytes([packed(e) for e in make_events(Producer(orgs), events, 1795469836271)])
    tune_gc()  # the collector as `creditgate sync` sets it
    stages: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.thread_time()
        out = fn(*args)
        stages.setdefault(name, []).append(time.thread_time() - t0)
        return out

    def parse() -> Any:
        reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        reader.feed(data)
        return reader.gets()[0][1]

    def reorder(rows: Any, order: Any) -> tuple[Any, Any, Any]:
        return in_order(rows.flats, order), in_order(rows.days, order), in_order(rows.lines, order)

    def packed_parameters(roll: Any, snaps: Any) -> None:
        sql.statement("rollup", roll)
        sql.statement("insert_snapshots_plain", snaps)

    for _ in range(8):
        entries = timed("hiredis parse", parse)
        rows = timed("decode", decode_entries, entries, Times()).rows
        order = timed("org_order", org_order, rows.flats)
        flats, days, lines = timed("in_order (3 lists)", reorder, rows, order)
        timed("COPY payload", fast_payload, lines, rows.empty_bucket, rows.clean)
        snaps = timed("snapshots", aggregate.snapshots, flats, "UTC")
        timed("plans (cold)", aggregate.plans, rows.flats)
        roll = timed("rollups", aggregate.rollups, flats, days)
        timed("packed parameters", packed_parameters, roll, snaps)
    total = 0.0
    for name, times in stages.items():
        per = statistics.median(times) / events * 1e6
        total += per
        print(f"{name:20} {per:6.3f}")
    print(f"{'all':20} {total:6.3f}")


def main(args: argparse.Namespace) -> None:
    trees = ([("--tree", Path(args.tree).resolve())] if args.tree else []) + [("this", ROOT)]
    for round_ in range(args.rounds):
        for name, tree in trees:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(args.events),
                 str(args.orgs)],
                cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            print(f"round {round_ + 1}, {name} ({tree}): CPU µs per event")
            print(done.stdout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(Path.cwd()))  # the tree under test first
        child(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="an older tree, run in turn with this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=12_500)
    parser.add_argument("--orgs", type=int, default=312)
    main(parser.parse_args())
