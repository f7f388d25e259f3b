"""The gateway's instructions per settle of a fixed, a header and a usage cost (callgrind).

    .venv/bin/python bench/settle_instructions.py                     # this tree
    .venv/bin/python bench/settle_instructions.py --tree /tmp/before  # and another

The gateway-process side of bench/lua_instructions.py ``--actual`` (which counts Redis):
what queueing, encoding and answering one settle costs this process, as the middleware
settles (``Meter.settle_nowait`` with the call's ``Actual``, built per request as the usage
tap builds it; batched per shard per tick). Per tree and variant, two child runs under
callgrind admit ``--large`` requests each, then settle ``--small`` or ``--large`` of them;
(large run - small run) / (large - small) is one settle, without start-up, imports, the
admits and the warm-up. Variants: ``fixed`` (no actual), ``header`` (the hold charged by
the policy, no usage: cost source ``policy``, usage missing), ``usage`` (an actual with a
model and four counts). A private redis-server serves both trees; its work is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
VARIANTS = ("fixed", "header", "usage")


def _child(url: str, variant: str, settles: int, total: int) -> None:
    from bench.lua_cpu import FEATURE, TOKENS, setup_orgs
    from bench.run_all import CONFIG
    from gateway.config import parse_config
    from gateway.metering.meter import Actual, Meter
    from gateway.redisio.connect import connect_redis
    from gateway.usage.model import Usage

    async def main() -> None:
        prefix = f"cgsetins{os.getpid()}"
        config = parse_config(
            CONFIG.format(redis_url=url, dsn="", prefix=prefix, tokens=TOKENS), "<bench>"
        )
        handles = connect_redis(url, fast=True)
        meter = Meter(config, handles, now_ms=lambda: int(time.time() * 1000))
        org = "bench-org-0000"
        await setup_orgs(meter, [org])
        usage = Usage("openai", "gpt-4o-mini-2024-07-18", 1_017, 512, 187, 64)

        async def run(n_admit: int, n_settle: int) -> None:
            adms = []
            for _ in range(0, n_admit, 64):
                adms += await asyncio.gather(
                    *(meter.admit(org, FEATURE, user="u1", cost=40) for _i in range(64))
                )
            for start in range(0, n_settle, 64):
                for adm in adms[start : start + 64]:
                    if variant == "fixed":
                        actual = None
                    elif variant == "header":
                        actual = Actual(40, None, missing=True, source="policy")
                    else:
                        actual = Actual(20, usage)
                    meter.settle_nowait(adm, ok=True, status=200, latency_ms=3, actual=actual)
                await meter.drain()

        await run(128, 128)  # warm up
        await run(total, settles)
        await handles.close()

    asyncio.run(main())


def _count(tree: Path, url: str, variant: str, settles: int, total: int) -> int:
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    return child_instructions(
        tree,
        _HERE / "settle_instructions.py",
        [url, variant, str(settles), str(total)],
        fixed_hash=True,
    )


def main() -> None:
    """Print the gateway's instructions per settle per tree and variant."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=576)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, variant, settles, total = args.child
        sys.path.insert(0, os.getcwd())  # the tree under test
        _child(url, variant, int(settles), int(total))
        return
    sys.path.insert(0, str(_HERE.parent))
    from bench.services import own_redis

    trees = args.tree or [_HERE.parent]
    print("gateway instructions per settle (callgrind; lower is better)")
    with own_redis(1) as redis:
        for tree in trees:
            per = {}
            for variant in VARIANTS:
                small = _count(tree, redis.url, variant, args.small, args.large)
                large = _count(tree, redis.url, variant, args.large, args.large)
                per[variant] = (large - small) / (args.large - args.small)
            print(
                f"  {tree!s:<28} "
                + "  ".join(f"{v} {n / 1000:6.1f} k" for v, n in per.items())
                + f"  (header - fixed {(per['header'] - per['fixed']) / 1000:.1f} k,"
                f" usage - fixed {(per['usage'] - per['fixed']) / 1000:.1f} k)",
                flush=True,
            )


if __name__ == "__main__":
    main()
