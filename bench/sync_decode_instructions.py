"""Instructions per event of the sync job's decode, v1 entries against v2, counted by valgrind.

    .venv/bin/python bench/sync_decode_instructions.py [--tree DIR] [--events 2000]

The load-independent companion of bench/sync_throughput.py's worker CPU per event: a child
process under callgrind (bench/callgrind.py) reads one shard's ``XREADGROUP`` reply from a
file (the bytes Redis sends, built here from bench/sync_throughput.py's ``Producer``:
charge events, ``fixed`` or with the usage fields), parses it with ``hiredis.Reader`` as
the worker's client does (gateway/redisio/link.py), decodes it (``decode_entries``) and
renders the ``COPY`` payload (``fast_payload``), the collector tuned as ``creditgate sync``
tunes it: the worker's per-event work before Postgres. Two runs per case, of ``--events``
and of a tenth of that; their difference over the events between is one event's
instructions, without the interpreter's start.
``--writer`` adds the writer's Python work on the decoded rows (sync/writer.py's fast path
before and between its statements: the snapshot and rollup reductions, the plans, the
packed parameters; ``_writer_work``), on the warm pass's events (the cold pass's keys
again, as bench/sync_throughput.py's steady state); ``--orgs 5000 --events 20000`` is that
bench's spread and batch.
Cases: v1 and v2 entries in this tree; with ``--tree DIR`` (an older tree, e.g.
``git archive 34eed0e``) its v1 decode too, the baseline, and with ``--tree-v2`` its v2
decode as well (a tree from 11d on). Printed: instructions per event
and the ratio to the baseline (the other tree's v1, else this tree's v1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bulk(value: str) -> bytes:
    raw = value.encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def reply_bytes(entries: list[dict[str, str]]) -> bytes:
    """The RESP2 reply of an ``XREADGROUP`` of one stream returning ``entries``."""
    out = [b"*1\r\n*2\r\n", _bulk("bench:{s0}:events"), b"*%d\r\n" % len(entries)]
    for i, fields in enumerate(entries):
        out.append(b"*2\r\n" + _bulk(f"1795469836271-{i}") + b"*%d\r\n" % (2 * len(fields)))
        out.extend(_bulk(x) for pair in fields.items() for x in pair)
    return b"".join(out)


def child(path: str, writer: bool = False) -> None:
    """Parse, decode and render the reply in ``path`` (the measured work); with ``writer``,
    also the writer's reductions and packed parameters (see ``--writer``)."""
    import hiredis

    from sync.batch import decode_entries
    from sync.records import Times, fast_payload
    from sync.worker import tune_gc

    tune_gc()  # the collector as `creditgate sync` sets it
    data = Path(path).read_bytes()
    reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
    reader.feed(data)
    reply = reader.gets()
    entries = reply[0][1]
    decoded = decode_entries(entries, Times())
    assert not decoded.bad and len(decoded.rows) == len(entries), decoded.bad[:1]
    rows = decoded.rows
    if getattr(rows, "clean", False):  # known by the compiled decode: as the writer passes it
        assert fast_payload(rows.lines, rows.empty_bucket, True) is not None
    else:
        assert fast_payload(rows.lines, rows.empty_bucket) is not None
    if writer:
        _writer_work(decoded.rows)


def _writer_work(rows: Any) -> None:
    """What sync/writer.py's fast path does in Python before and between its statements,
    for a steady state (every org known, so no organizations statement): the snapshot
    and rollup reductions, the plans where the tree computes them for known orgs too, and
    the packed parameters. Each tree's own functions; a tree that has ``orgs_of`` asks it
    first, as its writer does."""
    from sync import aggregate, sql
    from sync.records import ORG

    snaps = aggregate.snapshots(rows.flats)
    known = {f[ORG] for f in rows.flats}
    if hasattr(aggregate, "orgs_of"):
        plans = aggregate.plans(rows.flats) if aggregate.orgs_of(rows.flats) - known else {}
    else:
        plans = aggregate.plans(rows.flats)
    assert all(org in known for org in plans)
    roll = aggregate.rollups(rows.flats, rows.days)
    sql.statement("rollup", roll)
    sql.statement("snapshots", snaps)


def main(args: argparse.Namespace) -> None:
    from bench.callgrind import child_instructions
    from bench.sync_throughput import Producer, make_events, warm_pass
    from gateway.core.events import packed

    trees = [("this tree", ROOT)]
    if args.tree:
        trees.insert(0, ("--tree", Path(args.tree).resolve()))
    script = Path(__file__).resolve()
    counts = (args.events // 10, args.events)
    with tempfile.TemporaryDirectory(prefix="cg-syncdecode-") as tmp:
        results: list[tuple[str, str, str, float]] = []
        for kind in args.kinds:
            producer = Producer(args.orgs, usage=kind == "usage")
            events = make_events(producer, args.events, 1795469836271)
            if args.writer:  # the steady state: the same keys again (bench/sync_throughput.py)
                events = warm_pass(producer, events)
            for e in events:
                if "um" in e:
                    e["um"] = ""  # as settle.lua writes a usage that came ("1": it never did)
            files = {}
            for fmt in ("v1", "v2"):
                written = events if fmt == "v1" else [packed(e) for e in events]
                for n in counts:
                    f = Path(tmp) / f"{kind}-{fmt}-{n}.resp"
                    f.write_bytes(reply_bytes(written[:n]))
                    files[(fmt, n)] = f
            for name, tree in trees:
                formats = ("v1",) if name == "--tree" and not args.tree_v2 else ("v1", "v2")
                for fmt in ("v2",) if args.writer else formats:
                    t = time.monotonic()
                    extra = ["writer"] if args.writer else []
                    short, long = (
                        child_instructions(
                            tree, script, [str(files[(fmt, n)]), *extra], fixed_hash=True
                        )
                        for n in counts
                    )
                    per = (long - short) / (counts[1] - counts[0])
                    results.append((kind, name, fmt, per))
                    print(f"  {kind} {name} {fmt}: {per:,.0f} ({time.monotonic() - t:.0f} s)")
        print()
        print(f"Instructions per event (callgrind; {counts[1]} - {counts[0]} events)")
        print(f"{'events':8} {'tree':10} {'format':6} {'per event':>10} {'ratio':>7}")
        for kind, name, fmt, per in results:
            base = next(p for k, _, _, p in results if k == kind)
            print(f"{kind:8} {name:10} {fmt:6} {per:>10,.0f} {per / base:>7.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path.cwd()))  # the tree under test first
        child(sys.argv[2], writer=sys.argv[3:] == ["writer"])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="an older tree: its v1 decode is the baseline")
    parser.add_argument(
        "--tree-v2",
        action="store_true",
        help="the --tree's v2 decode too (a tree that reads v2: 11d on)",
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--kinds", nargs="+", default=["fixed", "usage"])
    parser.add_argument("--orgs", type=int, default=500, help="the Producer's orgs")
    parser.add_argument(
        "--writer",
        action="store_true",
        help="also the writer's Python work (reductions, packed parameters) on a warm pass",
    )
    main(parser.parse_args())
