"""One tenant's ceiling: how many charges per second one org can get from its one shard.

    .venv/bin/python -m bench.tenant_ceiling [--clients 3] [--seconds 4]
        [--steps 2000,5000,10000,15000,20000,30000,0] [--workloads fixed,levels,usage,limiter,all]
        [--callgrind] [--json out.jsonl]

All of an org's keys live in one virtual shard (one Redis Cluster slot), so all of its
traffic lands on one Redis process, i.e. one core. This measures that core's limit three
ways, for each workload:

1. **Ramp.** A private redis-server pinned to core 0 (no persistence). ``--clients``
   gateway-like processes pinned to core 1, each with the gateway's own ``Meter`` on the
   pipelined client (KEYS/ARGV built as in production, settles batched per shard as the
   middleware's ``settle_nowait`` queues them). Each client runs ``--workers`` tasks that
   admit bursts of ``--burst`` requests concurrently (what the pipelined client sends when
   that many requests arrive in one loop turn) and settle each right after. Every step
   offers a total rate (``0``: as fast as the clients go) for ``--seconds``; reported per
   step: achieved charges/s, Redis's CPU utilisation (``INFO cpu`` used_cpu_user + sys
   over wall time; 100 % = the core is saturated), Redis CPU µs per request (charge + its share of
   the settle batch), the clients' CPU and the load average. On this 2-core machine the
   Python load generator on one core usually runs out before Redis does: that is why (2)
   and (3) exist.
2. **CPU per request -> ceiling.** 10^6 / (Redis CPU µs per request) is the requests/s at
   100 % of the core, with the pipelining of the busiest step (bigger batches cost less per
   request, so the ceiling is read at the highest achieved rate). ``INFO commandstats``
   evalsha usec per request (time inside the scripts only) gives the bound without
   networking and parsing.
3. **Instructions (``--callgrind``).** The same workloads against a redis-server under
   valgrind's callgrind: instructions Redis executes per charge and per settle (the whole
   server), which do not move with the machine's load. This VM exposes no hardware counters
   (``perf stat`` says *not supported*), so the instructions/s rate of the Redis process on
   this CPU is calibrated as instructions per request (callgrind) / CPU seconds per request
   (the ramp's busiest step) of the ``fixed`` workload; every workload's ceiling is then
   rate / its instructions per request: its cost relative to ``fixed`` measured without
   noise, scaled by one CPU-time figure.

Workloads (one org, one user, one feature of cost 1; the plan holds 10^9 tokens plus a
10^9 grant so nothing is ever refused):

- ``fixed``: no rate limits, no levels (the cheapest charge);
- ``levels``: the request's API key, user and team each capped (contract A10, as
  bench/lua_cpu.py ``--levels``);
- ``usage``: ``cost: {usage: openai, reserve: 5, max: 1000}``: the charge holds 5, the
  settle charges the actual (3) with the call's usage (contract A8);
- ``limiter``: ``fixed`` plus the per-org rate limiter (GCRA, 10^9/second);
- ``all``: levels + usage + per-org and per-user limiters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lua_cpu import FEATURE, TOKENS, setup_orgs
from bench.services import free_port, own_redis, stop_process, wait_listening
from gateway.config import Config, parse_config
from gateway.core.redis_keys import KeySpace
from gateway.metering.meter import Actual, Admission, Meter
from gateway.redisio.connect import connect_redis
from gateway.usage.model import Usage

ORG = "big-tenant"
WORKLOADS = ("fixed", "levels", "usage", "limiter", "all")
ORG_LIMIT = "{per: org, limit: 1000000000/second}"
USER_LIMIT = "{per: user, limit: 1000000000/second}"
# The price table a usage cost needs (never consulted: the bench settles a known actual).
MODELS = 'models: {"gpt-4o-mini*": {input: 1, output: 4}, default: {input: 2, output: 8}}\n'
USAGE = Usage("openai", "gpt-4o-mini", 120, 0, 30, 0)


def config_text(workload: str, redis_url: str, prefix: str) -> str:
    """The gateway config of ``workload`` (see the module docstring)."""
    usage = workload in ("usage", "all")
    cost = "{usage: openai, reserve: 5, max: 1000}" if usage else "1"
    limits = {"limiter": [ORG_LIMIT], "all": [ORG_LIMIT, USER_LIMIT]}.get(workload, [])
    return f"""\
redis_url: {redis_url}
database_url: ""
key_prefix: {prefix}
{MODELS if usage else ""}features: {{{FEATURE}: {{cost: {cost}}}}}
plans:
  bench:
    allocations: {{{FEATURE}: {TOKENS}}}
    rate_limits: [{", ".join(limits)}]
