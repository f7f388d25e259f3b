"""Where a metered short request's CPU goes, part by part, in instructions (callgrind).

    .venv/bin/python bench/hotpath_parts.py ladder [--only NAME ...] [--tree DIR] [--gc-off]
    .venv/bin/python bench/hotpath_parts.py opcodes [--requests 1920] [--uvicorn]

``ladder`` counts, under valgrind's callgrind, the instructions per request of a series of
apps that each add one part to the one before (the same request and the same difference
method as bench/instructions.py: a ``--small`` and a ``--large`` run, the difference of the
totals over the difference of the counts, so start-up and imports drop out). The count does
not depend on the machine's load. Steps (each driven as an ASGI app in process by 64
concurrent tasks, as bench/middleware_cpu.py does, unless it says uvicorn):

- ``noop``: an ASGI app answering 100 bytes without Starlette (the loop and the driver);
- ``bare``: the bare Starlette app (routing, Request/Response);
- ``floor``: bare + one pipelined EVALSHA of ``return 1`` on the real Redis;
- ``skeleton``: CreditGateMiddleware with identity, admit and settle replaced by constants
  and Redis by canned replies: the middleware's own code (route matching, header policy,
  request id, inner scope, response headers, send wrapper, metrics counters);
- ``identity``: + the real identity (API key from the in-process cache);
- ``meter``: + the meter's Python (charge argument building, reply decode, settle enqueue
  and batch), Redis answering at once;
- ``suspend``: + the reply one loop turn later through a future (the task's suspension);
- ``metered``: + the real pipelined Redis client (encode, write, read, hiredis parse,
  future wake-up) and a private Redis: the metered request, 1 org;
- ``metered64``: the same with 64 orgs' keys in turn;
- ``uv-noop`` / ``uv-bare`` / ``uv-metered`` / ``uv-metered64``: ``noop``, ``bare``,
  ``metered`` and ``metered64`` behind
  uvicorn's httptools protocol on an in-memory transport (HTTP parsing and response
  serialisation; no socket, so kernel time is not in it);
- ``proxy``: GatewayApp (the metering proxy, lean upstream client) in front of the bare app
  under uvicorn in another process (not counted), driven in process.

``opcodes`` splits the metered request (1 org, 64 orgs and the proxy) by Python function:
bytecodes executed per request (``sys.settrace`` opcode events, no valgrind), grouped by
source file. It attributes the Python part of a ladder step to the functions in it; C work
(hiredis, uvloop, httptools) is not in these counts, the ladder has it.

``opcodes --uvicorn`` does the same for the bare and the metered app behind uvicorn.

Needs ``valgrind``. Each ladder step runs twice under callgrind (3-6 minutes per step on
this box at load 7-11). The steps with canned Redis replies repeat within ~0.5 k
instructions; the ones talking to the real Redis (``floor``, ``metered``, ``metered64``,
``proxy``) depend on how replies and settles batch, which changes with the run's speed, and
moved by up to ~12 k between runs (BENCHMARKS.md section 1, "Where a metered request's CPU
goes").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
STEPS = (
    "noop",
    "bare",
    "floor",
    "skeleton",
    "identity",
    "meter",
    "suspend",
    "metered",
    "metered64",
    "uv-noop",
    "uv-bare",
    "uv-metered",
    "uv-metered64",
    "proxy",
)
CONCURRENCY = 64
WARMUP = 640


async def noop_app(scope: Any, receive: Any, send: Any) -> None:
    """100 bytes of JSON, no framework: what the driver and the loop cost by themselves."""
    from bench.apps import BODY

    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def _stubbed(settings: Any, key: str, *, identity: bool, meter: bool, sync: bool) -> Any:
    """The metered app with parts replaced by constants (as bench/middleware_cpu.py's
    breakdown does); the replacements are installed before the middleware binds them."""
    from bench.apps import StubRunner, cg_app, gate_of
    from gateway.identity.principal import Identity
    from gateway.metering.admission import Admission

    org, user = settings.keys[key]
    ident = Identity(org, user, "api_key")
    app = cg_app(settings, fast=True)
    gate = gate_of(app)
    gate.redis.runner = StubRunner(sync=sync)
    if not identity:

        async def fixed_identity(scope: Any) -> Identity:
            return ident

        gate.identifier.identify = fixed_identity
        gate.identifier.decide = lambda scope: ident
    if not meter:

        async def fixed_admit(org: str, feature: str, **kw: Any) -> Admission:
            adm = Admission("ok", kw["request_id"], org, feature, feature, 1, refresh_at_ms=0)
            adm.remaining, adm.limit, adm.limit_remaining, adm.limit_reset_ms = 9, 10**9, 10**9, 1
            return adm

        gate.meter.admission.admit = fixed_admit
        gate.meter.settlement.queue = lambda *a, **k: None
    return app


class _MemoryTransport(asyncio.Transport):
    """uvicorn's side of a keep-alive connection, in memory: the response bytes are kept
    only to know when the response is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.done: asyncio.Event = asyncio.Event()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[-3:]) == b'x"}':  # the last bytes of bench.apps.BODY
            self.done.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _raw_request(key: str) -> bytes:
    from bench.apps import PATH

    body = b'{"prompt":"hi"}'
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def drive_uvicorn(app: Any, keys: list[str], requests: int, concurrency: int) -> None:
    """``requests`` requests through uvicorn's httptools protocol, one keep-alive in-memory
    connection per task, ``concurrency`` tasks."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    config = Config(app, http="httptools", loop="none", lifespan="off", access_log=False)
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    raw = [_raw_request(k) for k in keys]

    async def connection(n: int, count: int) -> None:
        transport = _MemoryTransport()
        protocol = HttpToolsProtocol(config, state, {}, _loop=loop)
        protocol.connection_made(transport)
        for i in range(count):
            transport.done.clear()
            protocol.data_received(raw[(n + i) % len(raw)])
            await transport.done.wait()
        protocol.connection_lost(None)

    per = max(1, requests // concurrency)
    await asyncio.gather(*(connection(n, per) for n in range(concurrency)))


def _child(step: str, requests: int, settings_path: str) -> None:
    """Run under callgrind: build ``step``'s app, warm it up, drive ``requests`` requests.
    The orgs, keys and servers were prepared by the parent (outside valgrind: creating the
    database and 65 orgs costs more instructions than the requests themselves)."""
    sys.path.insert(0, os.getcwd())  # the tree under test
    from bench.apps import Settings, bare_app, cg_app, floor_app
    from bench.middleware_cpu import drive

    settings = Settings.load(settings_path)
    if os.environ.get("CG_PARTS_GC_OFF"):
        # --gc-off: the code's own instructions, without the cycle collector's passes,
        # whose place in a run (a full pass in the window or not) moves a uv- step's count
        # by several k (bench/collector.py counts the passes).
        import gc

        gc.disable()

    async def main() -> None:
        one = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        many = [k for k in settings.keys if k not in one]
        keys = many if step in ("metered64", "uv-metered64") else one
        uvicorn_front = step.startswith("uv-")
        name = step[3:] if uvicorn_front else step
        app: Any
        if name == "noop":
            app = noop_app
        elif name == "bare":
            app = bare_app()
        elif name == "floor":
            app = floor_app(settings)
        elif name == "skeleton":
            app = _stubbed(settings, one[0], identity=False, meter=False, sync=True)
        elif name == "identity":
            app = _stubbed(settings, one[0], identity=True, meter=False, sync=True)
        elif name == "meter":
            app = _stubbed(settings, one[0], identity=True, meter=True, sync=True)
        elif name == "suspend":
            app = _stubbed(settings, one[0], identity=True, meter=True, sync=False)
        elif name in ("metered", "metered64"):
            app = cg_app(settings, fast=True)
        elif name == "proxy":
            app = _proxy_app(settings)
        else:
            raise SystemExit(f"unknown step {step}")
        if uvicorn_front:
            await drive_uvicorn(app, keys, WARMUP, CONCURRENCY)
            await drive_uvicorn(app, keys, requests, CONCURRENCY)
        else:
            await drive(app, keys, WARMUP, CONCURRENCY)
            await drive(app, keys, requests, CONCURRENCY)
        await _drain(app)

    import uvloop

    uvloop.run(main())


async def _drain(app: Any) -> None:
    """Wait for the settles of the run (they belong to it)."""
    from bench.apps import gate_of

    metered = getattr(app, "metered", None)  # GatewayApp
    if metered is not None:
        await metered.gate.meter.drain()
        return
    with contextlib.suppress(AttributeError, StopIteration):  # no gate: noop, bare, floor
        await gate_of(app).meter.drain()


_UPSTREAM: list[subprocess.Popen[bytes]] = []


def _start_upstream() -> str:
    """The bare app under uvicorn in another process on core 1 (the proxy's upstream; not
    under valgrind); its URL."""
    from bench.services import free_port, wait_listening

    port = free_port()
    cmd = [
        "taskset", "-c", "1", sys.executable, "-m", "uvicorn", "--factory", "bench.apps:bare_app",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
        "--log-level", "warning", "--timeout-keep-alive", "600",  # valgrind is slow
    ]  # fmt: skip
    _UPSTREAM.append(subprocess.Popen(cmd, cwd=_HERE.parent))
    wait_listening(port)
    return f"http://127.0.0.1:{port}"


def _proxy_app(settings: Any) -> Any:
    """GatewayApp (lean upstream client) in front of the upstream named by UPSTREAM_URL."""
    from bench.apps import gateway_app

    return gateway_app(settings, os.environ["CG_PARTS_UPSTREAM"])


def _keep_keys_cached(redis_url: str) -> None:
    """Make every API key the children cached in Redis outlive the run (``PERSIST``).

    A child resolves its keys once, in its warm-up: from Redis's key cache while the entry
    lives (``REDIS_CACHE_SECONDS``, 300 s), else from Postgres (~33 k instructions per
    measured request for 64 keys). Under valgrind a pair of children can straddle the
    expiry, so that only one of them paid the Postgres lookups and the difference was
    biased by that much (BENCHMARKS.md section 1, round 11). Kept, every child after the
    first finds them all in Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for name in client.scan_iter(match="*:keys:*", count=1000):
            client.persist(name)
    finally:
        client.close()


