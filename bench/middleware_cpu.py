"""Where a metered request's CPU goes, measured in process (no HTTP server, no wrk).

    .venv/bin/python bench/middleware_cpu.py [--requests 40000] [--concurrency 64]
                                             [--orgs 64] [--profile FILE.pstats]

Calls the bare Starlette app of bench/apps.py, and the same app wrapped in
CreditGateMiddleware, directly as ASGI apps (in-memory receive/send) from C concurrent
tasks on uvloop pinned to core 0, against a private Redis pinned to core 1. Prints this
process's CPU µs per request, and the private Redis's:

- bare app, and metered (1 org / many orgs) against the real Redis;
- the breakdown of the metered request, by taking parts away with Redis replaced by canned
  replies (bench/apps.py StubRunner): the middleware's own code (path, route, headers,
  request id, response headers, send wrapper), identity (API key from the in-process
  cache), the meter's Python (admit and settle), the event-loop suspension a round trip
  costs, and the Redis client (packing, socket I/O, reply parsing);
- Redis's CPU per request for charge.lua and settle.lua separately.

Far less noisy than an HTTP benchmark on a busy machine: the tool for tuning
gateway/metering/middleware.py and the meter (gateway/metering/admission.py, charge_args.py,
settlement.py) and gateway/redisio/resp.py. ``--profile`` writes
cProfile stats of the
1-org metered loop against the real Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import PATH, StubRunner, bare_app, cg_app, gate_of
from bench.services import Service, own_postgres, own_redis


def make_request(key: str) -> tuple[dict[str, Any], Any]:
    """A fresh scope (servers build one per request) and a receive callable."""
    body = b'{"prompt":"hi"}'
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5555),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"wrk"),
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer " + key.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return scope, receive


async def drive(
    app: Any, keys: list[str], requests: int, concurrency: int, redis: Service | None = None
) -> tuple[float, float]:
    """Run ``requests`` requests from ``concurrency`` tasks; return (our CPU µs per request,
    Redis CPU µs per request)."""
    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    async def worker(n: int, count: int) -> None:
        for i in range(count):
            scope, receive = make_request(keys[(n + i) % len(keys)])
            await app(scope, receive, send)

    per = requests // concurrency
    await asyncio.gather(*(worker(n, max(1, per // 10)) for n in range(concurrency)))  # warm
    status.clear()
    cpu, rcpu = time.process_time(), redis.cpu() if redis else 0.0
    await asyncio.gather(*(worker(n, per) for n in range(concurrency)))
    gate = _gate_or_none(app)
    if gate is not None:
        await gate.meter.drain()  # the settles of this run belong to it
    cpu, rcpu = time.process_time() - cpu, (redis.cpu() if redis else 0.0) - rcpu
    if any(s != 200 for s in status):
        raise RuntimeError(f"unexpected statuses: {set(status)}")
    n = per * concurrency
    return cpu / n * 1e6, rcpu / n * 1e6


def _gate_or_none(app: Any) -> Any:
    try:
        return gate_of(app)
    except (AttributeError, StopIteration):
        return None


async def breakdown(settings: Any, keys: list[str], args: argparse.Namespace) -> None:
    """Take the metered request apart (Redis replaced by canned replies)."""
    from gateway.identity.principal import Identity
    from gateway.metering.admission import Admission

    org, user = settings.keys[keys[0]]
    ident = Identity(org, user, "api_key")

    async def fixed_identity(scope: Any) -> Identity:
        return ident

    async def fixed_admit(org: str, feature: str, **kw: Any) -> Admission:
        adm = Admission("ok", kw["request_id"], org, feature, feature, 1, refresh_at_ms=0)
        adm.remaining, adm.limit, adm.limit_remaining, adm.limit_reset_ms = 9, 10**9, 10**9, 1
        return adm

    def variant(identity: bool, meter: bool, sync: bool) -> Any:
        app = cg_app(settings, fast=True)
        gate = gate_of(app)
        gate.redis.runner = StubRunner(sync=sync)
        if not identity:
            gate.identifier.identify = fixed_identity
            gate.identifier.decide = lambda scope: ident
        if not meter:
            gate.meter.admission.admit = fixed_admit
            gate.meter.settlement.queue = lambda *a, **k: None
        return app

    bare = bare_app()
    steps = [
        ("middleware code (no identity, no meter, no Redis)", variant(False, False, True)),
        ("+ identity: API key from the in-process cache", variant(True, False, True)),
        ("+ meter: admit and settle (Redis answers at once)", variant(True, True, True)),
        ("+ suspension: the reply comes a loop turn later", variant(True, True, False)),
    ]
    base, _ = await drive(bare, keys, args.requests, args.concurrency)
    print(f"\nbreakdown (1 org), CPU µs/request: bare app {base:.1f}")
    previous = base
    for label, app in steps:
        await drive(app, keys, 1000, 8)  # builds the middleware stack
        cpu, _ = await drive(app, keys, args.requests, args.concurrency)
        print(f"  {label:<52} {cpu:6.1f}  (+{cpu - previous:.1f})")
        previous = cpu
    return None


async def redis_costs(settings: Any, redis: Service, requests: int) -> None:
    """Redis CPU per request of charge.lua and of settle.lua (batches of 64), and of an
    EVALSHA that does nothing, for scale."""
    from gateway.config import load_config
    from gateway.metering.gate import CreditGate
    from gateway.redisio.lua_scripts import LuaScript

    gate = CreditGate(load_config(Path(settings.config)))
    meter, org, batch = gate.meter, "bench-org-0000", 64
    charge = settle = 0.0
    for _ in range(2):  # the first round warms up
        admitted = []
        cpu = redis.cpu()
        for _ in range(requests // batch):
            admitted += await asyncio.gather(
                *(
                    meter.admit(org, "lead_generation", user="u1", method="POST", route=PATH)
                    for _ in range(batch)
                )
            )
        charge = redis.cpu() - cpu
        cpu = redis.cpu()
        for start in range(0, len(admitted), batch):
            await asyncio.gather(
                *(
                    meter.settle(a, ok=True, status=200, latency_ms=1)
                    for a in admitted[start : start + batch]
                )
            )
        settle = redis.cpu() - cpu
    noop = LuaScript.from_source("noop", "return 1")
    cpu = redis.cpu()
    for _ in range(requests // batch):
        await asyncio.gather(
            *(gate.redis.runner.run(noop, [f"{settings.prefix}:noop"], ()) for _ in range(batch))
        )
    nothing = redis.cpu() - cpu
    await gate.close()
    n = requests // batch * batch
    print(
        f"\nRedis CPU µs per request: charge.lua {charge / n * 1e6:.1f}, settle.lua "
        f"{settle / n * 1e6:.1f} (batches of {batch}); an EVALSHA of 'return 1': "
        f"{nothing / n * 1e6:.1f}"
    )


async def main(args: argparse.Namespace, redis: Service, admin_dsn: str) -> None:
    from bench.run_all import prepare

    workdir = Path(tempfile.mkdtemp(prefix="cg-bench-"))
    try:
        settings = await prepare(workdir, redis.url, admin_dsn, args.orgs)
        one = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        many = [k for k in settings.keys if k not in one]
        bare = bare_app()
        base, _ = await drive(bare, one, args.requests, args.concurrency)
        print(f"bare app:                  {base:6.1f} CPU µs/req")
        metered_one = 0.0
        for label, keys in (("1 org", one), (f"{len(many)} orgs", many)):
            app = cg_app(settings, fast=True)
            if args.profile and label == "1 org":
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
                metered, rcpu = await drive(app, keys, args.requests, args.concurrency, redis)
                prof.disable()
                prof.dump_stats(args.profile)
            else:
                metered, rcpu = await drive(app, keys, args.requests, args.concurrency, redis)
            if label == "1 org":
                metered_one = metered
            print(
                f"metered, {label:<10}        {metered:6.1f} CPU µs/req (metering adds "
                f"{metered - base:.1f} µs; ratio {base / metered:.2f}); Redis {rcpu:.1f} µs/req"
            )
            await gate_of(app).close()
        await breakdown(settings, one, args)
        print(f"  {'+ the real Redis client and socket I/O (1 org, above)':<52} {metered_one:6.1f}")
        await redis_costs(settings, redis, args.requests // 2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--orgs", type=int, default=64)
    parser.add_argument("--profile", help="write cProfile stats of the 1-org metered run")
    options = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with own_redis(1) as own, own_postgres(1) as pg:
        os.sched_setaffinity(0, {0})
        import uvloop

        uvloop.run(main(options, own, pg.url))
