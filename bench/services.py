"""Processes a benchmark run owns: a private Redis and Postgres, servers under test, wrk.

Everything here is started pinned to a core (``taskset``), bound to 127.0.0.1 on a free
port, and stopped by the ``ExitStack`` it was registered with (even when the run fails), so
a run never leaves anything behind and never touches the shared services' data.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
WRK = shutil.which("wrk") or "/usr/bin/wrk"


_port_cursor = 0


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1).

    ``CG_BENCH_PORTS=FIRST-LAST`` keeps a run inside a range of ports (a shared machine
    where each session owns a few): the ports are tried in turn from where the last call
    stopped; without it, any free port the kernel picks.
    """
    global _port_cursor
    spec = os.environ.get("CG_BENCH_PORTS")
    if not spec:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    first, last = (int(part) for part in spec.split("-"))
    span = last - first + 1
    for step in range(span):
        port = first + (_port_cursor + step) % span
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _port_cursor = (_port_cursor + step + 1) % span
        return port
    raise RuntimeError(f"no free port in CG_BENCH_PORTS={spec}")


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0
) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (or ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:g}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group we started (by its id), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Service:
    """A datastore process a run started (or None for pid when it uses a shared one)."""

    url: str
    pid: int | None

    def cpu(self) -> float:
        """CPU seconds used so far (0 when the process is not ours)."""
        return cpu_seconds(self.pid) if self.pid is not None else 0.0

    def script_calls(self) -> int:
        """EVALSHA calls this Redis has served so far (0 for a Postgres)."""
        if not self.url.startswith("redis"):
            return 0
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@contextlib.contextmanager
def own_redis(core: int) -> Iterator[Service]:
    """A private redis-server pinned to ``core``, no persistence."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cg-bench-redis-")
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(core),
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--logfile",
            os.path.join(workdir, "log"),
        ],
        start_new_session=True,
    )
    try:
        wait_listening(port, proc)
        yield Service(f"redis://127.0.0.1:{port}/0", proc.pid)
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def own_postgres(core: int) -> Iterator[Service]:
    """A private PostgreSQL 15 pinned to ``core`` (default settings: fsync and
    synchronous_commit on), run as the postgres user; its URL is the admin DSN."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cg-bench-pg-"))
    shutil.chown(workdir, "postgres", "postgres")
    data = workdir / "data"

    def pg(*args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    try:
        pg(str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data))
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1"
        # The postmaster inherits the affinity, and every backend inherits it from there.
        pg(
            "taskset",
            "-c",
            str(core),
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(workdir / "log"),
            "-w",
            "start",
        )
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield Service(f"postgresql://postgres@127.0.0.1:{port}/postgres", pid)
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


class Server:
    """A server under test: ``bench/serve.py KIND`` pinned to one core."""

    def __init__(self, kind: str, core: int, settings: Path, extra: Sequence[str] = ()) -> None:
        self.kind = kind
        self.core = core
        self.port = free_port()
        cmd = [
            "taskset",
            "-c",
            str(core),
            sys.executable,
            str(ROOT / "bench" / "serve.py"),
            kind,
            "--port",
            str(self.port),
            "--settings",
            str(settings),
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            wait_listening(self.port, self.proc)
        except BaseException:
            stop_process(self.proc)
            raise

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        """CPU seconds used so far by the server process."""
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        """Stop the server (it runs its ASGI lifespan shutdown on SIGTERM)."""
        stop_process(self.proc)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers plus socket errors
    server_cpu_us: float  # server CPU per request (µs), when a server was watched
    redis_cpu_us: float = 0.0  # the private Redis's CPU per request (µs)
    scripts_per_request: float = 0.0  # EVALSHA calls per request (charge + batched settles)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, dict[str, float], int, int]:
    """(req/s, latency percentiles in ms, requests, errors) from wrk --latency output."""
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))  # type: ignore[union-attr]
    pct = {
        m.group(1): _ms(m.group(2))
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.MULTILINE)
    }
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    if found := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(found.group(1))
    if found := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(g) for g in found.groups())
    return rps, pct, requests, errors


def run_wrk(
    url: str,
    script: Path,
    *,
    core: int,
    connections: int,
    seconds: float,
    server: Server | None = None,
    redis: Service | None = None,
) -> WrkResult:
    """One wrk run (1 thread, pinned to ``core``); raises if any request failed."""
    cmd = [
        "taskset",
        "-c",
        str(core),
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    cpu0 = server.cpu() if server is not None else 0.0
    rcpu0 = redis.cpu() if redis is not None else 0.0
    calls0 = redis.script_calls() if redis is not None else 0
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 30)
    cpu = server.cpu() - cpu0 if server is not None else 0.0
    rcpu = redis.cpu() - rcpu0 if redis is not None else 0.0
    calls = redis.script_calls() - calls0 if redis is not None else 0
    rps, pct, requests, errors = parse_wrk(done.stdout)
    if errors:
        raise RuntimeError(f"{errors} failed requests against {url}:\n{done.stdout}")
    per = 1e6 / requests if requests else 0.0
    return WrkResult(
        rps,
        pct["50"],
        pct["90"],
        pct["99"],
        requests,
        errors,
        cpu * per,
        rcpu * per,
        calls / requests if requests else 0.0,
    )


def check_response(url: str, key: str, body: bytes) -> None:
    """One request as wrk will send it; raise unless it gets 200 and exactly ``body``."""
    import urllib.request

    request = urllib.request.Request(
        url,
        data=b'{"prompt":"hi"}',
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        got = response.read()
        if response.status != 200 or got != body:
            raise RuntimeError(f"{url} answered {response.status} {got[:200]!r}")


def wrk_script(path: Path, keys: Sequence[str], body: str = '{"prompt":"hi"}') -> Path:
    """Write a wrk Lua script POSTing ``body`` with one API key, or cycling through many."""
    lua_keys = ", ".join(f'"{k}"' for k in keys)
    if len(keys) == 1:
        text = (
            f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {keys[0]}"\n'
        )
    else:
        # Requests are formatted once in init(); request() only picks the next one.
        text = (
            f"local keys = {{{lua_keys}}}\nlocal reqs = {{}}\nlocal i = 0\n"
            "init = function(args)\n"
            "  for n, k in ipairs(keys) do\n"
            '    reqs[n] = wrk.format("POST", nil, {["Content-Type"] = "application/json",'
            f' ["Authorization"] = "Bearer " .. k}}, \'{body}\')\n'
            "  end\nend\n"
            "request = function()\n  i = i % #reqs + 1\n  return reqs[i]\nend\n"
        )
    path.write_text(text)
    return path