def _count(tree: Path, step: str, requests: int, settings: Path) -> int:
    """Total instructions of one child run under callgrind."""
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    return child_instructions(
        tree, _HERE / "hotpath_parts.py", [step, str(requests), str(settings)]
    )


def ladder(args: argparse.Namespace) -> None:
    """Print instructions per request of each step (for each tree, alternately)."""
    from bench.apps import Settings
    from bench.instructions import _hour_long_key_cache
    from bench.run_all import prepare
    from bench.services import own_postgres, own_redis

    steps = args.only or list(STEPS)
    if args.gc_off:
        os.environ["CG_PARTS_GC_OFF"] = "1"  # the children inherit it
    trees = args.tree or [_HERE.parent]
    workdir = Path(tempfile.mkdtemp(prefix="cg-parts-"))
    with own_redis(1) as redis, own_postgres(1) as pg:
        import uvloop

        settings: Settings = uvloop.run(prepare(workdir, redis.url, pg.url, 64))
        _hour_long_key_cache(Path(settings.config))
        # Under valgrind on a busy machine a reply can take longer than the default 2 s
        # deadline (a 503 fails the run); the deadline's timer costs the same either way.
        config = Path(settings.config)
        config.write_text(config.read_text() + "redis_timeout_seconds: 60\n")
        path = workdir / "settings.json"
        settings.save(path)
        if "proxy" in steps:
            os.environ["CG_PARTS_UPSTREAM"] = _start_upstream()
        print(f"instructions per request (callgrind; {args.small} vs {args.large} requests)")
        try:
            for step in steps:
                for tree in trees:
                    t0 = time.monotonic()
                    if step.endswith("metered64") or step.endswith("metered"):
                        # Both children of a pair resolve their keys from Redis: a child
                        # outside valgrind caches them first (_keep_keys_cached).
                        subprocess.run(
                            [sys.executable, str(_HERE / "hotpath_parts.py"), "--child",
                             step, "64", str(path)],
                            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                        )  # fmt: skip
                        _keep_keys_cached(redis.url)
                    small = _count(tree, step, args.small, path)
                    _keep_keys_cached(redis.url)
                    large = _count(tree, step, args.large, path)
                    per = (large - small) / (args.large - args.small)
                    print(
                        f"  {step:<12} {tree!s:<22} {per / 1000:8.1f} k"
                        f"   ({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
        finally:
            for proc in _UPSTREAM:
                proc.terminate()


def opcodes(args: argparse.Namespace) -> None:
    """Print bytecodes per request by source file and by function, for the metered request
    (1 org, 64 orgs) and the proxy."""
    from bench.apps import bare_app, cg_app
    from bench.instructions import _hour_long_key_cache, _long_redis_timeout
    from bench.middleware_cpu import drive
    from bench.opcodes import OpcodeCount
    from bench.run_all import prepare
    from bench.services import own_postgres, own_redis

    counter = OpcodeCount()

    async def measure(label: str, app: Any, keys: list[str], uvicorn: bool = False) -> None:
        driver = drive_uvicorn if uvicorn else drive
        await driver(app, keys, WARMUP, CONCURRENCY)
        counter.start()
        await driver(app, keys, args.requests, CONCURRENCY)
        counter.stop()
        await _drain(app)
        counter.report(label, args.requests // CONCURRENCY * CONCURRENCY, args.top)

    async def main(redis_url: str, dsn: str) -> None:
        settings = await prepare(Path(tempfile.mkdtemp(prefix="cg-parts-")), redis_url, dsn, 64)
        _hour_long_key_cache(Path(settings.config))
        _long_redis_timeout(Path(settings.config))  # traced and on a busy box: slow replies
        one = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        many = [k for k in settings.keys if k not in one]
        if args.uvicorn:
            await measure("uvicorn + bare app", bare_app(), one, uvicorn=True)
            await measure("uvicorn + metered, 1 org", cg_app(settings, fast=True), one, True)
            return
        await measure("metered, 1 org", cg_app(settings, fast=True), one)
        await measure("metered, 64 orgs", cg_app(settings, fast=True), many)
        os.environ["CG_PARTS_UPSTREAM"] = _start_upstream()
        await measure("proxy (GatewayApp, lean client)", _proxy_app(settings), one)

    try:
        with own_redis(1) as redis, own_postgres(1) as pg:
            import uvloop

            uvloop.run(main(redis.url, pg.url))
    finally:
        for proc in _UPSTREAM:
            proc.terminate()


def main() -> None:
    """Parse the command line and run ``ladder`` or ``opcodes``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", nargs="?", choices=("ladder", "opcodes"), default="ladder")
    parser.add_argument("--only", action="append", choices=STEPS, help="a step (repeatable)")
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument(
        "--gc-off", action="store_true", help="ladder: the children run with the collector off"
    )
    parser.add_argument("--small", type=int, default=320)
    parser.add_argument("--large", type=int, default=1920)
    parser.add_argument("--requests", type=int, default=1920, help="opcodes: requests")
    parser.add_argument("--top", type=int, default=40, help="opcodes: functions listed")
    parser.add_argument(
        "--uvicorn", action="store_true", help="opcodes: bare and metered behind uvicorn"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            _child(args.child[0], int(args.child[1]), args.child[2])
        finally:
            for proc in _UPSTREAM:
                proc.terminate()
        return
    sys.path.insert(0, str(_HERE.parent))
    if args.mode == "ladder":
        ladder(args)
    else:
        opcodes(args)


if __name__ == "__main__":
    main()
