"""What the cycle collector does per metered request, in process and behind uvicorn.

    .venv/bin/python bench/collector.py [--uvicorn] [--app metered|bare] [--orgs 1|64]

Drives the app of ``bench/instructions.py`` (the middleware, the real pipelined client, a
private Redis and Postgres; ``CG_BENCH_PORTS`` applies) with 64 concurrent tasks, in
process as ``bench/middleware_cpu.py`` does or through uvicorn's httptools protocol on an
in-memory transport (``bench/hotpath_parts.py``'s ``uv-*`` steps), and reports per 1,000
requests the collections of each generation (``gc.callbacks``), the CPU time spent in
them, and the objects a run with the collector off leaves as garbage (reference cycles).
The collector's own settings are left as a user's process has them: the middleware runs
inside the user's app, which we do not tune. CPU figures need alternating runs of the
trees compared (a loaded box moves them); the counts move only with the code.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUESTS = 6400


async def _run(redis_url: str, dsn: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, os.getcwd())  # the tree under test
    from bench.apps import bare_app, cg_app
    from bench.hotpath_parts import drive_uvicorn
    from bench.instructions import _hour_long_key_cache, _long_redis_timeout
    from bench.middleware_cpu import drive
    from bench.run_all import prepare

    settings = await prepare(Path(tempfile.mkdtemp(prefix="cg-gc-")), redis_url, dsn, 64)
    _hour_long_key_cache(Path(settings.config))
    _long_redis_timeout(Path(settings.config))
    one = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
    keys = one if args.orgs == 1 else [k for k in settings.keys if k not in one]
    app: Any = cg_app(settings, fast=True) if args.app == "metered" else bare_app()
    run: Any = drive_uvicorn if args.uvicorn else drive
    await run(app, keys, 640, 64)  # warm-up: caches, templates, seeded orgs
    if args.census:
        await _census(app, keys, run)
        return
    if args.tune:  # what `serve` does (README "The cycle collector"): the user's choice here
        gc.collect()
        gc.freeze()
        gc.set_threshold(2000, *gc.get_threshold()[1:])

    counts, seconds = [0, 0, 0], [0.0, 0.0, 0.0]
    started = [0.0]

    def observe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            counts[info["generation"]] += 1
            seconds[info["generation"]] += time.process_time() - started[0]

    gc.callbacks.append(observe)
    cpu = time.process_time()
    await run(app, keys, args.requests, 64)
    cpu = time.process_time() - cpu
    gc.callbacks.remove(observe)
    gc.collect()
    gc.disable()
    await run(app, keys, 640, 64)
    garbage = gc.collect()
    gc.enable()
    per_k = [round(c * 1000 / args.requests, 2) for c in counts]
    in_gc = sum(seconds)
    print(
        f"{args.app}{' behind uvicorn' if args.uvicorn else ' in process'}, {args.orgs} org(s)"
        f"{', collector tuned' if args.tune else ''}: "
        f"collections per 1,000 requests (gen 0/1/2) {per_k}; "
        f"CPU {cpu / args.requests * 1e6:.1f} µs/request, of it in collections "
        f"{in_gc / args.requests * 1e6:.2f} µs ({100 * in_gc / cpu:.1f} %; by generation "
        f"{[round(s / args.requests * 1e6, 2) for s in seconds]} µs); "
        f"garbage left by 640 requests with collection off: {garbage} objects"
    )


async def _census(app: Any, keys: list[str], run: Any) -> None:
    """Print the GC-tracked objects alive while the charges wait, by type, per waiting
    request: what the collector's young passes count and walk. Taken when a reply reaches
    the Redis connection with the most charges in flight of the run (the objects of the
    warm-up frozen first, the collector off, so what is left is what the run made)."""
    from collections import Counter

    from bench.apps import gate_of

    best: list[Any] = [0, Counter()]
    proto = gate_of(app).redis.runner.links[0].protocol

    class Watched:
        # uvloop keeps the protocol's bound data_received: the reader it calls is watched.
        def __init__(self, reader: Any) -> None:
            self.reader, self.gets = reader, reader.gets

        def feed(self, data: bytes) -> None:
            waiting = len(proto.pending)
            if waiting > best[0]:
                best[0] = waiting
                best[1] = Counter(_kind(o) for o in gc.get_objects())
            self.reader.feed(data)

    def _kind(obj: Any) -> str:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        code = getattr(obj, "cr_code", None) or getattr(obj, "__code__", None)
        if code is not None:
            name += f" {code.co_qualname}"
        return name

    gc.collect()
    gc.freeze()
    gc.disable()
    reader = proto.reader
    proto.reader = Watched(reader)
    try:
        await run(app, keys, 192, 64)
    finally:
        proto.reader = reader
        gc.enable()
        gc.unfreeze()
    waiting, counts = best
    total = sum(counts.values())
    print(
        f"GC-tracked objects alive with {waiting} charges waiting: {total} "
        f"({total / max(waiting, 1):.1f} per waiting request)"
    )
    for name, n in counts.most_common(40):
        print(f"  {n / max(waiting, 1):6.2f}  {n:6d}  {name}")


def main() -> None:
    """Parse the command line and run one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--uvicorn", action="store_true", help="behind uvicorn's protocol")
    parser.add_argument("--app", choices=("metered", "bare"), default="metered")
    parser.add_argument("--orgs", type=int, choices=(1, 64), default=1)
    parser.add_argument(
        "--tune", action="store_true", help="gc.freeze() and a first threshold of 2,000 first"
    )
    parser.add_argument(
        "--requests", type=int, default=REQUESTS, help="requests measured (a multiple of 64)"
    )
    parser.add_argument(
        "--census", action="store_true",
        help="the GC-tracked objects alive while the charges wait, by type, instead",
    )  # fmt: skip
    args = parser.parse_args()
    from bench.services import own_postgres, own_redis

    with own_redis(1) as redis, own_postgres(1) as pg:
        import uvloop

        uvloop.run(_run(redis.url, pg.url, args))


if __name__ == "__main__":
    main()
