"""Every creditgate gateway benchmark in one run: ``.venv/bin/python bench/run_all.py``.

Placement (2 cores): the server under test always runs alone on core 0; wrk (1 thread),
the private Redis and Postgres this run starts, the proxy benchmark's upstream and this
orchestrator (idle while wrk runs) share core 1. Baselines and peers get the same placement
and the same wrk script, and every figure is reported as a ratio to a baseline measured in
this run. Sections (``--only`` picks some):

1. middleware: bare Starlette app vs the same app + CreditGateMiddleware charging every
   request (one org / many orgs; pipelined runner / redis-py runner) vs BaseHTTPMiddleware
   doing one redis-py EVALSHA.
2. proxy: the bare app hit directly vs creditgate's GatewayApp proxying to it (upstream on
   core 1) vs a plain aiohttp streaming proxy with one redis-py EVALSHA per request.
3. postgres: one Postgres transaction per request on one org's row (bench/pg_peer.py) vs
   creditgate.
4. upstream-clients: bench/upstream_clients.py (httpx vs aiohttp inside UpstreamProxy).
5. streams (only with ``--only streams``: ~10 minutes): bench/streams.py, concurrent SSE
   streams through creditgate serve, the aiohttp peer and nginx (its own services).

Identity: API keys (``Authorization: Bearer cg_...``) created in this run's database and
served from the gateway's in-process key cache. Each org has a plan of 10^9 tokens plus a
10^9 grant and rate limits of 10^9/second per org and per user, so nothing is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import BODY, FEATURE, Settings, naive_balance_key
from bench.services import (
    PG_BIN,
    ROOT,
    WRK,
    Server,
    Service,
    WrkResult,
    check_response,
    own_postgres,
    own_redis,
    run_wrk,
    wrk_script,
)

SUT_CORE, AUX_CORE = 0, 1
SECTIONS = ("middleware", "proxy", "postgres", "upstream-clients", "streams")
DEFAULT_SECTIONS = SECTIONS[:-1]  # streams takes longer than all the others together
PLAN_TOKENS = 10**9
CONFIG = """\
redis_url: {redis_url}
database_url: {dsn}
key_prefix: {prefix}
identity: {{api_keys: true, trusted_headers: false}}
features: {{lead_generation: {{cost: 1}}}}
plans:
  bench:
    allocations: {{lead_generation: {tokens}}}
    rate_limits: [{{per: org, limit: 1000000000/second}}, {{per: user, limit: 1000000000/second}}]
default_plan: bench
routes:
  - {{method: POST, path: /api/v1/leads/generate, feature: lead_generation}}