default_plan: bench
routes:
  - {{method: POST, path: /x, feature: {FEATURE}}}
"""


def workload_config(workload: str, redis_url: str, prefix: str) -> Config:
    """The parsed config of ``workload``."""
    return parse_config(config_text(workload, redis_url, prefix), f"<{workload}>")


def has_levels(workload: str) -> bool:
    """Whether ``workload``'s requests have a capped team, user and key."""
    return workload in ("levels", "all")


def has_usage(workload: str) -> bool:
    """Whether ``workload`` settles an actual cost (reserve then settle actual)."""
    return workload in ("usage", "all")


# --- the load-generating client (a child process pinned to core 1) ----------------------


class Client:
    """One gateway-like process: a Meter on the pipelined client, driven step by step."""

    def __init__(self, workload: str, url: str, prefix: str) -> None:
        self.workload = workload
        self.meter = Meter(
            workload_config(workload, url, prefix),
            connect_redis(url, fast=True),
            now_ms=lambda: int(time.time() * 1000),
        )
        self.key_id = "key_bench" if has_levels(workload) else None
        self.actual = Actual(3, USAGE) if has_usage(workload) else None

    def _settle(self, adm: Admission) -> None:
        if self.actual is None:
            self.meter.settle_nowait(adm, ok=True, status=200, latency_ms=1)
        else:
            self.meter.settle_nowait(adm, ok=True, status=200, latency_ms=1, actual=self.actual)

    async def step(self, rate: float, seconds: float, workers: int, burst: int) -> dict[str, Any]:
        """Offer ``rate`` requests/s (0: as fast as possible) for ``seconds``."""
        admitted = refused = 0
        cpu = time.process_time()
        began = time.monotonic()
        stop = began + seconds
        meter, key_id = self.meter, self.key_id

        async def worker(offset: float) -> None:
            nonlocal admitted, refused
            interval = burst * workers / rate if rate else 0.0
            due = began + offset * interval
            while True:
                now = time.monotonic()
                if now >= stop:
                    return
                if due > now:
                    await asyncio.sleep(due - now)
                due += interval
                adms = await asyncio.gather(
                    *(meter.admit(ORG, FEATURE, user="u1", key_id=key_id) for _ in range(burst))
                )
                for adm in adms:
                    if adm.ok:
                        admitted += 1
                        self._settle(adm)
                    else:
                        refused += 1

        await asyncio.gather(*(worker(n / workers) for n in range(workers)))
        await meter.drain()  # the step's settles belong to the step
        return {
            "admitted": admitted,
            "refused": refused,
            "wall": time.monotonic() - began,
            "cpu": time.process_time() - cpu,
        }

    async def close(self) -> None:
        """Settle what is queued and close the connections."""
        await self.meter.drain()
        await self.meter.redis.close()


def child(workload: str, url: str, prefix: str) -> None:
    """The child's loop: one JSON command per stdin line, one JSON answer per line."""
    import uvloop

    loop = uvloop.new_event_loop()
    client = Client(workload, url, prefix)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        got = loop.run_until_complete(
            client.step(cmd["rate"], cmd["seconds"], cmd["workers"], cmd["burst"])
        )
        print(json.dumps(got), flush=True)
    loop.run_until_complete(client.close())


# --- the orchestrator ---------------------------------------------------------------------


@dataclass
class Step:
    """One offered rate of one workload, as measured."""

    workload: str
    offered: int  # requests/s in total, 0 = unbounded
    achieved: float  # charges/s (= charge+settle requests/s: every request is settled)
    refused: int
    redis_util: float  # Redis CPU seconds / wall seconds
    redis_cpu_us: float  # Redis CPU µs per request (charge + settle share)
    evalsha_us: float  # µs inside scripts per request (charge + settle)
    evalsha_per_req: float  # script calls per request (1 charge + settle batches)
    clients_util: float  # the clients' CPU seconds / wall seconds (core 1)
    client_cpu_us: float  # the clients' CPU µs per request
    load: str  # /proc/loadavg's 1/5/15-minute averages at the end of the step

    @property
    def ceiling(self) -> float:
        """Requests/s at 100 % of Redis's core, at this step's pipelining."""
        return 1e6 / self.redis_cpu_us if self.redis_cpu_us else 0.0


