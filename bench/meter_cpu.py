"""The meter's own CPU per request: ``admit`` + ``settle_nowait``, Redis replaced by canned
replies, nothing else (no HTTP, no middleware, no identity).

    .venv/bin/python bench/meter_cpu.py [--tree DIR] [--requests 20000] [--reps 7]

The narrowest of the benchmarks, for changes inside gateway/metering and gateway/redisio:
the argument encoding (gateway/metering/charge_args.py, gateway/redisio/resp.py), the
admission's bookkeeping and the settlement queue. ``--tree DIR`` measures another checkout
(e.g. ``git archive <commit> | tar -x -C DIR``) with this venv, for A/B runs: alternate
the two a few times on a busy machine. Pinned to core 0; prints the best of ``--reps``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHARGE_OK = ["ok", 999, 10**9, 10**9 - 1, 1]


class CannedRunner:
    """A ScriptRunner that answers at once: every charge "ok", every settle 1 per hold."""

    async def run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Settle (and anything else sent unencoded): one 1 per item."""
        return CHARGE_OK if script.name == "charge" else [1] * int(args[1])

    async def run_encoded(self, script: Any, count: int, encoded: bytes) -> Any:
        """Charge."""
        return CHARGE_OK

    async def close(self) -> None:
        """Nothing to release."""


async def measure(requests: int, reps: int) -> float:
    """Best CPU µs per admit + settle_nowait over ``reps`` rounds of ``requests``."""
    from gateway.core.periods import FixedClock
    from gateway.metering.gate import CreditGate
    from tests.support.reference import MID_NOVEMBER_MS, reference_config

    config = reference_config(redis_url=f"memory://{uuid.uuid4().hex}")
    gate = CreditGate(config, clock=FixedClock(MID_NOVEMBER_MS))
    gate.redis.runner = CannedRunner()
    meter = gate.meter
    admit, settle = meter.admit, meter.settle_nowait

    async def run(n: int) -> None:
        for _ in range(n):
            adm = await admit(
                "acme", "lead_generation", user="u1", method="POST", route="/api/v1/leads"
            )
            settle(adm, ok=True, status=200, latency_ms=3)
        await meter.drain()

    await run(2000)  # warm-up: caches filled
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        await run(requests)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    await gate.close()
    return best


def main() -> None:
    """Parse arguments and print the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    os.sched_setaffinity(0, {0})
    us = asyncio.run(measure(args.requests, args.reps))
    print(f"{args.tree}: meter CPU per admit + settle_nowait: {us:.2f} µs (best of {args.reps})")


if __name__ == "__main__":
    main()