"""


async def prepare(
    workdir: Path, redis_url: str, admin_dsn: str, orgs: int, config_template: str = CONFIG
) -> Settings:
    """Create the database, config, orgs (plan, grant, API key) and the peers' state.

    ``config_template`` is CONFIG or another config with the same placeholders
    (bench/streams.py adds an upstream and a usage-cost feature)."""
    from bench.pg_peer import create_schema
    from gateway.config import load_config
    from gateway.ledger.migrate import migrate
    from gateway.metering.gate import CreditGate

    dsn = admin_dsn.rsplit("/", 1)[0] + "/creditgate_bench_" + uuid.uuid4().hex[:8]
    await migrate(dsn)  # creates the database first
    prefix = "cgb" + uuid.uuid4().hex[:8]
    config_path = workdir / "creditgate.yaml"
    config_path.write_text(
        config_template.format(redis_url=redis_url, dsn=dsn, prefix=prefix, tokens=PLAN_TOKENS)
    )
    gate = CreditGate(load_config(config_path))
    names = [f"bench-org-{n:04d}" for n in range(orgs + 1)]
    keys: dict[str, tuple[str, str]] = {}
    limit = asyncio.Semaphore(8)

    async def one(org: str) -> None:
        async with limit:
            await gate.set_plan(org, "bench")
            await gate.grant(org, FEATURE, PLAN_TOKENS, reference="bench-grant")
            _, key = await gate.create_key(org, user="u1", name="bench")
            keys[key] = (org, "u1")

    try:
        await asyncio.gather(*(one(org) for org in names))
        await gate.redis.client.mset({naive_balance_key(prefix, o): 10**12 for o in names})
    finally:
        await gate.close()
    await create_schema(dsn, names[:1], 10**12)
    return Settings(str(config_path), redis_url, prefix, dsn, keys)


async def cleanup_shared(settings: Settings, admin_dsn: str) -> None:
    """Delete this run's keys and database from shared servers (--redis-url / --pg-dsn)."""
    import asyncpg

    from gateway.redisio.connect import connect_redis

    client = connect_redis(settings.redis_url).client
    async for key in client.scan_iter(match=f"{settings.prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
    conn = await asyncpg.connect(admin_dsn)
    try:
        name = settings.pg_dsn.rsplit("/", 1)[1]
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class Target:
    """One configuration to measure: a server kind, the wrk script, and its upstream."""

    name: str
    kind: str
    script: str = "one"  # "one": one org's key; "many": cycle through every other org
    upstream: str | None = None  # kind served on the aux core as this server's upstream


@dataclass(frozen=True, slots=True)
class Measured:
    """The slices of one target at one concurrency: the best one, and the spread."""

    best: WrkResult  # the slice with the most req/s (the least disturbed by other load)
    rps: tuple[float, ...]  # every slice's req/s

    @property
    def spread(self) -> str:
        """min-max req/s over the slices."""
        return f"{min(self.rps):,.0f}-{max(self.rps):,.0f}"


class Bench:
    """Starts servers, runs wrk in interleaved slices, keeps the results."""

    def __init__(
        self,
        settings_path: Path,
        scripts: dict[str, Path],
        redis: Service | None,
        slices: int,
        slice_seconds: float,
        warmup: float,
        key: str,
    ) -> None:
        self.settings_path = settings_path
        self.key = key  # the one-org script's API key, for the response check
        self.scripts = scripts
        self.redis = redis
        self.slices = slices
        self.slice_seconds = slice_seconds
        self.warmup = warmup

    def compare(
        self, targets: list[Target], conns: tuple[int, ...]
    ) -> dict[str, dict[int, Measured]]:
        """Serve every target at once (core 0; upstreams on core 1), then run wrk against
        them in turn, ``slices`` times per concurrency, so a change in the machine's other
        load hits every target alike. Keeps the best slice of each (see Measured)."""
        runs: dict[tuple[str, int], list[WrkResult]] = {}
        with contextlib.ExitStack() as stack:
            servers: list[tuple[Target, Server, str]] = []
            for t in targets:
                extra: list[str] = []
                if t.upstream is not None:
                    up = Server(t.upstream, AUX_CORE, self.settings_path)
                    stack.callback(up.stop)
                    extra = ["--upstream", up.url]
                server = Server(t.kind, SUT_CORE, self.settings_path, extra)
                stack.callback(server.stop)
                url = server.url + "/api/v1/leads/generate"
                servers.append((t, server, url))
                check_response(url, self.key, BODY)  # a proxy must pass the body through
                if self.warmup > 0:  # connections, key cache, first seeds, branch caches
                    run_wrk(
                        url,
                        self.scripts[t.script],
                        core=AUX_CORE,
                        connections=64,
                        seconds=self.warmup,
                    )
            for c in conns:
                for n in range(self.slices):
                    # Rotate the order so no target always follows the same neighbour.
                    for t, server, url in servers[n % len(servers) :] + servers[: n % len(servers)]:
                        runs.setdefault((t.name, c), []).append(
                            run_wrk(
                                url,
                                self.scripts[t.script],
                                core=AUX_CORE,
                                connections=c,
                                seconds=self.slice_seconds,
                                server=server,
                                redis=self.redis,
                            )
                        )
        out: dict[str, dict[int, Measured]] = {}
        for (name, c), results in runs.items():
            best = max(results, key=lambda r: r.rps)
            out.setdefault(name, {})[c] = Measured(best, tuple(r.rps for r in results))
        for t in targets:
            for c in conns:
                m = out[t.name][c]
                r = m.best
                print(
                    f"  {t.name:<44} c={c:<3} {r.rps:>9.0f} req/s ({m.spread})  "
                    f"p50 {r.p50_ms:.3f} ms  server {r.server_cpu_us:.0f} µs/req  "
                    f"redis {r.redis_cpu_us:.0f} µs/req, {r.scripts_per_request:.2f} EVALSHA/req",
                    flush=True,
                )
        return out


HEADER = (
    "| configuration | req/s ratio | req/s (best; all slices) | p50 ms | added p50 "
    "| server CPU µs/req | CPU ratio | Redis CPU µs/req | EVALSHA/req | target |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def fmt_row(what: str, m: Measured, base: Measured, target: str = "") -> str:
    """A markdown row: ratios to the baseline, then the absolute figures."""
    r, b = m.best, base.best
    added = "" if m is base else f"{(r.p50_ms - b.p50_ms) * 1000:+.0f} µs"
    cpu_ratio = b.server_cpu_us / r.server_cpu_us if r.server_cpu_us else 0.0
    return (
        f"| {what} | **{r.rps / b.rps:.2f}x** | {r.rps:,.0f} ({m.spread}) | "
        f"{r.p50_ms:.3f} | {added} | {r.server_cpu_us:.0f} | {cpu_ratio:.2f}x | "
        f"{r.redis_cpu_us:.0f} | {r.scripts_per_request:.2f} | {target} |"
    )


def run_sections(bench: Bench, sections: list[str]) -> list[str]:
    """Run the HTTP sections; return the markdown report."""
    out: list[str] = []
    hi, lo = 64, 8
    bare = Target("bare Starlette app", "bare")
    if "middleware" in sections:
        print("[middleware]", flush=True)
        targets = [
            bare,
            Target("bare app + 1 pipelined EVALSHA 'return 1' (floor)", "floor"),
            Target("CreditGateMiddleware, 1 org", "cg"),
            Target("CreditGateMiddleware, many orgs", "cg", "many"),
            Target("CreditGateMiddleware, redis-py runner", "cg-redispy"),
            Target("BaseHTTPMiddleware + redis-py EVALSHA", "naive"),
        ]
        res = bench.compare(targets, (hi, lo))
        out += ["### 1. Middleware (baseline: the bare Starlette app, same run)", "", HEADER]
        goals = {
            "CreditGateMiddleware, 1 org": ">= 0.6x",
            "CreditGateMiddleware, many orgs": ">= 0.6x",
            "BaseHTTPMiddleware + redis-py EVALSHA": "naive design",
            "CreditGateMiddleware, redis-py runner": "comparison",
        }
        for c in (hi, lo):
            for t in targets:
                goal = goals.get(t.name, "")
                if c == lo and t.name.startswith("CreditGateMiddleware, 1"):
                    goal += ", added p50 < 500 µs"
                out.append(fmt_row(f"{t.name}, c={c}", res[t.name][c], res[bare.name][c], goal))
        out.append("")
    if "proxy" in sections:
        print("[proxy]", flush=True)
        gw = Target("creditgate proxy (GatewayApp) -> bare app", "gateway", upstream="bare")
        aio = Target(
            "aiohttp streaming proxy + redis-py EVALSHA -> bare app",
            "aiohttp-proxy",
            upstream="bare",
        )
        lean = Target(
            "creditgate proxy with aiohttp's client (upstream_client: aiohttp)",
            "gateway-aiohttp",
            upstream="bare",
        )
        res = bench.compare([bare, gw, aio, lean], (hi, lo))
        out += ["### 2. Proxy (baseline: the bare app hit directly, same run)", "", HEADER]
        for c in (hi, lo):
            out.append(fmt_row(f"bare app direct, c={c}", res[bare.name][c], res[bare.name][c]))
            out.append(fmt_row(f"{gw.name}, c={c}", res[gw.name][c], res[bare.name][c], ">= 0.25x"))
            out.append(fmt_row(f"{aio.name}, c={c}", res[aio.name][c], res[bare.name][c], "peer"))
            out.append(fmt_row(f"{lean.name}, c={c}", res[lean.name][c], res[bare.name][c]))
            for t in (gw, lean):
                g, a = res[t.name][c].best, res[aio.name][c].best
                out.append(
                    f"| **{t.name} / aiohttp proxy, c={c}** | **{g.rps / a.rps:.2f}x**"
                    f" | | | | | {a.server_cpu_us / g.server_cpu_us:.2f}x | | | >= 2x |"
                )
        out.append("")
    if "postgres" in sections:
        print("[postgres]", flush=True)
        pg = Target("Postgres txn per request, synchronous_commit=on", "pg-peer")
        pga = Target("Postgres txn per request, synchronous_commit=off", "pg-peer-async")
        cg = Target("CreditGateMiddleware, 1 org", "cg")
        res = bench.compare([pg, pga, cg], (hi,))
        out += [
            "### 3. The design it replaces (baseline: a Postgres transaction per request, "
            "all on one org)",
            "",
            HEADER,
        ]
        out.append(fmt_row(f"{pg.name}, c={hi}", res[pg.name][hi], res[pg.name][hi]))
        out.append(fmt_row(f"{pga.name}, c={hi}", res[pga.name][hi], res[pg.name][hi]))
        out.append(fmt_row(f"{cg.name}, c={hi}", res[cg.name][hi], res[pg.name][hi], ">= 10x"))
        ours, peer = res[cg.name][hi].best, res[pga.name][hi].best
        out.append(
            f"| **creditgate / Postgres peer with synchronous_commit=off** | "
            f"**{ours.rps / peer.rps:.1f}x** | | | | | | | | |"
        )
        out.append("")
    return out


def machine_info() -> list[str]:
    """The machine and the versions the figures belong to (markdown lines)."""
    import importlib.metadata
    import platform

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )

    def version(cmd: list[str]) -> str:
        try:
            return (
                subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            return "not found"

    packages = [
        "uvicorn",
        "starlette",
        "redis",
        "hiredis",
        "aiohttp",
        "httpx",
        "uvloop",
        "httptools",
        "asyncpg",
    ]
    pkgs = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    return [
        f"- CPUs: {os.cpu_count()} (`nproc`), {cpu}; Linux {platform.release()}",
        f"- Python {platform.python_version()}; {pkgs}",
        f"- {version(['redis-server', '--version'])}",
        f"- {version([str(PG_BIN / 'postgres'), '--version'])}",
        f"- {version([WRK, '--version'])}".replace("Copyright (C) 2012 Will Glozer", ""),
    ]


def run_upstream_clients(seconds: float, repeats: int) -> str:
    """Run bench/upstream_clients.py and return its table."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "upstream_clients.py"),
            "--seconds",
            str(seconds),
            "--repeats",
            str(repeats),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--slices", type=int, default=3, help="wrk runs per target and concurrency, interleaved"
    )
    parser.add_argument("--slice-seconds", type=float, default=4.0, help="per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="per server start")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run everything at this niceness (e.g. -10 on a busy machine)",
    )
    parser.add_argument("--orgs", type=int, default=256, help="orgs in the many-orgs runs")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument(
        "--pg-dsn",
        help="admin DSN of a Postgres to use instead of a "
        "private one (a throwaway database is created and dropped)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    sections = args.only or list(DEFAULT_SECTIONS)
    os.sched_setaffinity(0, {AUX_CORE})
    if args.nice:
        os.nice(args.nice)  # inherited by every process started from here
    report: list[str] = ["### Machine", "", *machine_info(), ""]
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        http = [s for s in sections if s not in ("upstream-clients", "streams")]
        if http:
            redis = (
                Service(args.redis_url, None)
                if args.redis_url
                else stack.enter_context(own_redis(AUX_CORE))
            )
            redis_url = redis.url
            admin_dsn = args.pg_dsn or stack.enter_context(own_postgres(AUX_CORE)).url
            workdir = Path(tempfile.mkdtemp(prefix="cg-bench-"))
            stack.callback(shutil.rmtree, workdir, True)
            settings = asyncio.run(prepare(workdir, redis_url, admin_dsn, args.orgs))
            if args.redis_url or args.pg_dsn:
                stack.callback(lambda: asyncio.run(cleanup_shared(settings, admin_dsn)))
            settings_path = workdir / "settings.json"
            settings.save(settings_path)
            keys = list(settings.keys)
            first = next(k for k, (org, _) in settings.keys.items() if org == "bench-org-0000")
            scripts = {
                "one": wrk_script(workdir / "one.lua", [first]),
                "many": wrk_script(workdir / "many.lua", [k for k in keys if k != first]),
            }
            bench = Bench(
                settings_path, scripts, redis, args.slices, args.slice_seconds, args.warmup, first
            )
            report += run_sections(bench, http)
        if "upstream-clients" in sections:
            print("[upstream-clients]", flush=True)
            table = run_upstream_clients(2.0, 2)
            print(table, flush=True)
            report += [
                "### 4. Upstream HTTP client inside UpstreamProxy (bench/upstream_clients.py)",
                "",
                "```",
                table.rstrip(),
                "```",
                "",
            ]
    if "streams" in sections:
        from bench import streams

        print("[streams]", flush=True)
        report += ["### 5. Concurrent SSE streams (bench/streams.py)", ""]
        # Its own Redis, Postgres and upstream; the niceness set above is inherited.
        report += streams.run(streams.STEPS, 6.0, 60, 0, None)
    report.append(
        f"(run took {time.monotonic() - started:.0f} s; 1-minute load average "
        f"before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f})"
    )
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
