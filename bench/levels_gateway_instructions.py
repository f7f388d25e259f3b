"""Gateway instructions per request, with team/user/key levels and without (callgrind).

    .venv/bin/python bench/levels_gateway_instructions.py [--reps 3] [--requests 2048]
                                                           [--orgs 100] [--keep DIR]

The load-independent companion of ``bench/lua_cpu.py --levels``'s *gateway CPU* column
(whose process time swings with the machine's load): the same workloads, driven the same
way (the gateway's own ``Meter``, admit a burst concurrently, then settle it; bursts of
64 for one org and 64 x 16 for ``--orgs`` orgs, each request picking an org at random),
but this process runs under valgrind's callgrind, which counts the instructions it
executes (user space: the meter's Python, the Redis client, the event loop), whatever
else the machine runs. Redis runs natively (a private redis-server). Four workloads: one
org without levels and one with (a capped team, user and key: ``bench/lua_cpu.py``'s
``LEVEL_FIELDS``), ``--orgs`` orgs without and with; every request of every workload sends
the same user and API key id. Each repetition runs them all, alternating the order;
collection is switched on only around each workload's measured requests (after a warm-up
that charges every org of the workload twice, a burst of it and a ``gc.collect()``)
through callgrind's client requests (a tiny C helper compiled at start, loaded with
ctypes) and dumped under the workload's name. Printed: instructions per request (admit
+ settle), medians and ranges, and the levels/none ratios.

Kernel time (socket reads and writes) is not counted: every workload sends the same
commands and gets replies of the same size (58-59 bytes per charge); only how many reads
a burst's replies take can differ, with how fast Redis answers (BENCHMARKS.md section 10).

``--keep DIR`` keeps the dumps: ``callgrind_annotate DIR/cg.out.<pid>.<n>`` gives the
function profile of one workload's phase. Needs ``valgrind`` and a C compiler.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import glob
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lua_cpu import FEATURE, TOKENS, private_redis, setup_orgs
from bench.run_all import CONFIG
from gateway.config import parse_config
from gateway.metering.meter import Meter
from gateway.redisio.connect import connect_redis

BURST = 64
KEY_ID = "key_bench"  # the same API key id in every workload (bench/lua_cpu.py --levels)

# Callgrind's client requests (valgrind/callgrind.h) as C functions for ctypes: outside
# valgrind they are no-ops.
_HELPER_C = """
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def _helper(workdir: str) -> str:
    """Compile the client-request helper into ``workdir``; return the library's path."""
    src, lib = os.path.join(workdir, "cgctl.c"), os.path.join(workdir, "cgctl.so")
    Path(src).write_text(_HELPER_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", lib, src], check=True)
    return lib


async def _rounds(
    meter: Meter,
    orgs: list[str],
    requests: int,
    burst: int,
    rng: random.Random,
    every: bool = False,
) -> None:
    """Admit ``requests`` requests in bursts (each picking an org; with ``every``, the
    orgs in turn), settle each burst."""
    done = 0
    while done < requests:
        n = min(burst, requests - done)
        if every:
            picks = [orgs[(done + i) % len(orgs)] for i in range(n)]
        elif len(orgs) == 1:
            picks = [orgs[0]] * n
        else:
            picks = [rng.choice(orgs) for _ in range(n)]
        adms = await asyncio.gather(
            *(meter.admit(o, FEATURE, user="u1", key_id=KEY_ID) for o in picks)
        )
        if any(a.status != "ok" for a in adms):
            raise SystemExit(f"refused: {[a.status for a in adms if a.status != 'ok'][:3]}")
        charged = await asyncio.gather(
            *(meter.settle(a, ok=True, status=200, latency_ms=3) for a in adms)
        )
        if any(c != 1 for c in charged):
            raise SystemExit(f"settle returned {[c for c in charged if c != 1][:3]}")
        done += n


def workloads(orgs: int) -> dict[str, list[str]]:
    """The four workloads: 1 org and ``orgs`` orgs, without levels and with."""
    many = [f"bench-org-{n:04d}" for n in range(orgs)]
    levelled = [f"bench-lv-org-{n:04d}" for n in range(orgs)]
    return {
        "1 org": many[:1], "1 org lv": levelled[:1],
        f"{orgs} orgs": many, f"{orgs} orgs lv": levelled,
    }  # fmt: skip


async def child(args: argparse.Namespace) -> None:
    """Under callgrind: set up, then run the workloads with collection around each."""
    lib = ctypes.CDLL(args.lib)
    prefix = "cglvins" + uuid.uuid4().hex[:8]
    config = parse_config(
        CONFIG.format(redis_url=args.url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
    )
    # Under valgrind this process runs ~50x slower: a burst's replies can take longer to
    # read than the default 2 s command timeout.
    handles = connect_redis(args.url, fast=True, timeout=120.0)
    meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
    loads = workloads(args.orgs)
    names = list(loads)
    await setup_orgs(meter, loads[names[2]])
    await setup_orgs(meter, loads[names[3]], levels=True)
    rng = random.Random(1)
    try:
        for rep in range(args.reps):
            for name in names[:: -1 if rep % 2 else 1]:
                orgs = loads[name]
                burst = BURST if len(orgs) == 1 else BURST * 16
                # Warm-up: every org charged twice, so that a levelled org's first charges
                # (which read the levels in full and report them: learn_levels) and the
                # rebuild of its caller's templates at the next one, both once per caller,
                # are not counted; then a burst as measured.
                await _rounds(meter, orgs, 2 * len(orgs), burst, rng, every=True)
                await _rounds(meter, orgs, burst, burst, rng)
                gc.collect()  # every workload starts from the same collector state
                lib.cg_toggle()
                await _rounds(meter, orgs, args.requests, burst, rng)
                lib.cg_toggle()
                lib.cg_dump(f"{name}|{rep}".encode())
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        await meter.drain()
        await handles.close()


def _dumps(workdir: str) -> dict[str, list[int]]:
    """Instructions of each workload's dumps, by workload name."""
    out: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "cg.out.*"))):
        text = Path(path).read_text()
        desc = re.search(r"^desc: Trigger: Client Request: (.*)\|\d+$", text, re.MULTILINE)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if desc and total:
            out.setdefault(desc.group(1), []).append(int(total.group(1)))
    return out


