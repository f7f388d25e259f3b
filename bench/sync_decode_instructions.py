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
Cases: v1 and v2 entries in this tree; with ``--tree DIR`` (an older tree, e.g.
``git archive 34eed0e``) its v1 decode too, the baseline. Printed: instructions per event
and the ratio to the baseline (the other tree's v1, else this tree's v1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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


def child(path: str) -> None:
    """Parse, decode and render the reply in ``path`` (the measured work)."""
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
    assert fast_payload(decoded.rows.lines, decoded.rows.empty_bucket) is not None


def main(args: argparse.Namespace) -> None:
    from bench.callgrind import child_instructions
    from bench.sync_throughput import Producer, make_events
    from gateway.core.events import packed

    trees = [("this tree", ROOT)]
    if args.tree:
        trees.insert(0, ("--tree", Path(args.tree).resolve()))
    script = Path(__file__).resolve()
    counts = (args.events // 10, args.events)
    with tempfile.TemporaryDirectory(prefix="cg-syncdecode-") as tmp:
        results: list[tuple[str, str, str, float]] = []
        for kind in args.kinds:
            events = make_events(Producer(500, usage=kind == "usage"), args.events, 1795469836271)
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
                for fmt in ("v1",) if name == "--tree" else ("v1", "v2"):
                    t = time.monotonic()
                    short, long = (
                        child_instructions(tree, script, [str(files[(fmt, n)])], fixed_hash=True)
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
        child(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", help="an older tree: its v1 decode is the baseline")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--kinds", nargs="+", default=["fixed", "usage"])
    main(parser.parse_args())
