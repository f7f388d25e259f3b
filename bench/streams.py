"""Streaming (SSE) capacity of one gateway core: ``.venv/bin/python bench/streams.py``.

A model streams a token every ~20 ms for seconds; a gateway's limit is then how many such
streams one core holds open, not requests per second. This benchmark ramps the number of
concurrent streams N and reports, per target, the most streams held while the *added*
per-event latency p99 stays under 10 ms, the server's memory per open stream and the added
time to first byte.

Pieces (all subcommands of this file, started as separate processes):

- ``upstream``: a raw-socket asyncio (uvloop + httptools) SSE server on core 1. Each request
  gets ``events=E`` OpenAI-shaped ``chat.completion.chunk`` events, one every 20 ms (the
  first with the headers), then a final usage chunk, ``data: [DONE]`` and the end of the
  chunked body; the connection stays open for the next request (the proxies pool it). Every
  event embeds its send time (``"t":`` monotonic ns, taken at the write). One 1 ms timer
  serves all streams from 20 phase slots, so the upstream costs one write per event and
  no timer per stream.
- ``client``: the load generator on core 1 (uvloop, raw sockets). It opens N streams spread
  evenly over a ramp-in time, timestamps every read on arrival and histograms arrival minus
  send per event, for the events that arrive while all N streams are open (the window).
  TTFB is from the request's write to the first response byte.
- the orchestrator (``run``, the default): private Redis and Postgres on core 1 (as
  bench/run_all.py), the targets on core 0, and the ramp.

Targets, each alone on core 0 while measured (all are started at once; idle ones cost
nothing): the upstream hit directly (the baseline: the same client and upstream with no
proxy, so "added" = target minus baseline at the same N), ``creditgate serve`` with a
fixed-cost feature, ``creditgate serve`` with a usage-cost feature (usage read from the
stream), the aiohttp peer (bench/aiohttp_proxy.py: one redis-py EVALSHA, aiohttp both
ways), and nginx with ``proxy_buffering off`` (one process, no metering: a proxy in C).

Ramp: for each N, every target still in the race gets one step (targets rotate, as in
run_all's interleaved slices). A target drops out at the first N where its added per-event
p99 reaches 10 ms, any stream fails, or fewer than 95 % of the events expected in the
window arrive (a proxy that cannot keep up). When the baseline itself fails a step, the
harness (core 1) is the limit and the ramp ends for everyone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import PATH
from bench.services import (
    ROOT,
    Server,
    cpu_seconds,
    free_port,
    own_postgres,
    own_redis,
    stop_process,
    wait_listening,
)

SUT_CORE, AUX_CORE = 0, 1
INTERVAL_MS = 20  # one event per 20 ms: a model's token rate
SLOTS = INTERVAL_MS  # the upstream's 1 ms timer visits one slot per tick
HIST_US = 10  # latency histogram resolution (µs)
HIST_MAX = 200_000  # buckets: up to 2 s; later events land in the last one
LIMIT_MS = 10.0  # the added p99 a step must stay under
USAGE_PATH = "/v1/chat/completions"
STEPS = (250, 500, 1000, 2000, 4000, 8000)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# What a chat completion chunk looks like on the wire (~190 bytes with its framing); the
# send time goes last so the client finds it with one regex.
_EVENT_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" token"},'
    b'"finish_reason":null}],"t":'
)
_USAGE_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":%d,"total_tokens":%d},"t":'
)
_DONE = b"data: [DONE]\n\n"
_HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_SEND_TIME = re.compile(rb'"t":(\d+)')
REQUEST_BODY = (
    b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
    b'"max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}'
)

CONFIG = """\
redis_url: {redis_url}
database_url: {dsn}
key_prefix: {prefix}
upstream: @UPSTREAM@
upstream_max_connections: 10000
identity: {{api_keys: true, trusted_headers: false}}
models:
  "gpt-4o-mini*": {{input: 1, output: 4}}
  default: {{input: 1, output: 4}}
features:
  lead_generation: {{cost: 1}}
  chat: {{cost: {{usage: auto, reserve: 100, max: 2000}}}}
plans:
  bench:
    allocations: {{lead_generation: {tokens}, chat: {tokens}}}
    rate_limits: [{{per: org, limit: 1000000000/second}}, {{per: user, limit: 1000000000/second}}]
default_plan: bench
routes:
  - {{method: POST, path: {path}, feature: lead_generation}}
  - {{method: POST, path: {usage_path}, feature: chat}}