def main() -> None:
    """Start Redis natively, this script's child under callgrind, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2048, help="per workload and rep")
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--keep", help="copy callgrind's dumps here (callgrind_annotate)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args))
        return
    workdir = tempfile.mkdtemp(prefix="cg-lvgw-")
    try:
        lib = _helper(workdir)
        with private_redis() as url:
            subprocess.run(
                ["valgrind", "--tool=callgrind", "--collect-atstart=no",
                 f"--callgrind-out-file={workdir}/cg.out.%p", sys.executable, __file__,
                 "--child", "--url", url, "--lib", lib, "--reps", str(args.reps),
                 "--requests", str(args.requests), "--orgs", str(args.orgs)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        counts = _dumps(workdir)
    finally:
        if args.keep:
            shutil.copytree(workdir, args.keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)

    def med(values: list[int]) -> float:
        return sorted(values)[len(values) // 2] / args.requests

    print(f"gateway instructions per request, admit + settle (callgrind; {args.reps} x "
          f"{args.requests} requests per workload)")  # fmt: skip
    for name, values in counts.items():
        lo, hi = min(values) / args.requests, max(values) / args.requests
        print(f"{name:<14} {med(values) / 1000:8.1f}k  ({lo / 1000:.1f}k .. {hi / 1000:.1f}k)")
    print("levels / none, ratio of the medians")
    for name, values in counts.items():
        none = counts.get(name.removesuffix(" lv"))
        if name.endswith(" lv") and none:
            print(f"{name.removesuffix(' lv'):<14} {med(values) / med(none):.3f}")


if __name__ == "__main__":
    main()
