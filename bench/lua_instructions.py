"""Redis instructions per charge and per settle, with team/user/key levels and without.

    .venv/bin/python bench/lua_instructions.py [--requests 2000] [--reps 3]

The load-independent companion of bench/lua_cpu.py --levels: a private redis-server runs
under valgrind's callgrind, which counts the instructions Redis executes (Ir) whatever
else the machine runs, so the levels/none ratio does not swing with other work. Two orgs
on the benchmarks' plan (bench/run_all.py): one without levels, one whose requests have a
capped team (their API key's), user and key; both send the same user and API key id, so the
only difference is the org's levels. Each repetition admits ``--requests`` requests of
each org in bursts of 64 through the gateway's own ``Meter`` (so KEYS/ARGV are built as in
production, templates warmed up first) and then settles them; callgrind's counters are
zeroed before and dumped after every phase (``callgrind_control``). Printed: instructions
per request of the charge phase and of the settle phase (the whole server: parsing,
networking and the script), their levels/none ratios, and this process's CPU µs per
request of admit + settle (the gateway's side: wall-clock CPU, so it does move with load).

Instructions are not time (cache misses, branch mispredictions), but the levels path and
the no-levels path run the same kind of code (Lua, hash lookups), so the ratio tracks the
CPU ratio; bench/lua_cpu.py gives the µs.

``--actual`` (issue 8: what a variable cost's settle costs Redis) measures instead, on the
org without levels, the settle of the same admitted requests three ways: ``fixed`` (a
charge of the hold: the fixed-cost item), ``header`` (an extended item charging the hold
with no usage, as a header cost whose answer had no header: cost source ``policy``, usage
missing) and ``usage`` (an extended item charging an actual below the hold, with a model
and four counts, as a ``usage:`` cost: part of the hold given back). Printed per variant:
Redis instructions per settle and their ratio to ``fixed``, and this process's CPU µs per
settle (``settle_nowait`` as the middleware does, a burst drained per call: queue,
encode, reply; moves with the load).

``--flush N`` (issue 10 item 3: the settles of many orgs in one call) measures instead the
settles of ``--orgs`` orgs (default 256, over the config's 16 shards) as a 2 ms window
leaves them with many orgs: flushes of N settles of N different orgs (drawn with a fixed
seed, so two trees settle the same sequence), each queued with ``settle_nowait`` and
drained as one flush. Printed: Redis instructions per settle, settle.lua calls per settle
(``INFO commandstats``) and this process's CPU µs per settle. Run it from both trees (copy
this file into the old one: it imports the gateway of the tree it sits in).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median_high as med  # the upper middle of an even count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.callgrind import callgrind_redis_server
from bench.lua_cpu import FEATURE, TOKENS, _free_port, setup_orgs
from bench.run_all import CONFIG
from gateway.config import parse_config
from gateway.metering.meter import Actual, Meter
from gateway.redisio.connect import connect_redis
from gateway.usage.model import Usage

BURST = 64


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _last_total(workdir: str, seen: set[str]) -> int:
    """The instruction total of the newest callgrind dump not read before."""
    for _ in range(200):
        new = sorted(set(glob.glob(os.path.join(workdir, "cg.out*"))) - seen)
        for path in new:
            text = Path(path).read_text()
            for line in text.splitlines():
                if line.startswith(("totals:", "summary:")):
                    seen.add(path)
                    return int(line.split()[1])
        time.sleep(0.05)
    raise SystemExit("callgrind wrote no dump")


async def measure(url: str, pid: int, workdir: str, args: argparse.Namespace) -> None:
    """Run the phases against the Redis under callgrind at ``url`` and print the table."""
    prefix = "cgluains" + uuid.uuid4().hex[:8]
    config = parse_config(
        CONFIG.format(redis_url=url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
    )
    handles = connect_redis(url, fast=True)
    meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
    orgs = {"none": "bench-org-0000", "levels": "bench-lv-org-0000"}
    await setup_orgs(meter, [orgs["none"]])
    await setup_orgs(meter, [orgs["levels"]], levels=True, members=args.members)
    seen: set[str] = set()
    charge: dict[str, list[float]] = {"none": [], "levels": []}
    settle: dict[str, list[float]] = {"none": [], "levels": []}
    own: dict[str, list[float]] = {"none": [], "levels": []}

    async def phase(org: str, n: int) -> tuple[float, float, float]:
        adms = []
        cpu = time.process_time()
        _callgrind(pid, "-z")
        for start in range(0, n, BURST):
            burst = min(BURST, n - start)
            got = await asyncio.gather(
                *(meter.admit(org, FEATURE, user="u1", key_id="key_bench") for _ in range(burst))
            )
            if any(not a.ok for a in got):
                raise SystemExit(f"refused: {[a.status for a in got if not a.ok][:3]}")
            adms += got
        _callgrind(pid, "-d")
        c = _last_total(workdir, seen)
        _callgrind(pid, "-z")
        for start in range(0, n, BURST):
            await asyncio.gather(
                *(
                    meter.settle(a, ok=True, status=200, latency_ms=3)
                    for a in adms[start : start + BURST]
                )
            )
        _callgrind(pid, "-d")
        s = _last_total(workdir, seen)
        return c / n, s / n, (time.process_time() - cpu) * 1e6 / n

    try:
        for org in orgs.values():
            await phase(org, BURST * 2)  # warm up: templates learned, scripts loaded
        for rep in range(args.reps):
            order = list(orgs.items())
            if rep % 2:
                order.reverse()
            for name, org in order:
                c, s, g = await phase(org, args.requests)
                charge[name].append(c)
                settle[name].append(s)
                own[name].append(g)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        await meter.drain()
        await handles.close()

    print(f"Redis instructions per request (callgrind; {args.reps} x {args.requests} requests)")
    print(f"{'org':<8} {'charge':>10} {'settle':>10} {'gateway CPU µs':>15}")
    for name in orgs:
        print(f"{name:<8} {med(charge[name]):>10.0f} {med(settle[name]):>10.0f} "
              f"{med(own[name]):>15.1f}   charge {min(charge[name]):.0f}..{max(charge[name]):.0f}"
              f", settle {min(settle[name]):.0f}..{max(settle[name]):.0f}")  # fmt: skip
    both = {name: med(charge[name]) + med(settle[name]) for name in orgs}
    print(
        f"levels/none: charge {med(charge['levels']) / med(charge['none']):.3f}, settle "
        f"{med(settle['levels']) / med(settle['none']):.3f}, charge+settle "
        f"{both['levels'] / both['none']:.3f}, "
        f"gateway CPU {med(own['levels']) / med(own['none']):.3f}"
    )


_HOLD = 40
"""The hold of every ``--actual`` request."""
_ACTUALS: dict[str, Actual | None] = {
    "fixed": None,
    "header": Actual(_HOLD, None, missing=True, source="policy"),
    "usage": Actual(_HOLD // 2, Usage("openai", "gpt-4o-mini-2024-07-18", 1_017, 512, 187, 64)),
}
"""The settle of each ``--actual`` variant (None: the fixed-cost item)."""


async def measure_actual(url: str, pid: int, workdir: str, args: argparse.Namespace) -> None:
    """``--actual``: Redis instructions per settle of a fixed, a header and a usage item."""
    prefix = "cgluains" + uuid.uuid4().hex[:8]
    config = parse_config(
        CONFIG.format(redis_url=url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
    )
    handles = connect_redis(url, fast=True)
    meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
    org = "bench-org-0000"
    await setup_orgs(meter, [org])
    seen: set[str] = set()
    settle: dict[str, list[float]] = {v: [] for v in _ACTUALS}
    own: dict[str, list[float]] = {v: [] for v in _ACTUALS}
    actuals = _ACTUALS

    async def phase(variant: str, n: int) -> tuple[float, float]:
        adms = []
        for start in range(0, n, BURST):
            burst = min(BURST, n - start)
            adms += await asyncio.gather(
                *(meter.admit(org, FEATURE, user="u1", cost=_HOLD) for _ in range(burst))
            )
        if any(not a.ok for a in adms):
            raise SystemExit("refused")
        actual = actuals[variant]
        cpu = time.process_time()
        _callgrind(pid, "-z")
        for start in range(0, n, BURST):
            # As the middleware settles: fire and forget, a burst batched per call.
            for a in adms[start : start + BURST]:
                meter.settle_nowait(a, ok=True, status=200, latency_ms=3, actual=actual)
            await meter.drain()
        _callgrind(pid, "-d")
        s = _last_total(workdir, seen)
        return s / n, (time.process_time() - cpu) * 1e6 / n

    try:
        for variant in actuals:
            await phase(variant, BURST * 2)  # warm up
        for rep in range(args.reps):
            order = list(actuals)
            if rep % 2:
                order.reverse()
            for variant in order:
                s, g = await phase(variant, args.requests)
                settle[variant].append(s)
                own[variant].append(g)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        await meter.drain()
        await handles.close()

    print(f"Redis instructions per settle (callgrind; {args.reps} x {args.requests} settles)")
    fixed = med(settle["fixed"])
    for variant in actuals:
        print(
            f"{variant:<8} {med(settle[variant]):>10.0f} ({med(settle[variant]) / fixed:.3f}x)"
            f"  range {min(settle[variant]):.0f}..{max(settle[variant]):.0f}"
            f"  gateway CPU {med(own[variant]):.1f} µs"
        )


async def measure_flush(url: str, pid: int, workdir: str, args: argparse.Namespace) -> None:
    """``--flush N``: Redis instructions per settle of many orgs' flushes of N settles."""
    prefix = "cgluains" + uuid.uuid4().hex[:8]
    config = parse_config(
        CONFIG.format(redis_url=url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
    )
    handles = connect_redis(url, fast=True)
    meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
    orgs = [f"bench-org-{i:04d}" for i in range(args.orgs)]
    await setup_orgs(meter, orgs)
    seen: set[str] = set()
    rng = random.Random(10)
    per = args.flush
    settle: list[float] = []
    calls: list[float] = []
    own: list[float] = []

    async def evalsha_calls() -> int:
        info = await handles.client.info("commandstats")
        return int(info.get("cmdstat_evalsha", {}).get("calls", 0))

    async def phase(flushes: int) -> tuple[float, float, float]:
        batches = []
        for _ in range(flushes):
            picked = rng.sample(orgs, per)
            got = await asyncio.gather(
                *(meter.admit(org, FEATURE, user="u1", key_id="key_bench") for org in picked)
            )
            if any(not a.ok for a in got):
                raise SystemExit("refused")
            batches.append(got)
        before = await evalsha_calls()
        cpu = time.process_time()
        _callgrind(pid, "-z")
        for batch in batches:
            for a in batch:  # as the middleware settles: fire and forget, one flush
                meter.settle_nowait(a, ok=True, status=200, latency_ms=3)
            await meter.drain()
        _callgrind(pid, "-d")
        n = flushes * per
        own_us = (time.process_time() - cpu) * 1e6 / n
        s = _last_total(workdir, seen)
        return s / n, (await evalsha_calls() - before) / n, own_us

    flushes = max(1, args.requests // per)
    try:
        await phase(4)  # warm up: templates learned, scripts loaded
        for rep in range(args.reps):
            s, c, g = await phase(flushes)
            settle.append(s)
            calls.append(c)
            own.append(g)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        await meter.drain()
        await handles.close()

    print(
        f"Redis instructions per settle (callgrind; {args.reps} x {flushes} flushes of "
        f"{per} settles, {args.orgs} orgs)"
    )
    print(
        f"settle {med(settle):.0f} (range {min(settle):.0f}..{max(settle):.0f}), "
        f"settle.lua calls per settle {med(calls):.3f}, gateway CPU {med(own):.1f} µs"
    )


def cli() -> None:
    """Start redis-server under callgrind on a free port, measure, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per org and repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--members", type=int, default=0,
        help="this many more users and keys in the levelled org (bench/lua_cpu.py)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", help="copy callgrind's dumps here (callgrind_annotate shows where they go)"
    )
    parser.add_argument(
        "--actual", action="store_true",
        help="settles of a fixed, a header and a usage cost instead (issue 8)",
    )  # fmt: skip
    parser.add_argument(
        "--flush", type=int, default=0,
        help="many orgs' settles in flushes of this many instead (issue 10 item 3)",
    )  # fmt: skip
    parser.add_argument("--orgs", type=int, default=256, help="with --flush")
    args = parser.parse_args()
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="cg-luains-")
    proc = callgrind_redis_server(workdir, port)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(600):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        client.close()
        # The dumps of the phases; the one written at exit is not read.
        run = measure_flush if args.flush else measure_actual if args.actual else measure
        asyncio.run(run(f"redis://127.0.0.1:{port}/0", proc.pid, workdir, args))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if args.keep:
            shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    cli()