"""


# --------------------------------------------------------------------------- upstream


class _UpstreamConn(asyncio.Protocol):
    """One upstream connection: parses requests (httptools) and hands each to the clock."""

    def __init__(self, clock: _Clock) -> None:
        import httptools

        self.clock = clock
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        """httptools callback (the URL may come in pieces)."""
        self.url += url

    def on_message_complete(self) -> None:
        """httptools callback: the request (and its body) is in; start its stream."""
        found = re.search(rb"[?&]events=(\d+)", self.url)
        self.url = b""
        assert self.transport is not None
        self.clock.start(self.transport, int(found.group(1)) if found else 10)


class _Clock:
    """Every stream's events from one 1 ms timer: a stream lives in one of 20 slots and is
    written to each time its slot comes round, i.e. every 20 ms."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: list[list[list[Any]]] = [[] for _ in range(SLOTS)]
        self.tick = 0
        self.next = loop.time()
        loop.call_at(self.next, self.on_tick)

    def start(self, transport: asyncio.Transport, events: int) -> None:
        """Headers and the first event now, the rest from the slot just visited (20 ms on)."""
        transport.write(_HEADERS + _event(time.monotonic_ns()))
        if events <= 1:
            transport.write(_ending(events))
            return
        stream = [transport, events - 1, events]
        self.slots[(self.tick - 1) % SLOTS].append(stream)

    def on_tick(self) -> None:
        """Write one event to every stream of this tick's slot."""
        k = self.tick % SLOTS
        self.tick += 1
        alive = []
        for stream in self.slots[k]:
            transport = stream[0]
            if transport.is_closing():
                continue
            stream[1] -= 1
            if stream[1] > 0:
                transport.write(_event(time.monotonic_ns()))
                alive.append(stream)
            else:
                transport.write(_event(time.monotonic_ns()) + _ending(stream[2]))
        self.slots[k] = alive
        # Fixed 1 ms grid: a late tick is followed at once by the next (catching up), so the
        # event rate holds; each event still carries its own send time.
        self.next += 0.001
        self.loop.call_at(self.next, self.on_tick)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(now_ns: int) -> bytes:
    return _chunk(b"%s%d}\n\n" % (_EVENT_HEAD, now_ns))


_ENDINGS: dict[int, bytes] = {}


def _ending(total: int) -> bytes:
    """The usage chunk (send time = now), [DONE] and the chunked terminator."""
    usage = (_USAGE_HEAD % (total, total + 12)) + b"%d}\n\n" % time.monotonic_ns()
    return _chunk(usage) + _chunk(_DONE) + b"0\r\n\r\n"


def serve_upstream(port: int) -> None:
    """Run the SSE upstream on 127.0.0.1:``port`` until killed."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock = _Clock(loop)
        server = await loop.create_server(
            lambda: _UpstreamConn(clock),
            "127.0.0.1",
            port,
            backlog=4096,
            reuse_port=True,  # one upstream process per harness core share the port
        )
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --------------------------------------------------------------------------- client


@dataclass(slots=True)
class _Run:
    """One client step's state and tallies."""

    request: bytes
    window: tuple[int, int]  # monotonic ns: events arriving in [start, end) are counted
    hist: list[int] = field(default_factory=lambda: [0] * (HIST_MAX + 1))
    ttfb: list[int] = field(default_factory=list)
    events: int = 0  # events counted in the window
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    finished: int = 0
    total: int = 0
    done: asyncio.Future[None] | None = None

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def end_one(self) -> None:
        self.finished += 1
        if self.finished == self.total and self.done is not None and not self.done.done():
            self.done.set_result(None)


class _StreamReader(asyncio.Protocol):
    """One stream: sends the request, timestamps every read, closes after [DONE]."""

    __slots__ = ("complete", "first", "run", "sent", "tail", "transport")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.first = True
        self.complete = False
        self.tail = b""
        self.sent = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.sent = time.monotonic_ns()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        run = self.run
        if self.first:
            self.first = False
            run.ttfb.append(now - self.sent)
            if not data.startswith(b"HTTP/1.1 200"):
                run.error("status " + data[9:12].decode(errors="replace"))
                self.complete = True  # counted already; connection_lost must not recount
                assert self.transport is not None
                self.transport.close()
                return
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        self.tail = buf[end + 2 :]
        if run.window[0] <= now < run.window[1]:
            hist = run.hist
            sends = _SEND_TIME.findall(buf, 0, end)
            run.events += len(sends)
            for sent in sends:
                us = (now - int(sent)) // (HIST_US * 1000)
                hist[us if us < HIST_MAX else HIST_MAX] += 1
        if b"data: [DONE]" in buf:
            self.complete = True
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            self.run.error("cut off" if exc is None else type(exc).__name__)
        self.run.end_one()


def _percentile_hist(hist: Sequence[int], q: float) -> float:
    """The q-quantile (0-1) of the histogram, in ms."""
    total = sum(hist)
    if total == 0:
        return float("nan")
    rank = q * (total - 1)
    seen = 0
    for bucket, count in enumerate(hist):
        seen += count
        if seen > rank:
            return (bucket + 0.5) * HIST_US / 1000
    return HIST_MAX * HIST_US / 1000


