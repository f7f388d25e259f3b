"""System calls and user/kernel CPU per request: the bare app vs the proxy under wrk.

``python bench/proxy_syscalls.py [--seconds 4] [--connections 64]``

Serves the bare app (core 0) and creditgate's proxy (``creditgate serve``'s protocol, core
0) in front of a bare app on core 1, with a private Redis and Postgres on core 1, as
bench/run_all.py's proxy section does. For each server: a warm-up, then one wrk run during
which ``perf stat`` counts the server process's system calls by kind (kernel tracepoints,
no ptrace: the server runs at its normal speed) and /proc gives its user and system CPU
time. Prints both per request. Run it from the tree to measure (bench/serve.py of that tree
serves); counts depend on how much each loop turn batches, so compare trees in one window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import BODY
from bench.run_all import AUX_CORE, SUT_CORE, prepare
from bench.services import (
    WRK,
    Server,
    check_response,
    own_postgres,
    own_redis,
    parse_wrk,
    wrk_script,
)

SYSCALLS = (
    "read",
    "write",
    "writev",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "accept4",
    "close",
    "futex",
    "getpid",
    "ioctl",
    "shutdown",
    "clock_gettime",
)


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(server: Server, url: str, script: Path, connections: int, seconds: int) -> dict:
    """One wrk run against ``server`` with its syscalls counted; per-request figures."""
    events = ",".join(
        ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{name}" for name in SYSCALLS]
    )
    out = Path(tempfile.mkstemp(prefix="cg-perf-")[1])
    perf = subprocess.Popen(
        ["perf", "stat", "-x", ",", "-o", str(out), "-e", events, "-p", str(server.proc.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cpu0 = user_system(server.proc.pid)
        done = subprocess.run(
            [
                "taskset",
                "-c",
                str(AUX_CORE),
                WRK,
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        cpu1 = user_system(server.proc.pid)
    finally:
        perf.send_signal(2)  # SIGINT: perf stat writes its counts and exits
        perf.wait(timeout=30)
    rps, _, requests, errors = parse_wrk(done.stdout)
    if errors:
        raise RuntimeError(done.stdout)
    counts: dict[str, float] = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            name = re.sub(r"^(raw_)?syscalls:sys_enter_?", "", parts[2]) or "all"
            counts[name] = int(parts[0]) / requests
    out.unlink()
    return {
        "rps": rps,
        "user_us": (cpu1[0] - cpu0[0]) * 1e6 / requests,
        "sys_us": (cpu1[1] - cpu0[1]) * 1e6 / requests,
        "calls": counts,
    }


def by_fd(server: Server, wrk: list[str], data: Path, callers: str | None) -> None:
    """``--callers``: the proxy's C call stacks at one system call (perf report); else
    ``--by-fd``: reads and writes per request by file descriptor (which socket: the
    client's, the upstream's, Redis's are told apart by their share)."""
    names = [callers] if callers else ["read", "write", "writev", "sendto", "recvfrom"]
    events = [x for n in names for x in ("-e", f"syscalls:sys_enter_{n}")]
    graph = ["--call-graph", "dwarf"] if callers else []
    rec = subprocess.Popen(
        ["perf", "record", "-q", *graph, "-o", str(data), *events, "-p", str(server.proc.pid)]
    )
    done = subprocess.run(wrk, check=True, capture_output=True, text=True)
    rec.send_signal(2)  # SIGINT: perf record writes its data and exits
    rec.wait(timeout=120)
    if callers:
        subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-G"])
        return
    requests = parse_wrk(done.stdout)[2]
    script = subprocess.run(
        ["perf", "script", "-i", str(data)], check=True, capture_output=True, text=True
    ).stdout
    counts: dict[tuple[str, int], int] = {}
    for m in re.finditer(r"sys_enter_(\w+): fd: (0x[0-9a-f]+)", script):
        key = (m.group(1), int(m.group(2), 16))
        counts[key] = counts.get(key, 0) + 1
    print(f"{requests} requests (wrk); system calls per request by fd, the largest first:")
    for (name, fd), n in sorted(counts.items(), key=lambda kv: -kv[1])[:40]:
        if n / requests >= 0.001:
            print(f"  {name:<8} fd {fd:>4}: {n / requests:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--callers",
        metavar="SYSCALL",
        help="instead: record the proxy's C call stacks at this system call (perf report)",
    )
    parser.add_argument(
        "--by-fd",
        action="store_true",
        help="instead: the proxy's reads and writes per request by file descriptor",
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {AUX_CORE})
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(own_redis(AUX_CORE))
        pg = stack.enter_context(own_postgres(AUX_CORE))
        workdir = Path(tempfile.mkdtemp(prefix="cg-bench-"))
        stack.callback(shutil.rmtree, workdir, True)
        settings = asyncio.run(prepare(workdir, redis.url, pg.url, 1))
        settings_path = workdir / "settings.json"
        settings.save(settings_path)
        key = next(k for k, (org, _) in settings.keys.items() if org == "bench-org-0000")
        script = wrk_script(workdir / "one.lua", [key])
        bare = Server("bare", SUT_CORE, settings_path)
        stack.callback(bare.stop)
        up = Server("bare", AUX_CORE, settings_path)
        stack.callback(up.stop)
        proxy = Server("gateway", SUT_CORE, settings_path, ["--upstream", up.url])
        stack.callback(proxy.stop)
        servers = {"bare app": bare, "proxy": proxy}
        warm = ["taskset", "-c", str(AUX_CORE), WRK, "-t1", "-c64"]
        for server in servers.values():
            url = server.url + "/api/v1/leads/generate"
            check_response(url, key, BODY)
            subprocess.run(
                [*warm, "-d2s", "-s", str(script), url],
                check=True,
                capture_output=True,
            )
        if args.callers or args.by_fd:
            by_fd(
                proxy,
                [*warm, "-d2s", "-s", str(script), proxy.url + "/api/v1/leads/generate"],
                workdir / "perf.data",
                args.callers,
            )
            return
        results: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name, server in servers.items():
                url = server.url + "/api/v1/leads/generate"
                results.setdefault(name, []).append(
                    measure(server, url, script, args.connections, args.seconds)
                )
    names = ["all", *SYSCALLS]
    print(f"c={args.connections}, {args.seconds} s per run, load {os.getloadavg()[0]:.2f}")
    header = "| per request | " + " | ".join(
        f"{n} {i + 1}" for n in results for i in range(len(results[n]))
    )
    print(header + " |")
    print("|---" * (1 + sum(len(v) for v in results.values())) + "|")
    rows = [
        ("req/s", "rps", "{:,.0f}"),
        ("user µs", "user_us", "{:.1f}"),
        ("system µs", "sys_us", "{:.1f}"),
    ]
    for label, field, fmt in rows:
        cells = [fmt.format(r[field]) for v in results.values() for r in v]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for n in names:
        cells = [f"{r['calls'].get(n, 0.0):.2f}" for v in results.values() for r in v]
        if any(c != "0.00" for c in cells):
            print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
