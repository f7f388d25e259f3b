"""Redis CPU per metered request: charge.lua and settle.lua, measured on the Redis side.

    .venv/bin/python bench/lua_cpu.py [--url redis://127.0.0.1:6379/0] [--reps 5]
                                      [--requests 20000] [--orgs 1000]
                                      [--baseline DIR] [--fast | --redis-py]

Requests go through the gateway's own ``Meter`` (so KEYS/ARGV are built exactly as in
production): each round admits a burst of requests concurrently (``admit``), then settles
them all (``settle``, which batches one shard's settles per call, up to 64). Two workloads,
both shaped like bench/run_all.py's: one org (one user), and ``--orgs`` orgs (one user each,
each request picks an org at random). Every org has a plan of 10^9 tokens, a 10^9 purchased
lot and rate limits of 10^9/second per org and per user, so nothing is refused and every
limiter runs.

What is measured is the Redis server's CPU, not this process's: ``INFO commandstats``
(the ``evalsha`` usec, i.e. time inside the scripts, read between the admit and the settle
phase of every round) and ``INFO cpu`` (used_cpu_user + used_cpu_sys: the whole server,
networking and parsing included). Figures are µs per request: per charge, and per request
for settle (one settle call serves a batch).

By default a private redis-server is started (no other client pollutes its counters); with
``--url`` the given Redis is used under a unique key prefix, which is deleted afterwards,
and the figures include whatever else that server runs meanwhile.

``--levels`` (contract A10) runs every workload twice in each repetition, alternating: on
orgs without levels and on orgs whose every request has a capped team (its API key's), user
and key; both send the same API key id, so the only difference is the org's levels. It
prints the levels/none ratio of the medians, and this process's CPU per request (the
gateway's side of admit and settle: the meter's Python, the Redis client, the event loop),
so both ratios come from one run on one machine state.

``--baseline DIR`` A/B-tests: DIR holds another charge.lua and settle.lua with the same
KEYS/ARGV interface (e.g. a copy of the previous version); the two variants alternate
within every repetition, and each is reported as a range over the repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run_all import CONFIG  # the benchmarks' config: one feature, 10^9 tokens, 2 limiters
from gateway.config import Config, parse_config
from gateway.metering.meter import Meter
from gateway.redisio.connect import RedisHandles, connect_redis
from gateway.redisio.lua_scripts import LuaScript, assemble, load

FEATURE = "lead_generation"
TOKENS = 10**9


@dataclass
class Figures:
    """µs per request of one variant and workload, one value per repetition."""

    charge: list[float] = field(default_factory=list)
    gateway: list[float] = field(default_factory=list)  # this process's CPU, per request
    settle: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # used_cpu (user+sys), per request
    charge_cpu: list[float] = field(default_factory=list)  # used_cpu of the admit phase
    batch: list[float] = field(default_factory=list)  # settle requests per settle call


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence); yields its URL."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="cg-luacpu-")
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
         "--logfile", os.path.join(workdir, "log")],
        start_new_session=True,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def _counters(handles: RedisHandles) -> tuple[int, int, float]:
    """(evalsha calls, evalsha usec, server CPU seconds) right now."""
    stats: dict[str, Any] = await handles.client.info("commandstats")
    ev = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    cpu: dict[str, Any] = await handles.client.info("cpu")
    return (
        int(ev["calls"]),
        int(ev["usec"]),
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


# With --levels: every request has a team (its API key's), a user and a key, each capped
# (contract A10), far above what the bench draws.
LEVEL_FIELDS = {
    "Lm:k:key_bench": "t1", "Lm:u:u1": "t1",
    f"Lc:{FEATURE}:t:t1": str(TOKENS), f"Lc:{FEATURE}:u:u1": str(TOKENS),
    f"Lc:{FEATURE}:k:key_bench": "p9000",
}  # fmt: skip
KEY_ID: str | None = None


def member_fields(members: int, period: str) -> dict[str, str]:
    """``members`` more users and keys of team t1, each with a cap and a counter of
    ``period`` (gateway/core/caps.py): the fields a real org with levels has besides the
    bench caller's."""
    fields: dict[str, str] = {f"Lp:{FEATURE}": period} if members else {}
    for n in range(members):
        for letter in ("u", "k"):
            ident = f"m{n}"
            fields[f"Lm:{letter}:{ident}"] = "t1"
            fields[f"Lc:{FEATURE}:{letter}:{ident}"] = str(TOKENS)
            fields[f"Ln:{FEATURE}:{letter}:{ident}"] = "1"
    return fields