def _percentile(values: list[int], q: float) -> float:
    """The q-quantile of ns values, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def run_client(
    port: int,
    path: str,
    key: str,
    streams: int,
    ramp: float,
    events: int,
    margin: float,
    start_ns: int = 0,
) -> dict[str, Any]:
    """Open ``streams`` streams over ``ramp`` seconds, each of ``events`` events; measure
    while all are open (from ramp + margin to the first stream's end minus margin)."""
    import uvloop

    request = (
        f"POST {path}?events={events} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        # Several clients (one per harness core) share one start, hence one window.
        start = start_ns or time.monotonic_ns() + 50_000_000
        length_ns = events * INTERVAL_MS * 1_000_000
        window = (start + int((ramp + margin) * 1e9), start + length_ns - int(margin * 1e9))
        run = _Run(request, window, total=streams, done=loop.create_future())
        # The orchestrator samples the server's memory and CPU inside this window.
        print(json.dumps({"window": window}), flush=True)
        cpu0 = time.process_time()

        async def open_one(at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            try:
                await loop.create_connection(lambda: _StreamReader(run), "127.0.0.1", port)
            except OSError as exc:
                run.error("connect " + type(exc).__name__)
                run.end_one()

        base = start / 1e9
        opens = [asyncio.create_task(open_one(base + ramp * i / streams)) for i in range(streams)]
        timeout = ramp + length_ns / 1e9 + 30
        try:
            await asyncio.wait_for(run.done, timeout)  # type: ignore[arg-type]
        except TimeoutError:
            run.error(f"timeout ({streams - run.finished} streams unfinished)")
        for task in opens:
            task.cancel()
        seconds = (window[1] - window[0]) / 1e9
        return {
            "streams": streams,
            "errors": run.errors,
            "error_kinds": run.error_kinds,
            "events": run.events,
            "expected": streams * seconds * 1000 / INTERVAL_MS,
            # Raw, for merge(): the histogram's non-empty buckets and every TTFB.
            "hist": {b: c for b, c in enumerate(run.hist) if c},
            "ttfb_ns": run.ttfb,
            "client_cpu_s": time.process_time() - cpu0,
        }

    return uvloop.run(main())


# --------------------------------------------------------------------------- orchestrator


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        # Root may raise the hard limit too: 8,000 streams through a proxy take 16,000+.
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
        return 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far: the system share is the
    socket work, which on loopback includes the receiving side's TCP processing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Proc:
    """A process of this run pinned to a core, stopped with the run."""

    def __init__(self, cmd: Sequence[str], core: int, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *cmd],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_listening(port, self.proc)
        except BaseException:
            stop_process(self.proc)
            raise

    @property
    def pid(self) -> int:
        """The server's pid (taskset execs the command in place)."""
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) the process group."""
        stop_process(self.proc)


@dataclass(slots=True)
class Target:
    """One thing to stream through: its port, path, and the process to watch (none for the
    baseline)."""

    name: str
    port: int
    path: str
    pid: int | None
    idle_rss_kib: int = 0
    idle_ttfb: dict[str, Any] = field(default_factory=dict)
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    fail: str = ""  # the first step that missed the target (added p99, errors, events)
    out: str = ""  # why it left the ramp (saturated; or, with --strict, the first miss)


def judge(t: Target, n: int, r: dict[str, Any], base: dict[str, Any] | None, strict: bool) -> None:
    """Record whether step N met the target (added p99 < 10 ms, no failed stream, >= 95 %
    of the window's events; the baseline: raw p99 < 10 ms) and whether the target stays
    in the ramp: it leaves when saturated (a failed stream or < 90 % of the events: a
    server that cannot keep up), or at the first miss with ``strict``. On a loaded machine
    the lenient rule keeps measuring memory and CPU per event past the first miss."""
    added = r["p99_ms"] - (base["p99_ms"] if base is not None else 0.0)
    delivered = r["events"] / r["expected"]
    miss = ""
    if r["errors"]:
        miss = f"N={n}: {r['errors']} failed streams {r['error_kinds']}"
    elif delivered < 0.95:
        miss = f"N={n}: only {delivered:.0%} of the events arrived"
    elif added >= LIMIT_MS:
        miss = f"N={n}: p99 {'added ' if base is not None else ''}{added:.1f} ms"
    if miss and not t.fail:
        t.fail = miss
    if r["errors"] or delivered < 0.90 or (strict and miss):
        t.out = miss


def nginx_conf(workdir: Path, port: int, upstream_port: int) -> Path:
    """One process (no master), no buffering either way, pooled upstream connections."""
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 40000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  upstream sse {{ server 127.0.0.1:{upstream_port}; keepalive 10000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_timeout 5s;
    location / {{
      proxy_pass http://sse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 60s;
    }}
  }}
}}
"""
    )
    return conf


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's figures from its clients' raw results (one client per harness core)."""
    hist = [0] * (HIST_MAX + 1)
    ttfb: list[int] = []
    kinds: dict[str, int] = {}
    for part in parts:
        for bucket, count in part["hist"].items():
            hist[int(bucket)] += count
        ttfb += part["ttfb_ns"]
        for kind, count in part["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {
        "streams": sum(p["streams"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "error_kinds": kinds,
        "events": sum(p["events"] for p in parts),
        "expected": sum(p["expected"] for p in parts),
        "p50_ms": _percentile_hist(hist, 0.50),
        "p99_ms": _percentile_hist(hist, 0.99),
        "p999_ms": _percentile_hist(hist, 0.999),
        "ttfb_p50_ms": _percentile(ttfb, 0.50),
        "ttfb_p99_ms": _percentile(ttfb, 0.99),
    }


def client_step(
    target: Target,
    key: str,
    streams: int,
    events: int,
    ramp: float,
    env: dict[str, str],
    upstream_pids: Sequence[int],
    aux_cores: Sequence[int],
) -> dict[str, Any]:
    """One step: a client per harness core (the streams split evenly, one shared start),
    while this samples the server's RSS and the CPU of the server, the clients and the
    upstreams inside the window."""
    start_ns = time.monotonic_ns() + 1_000_000_000  # time for the clients to start up
    procs = []
    for i, core in enumerate(aux_cores):
        share = streams // len(aux_cores) + (i < streams % len(aux_cores))
        cmd = [
            "taskset",
            "-c",
            str(core),
            sys.executable,
            str(Path(__file__).resolve()),
            "client",
            "--port",
            str(target.port),
            "--path",
            target.path,
            "--key",
            key,
            "--streams",
            str(share),
            "--events",
            str(events),
            "--ramp",
            str(ramp),
            "--start-ns",
            str(start_ns),
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    try:
        windows = []
        for proc in procs:
            assert proc.stdout is not None
            windows.append(json.loads(proc.stdout.readline())["window"])
        window = windows[0]  # all the same: one start, one ramp, one stream length
        while time.monotonic_ns() < window[0]:
            time.sleep(0.02)
        user0, sys0 = cpu_split(target.pid) if target.pid else (0.0, 0.0)
        client0 = sum(cpu_seconds(p.pid) for p in procs)
        up0 = sum(cpu_seconds(pid) for pid in upstream_pids)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic_ns() < window[1]:
            if target.pid:
                peak = max(peak, rss_kib(target.pid))
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        user1, sys1 = cpu_split(target.pid) if target.pid else (0.0, 0.0)
        cpu = (user1 - user0 + sys1 - sys0) / elapsed
        system = (sys1 - sys0) / elapsed
        client_cpu = (sum(cpu_seconds(p.pid) for p in procs) - client0) / elapsed
        upstream_cpu = (sum(cpu_seconds(pid) for pid in upstream_pids) - up0) / elapsed
        parts = []
        for proc in procs:
            assert proc.stdout is not None
            parts.append(json.loads(proc.stdout.read()))
    finally:
        for proc in procs:
            proc.wait(timeout=120)
    result = merge(parts)
    result.update(
        rss_kib=peak,
        server_core=cpu,
        server_system=system,
        client_core=client_cpu,
        upstream_core=upstream_cpu,
    )
    return result


def step_shape(streams: int, window: float) -> tuple[float, int]:
    """Open N streams over max(2 s, N/2000 s) (a burst of thousands of connects would
    measure the accept path, not streaming), each long enough that all N stay open for
    ``window`` seconds plus margins."""
    ramp = max(2.0, streams / 2000)
    events = round((ramp + window + 1.0) * 1000 / INTERVAL_MS)
    return ramp, events


def measure_idle(
    target: Target, key: str, env: dict[str, str], probes: int, core: int = AUX_CORE
) -> None:
    """TTFB one stream at a time (``probes`` short streams of 2 events each, in sequence
    through one client process), then the server's idle RSS."""
    samples: list[dict[str, Any]] = []
    # First calls (lazy imports, script loads, the key cache, the upstream pool) are not
    # what a stream costs: 5 uncounted streams first.
    client_probe(target, key, env, 5, core)
    cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
    for _ in range(3):  # three client processes of probes/3 sequential streams
        samples.append(client_probe(target, key, env, max(1, probes // 3), core))
    streams = 3 * max(1, probes // 3)
    ttfbs = sorted(x for s in samples for x in s["ttfb_ns"])
    target.idle_ttfb = {
        "p50_ms": ttfbs[len(ttfbs) // 2] / 1e6,
        "p99_ms": ttfbs[min(len(ttfbs) - 1, int(0.99 * len(ttfbs)))] / 1e6,
        "errors": sum(s["errors"] for s in samples),
        # Server CPU per probe (connect, charge, upstream request, 2 events, end, close):
        # what a stream's setup costs, however loaded the machine.
        "cpu_us": (cpu_seconds(target.pid) - cpu0) / streams * 1e6 if target.pid else 0.0,
    }
    if target.pid:
        target.idle_rss_kib = rss_kib(target.pid)


def client_probe(
    target: Target, key: str, env: dict[str, str], count: int, core: int = AUX_CORE
) -> dict[str, Any]:
    """``count`` streams one after another (client subcommand ``probe``)."""
    cmd = [
        "taskset",
        "-c",
        str(core),
        sys.executable,
        str(Path(__file__).resolve()),
        "probe",
        "--port",
        str(target.port),
        "--path",
        target.path,
        "--key",
        key,
        "--count",
        str(count),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"probe of {target.name} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_probe(port: int, path: str, key: str, count: int) -> dict[str, Any]:
    """Sequential 2-event streams on fresh connections; TTFB of each."""
    import uvloop

    request = (
        f"POST {path}?events=2 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(REQUEST_BODY)}\r\n\r\n"
    ).encode() + REQUEST_BODY

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        ttfbs: list[int] = []
        errors = 0
        for _ in range(count):
            run = _Run(request, (0, 0), total=1, done=loop.create_future())
            try:
                await loop.create_connection(partial(_StreamReader, run), "127.0.0.1", port)
                await asyncio.wait_for(run.done, 10)  # type: ignore[arg-type]
            except (OSError, TimeoutError):
                run.error("probe")
            errors += run.errors
            ttfbs += run.ttfb
            await asyncio.sleep(0.005)
        return {"ttfb_ns": ttfbs, "errors": errors}

    return uvloop.run(main())


def fmt_ms(value: float) -> str:
    """A latency in ms, or µs when small."""
    if value != value:  # NaN
        return "-"
    return f"{value:.2f} ms" if abs(value) >= 1 else f"{value * 1000:.0f} µs"


def run(
    steps: Sequence[int],
    window: float,
    probes: int,
    nice: int,
    only: Sequence[str] | None,
    strict: bool = False,
    json_out: Path | None = None,
    profile: Path | None = None,
    aux_cores: Sequence[int] = (AUX_CORE,),
    before: Path | None = None,
) -> list[str]:
    """The whole benchmark; returns the markdown report (and writes the raw figures to
    ``json_out``). ``before``: another source tree of creditgate (e.g. ``git archive`` of
    an older commit) served as one more target per creditgate target measured (fixed
    cost, usage cost), for old vs new in one run."""
    from bench.apps import Settings
    from bench.run_all import prepare

    nofile = raise_nofile()
    aux = aux_cores[0]  # Redis, Postgres, this orchestrator and the idle probes
    os.sched_setaffinity(0, {aux})
    if nice:
        os.nice(nice)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(own_redis(aux))
        pg = stack.enter_context(own_postgres(aux))
        workdir = Path(tempfile.mkdtemp(prefix="cg-streams-"))
        stack.callback(shutil.rmtree, workdir, True)
        up_port = free_port()
        upstreams = []
        for core in aux_cores:  # one per harness core, sharing the port (SO_REUSEPORT)
            upstream = Proc(
                [sys.executable, str(Path(__file__).resolve()), "upstream", "--port", str(up_port)],
                core,
                up_port,
                env,
            )
            stack.callback(upstream.stop)
            upstreams.append(upstream)
        time.sleep(0.5)  # a second upstream binds after the port already answers
        config = (
            CONFIG.replace("@UPSTREAM@", f"http://127.0.0.1:{up_port}")
            .replace("{path}", PATH)
            .replace("{usage_path}", USAGE_PATH)
        )
        settings: Settings = asyncio.run(
            prepare(workdir, redis.url, pg.url, 0, config_template=config)
        )
        settings_path = workdir / "settings.json"
        settings.save(settings_path)
        key = next(iter(settings.keys))
        creditgate = str(Path(sys.executable).parent / "creditgate")

        targets: list[Target] = [Target("upstream direct (baseline)", up_port, PATH, None)]

        def serve_cg(name: str, path: str, tree: Path = ROOT) -> None:
            port = free_port()
            # --profile: the same server under cProfile (see profile_serve).
            me = str(Path(__file__).resolve())
            prof = (
                [sys.executable, me, "profile-serve", str(profile / f"{port}.prof")]
                if profile is not None
                else [creditgate]
            )
            proc = Proc(
                [
                    *prof,
                    "serve",
                    "--config",
                    settings.config,
                    "--port",
                    str(port),
                    "--no-sync",
                    "--log-level",
                    "warning",
                ],
                SUT_CORE,
                port,
                {**env, "PYTHONPATH": str(tree)},
            )
            stack.callback(proc.stop)
            targets.append(Target(name, port, path, proc.pid))

        wanted = set(only or ("creditgate", "creditgate-usage", "aiohttp", "nginx"))
        if "creditgate" in wanted:
            serve_cg("creditgate serve, fixed cost", PATH)
        if before is not None and "creditgate" in wanted:
            serve_cg(f"creditgate serve, fixed cost, before ({before.name})", PATH, before)
        if "creditgate-usage" in wanted:
            serve_cg("creditgate serve, usage cost (read from the stream)", USAGE_PATH)
        if before is not None and "creditgate-usage" in wanted:
            serve_cg(f"creditgate serve, usage cost, before ({before.name})", USAGE_PATH, before)
        if "aiohttp" in wanted:
            peer = Server(
                "aiohttp-proxy",
                SUT_CORE,
                settings_path,
                ["--upstream", f"http://127.0.0.1:{up_port}", "--upstream-limit", "0"],
            )
            stack.callback(peer.stop)
            targets.append(
                Target("aiohttp peer (bench/aiohttp_proxy.py)", peer.port, PATH, peer.proc.pid)
            )
        if "nginx" in wanted:
            port = free_port()
            conf = nginx_conf(workdir, port, up_port)
            nginx = Proc(
                [NGINX, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                SUT_CORE,
                port,
                env,
            )
            stack.callback(nginx.stop)
            targets.append(Target("nginx, proxy_buffering off (C)", port, PATH, nginx.pid))

        print(f"[streams] RLIMIT_NOFILE {nofile}; idle TTFB probes", flush=True)
        for t in targets:
            measure_idle(t, key, env, probes, aux)
            print(
                f"  {t.name:<55} idle TTFB p50 {fmt_ms(t.idle_ttfb['p50_ms'])}"
                f" p99 {fmt_ms(t.idle_ttfb['p99_ms'])}  RSS {t.idle_rss_kib / 1024:.1f} MiB"
                f"  server CPU {t.idle_ttfb['cpu_us']:.0f} µs per stream",
                flush=True,
            )
        base = targets[0]
        racing = list(targets)
        for i, n in enumerate(steps):
            if base not in racing:
                break
            ramp, events = step_shape(n, window)
            order = racing[i % len(racing) :] + racing[: i % len(racing)]
            for t in order:
                r = client_step(t, key, n, events, ramp, env, [u.pid for u in upstreams], aux_cores)
                t.steps[n] = r
                print(
                    f"  N={n:<5} {t.name:<55} p50 {fmt_ms(r['p50_ms'])} p99 {fmt_ms(r['p99_ms'])}"
                    f" delivered {r['events'] / r['expected']:.1%} errors {r['errors']}"
                    f" {r['error_kinds'] or ''} TTFB p50 {fmt_ms(r['ttfb_p50_ms'])}"
                    f" RSS {r['rss_kib'] / 1024:.0f} MiB server {r['server_core']:.0%}"
                    f" (system {r['server_system']:.0%})"
                    f" client {r['client_core']:.0%} upstream {r['upstream_core']:.0%}",
                    flush=True,
                )
            b = base.steps[n]
            for t in order:
                judge(t, n, t.steps[n], None if t is base else b, strict)
            racing = [t for t in racing if not t.out]
        if json_out is not None:
            dump(targets, json_out)
        lines += report(targets, steps, window)
        lines.append(
            f"(run took {time.monotonic() - started:.0f} s; 1-minute load average "
            f"before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}; RLIMIT_NOFILE {nofile})"
        )
    return lines


def best_step(t: Target, steps: Sequence[int]) -> int | None:
    """The largest N before this target's first miss."""
    passed = [n for n in steps if n in t.steps]
    if t.fail:
        failed = int(t.fail.split(":")[0][2:])
        passed = [n for n in passed if n < failed]
    return max(passed) if passed else None


def cpu_per_event_us(r: dict[str, Any], n: int) -> float:
    """Server CPU per event delivered in the window (µs): load moves it far less than
    latency, so it is the figure to compare on a shared machine."""
    seconds = r["expected"] / (n * 1000 / INTERVAL_MS)
    return float(r["server_core"]) * seconds / r["events"] * 1e6 if r["events"] else float("nan")


def per_event(r: dict[str, Any], n: int) -> str:
    """CPU per event with its system (kernel) share."""
    share = r["server_system"] / r["server_core"] if r["server_core"] else 0.0
    return f"{cpu_per_event_us(r, n):.1f} µs ({share:.0%} system)"


def dump(targets: list[Target], path: Path) -> None:
    """Every step's raw figures as JSON (re-render or compare runs later)."""
    path.write_text(
        json.dumps(
            [
                {
                    "name": t.name,
                    "idle_rss_kib": t.idle_rss_kib,
                    "idle_ttfb": t.idle_ttfb,
                    "steps": t.steps,
                    "fail": t.fail,
                    "out": t.out,
                }
                for t in targets
            ],
            indent=1,
        )
    )


def report(targets: list[Target], steps: Sequence[int], window: float) -> list[str]:
    """Markdown: the summary per target, then every step."""
    base = targets[0]
    by_name = {t.name.split(" ")[0]: t for t in targets}
    best = {t.name: best_step(t, steps) for t in targets}
    lines = [
        f"Streams of one event per {INTERVAL_MS} ms; each step opens N streams over "
        f"max(2 s, N/2000 s) and measures for {window:g} s while all N are open "
        "(streams last ramp + window + 1 s). Added = this target minus the upstream hit "
        "directly, at the same N in the same run.",
        "",
        "| target | max N with added p99 < 10 ms | added p99 at that N | RSS per stream "
        "at that N | added TTFB p50 / p99, idle | added TTFB p50 / p99 at that N | "
        "server CPU at that N | vs aiohttp peer | vs nginx | first miss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    aio = best.get(by_name["aiohttp"].name) if "aiohttp" in by_name else None
    ngx = best.get(by_name["nginx,"].name) if "nginx," in by_name else None
    for t in targets:
        n = best[t.name]
        if n is None:
            lines.append(f"| {t.name} | < {steps[0]} | | | | | | | | {t.fail} |")
            continue
        r, b = t.steps[n], base.steps[n]
        is_base = t is base
        added = r["p99_ms"] - (0 if is_base else b["p99_ms"])
        per = (r["rss_kib"] - t.idle_rss_kib) / n if t.pid else float("nan")
        idle = (
            ""
            if is_base
            else f"{fmt_ms(t.idle_ttfb['p50_ms'] - base.idle_ttfb['p50_ms'])} / "
            f"{fmt_ms(t.idle_ttfb['p99_ms'] - base.idle_ttfb['p99_ms'])}"
        )
        at_n = (
            ""
            if is_base
            else f"{fmt_ms(r['ttfb_p50_ms'] - b['ttfb_p50_ms'])} / "
            f"{fmt_ms(r['ttfb_p99_ms'] - b['ttfb_p99_ms'])}"
        )
        vs_aio = f"{n / aio:.2f}x" if aio and not is_base else ""
        vs_ngx = f"{n / ngx:.2f}x" if ngx and not is_base else ""
        more = "" if t.fail else " (no miss: ramp ended)"
        lines.append(
            f"| {t.name} | **{n:,}**{more} | {'raw ' if is_base else ''}{fmt_ms(added)} | "
            f"{'' if per != per else f'{per:.1f} KiB'} | {idle} | {at_n} | "
            f"{'' if is_base else format(r['server_core'], '.0%')} | {vs_aio} | {vs_ngx} | "
            f"{t.fail or 'none'} |"
        )
    lines += [
        "",
        "Load-independent figures, at every N a target was measured: server CPU per event "
        "(µs) and the streams one core would hold at that cost (1 s / (CPU per event x "
        f"{1000 // INTERVAL_MS} events/s)); RSS per open stream (KiB):",
        "",
        "| target | CPU per stream setup (idle probes) | "
        + " | ".join(f"N={n:,}" for n in steps)
        + " | projected streams/core (lowest-N CPU) | vs aiohttp | vs nginx |",
        "|---|---|" + "---|" * (len(steps) + 3),
    ]
    projected: dict[str, float] = {}
    for t in targets[1:]:
        first = next((n for n in steps if n in t.steps), None)
        if first is not None:
            per = cpu_per_event_us(t.steps[first], first)
            projected[t.name] = 1e6 / (per * 1000 / INTERVAL_MS) if per == per else 0.0
    aio_p = projected.get(by_name["aiohttp"].name, 0.0) if "aiohttp" in by_name else 0.0
    ngx_p = projected.get(by_name["nginx,"].name, 0.0) if "nginx," in by_name else 0.0
    for t in targets[1:]:
        cells = []
        for n in steps:
            if n not in t.steps:
                cells.append("")
                continue
            r = t.steps[n]
            # A server that falls behind has not opened all N streams (nor sent every
            # event): its figures at that N are marked.
            behind = " (behind)" if r["events"] < 0.95 * r["expected"] else ""
            cells.append(
                f"{per_event(r, n)}, {(r['rss_kib'] - t.idle_rss_kib) / n:.1f} KiB{behind}"
            )
        p = projected.get(t.name, 0.0)
        lines.append(
            f"| {t.name} | {t.idle_ttfb.get('cpu_us', 0):.0f} µs | "
            + " | ".join(cells)
            + f" | {p:,.0f} | {p / aio_p if aio_p else 0:.2f}x | {p / ngx_p if ngx_p else 0:.2f}x |"
        )
    lines += [
        "",
        "Every step (p50/p99 are raw arrival minus send; *added* subtracts the baseline's "
        "p99 at that N; *core 1*: the client's and the upstream's CPU, as shares of a core):",
        "",
        "| N | target | p50 | p99 | added p99 | events delivered | errors | TTFB p50 / p99 "
        "| RSS MiB (idle) | KiB per stream | server core | CPU µs/event | core 1: client "
        "+ upstream |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in steps:
        for t in targets:
            if n not in t.steps:
                continue
            r = t.steps[n]
            bn = base.steps.get(n)
            added = "" if t is base or bn is None else fmt_ms(r["p99_ms"] - bn["p99_ms"])
            per = f"{(r['rss_kib'] - t.idle_rss_kib) / n:.1f}" if t.pid else ""
            rss = f"{r['rss_kib'] / 1024:.0f} ({t.idle_rss_kib / 1024:.0f})" if t.pid else ""
            lines.append(
                f"| {n:,} | {t.name} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | {added} "
                f"| {r['events'] / r['expected']:.1%} | {r['errors']} "
                f"| {fmt_ms(r['ttfb_p50_ms'])} / {fmt_ms(r['ttfb_p99_ms'])} | {rss} | {per} "
                f"| {format(r['server_core'], '.0%') if t.pid else ''} "
                f"| {per_event(r, n) if t.pid else ''} "
                f"| {r['client_core']:.0%} + {r['upstream_core']:.0%} |"
            )
    lines.append("")
    return lines


def profile_serve(out: str, argv: list[str]) -> None:
    """``creditgate ARGV`` under cProfile, dumped to ``out`` when SIGTERM stops it.

    uvicorn re-raises the SIGTERM it caught once it has shut down; with the default
    handler that would kill the process before cProfile writes, so the handler installed
    here (the one uvicorn restores) exits through SystemExit instead."""
    import cProfile
    import signal

    from gateway.commands.cli import main as cli

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.argv = ["creditgate", *argv]
    cProfile.runctx("cli()", {"cli": cli}, {}, out)


def render(path: Path, window: float) -> str:
    """The markdown report again from a run's raw JSON (``--out``'s .json)."""
    targets = []
    for d in json.loads(path.read_text()):
        t = Target(d["name"], 0, "", 1 if d["name"].split(" ")[0] != "upstream" else None)
        t.idle_rss_kib, t.idle_ttfb, t.fail, t.out = (
            d["idle_rss_kib"],
            d["idle_ttfb"],
            d["fail"],
            d["out"],
        )
        t.steps = {int(n): r for n, r in d["steps"].items()}
        targets.append(t)
    steps = sorted({n for t in targets for n in t.steps} | set(STEPS))
    return "\n".join(report(targets, steps, window))


def main() -> None:
    if sys.argv[1:2] == ["profile-serve"]:  # its arguments are creditgate's, not ours
        profile_serve(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    up = sub.add_parser("upstream", help="the SSE upstream")
    up.add_argument("--port", type=int, required=True)
    cl = sub.add_parser("client", help="one ramp step")
    pr = sub.add_parser("probe", help="sequential TTFB probes")
    for p in (cl, pr):
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default=PATH)
        p.add_argument("--key", required=True)
    cl.add_argument("--streams", type=int, required=True)
    cl.add_argument("--events", type=int, required=True)
    cl.add_argument("--ramp", type=float, required=True)
    cl.add_argument("--margin", type=float, default=0.5)
    cl.add_argument("--start-ns", type=int, default=0, help="shared start (monotonic ns)")
    pr.add_argument("--count", type=int, default=30)
    rd = sub.add_parser("render", help="the report again from a run's JSON")
    rd.add_argument("json", type=Path)
    rd.add_argument("--window", type=float, default=6.0)
    rn = sub.add_parser("run", help="the whole benchmark (the default)")
    for p in (parser, rn):
        p.add_argument(
            "--steps", default=",".join(map(str, STEPS)), help="concurrent streams per step"
        )
        p.add_argument("--window", type=float, default=6.0, help="seconds measured per step")
        p.add_argument("--probes", type=int, default=60, help="idle TTFB streams per target")
        p.add_argument("--nice", type=int, default=0)
        p.add_argument(
            "--target",
            action="append",
            choices=("creditgate", "creditgate-usage", "aiohttp", "nginx"),
            help="measure only these (the baseline always runs; repeatable)",
        )
        p.add_argument(
            "--aux-cores",
            default=str(AUX_CORE),
            help="harness cores, e.g. 1,2,3: a client and an upstream process on each "
            "(default: 1; the server under test is always on core 0)",
        )
        p.add_argument(
            "--profile",
            type=Path,
            help="run creditgate under cProfile, writing DIR/<port>.prof (diagnosis only)",
        )
        p.add_argument(
            "--strict",
            action="store_true",
            help="a target leaves the ramp at its first miss (default: when saturated)",
        )
        p.add_argument(
            "--out", type=Path, help="also write the markdown report here (raw figures: .json)"
        )
        p.add_argument(
            "--before",
            type=Path,
            help="another creditgate source tree (e.g. git archive of the previous commit "
            "unpacked in a directory) served as one more target per creditgate target "
            "(fixed cost, usage cost): old vs new in one run",
        )
    args = parser.parse_args()
    if args.cmd == "upstream":
        serve_upstream(args.port)
    elif args.cmd == "client":
        print(
            json.dumps(
                run_client(
                    args.port,
                    args.path,
                    args.key,
                    args.streams,
                    args.ramp,
                    args.events,
                    args.margin,
                    args.start_ns,
                )
            ),
            flush=True,
        )
    elif args.cmd == "render":
        print(render(args.json, args.window))
    elif args.cmd == "probe":
        print(json.dumps(run_probe(args.port, args.path, args.key, args.count)), flush=True)
    else:
        steps = [int(s) for s in args.steps.split(",")]
        json_out = args.out.with_suffix(".json") if args.out else None
        text = "\n".join(
            run(
                steps,
                args.window,
                args.probes,
                args.nice,
                args.target,
                args.strict,
                json_out,
                args.profile,
                [int(c) for c in args.aux_cores.split(",")],
                args.before,
            )
        )
        print("\n" + text, flush=True)
        if args.out:
            args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