def _redis_counters(client: Any) -> tuple[int, int, float]:
    """(evalsha calls, evalsha usec, Redis's CPU seconds: ``INFO cpu`` user + sys, i.e.
    its getrusage, µs resolution where /proc has the clock tick's 10 ms)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    cpu = client.info("cpu")
    used = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return int(stats["calls"]), int(stats["usec"]), used


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Clients:
    """``n`` child processes pinned to ``core``, each a :class:`Client`."""

    def __init__(self, n: int, core: int, workload: str, url: str, prefix: str) -> None:
        command = ["taskset", "-c", str(core), sys.executable, "-m", "bench.tenant_ceiling",
                   "--child", workload, url, prefix]  # fmt: skip
        root = Path(__file__).resolve().parent.parent
        pipe = subprocess.PIPE
        self.procs = [
            subprocess.Popen(
                command, stdin=pipe, stdout=pipe, text=True, cwd=root, start_new_session=True
            )
            for _ in range(n)
        ]
        for proc in self.procs:
            self._read(proc)

    @staticmethod
    def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a client exited with {proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def step(self, rate: float, seconds: float, workers: int, burst: int) -> list[dict[str, Any]]:
        """Run one step in every client at once (each offers rate / n)."""
        cmd = {"rate": rate / len(self.procs), "seconds": seconds, "workers": workers,
               "burst": burst}  # fmt: skip
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        return [self._read(proc) for proc in self.procs]

    def close(self) -> None:
        """Ask every client to quit; stop the ones that do not (by their own ids)."""
        for proc in self.procs:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"quit": True}) + "\n")
                proc.stdin.flush()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(proc)  # type: ignore[arg-type]


async def seed(workload: str, url: str, prefix: str) -> None:
    """Create the org on the bench plan with its grant (and levels for the levelled ones)."""
    handles = connect_redis(url, fast=True)
    meter = Meter(
        workload_config(workload, url, prefix), handles, now_ms=lambda: int(time.time() * 1000)
    )
    try:
        await setup_orgs(meter, [ORG], levels=has_levels(workload))
    finally:
        await handles.close()


def ramp(args: argparse.Namespace, url: str, workload: str) -> list[Step]:
    """Every offered rate of ``args.steps`` for ``workload``, on a fresh key prefix."""
    import redis

    prefix = "cgceil" + uuid.uuid4().hex[:8]
    asyncio.run(seed(workload, url, prefix))
    config = workload_config(workload, url, prefix)
    events = KeySpace(config.key_prefix, config.shards).shard(ORG).events
    info = redis.Redis.from_url(url)
    clients = Clients(args.clients, args.client_core, workload, url, prefix)
    steps: list[Step] = []
    try:
        clients.step(2000, 1.0, args.workers, args.burst)  # warm-up: scripts, templates
        for rate in args.steps:
            rows0 = int(info.xlen(events))
            calls0, usec0, cpu0 = _redis_counters(info)
            wall0 = time.monotonic()
            got = clients.step(rate, args.seconds, args.workers, args.burst)
            wall1 = time.monotonic()
            calls1, usec1, cpu1 = _redis_counters(info)
            wall = wall1 - wall0
            n = sum(g["admitted"] for g in got)
            # Every admitted request was settled within its step: one charge event each
            # (a figure of charges/s that counted anything else would be worthless).
            rows = int(info.xlen(events)) - rows0
            if rows != n or any(g["refused"] for g in got):
                raise SystemExit(f"{workload}: {n} admitted, {rows} charge events, refused "
                                 f"{sum(g['refused'] for g in got)}")  # fmt: skip
            own = sum(g["cpu"] for g in got)
            step = Step(
                workload=workload, offered=rate, achieved=n / wall,
                refused=sum(g["refused"] for g in got),
                redis_util=(cpu1 - cpu0) / wall, redis_cpu_us=(cpu1 - cpu0) * 1e6 / max(n, 1),
                evalsha_us=(usec1 - usec0) / max(n, 1),
                evalsha_per_req=(calls1 - calls0) / max(n, 1),
                clients_util=own / wall, client_cpu_us=own * 1e6 / max(n, 1), load=_loadavg(),
            )  # fmt: skip
            steps.append(step)
            print(_row(step), flush=True)
    finally:
        clients.close()
        for key in info.scan_iter(match=f"{prefix}:*", count=1000):
            info.delete(key)
        info.close()
    return steps


def _row(s: Step) -> str:
    offered = f"{s.offered:,}" if s.offered else "max"
    return (
        f"{s.workload:<8} {offered:>7} {s.achieved:>9,.0f} {s.redis_util * 100:>6.0f}% "
        f"{s.redis_cpu_us:>8.1f} {s.evalsha_us:>8.1f} {s.evalsha_per_req:>6.3f} "
        f"{s.clients_util * 100:>6.0f}% {s.client_cpu_us:>7.1f} {s.ceiling:>9,.0f}  {s.load}"
    )


HEADER = (
    f"{'workload':<8} {'offered':>7} {'charges/s':>9} {'Redis':>7} {'R µs/req':>8} "
    f"{'evalsha':>8} {'calls':>6} {'clients':>7} {'C µs':>7} {'ceiling':>9}  load 1/5/15"
)


# --- instructions under callgrind ----------------------------------------------------------


@contextlib.contextmanager
def callgrind_redis(core: int, keep: str | None = None) -> Iterator[tuple[str, int, str]]:
    """A redis-server under callgrind pinned to ``core``: (url, pid, dump directory);
    ``keep``: copy the dumps there at the end (for ``callgrind_annotate``)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cg-ceiling-ir-")
    proc = subprocess.Popen(
        ["taskset", "-c", str(core), "valgrind", "--tool=callgrind",
         f"--callgrind-out-file={workdir}/cg.out.%p",
         shutil.which("redis-server") or "redis-server",
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_listening(port, proc, timeout=60)
        yield f"redis://127.0.0.1:{port}/0", proc.pid, workdir
    finally:
        stop_process(proc, timeout=30)
        if keep:
            shutil.copytree(workdir, keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _dump_number(path: str) -> int:
    """The dump's sequence number (``cg.out.PID.N``; by name, .10 would sort before .2)."""
    tail = path.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() and path.count(".") >= 3 else 1 << 30


def _dump_total(pid: int, workdir: str, seen: set[str]) -> int:
    """Dump callgrind's counters now; the instructions since the last zeroing."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(400):
        fresh = set(glob.glob(os.path.join(workdir, "cg.out*"))) - seen
        for path in sorted(fresh, key=_dump_number):
            for line in Path(path).read_text().splitlines():
                if line.startswith(("totals:", "summary:")):
                    seen.add(path)
                    return int(line.split()[1])
        time.sleep(0.05)
    raise RuntimeError("callgrind wrote no dump")


def _zero(pid: int) -> None:
    """Zero callgrind's counters of ``pid``."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


async def instructions(
    workload: str, url: str, pid: int, workdir: str, seen: set[str], requests: int, burst: int
) -> tuple[float, float]:
    """Redis instructions per request of ``workload``: (charge phase, settle phase).

    ``seen``: the dumps already read (shared by every workload of one callgrind run)."""
    prefix = "cgceilir" + uuid.uuid4().hex[:8]
    await seed(workload, url, prefix)
    client = Client(workload, url, prefix)

    async def phase(n: int) -> tuple[float, float]:
        # callgrind_control returns at once; blocking the loop here is harmless.
        _zero(pid)
        adms: list[Admission] = []
        for _ in range(0, n, burst):
            adms += await asyncio.gather(
                *(client.meter.admit(ORG, FEATURE, user="u1", key_id=client.key_id)
                  for _ in range(burst))
            )  # fmt: skip
        if not all(a.ok for a in adms):
            raise SystemExit(f"{workload}: refused under callgrind")
        charge = _dump_total(pid, workdir, seen)
        _zero(pid)
        for start in range(0, len(adms), burst):
            for adm in adms[start : start + burst]:
                client._settle(adm)
            await client.meter.drain()
        settle = _dump_total(pid, workdir, seen)
        return charge / len(adms), settle / len(adms)

    try:
        await phase(burst * 2)  # warm-up
        return await phase(requests)
    finally:
        await client.close()


# --- main -----------------------------------------------------------------------------------


def summary(results: dict[str, list[Step]]) -> None:
    """Print each workload's ceiling from its busiest step (the largest pipelined batches).

    *scripts only* is 10^6 / the lowest evalsha µs per request of any step: the bound if
    Redis spent its core on nothing but the scripts (evalsha usec is wall time inside the
    script, so it grows whenever Redis waits for the core: the lowest is the least
    inflated)."""
    print("\nceiling of one Redis core, requests/s (charge + settle), from the busiest step:")
    print(f"{'workload':<8} {'achieved':>9} {'Redis util':>10} {'R CPU µs':>9} {'ceiling':>9} "
          f"{'min evalsha µs':>14} {'scripts only':>12}")  # fmt: skip
    for workload, steps in results.items():
        s = max(steps, key=lambda step: step.achieved)
        low = min(step.evalsha_us for step in steps)
        print(f"{workload:<8} {s.achieved:>9,.0f} {s.redis_util * 100:>9.0f}% "
              f"{s.redis_cpu_us:>9.1f} {s.ceiling:>9,.0f} {low:>14.1f} "
              f"{1e6 / low if low else 0:>12,.0f}")  # fmt: skip


def main(args: argparse.Namespace) -> None:
    """Ramp every workload, then (``--callgrind``) count instructions; print the summary."""
    print(f"load average at start: {_loadavg()}; Redis on core {args.redis_core}, "
          f"{args.clients} clients x {args.workers} workers x bursts of {args.burst} on core "
          f"{args.client_core}, {args.seconds:g} s per step")  # fmt: skip
    results: dict[str, list[Step]] = {}
    fixed_us = args.fixed_cpu_us
    if fixed_us is None:
        with own_redis(args.redis_core) as redis_service:
            print(HEADER)
            for round_ in range(args.rounds):
                order = args.workloads if round_ % 2 == 0 else args.workloads[::-1]
                for workload in order:
                    steps = ramp(args, redis_service.url, workload)
                    results.setdefault(workload, []).extend(steps)
        summary(results)
        if "fixed" in results:
            fixed_us = max(results["fixed"], key=lambda s: s.achieved).redis_cpu_us
    counted: dict[str, tuple[float, float]] = {}
    if args.callgrind:
        with callgrind_redis(args.redis_core, args.keep) as (url, pid, workdir):
            seen: set[str] = set()
            for workload in ("fixed", *(w for w in args.workloads if w != "fixed")):
                counted[workload] = asyncio.run(
                    instructions(workload, url, pid, workdir, seen, args.ir_requests, 64)
                )
        ir_fixed = sum(counted["fixed"])
        rate = ir_fixed / (fixed_us / 1e6) if fixed_us else 0.0
        print(
            f"\nRedis instructions per request (callgrind, {args.ir_requests} requests, "
            f"bursts of 64); rate calibrated on 'fixed': {ir_fixed:,.0f} instr / "
            f"{fixed_us or 0:.1f} CPU µs = {rate / 1e9:.2f} G instr/s"
        )
        print(f"{'workload':<8} {'charge':>9} {'settle':>9} {'total':>9} {'vs fixed':>8} "
              f"{'ceiling':>9}")  # fmt: skip
        for workload, (charge, settle) in counted.items():
            total = charge + settle
            print(f"{workload:<8} {charge:>9,.0f} {settle:>9,.0f} {total:>9,.0f} "
                  f"{total / ir_fixed:>8.2f} {rate / total:>9,.0f}")  # fmt: skip
    print(f"load average at end: {_loadavg()}")
    if args.json:
        with open(args.json, "a") as out:
            for steps in results.values():
                for s in steps:
                    out.write(json.dumps({**asdict(s), "ceiling": s.ceiling}) + "\n")
            for workload, (charge, settle) in counted.items():
                out.write(json.dumps({"workload": workload, "ir_charge": charge,
                                      "ir_settle": settle}) + "\n")  # fmt: skip


def cli() -> None:
    """Parse the arguments; run as the orchestrator or (``--child``) as a client."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3, help="load-generating processes")
    parser.add_argument("--workers", type=int, default=4, help="concurrent bursts per client")
    parser.add_argument("--burst", type=int, default=16, help="requests admitted at once")
    parser.add_argument("--seconds", type=float, default=4.0, help="per step")
    parser.add_argument(
        "--steps", default="2000,5000,10000,15000,20000,30000,0",
        help="offered requests/s in total, comma-separated (0: as fast as the clients go)",
    )  # fmt: skip
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=1, help="ramps per workload")
    parser.add_argument("--redis-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--callgrind", action="store_true", help="also count instructions")
    parser.add_argument("--ir-requests", type=int, default=2048)
    parser.add_argument(
        "--keep", help="copy callgrind's dumps here (per workload: warm-up charge and"
        " settle, then charge and settle; callgrind_annotate --inclusive=yes shows where)",
    )  # fmt: skip
    parser.add_argument(
        "--fixed-cpu-us", type=float,
        help="skip the ramp; calibrate --callgrind's instructions/s on this Redis CPU µs"
        " per 'fixed' request (from an earlier ramp)",
    )  # fmt: skip
    parser.add_argument("--json", help="append every step as a JSON line to this file")
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    args.workloads = args.workloads.split(",")
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {sorted(unknown)}")
    main(args)


if __name__ == "__main__":
    cli()
