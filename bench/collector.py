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
    await run(app, keys, REQUESTS, 64)
    cpu = time.process_time() - cpu
    gc.callbacks.remove(observe)
    gc.collect()
    gc.disable()
    await run(app, keys, 640, 64)
    garbage = gc.collect()
    gc.enable()
    per_k = [round(c * 1000 / REQUESTS, 1) for c in counts]
    in_gc = sum(seconds)
    print(
        f"{args.app}{' behind uvicorn' if args.uvicorn else ' in process'}, {args.orgs} org(s)"
        f"{', collector tuned' if args.tune else ''}: "
        f"collections per 1,000 requests (gen 0/1/2) {per_k}; "
        f"CPU {cpu / REQUESTS * 1e6:.1f} µs/request, of it in collections "
        f"{in_gc / REQUESTS * 1e6:.2f} µs ({100 * in_gc / cpu:.1f} %); "
        f"garbage left by 640 requests with collection off: {garbage} objects"
    )


def main() -> None:
    """Parse the command line and run one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--uvicorn", action="store_true", help="behind uvicorn's protocol")
    parser.add_argument("--app", choices=("metered", "bare"), default="metered")
    parser.add_argument("--orgs", type=int, choices=(1, 64), default=1)
    parser.add_argument(
        "--tune", action="store_true", help="gc.freeze() and a first threshold of 2,000 first"
    )
    args = parser.parse_args()
    from bench.services import own_postgres, own_redis

    with own_redis(1) as redis, own_postgres(1) as pg:
        import uvloop

        uvloop.run(_run(redis.url, pg.url, args))


if __name__ == "__main__":
    main()
