"""Instructions per streamed event of ``creditgate serve``, counted by valgrind.

    .venv/bin/python bench/stream_instructions.py                              # this tree
    .venv/bin/python bench/stream_instructions.py --before /tmp/before-streams  # and another

bench/streams.py measures the server's CPU per event from /proc, which moves by ±10-20 %
with the machine's load (2 cores, shared). Callgrind's instruction counts do not: here
``creditgate serve`` runs under callgrind (user space only: the kernel's socket work, about
half of a stream's CPU, is not counted), in front of bench/streams.py's SSE upstream (one
OpenAI-shaped event every 20 ms per stream, then the usage, ``[DONE]``, the end) and its
client. For each route (``fixed``: ``cost: 1``; ``usage``: the usage read from the stream)
the counters are zeroed, ``--streams`` streams of ``--short`` events run, the counters
dumped; then the same with ``--long`` events. (long total - short total) / (streams x
(long - short)) is one event's cost, without the stream's setup and end.

The server must keep up (one upstream write per client read, as on a real machine): under
callgrind it is ~50x slower, so few streams at once (default 4: 200 events/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import PATH
from bench.services import ROOT, free_port, own_postgres, own_redis, stop_process
from bench.streams import CONFIG, USAGE_PATH, run_client

ROUTES = {"fixed": PATH, "usage": USAGE_PATH}
_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)


def _wait(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {timeout:g} s")


def _dump(pid: int, outdir: Path, keep: Path | None = None) -> int:
    """Dump callgrind's counters (which zeroes them) and return the dump's total; the dump
    is moved to ``keep`` (for callgrind_annotate), else deleted."""
    before = set(outdir.iterdir())
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(200):
        new = [p for p in set(outdir.iterdir()) - before if p.stat().st_size > 0]
        if new:
            time.sleep(0.3)  # let it finish writing
            found = _TOTALS.search(new[0].read_bytes())
            if found:
                if keep is None:
                    new[0].unlink()
                else:
                    shutil.move(new[0], keep)
                return int(found.group(1))
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def _stream(port: int, path: str, key: str, streams: int, events: int) -> None:
    result = run_client(port, path, key, streams, 0.2, events, 0.1)
    if result.get("errors"):
        raise RuntimeError(f"stream errors: {result.get('error_kinds')}")


def measure(
    tree: Path, config: str, key: str, args: argparse.Namespace, label: str
) -> dict[str, float]:
    """Instructions per event of each route, for ``creditgate serve`` from ``tree``."""
    port = free_port()
    outdir = Path(tempfile.mkdtemp(prefix="cg-stream-callgrind-"))
    creditgate = str(Path(sys.executable).parent / "creditgate")
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={outdir}/callgrind.out.%p",
            "--trace-children=no",
            sys.executable,
            creditgate,
            "serve",
            "--config",
            config,
            "--port",
            str(port),
            "--no-sync",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait(port, proc, 300)
        out: dict[str, float] = {}
        for name in args.routes:
            path = ROUTES[name]
            _stream(port, path, key, args.streams, args.short)  # warm-up
            totals = []
            for events in (args.short, args.long):
                _dump(proc.pid, outdir)  # zero
                _stream(port, path, key, args.streams, events)
                time.sleep(0.5)  # the settles after the last stream's end
                keep = None if args.keep is None else args.keep / f"{label}-{name}-{events}.out"
                totals.append(_dump(proc.pid, outdir, keep))
            out[name] = (totals[1] - totals[0]) / (args.streams * (args.long - args.short))
        return out
    finally:
        stop_process(proc)
        shutil.rmtree(outdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", type=Path, help="another creditgate source tree")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--short", type=int, default=20, help="events per stream, short run")
    parser.add_argument("--long", type=int, default=120, help="events per stream, long run")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    parser.add_argument(
        "--keep", type=Path, help="keep the dumps here, for callgrind_annotate (diagnosis)"
    )
    args = parser.parse_args()
    from bench.apps import Settings
    from bench.run_all import prepare

    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(own_redis(1))
        pg = stack.enter_context(own_postgres(1))
        workdir = Path(tempfile.mkdtemp(prefix="cg-stream-instr-"))
        stack.callback(shutil.rmtree, workdir, True)
        up_port = free_port()
        upstream = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "streams.py"),
                "upstream",
                "--port",
                str(up_port),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        stack.callback(stop_process, upstream)
        _wait(up_port, upstream, 20)
        template = (
            CONFIG.replace("@UPSTREAM@", f"http://127.0.0.1:{up_port}")
            .replace("{path}", PATH)
            .replace("{usage_path}", USAGE_PATH)
        )
        settings: Settings = asyncio.run(
            prepare(workdir, redis.url, pg.url, 0, config_template=template)
        )
        key = next(iter(settings.keys))
        trees = [("this tree", ROOT, "new")]
        if args.before is not None:
            trees.append((f"before ({args.before})", args.before, "before"))
        print(
            f"instructions per event (callgrind, user space; {args.streams} streams, "
            f"{args.long} - {args.short} events each; lower is better)"
        )
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        for label, tree, short in trees:
            figures = measure(tree, settings.config, key, args, short)
            shown = ", ".join(f"{name} {value:,.0f}" for name, value in figures.items())
            print(f"{label}: {shown}", flush=True)


if __name__ == "__main__":
    main()
