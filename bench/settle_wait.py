"""What ``settle_wait_replicas`` costs: the settle path and the request path, off vs on.

A private master and one replica (each pinned to a core, no persistence), one in-process
``CreditGate`` on the master. ``--concurrency`` workers each loop admit (charge.lua, the
request's one round trip) then ``settle_nowait`` (the middleware's settle, after the
response) for ``--seconds``. Reported per mode:

- requests/s, and the admit's p50/p99 latency (what a client waits for);
- the settle batch's p50/p99 time in Redis calls (``run`` off; ``run_replicated``, the
  script plus WAIT on the settles' own socket, on), and batches per second.

    python -m bench.settle_wait --seconds 5 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import yaml

from bench.services import free_port, own_redis, stop_process, wait_listening
from gateway.config import parse_config
from gateway.metering.gate import CreditGate

CONFIG = """
redis_url: REDIS
database_url: ""
features: {chat: {cost: 1}}
plans: {big: {allocations: {chat: 1000000000}}}
default_plan: big
routes: [{method: POST, path: /chat, feature: chat}]
"""


@contextlib.contextmanager
def replica_of(master_port: int, core: int) -> Iterator[int]:
    """A redis-server replicating 127.0.0.1:master_port, pinned to ``core``."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="cg-bench-replica-")
    proc = subprocess.Popen(
        ["taskset", "-c", str(core), "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
         "--replicaof", "127.0.0.1", str(master_port), "--logfile", f"{workdir}/log"],
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        yield port
    finally:
        stop_process(proc)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def run_mode(url: str, wait: int, seconds: float, concurrency: int) -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.replace("REDIS", url))
    data["settle_wait_replicas"] = wait
    gate = CreditGate(parse_config(yaml.safe_dump(data), "bench.yaml"))
    settlement = gate.meter.settlement
    batches: list[float] = []
    # Time each settle batch's Redis call(s): wrap the runner's method the mode uses.
    name = "run_replicated" if wait else "run"
    original = getattr(settlement.runner, name)

    async def timed(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args)
        finally:
            batches.append(time.perf_counter() - started)

    setattr(settlement.runner, name, timed)
    admits: list[float] = []
    stop = time.monotonic() + seconds

    async def worker(n: int) -> None:
        org = f"bench{n}"
        while time.monotonic() < stop:
            started = time.perf_counter()
            adm = await gate.meter.admit(org, "chat", user="u")
            admits.append(time.perf_counter() - started)
            gate.meter.settle_nowait(adm, ok=True, status=200, latency_ms=1)

    for n in range(concurrency):  # seed every org first: not part of the measurement
        await gate.set_plan(f"bench{n}", "big")
    began = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.monotonic() - began
    await gate.close()
    return {
        "mode": f"settle_wait_replicas: {wait}",
        "req_per_s": round(len(admits) / elapsed),
        "admit_p50_us": round(_pct(admits, 0.5) * 1e6),
        "admit_p99_us": round(_pct(admits, 0.99) * 1e6),
        "settle_batch_p50_us": round(_pct(batches, 0.5) * 1e6),
        "settle_batch_p99_us": round(_pct(batches, 0.99) * 1e6),
        "settle_batches_per_s": round(len(batches) / elapsed),
        "items_per_batch": round(len(admits) / max(1, len(batches)), 1),
        "resent": settlement.stats["sent"] - len(batches) if wait else 0,
        "mean_admit_us": round(statistics.fmean(admits) * 1e6) if admits else 0,
    }


async def main(seconds: float, concurrency: int, rounds: int) -> None:
    with own_redis(0) as master:
        port = int(master.url.rsplit(":", 1)[1].split("/")[0])
        with replica_of(port, 1):
            await asyncio.sleep(0.5)  # the replica's first sync
            for _ in range(rounds):
                for wait in (0, 1):
                    print(await run_mode(master.url, wait, seconds, concurrency))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency, args.rounds))
