"""CPU cost per EVALSHA: redis-py's asyncio client vs the pipelined client (gateway/fastredis).

    python bench/redis_client.py [--url redis://127.0.0.1:6379/0] [--calls 20000]
                                 [--concurrency 1,8,64] [--connections 1] [--uvloop]

For each client and concurrency C, C tasks run a small script (one INCR) back to back until
``--calls`` calls are done; the figure is this process's CPU time (``time.process_time``)
divided by the number of calls, i.e. what one metered request's Redis call costs the
gateway's CPU. Wall time per call is shown too. The Redis server's own CPU is not counted.
Only a uniquely named key is touched, and it is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.redisio.connect import ScriptRunner, connect_redis
from gateway.redisio.lua_scripts import LuaScript

SCRIPT = LuaScript.from_source("bench", "return redis.call('INCR', KEYS[1])")
CLIENTS = {"redis-py": False, "fastredis": True}


async def measure(
    runner: ScriptRunner, key: str, calls: int, concurrency: int
) -> tuple[float, float]:
    """Return (CPU µs per call, wall µs per call)."""
    per_task = calls // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await runner.run(SCRIPT, [key], [])

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm up: connect, load
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_task * concurrency
    return cpu / done * 1e6, wall / done * 1e6


async def main(args: argparse.Namespace) -> None:
    key = f"cgbench{uuid.uuid4().hex[:8]}:{{s0}}:n"
    levels = [int(c) for c in args.concurrency.split(",")]
    url = args.url
    if args.connections != 1:
        url += ("&" if "?" in url else "?") + f"connections={args.connections}"
    rows: dict[str, list[tuple[float, float]]] = {}
    for name, fast in CLIENTS.items():
        rows[name] = []
        for level in levels:
            handles = connect_redis(url, fast=fast)
            try:
                rows[name].append(await measure(handles.runner, key, args.calls, level))
            finally:
                await handles.client.delete(key)
                await handles.close()
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"CPU µs per EVALSHA ({args.calls} calls, {loop} loop, {url})")
    print(f"{'client':<12}" + "".join(f"{f'conc={c}':>20}" for c in levels))
    for name, cells in rows.items():
        line = "".join(f"{f'{cpu:.1f} ({wall:.1f} wall)':>20}" for cpu, wall in cells)
        print(f"{name:<12}{line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--connections", type=int, default=1, help="sockets of fastredis")
    parser.add_argument("--uvloop", action="store_true")
    options = parser.parse_args()
    if options.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(options))
