"""Benchmark: lean vs aiohttp vs httpx as UpstreamProxy's upstream HTTP client.

Runs a minimal raw-ASGI echo upstream under uvicorn (httptools + uvloop) pinned to core 1
(``taskset -c 1``) and drives ``UpstreamProxy(client=...)`` in this process, pinned to
core 0, by calling it as an ASGI app with in-memory receive/send (no server in front, so
the client side's CPU is the proxy plus its HTTP client). Cells: concurrency 1, 8, 64;
POST bodies of 100 B and 64 KiB echoed back; "buffered" (request with Content-Length,
response with Content-Length: the proxy's read-whole path) and "streamed" (request in two
pieces without a length, response chunked: the proxy's generator and relay paths).

Clients run alternately within each cell (A/B/A/B...), so a noisy neighbour hits them
alike. Prints req/s and client CPU µs per request for each client, the best run and the
range over the repeats, and the best as a ratio of the cell's winner (1.00 = best; req/s
higher is better, CPU lower is better).

    .venv/bin/python bench/upstream_clients.py [--seconds 2] [--repeats 3]
        [--clients lean,aiohttp,httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

from gateway.proxy.app import UpstreamProxy

CLIENTS = ("lean", "aiohttp", "httpx")
CONCURRENCY = (1, 8, 64)
SIZES = (100, 64 * 1024)
MODES = ("buffered", "streamed")


async def echo_upstream(scope: Any, receive: Any, send: Any) -> None:
    """Echo the request body; with ?stream=1 answer chunked, in 16 KiB pieces."""
    if scope["type"] != "http":
        return
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["query_string"] == b"stream=1":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        for offset in range(0, len(body), 16384):
            await send(
                {
                    "type": "http.response.body",
                    "body": bytes(body[offset : offset + 16384]),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    else:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": bytes(body)})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        echo_upstream,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


async def one_request(app: UpstreamProxy, body: bytes, streamed: bool) -> int:
    """Send one POST through the proxy; return the response body length."""
    if streamed:
        pieces = [body[: len(body) // 2], body[len(body) // 2 :]]
        headers = [(b"host", b"bench"), (b"transfer-encoding", b"chunked")]
    else:
        pieces = [body]
        headers = [(b"host", b"bench"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "query_string": b"stream=1" if streamed else b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    received = 0
    status = 0

    async def receive() -> dict[str, Any]:
        if pieces:
            chunk = pieces.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}
        await never  # the client never disconnects; the proxy's watcher is cancelled
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        nonlocal received, status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            received += len(message.get("body", b""))

    await app(scope, receive, send)
    if status != 200 or received != len(body):
        raise RuntimeError(f"bad response: status {status}, {received} of {len(body)} bytes")
    return received


async def run_cell(
    upstream: str, client: str, concurrency: int, size: int, streamed: bool, seconds: float
) -> tuple[float, float]:
    """Return (requests per second, client CPU µs per request) for one cell."""
    app = UpstreamProxy(
        upstream,
        client=client,  # type: ignore[arg-type]
        max_connections=concurrency,
    )
    body = os.urandom(size)
    count = 0
    stop = 0.0

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < stop:
            await one_request(app, body, streamed)
            count += 1

    try:
        stop = time.monotonic() + min(0.5, seconds / 4)  # warm the pool and the code paths
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        count = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        stop = time.monotonic() + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await app.aclose()
    return count / wall, cpu / count * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("benchmark upstream did not start")


async def bench(upstream: str, seconds: float, repeats: int, clients: list[str]) -> None:
    print(
        f"{'cell':<26} {'client':<8} {'req/s':>7} {'ratio':>6} {'CPU µs/req':>11} "
        f"{'range':>13} {'ratio':>6}"
    )
    for size in SIZES:
        for mode in MODES:
            for concurrency in CONCURRENCY:
                runs: dict[str, list[tuple[float, float]]] = {c: [] for c in clients}
                for rep in range(repeats):  # interleaved, best of N, to damp noisy neighbours
                    order = clients if rep % 2 == 0 else clients[::-1]  # A/B, then B/A
                    for client in order:
                        runs[client].append(
                            await run_cell(
                                upstream, client, concurrency, size, mode == "streamed", seconds
                            )
                        )
                best = {c: (max(r for r, _ in v), min(u for _, u in v)) for c, v in runs.items()}
                top_rps = max(r for r, _ in best.values())
                low_cpu = min(c for _, c in best.values())
                cell = f"{size} B {mode} c={concurrency}"
                for client in clients:
                    rps, cpu = best[client]
                    worst = max(u for _, u in runs[client])
                    print(
                        f"{cell:<26} {client:<8} {rps:>7.0f} {rps / top_rps:>6.2f} "
                        f"{cpu:>11.1f} {f'{cpu:.0f}-{worst:.0f}':>13} {low_cpu / cpu:>6.2f}",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (best kept)")
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="comma-separated clients to compare (default: all)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: upstream
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    upstream = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, os.path.abspath(__file__), "--serve", str(port)]
    )
    try:
        os.sched_setaffinity(0, {0})
        wait_listening(port)
        import uvloop

        uvloop.run(
            bench(
                f"http://127.0.0.1:{port}",
                args.seconds,
                args.repeats,
                [c.strip() for c in args.clients.split(",") if c.strip()],
            )
        )
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
