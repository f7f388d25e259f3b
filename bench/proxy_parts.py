"""The proxy's short request as ``creditgate serve`` runs it, in instructions (callgrind)
and bytecodes per function: the load-independent measure of the proxy's own CPU.

    .venv/bin/python bench/proxy_parts.py count [--tree DIR ...] [--step uv-proxy]
    .venv/bin/python bench/proxy_parts.py opcodes [--requests 1920] [--top 40]

``count`` counts, under valgrind's callgrind, the instructions the gateway process executes
per request (user space; kernel time is not counted), by the difference method of
bench/hotpath_parts.py: a ``--small`` and a ``--large`` run after the same warm-up, the
difference of the totals over the difference of the counts. Steps:

- ``uv-proxy``: GatewayApp (the metering middleware + UpstreamProxy with the lean client)
  behind the HTTP protocol ``creditgate serve`` uses (``server_options(config)``:
  gateway/commands/limited_protocol.py), with serve's uvicorn options (no Server/Date
  headers of its own), its startup run first as serve's lifespan runs it (the cycle
  collector tuned: gateway/commands/server.py ``tune_collector``), on an in-memory client
  transport; 64 keep-alive connections, one
  request at a time each. The upstream is the bare app under uvicorn in another process
  on core 1 (not counted), reached over real sockets;
- ``proxy``: the same GatewayApp driven as an ASGI app, no server in front (what
  bench/hotpath_parts.py's ``proxy`` step measures).

``--tree DIR`` (repeatable) runs the step against another checkout (``git archive REV |
tar -x -C DIR``) with the same driver: before vs after in one run, alternating.

``opcodes`` prints the Python bytecodes per request of ``uv-proxy`` by function
(``sys.settrace`` opcode events, no valgrind): where the proxy's Python goes.

Needs ``valgrind``; the servers (Redis, Postgres, the upstream) are private to the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
STEPS = ("uv-proxy", "proxy")
CONCURRENCY = 64
WARMUP = 640


async def drive_serve(app: Any, keys: list[str], requests: int, concurrency: int) -> None:
    """``requests`` requests through ``creditgate serve``'s HTTP protocol, one keep-alive
    in-memory connection per task, ``concurrency`` tasks."""
    from uvicorn.config import Config as UvicornConfig
    from uvicorn.server import ServerState

    from bench.hotpath_parts import _MemoryTransport, _raw_request
    from gateway.commands.server import server_options

    options = server_options(app.gate.config)
    config = UvicornConfig(
        app,
        loop="none",
        lifespan="off",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        **options,
    )
    config.load()
    state = ServerState()  # serve's default headers: none (server_header/date_header off)
    loop = asyncio.get_running_loop()
    raw = [_raw_request(k) for k in keys]
    protocol_class = config.http_protocol_class

    async def connection(n: int, count: int) -> None:
        transport = _MemoryTransport()
        protocol = protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
        protocol.connection_made(transport)
        for i in range(count):
            transport.done.clear()
            protocol.data_received(raw[(n + i) % len(raw)])
            await transport.done.wait()
        protocol.connection_lost(None)

    per = max(1, requests // concurrency)
    await asyncio.gather(*(connection(n, per) for n in range(concurrency)))


def _child(step: str, requests: int, settings_path: str) -> None:
    """Run under callgrind: build the proxy, warm it up, drive ``requests`` requests."""
    sys.path.insert(0, os.getcwd())  # the tree under test
    from bench.apps import Settings, gateway_app
    from bench.middleware_cpu import drive

    settings = Settings.load(settings_path)

    async def main() -> None:
        keys = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        app = gateway_app(settings, os.environ["CG_PARTS_UPSTREAM"])
        await app.startup()  # what serve's lifespan runs first (no sync job here)
        driver = drive_serve if step == "uv-proxy" else drive
        await driver(app, keys, WARMUP, CONCURRENCY)
        await driver(app, keys, requests, CONCURRENCY)
        await app.metered.gate.meter.drain()  # the settles of the run belong to it

    import uvloop

    uvloop.run(main())


def _count(tree: Path, step: str, requests: int, settings: Path) -> int:
    """Total instructions of one child run under callgrind."""
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    return child_instructions(tree, _HERE / "proxy_parts.py", [step, str(requests), str(settings)])


async def _prepare(workdir: Path, redis_url: str, dsn: str) -> Any:
    from bench.run_all import prepare

    return await prepare(workdir, redis_url, dsn, 64)


def _adjust(settings: Any) -> None:
    """Keys cached for the run; under valgrind on a busy machine a Redis reply can take
    longer than the default 2 s deadline (a 503 fails the run); its timer costs the same."""
    from bench.instructions import _hour_long_key_cache

    _hour_long_key_cache(Path(settings.config))
    config = Path(settings.config)
    config.write_text(config.read_text() + "redis_timeout_seconds: 60\n")


def count(args: argparse.Namespace) -> None:
    """Print instructions per request of each step for each tree, alternately."""
    from bench.hotpath_parts import _UPSTREAM, _start_upstream
    from bench.services import own_postgres, own_redis

    trees = args.tree or [_HERE.parent]
    workdir = Path(tempfile.mkdtemp(prefix="cg-proxy-parts-"))
    with own_redis(1) as redis, own_postgres(1) as pg:
        import uvloop

        settings = uvloop.run(_prepare(workdir, redis.url, pg.url))
        _adjust(settings)
        path = workdir / "settings.json"
        settings.save(path)
        os.environ["CG_PARTS_UPSTREAM"] = _start_upstream()
        print(f"instructions per request (callgrind; {args.small} vs {args.large} requests)")
        try:
            for _ in range(args.rounds):
                for step in args.step or ["uv-proxy"]:
                    for tree in trees:
                        t0 = time.monotonic()
                        small = _count(tree, step, args.small, path)
                        large = _count(tree, step, args.large, path)
                        per = (large - small) / (args.large - args.small)
                        print(
                            f"  {step:<10} {tree!s:<26} {per / 1000:8.1f} k"
                            f"   ({time.monotonic() - t0:.0f} s)",
                            flush=True,
                        )
        finally:
            for proc in _UPSTREAM:
                proc.terminate()


def opcodes(args: argparse.Namespace) -> None:
    """Print bytecodes per request of ``uv-proxy`` by source file and by function."""
    from bench.apps import gateway_app
    from bench.hotpath_parts import _UPSTREAM, _start_upstream
    from bench.opcodes import OpcodeCount
    from bench.services import own_postgres, own_redis

    counter = OpcodeCount()

    async def main(redis_url: str, dsn: str) -> None:
        settings = await _prepare(Path(tempfile.mkdtemp(prefix="cg-proxy-parts-")), redis_url, dsn)
        _adjust(settings)  # before the app reads the config
        keys = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        app = gateway_app(settings, _start_upstream())
        await app.startup()
        await drive_serve(app, keys, WARMUP, CONCURRENCY)
        counter.start()
        await drive_serve(app, keys, args.requests, CONCURRENCY)
        counter.stop()
        await app.metered.gate.meter.drain()
        counter.report("uv-proxy", args.requests // CONCURRENCY * CONCURRENCY, args.top)

    try:
        with own_redis(1) as redis, own_postgres(1) as pg:
            import uvloop

            uvloop.run(main(redis.url, pg.url))
    finally:
        for proc in _UPSTREAM:
            proc.terminate()


def main() -> None:
    """Parse the command line and run ``count`` or ``opcodes``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", nargs="?", choices=("count", "opcodes"), default="count")
    parser.add_argument("--step", action="append", choices=STEPS, help="count: a step")
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--small", type=int, default=320)
    parser.add_argument("--large", type=int, default=1920)
    parser.add_argument("--rounds", type=int, default=1, help="count: repeat the whole set")
    parser.add_argument("--requests", type=int, default=1920, help="opcodes: requests")
    parser.add_argument("--top", type=int, default=40, help="opcodes: functions listed")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2])
        return
    sys.path.insert(0, str(_HERE.parent))
    if args.mode == "count":
        count(args)
    else:
        opcodes(args)


if __name__ == "__main__":
    main()
