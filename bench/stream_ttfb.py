"""Where a stream's time to first byte goes in ``creditgate serve``: ``.venv/bin/python
bench/stream_ttfb.py [--streams 300] [--tree DIR]``.

bench/streams.py measures the added TTFB from outside; this one splits it. The gateway
(GatewayApp under uvicorn with ``serve``'s protocol, fixed-cost route, trusted-header
identity) runs in a thread of this process, so a few of its functions can be wrapped to
timestamp one stream's path: the request read (``recv``), the app called (``app``), the
charge written to Redis (``redis_w``) and its reply read (``redis_r``), the request
written upstream (``up_w``) and the upstream's headers read (``up_r``), the response
headers written to the client (``head_w``). The upstream is bench/streams.py's SSE server
and Redis a private one, both on core 1; the client (core 1, a process of its own) opens
``--streams`` 2-event streams one after another, each on a fresh connection, and times
its write to the first byte; the same client against the upstream directly gives the
baseline. Also printed: the gateway thread's CPU per stream (its own CPU clock: load-
independent, but it includes the kernel's work for the thread's syscalls).

``--tree DIR``: another creditgate source tree (``git archive`` of an older commit) to
measure instead of this one, for before/after. The wrappers cost ~1 µs each.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAMPS = ("recv", "app", "redis_w", "redis_r", "up_w", "up_r", "head_w")
PATH = "/v1/stream"

CLIENT = r"""
import json, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
request = (b"POST %s?events=2 HTTP/1.1\r\nHost: x\r\nX-Org-Id: acme\r\nX-User-Id: u\r\n"
           b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % sys.argv[3].encode())
out = []
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter_ns(); sock.sendall(request); data = sock.recv(65536)
    out.append(time.perf_counter_ns() - t0)
    while not data.endswith(b"0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    sock.close()
    time.sleep(0.005)
print(json.dumps(out))
"""


def _instrument(marks: list[dict[str, int]]) -> None:
    """Wrap the functions along the path; each stream's first stamp of each kind counts."""
    from uvicorn.protocols.http import httptools_impl

    from gateway.commands import limited_protocol, server
    from gateway.proxy import lean_client, lean_connection
    from gateway.redisio import link

    current: dict[str, int] = {}

    def stamp(name: str) -> None:
        if name not in current:
            current[name] = time.perf_counter_ns()

    def wrap(cls: Any, method: str, name: str) -> None:
        original = getattr(cls, method)

        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            stamp(name)
            return original(self, *args, **kwargs)

        setattr(cls, method, wrapped)

    received = limited_protocol.LimitedHttpToolsProtocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        if data[:5] == b"POST ":  # a new stream's request: its stamps start here
            current.clear()
            current["recv"] = time.perf_counter_ns()
        received(self, data)

    limited_protocol.LimitedHttpToolsProtocol.data_received = data_received  # type: ignore[method-assign]
    call = server.GatewayApp.__call__

    async def app_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            stamp("app")
        await call(self, scope, receive, send)

    server.GatewayApp.__call__ = app_call  # type: ignore[method-assign]
    wrap(link._Protocol, "_flush", "redis_w")
    wrap(link._Protocol, "data_received", "redis_r")
    wrap(lean_client.LeanBackend, "_head", "up_w")  # just before the request's write
    wrap(lean_connection.Connection, "data_received", "up_r")
    send = httptools_impl.RequestResponseCycle.send

    async def cycle_send(self: Any, message: Any) -> None:
        await send(self, message)
        if message["type"] == "http.response.start":
            stamp("head_w")
            marks.append(dict(current))

    httptools_impl.RequestResponseCycle.send = cycle_send  # type: ignore[method-assign]


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tree", type=Path, help="measure this creditgate tree instead")
    args = parser.parse_args()
    tree = (args.tree or ROOT).resolve()
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(ROOT))  # bench/ and tests/support/ of this tree

    from bench.services import free_port, own_redis
    from gateway.commands.server import GatewayApp
    from gateway.metering.gate import CreditGate
    from tests.support.reference import reference_config
    from tests.support.served_gateway import served

    marks: list[dict[str, int]] = []
    _instrument(marks)
    up_port = free_port()
    upstream = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, str(ROOT / "bench/streams.py"), "upstream",
         "--port", str(up_port)],
    )  # fmt: skip
    try:
        with own_redis(1) as redis:
            time.sleep(0.5)
            config = reference_config(
                redis_url=redis.url, key_prefix="ttfb" + uuid.uuid4().hex[:6],
                upstream=f"http://127.0.0.1:{up_port}",
                routes=[{"method": "POST", "path": PATH, "feature": "lead_generation"}],
                plans={
                    "starter": {"allocations": {"lead_generation": 1}},
                    "pro": {"allocations": {"lead_generation": 10**9}},  # no rate limit
                },
            )  # fmt: skip

            async def setup() -> None:
                gate = CreditGate(config)
                await gate.set_plan("acme", "pro")
                await gate.close()

            asyncio.run(setup())
            clock: dict[str, int] = {}

            class Clocked:
                """Notes the server thread's CPU clock on the first request."""

                def __init__(self, app: Any) -> None:
                    self.app = app

                async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                    if "id" not in clock:
                        clock["id"] = time.pthread_getcpuclockid(threading.get_ident())
                    await self.app(scope, receive, send)

            def probe(port: int, count: int) -> list[int]:
                done = subprocess.run(
                    ["taskset", "-c", "1", sys.executable, "-c", CLIENT, str(port), str(count),
                     PATH],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                result: list[int] = json.loads(done.stdout)
                return result

            with served(Clocked(GatewayApp(CreditGate(config), sync=False)), config) as port:
                probe(port, 10)  # first calls: imports, scripts, pools
                marks.clear()
                cpu0 = time.clock_gettime(clock["id"])
                ttfb = probe(port, args.streams)
                cpu = (time.clock_gettime(clock["id"]) - cpu0) / args.streams
            direct = probe(up_port, args.streams)
    finally:
        upstream.kill()
    full = [m for m in marks if all(k in m for k in STAMPS)]
    print(f"tree {tree}; {len(full)} streams; 1-minute load {os.getloadavg()[0]:.2f}")
    print("| step | p50 µs |\n|---|---|")
    for a, b in itertools.pairwise(STAMPS):
        print(f"| {a} -> {b} | {_median([(m[b] - m[a]) / 1e3 for m in full]):.0f} |")
    inside = _median([(m["head_w"] - m["recv"]) / 1e3 for m in full])
    print(f"| recv -> head_w (in the gateway) | {inside:.0f} |")
    added = _median([t / 1e3 for t in ttfb]) - _median([t / 1e3 for t in direct])
    print(
        f"client TTFB p50 {_median([t / 1e3 for t in ttfb]):.0f} µs, direct "
        f"{_median([t / 1e3 for t in direct]):.0f} µs, added {added:.0f} µs; gateway "
        f"thread CPU per stream {cpu * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