async def setup_orgs(meter: Meter, orgs: list[str], levels: bool = False, members: int = 0) -> None:
    """Seed every org on the bench plan and grant it one large purchased lot; with
    ``levels``, the bench caller's levels and ``members`` other members' fields."""
    grant = load("grant")
    now = int(time.time() * 1000)
    period = meter.period(now)[0]
    fields = {**LEVEL_FIELDS, **member_fields(members, period)} if levels else None
    for org in orgs:
        await meter.seed_state(org, "bench", 0, [], fields)
        shard = meter.keys.shard(org)
        await meter.redis.runner.run(
            grant, [meter.keys.org(org), shard.events],
            [now, org, FEATURE, TOKENS, 0, "bench-grant"],
        )  # fmt: skip


async def run_rounds(
    meter: Meter, orgs: list[str], requests: int, burst: int, rng: random.Random
) -> tuple[float, float, float, float, float, float]:
    """Admit+settle ``requests`` requests in bursts; return µs/request (charge, settle,
    server CPU), the mean settle batch, this process's CPU µs/request (the INFO round
    trips between the phases included: the same for every variant) and the server's CPU
    µs/request of the admit phase alone (CPU time: unlike the evalsha usec, not inflated
    while a loaded machine has Redis waiting for a core)."""
    charge_us = settle_us = cpu_s = charge_cpu_s = 0.0
    own_cpu = time.process_time()
    settle_calls = 0
    done = 0
    handles = meter.redis
    while done < requests:
        n = min(burst, requests - done)
        picks = [orgs[0]] * n if len(orgs) == 1 else [rng.choice(orgs) for _ in range(n)]
        c0, u0, cpu0 = await _counters(handles)
        adms = await asyncio.gather(
            *(meter.admit(o, FEATURE, user="u1", key_id=KEY_ID) for o in picks)
        )
        c1, u1, cpu1 = await _counters(handles)
        bad = [a.status for a in adms if a.status != "ok"]
        if bad:
            raise SystemExit(f"admission refused: {bad[:3]}")
        futs = [meter.settle(a, ok=True, status=200, latency_ms=3) for a in adms]
        charged = await asyncio.gather(*futs)
        c2, u2, cpu2 = await _counters(handles)
        if any(c != 1 for c in charged):
            raise SystemExit(f"settle returned {[c for c in charged if c != 1][:3]}")
        if c1 - c0 != n:
            raise SystemExit(f"expected {n} charge calls, Redis counted {c1 - c0}")
        charge_us += u1 - u0
        settle_us += u2 - u1
        settle_calls += c2 - c1
        cpu_s += (cpu1 - cpu0) + (cpu2 - cpu1)
        charge_cpu_s += cpu1 - cpu0
        done += n
    own_cpu = time.process_time() - own_cpu
    return (
        charge_us / requests,
        settle_us / requests,
        cpu_s * 1e6 / requests,
        requests / max(settle_calls, 1),
        own_cpu * 1e6 / requests,
        charge_cpu_s * 1e6 / requests,
    )


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def _range(values: list[float]) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[0]:6.2f} .. {s[-1]:6.2f} (median {s[len(s) // 2]:6.2f})"


async def main(args: argparse.Namespace) -> None:
    """Run the workloads against ``args.url`` and print the table."""
    prefix = "cgluacpu" + uuid.uuid4().hex[:8]
    config: Config = parse_config(
        CONFIG.format(redis_url=args.url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
    )
    handles = connect_redis(args.url, fast=args.fast)
    meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
    variants: dict[str, tuple[LuaScript, LuaScript]] = {
        "current": (meter.admission.script, meter.settlement.script)
    }
    if args.baseline:
        # Assembled as the loader does (the shared prelude prepended where it is used).
        base = Path(args.baseline)
        variants = {
            "baseline": (
                assemble("charge", (base / "charge.lua").read_text()),
                assemble("settle", (base / "settle.lua").read_text()),
            ),
            **variants,
        }
    many = [f"bench-org-{n:04d}" for n in range(args.orgs)]
    workloads = {"1 org": many[:1], f"{args.orgs} orgs": many}
    levelled = [f"bench-lv-org-{n:04d}" for n in range(args.orgs)]
    if args.levels:
        workloads = {
            "1 org": many[:1], "1 org lv": levelled[:1],
            f"{args.orgs} orgs": many, f"{args.orgs} orgs lv": levelled,
        }  # fmt: skip
    rng = random.Random(1)
    results: dict[tuple[str, str], Figures] = {}
    try:
        await setup_orgs(meter, many)
        if args.levels:
            await setup_orgs(meter, levelled, levels=True, members=args.members)
        for charge_script, settle_script in variants.values():
            # Loaded up front: a NOSCRIPT reply would count as a call.
            for script in (charge_script, settle_script):
                await handles.client.script_load(script.source)
        for rep in range(args.reps):
            order = list(variants.items())
            if rep % 2:
                order.reverse()  # alternate which variant runs first
            # Alternate the workloads' order too (levels after none, then before).
            for wname, orgs in list(workloads.items())[:: -1 if rep % 2 else 1]:
                burst = args.burst if len(orgs) == 1 else args.burst * 16
                for vname, (charge, settle) in order:
                    meter.admission.script, meter.settlement.script = charge, settle
                    # Warm up: scripts loaded, connections open, branch caches.
                    await run_rounds(meter, orgs, burst, burst, rng)
                    c, s, cpu, batch, own, ccpu = await run_rounds(
                        meter, orgs, args.requests, burst, rng
                    )
                    fig = results.setdefault((wname, vname), Figures())
                    fig.gateway.append(own)
                    fig.charge_cpu.append(ccpu)
                    fig.charge.append(c)
                    fig.settle.append(s)
                    fig.server.append(cpu)
                    fig.batch.append(batch)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        await meter.drain()
        if args.private is False:
            async for key in handles.client.scan_iter(match=f"{prefix}:*", count=1000):
                await handles.client.delete(key)
        await handles.close()
    print(f"Redis CPU, µs per request ({args.reps} repetitions x {args.requests} requests;"
          f" {'pipelined' if args.fast else 'redis-py'} runner)")  # fmt: skip
    print(f"{'workload':<12} {'variant':<9} {'charge (evalsha)':<30} "
          f"{'settle/request (evalsha)':<30} {'server CPU/request':<30} batch")  # fmt: skip
    for (wname, vname), fig in results.items():
        print(f"{wname:<15} {vname:<9} {_range(fig.charge):<30} {_range(fig.settle):<30} "
              f"{_range(fig.server):<30} {sum(fig.batch) / len(fig.batch):.1f}")  # fmt: skip
    print("\nserver CPU of the admit phase (charge), and this process's CPU (the gateway's"
          " side of admit + settle), µs per request")  # fmt: skip
    for (wname, vname), fig in results.items():
        print(f"{wname:<15} {vname:<9} {_range(fig.charge_cpu):<30} {_range(fig.gateway)}")
    if args.levels:
        print("\nlevels / none, ratio of the medians")
        for (wname, vname), fig in results.items():
            none = results.get((wname.removesuffix(" lv"), vname))
            if not wname.endswith(" lv") or none is None:
                continue
            ratios = "  ".join(
                f"{name} {_median(getattr(fig, name)) / _median(getattr(none, name)):.2f}"
                for name in ("charge", "charge_cpu", "settle", "server", "gateway")
            )
            print(f"{wname.removesuffix(' lv'):<15} {vname:<9} {ratios}")


def cli() -> None:
    """Parse arguments, start a private Redis unless --url, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="use this Redis (default: start a private one)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000, help="per workload and rep")
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument(
        "--burst",
        type=int,
        default=64,
        help="requests admitted at once (x16 for the many-org workload)",
    )
    parser.add_argument("--baseline", help="directory with another charge.lua/settle.lua")
    parser.add_argument(
        "--levels", action="store_true",
        help="each workload also on orgs whose requests have a capped team, user and API"
        " key (contract A10), in the same run; prints the levels/none ratios",
    )  # fmt: skip
    parser.add_argument(
        "--members", type=int, default=0,
        help="with --levels: this many more users and keys in the levelled orgs (3 fields"
        " each): 22+ make the org hash a hash table instead of a listpack",
    )  # fmt: skip
    parser.add_argument(
        "--redis-py",
        dest="fast",
        action="store_false",
        help="run scripts through redis-py instead of the pipelined client",
    )
    args = parser.parse_args()
    global KEY_ID
    KEY_ID = "key_bench" if args.levels else None  # the same key with levels or none
    if args.url:
        args.private = False
        asyncio.run(main(args))
    else:
        args.private = True
        with private_redis() as url:
            args.url = url
            asyncio.run(main(args))


if __name__ == "__main__":
    cli()
