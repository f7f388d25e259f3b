"""Instructions per request of a fixed, a header and a usage cost, counted by valgrind.

    .venv/bin/python bench/usage_instructions.py                     # this tree
    .venv/bin/python bench/usage_instructions.py --tree /tmp/before  # another checkout
    .venv/bin/python bench/usage_instructions.py --modes proxy --body openai30k

Issue 8's target is a ratio of server CPU (a usage cost at most 1.10x a fixed one), and on
a shared 2-core machine CPU-time ratios move by ±10 % with the load (bench/usage_tap.py).
Callgrind's instruction counts do not: this is bench/instructions.py's method applied to
bench/usage_tap.py's requests. Per tree and mode, one child process under callgrind per
run; every run warms every variant up the same way (``--warm`` requests each), then drives
``--small`` requests of each variant, except one variant that gets ``--large`` (multiples
of 32: 32 concurrent tasks drive them). The
difference between a run's total and the all-small run's, divided by ``large - small``, is
that variant's cost of one request, without start-up, imports and warm-up.

Modes (both call the ASGI app in process, as bench/usage_tap.py's ``inprocess`` and
``streams`` parts do; the HTTP server in front, the same for every variant, is not
counted):

- ``inprocess``: the Starlette app answering the body itself behind ``CreditGateMiddleware``;
- ``proxy``: ``GatewayApp`` (middleware + ``UpstreamProxy`` with the lean client) in front of
  bench/usage_tap.py's upstream process (not counted: ``--trace-children=no``, and it is a
  process of its own), which answers the same body with its Content-Length.

Variants, on the same answer (``--body``, default the 2 KB pretty-printed OpenAI chat
completion): ``fixed`` (``cost: 1``), ``header`` (``header: X-Cost``; the answer has no
such header, so the missing-usage policy charges), ``usage`` (``usage: auto``, numeric
reserve: the request is read for include_usage, the answer held, its usage read and
priced). ``--variants`` picks among those and, on the ~900-byte answer of
bench/usage_tap.py's ``proxy`` part, ``fixed900``, ``numeric`` (``usage: openai``, reserve
5) and ``auto`` (``reserve: auto``: the request decoded for its estimate too); ratios are
to the first variant named.

Needs ``valgrind``. Python's hash seed is fixed (PYTHONHASHSEED=0) so runs repeat. Kernel
time (socket reads and writes) is not counted. The settles are flushed every
``--settle-every`` complete answers (default 16), not by the settle window's wall-clock
tick, which under valgrind (~50x slower, slower still on a loaded machine) held a number of
settles that varied from run to run (±3 k per request, BENCHMARKS.md "An eighth pass";
``--settle-every 0`` restores it). Each tree's ``gateway`` and ``bench`` are compiled to
bytecode first (``compileall``): with ``PYTHONDONTWRITEBYTECODE`` set, every child compiled
them from source under valgrind (start-up only, nothing per request).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
VARIANTS = {"fixed": "fixed", "header": "hdr", "usage": "any"}
"""Variant -> the path prefix of its route in bench/usage_tap.py's CONFIG (on ``--body``)."""
SMALL_VARIANTS = {
    "fixed900": "/fixed/v1/chat/completions",
    "numeric": "/usage/v1/chat/completions",
    "auto": "/auto/v1/chat/completions",
}
"""``--variants`` on the ~900-byte answer (bench/usage_tap.py's ``proxy`` part): a fixed
cost, ``usage: openai`` with a numeric reserve, and with ``reserve: auto``."""
MODES = ("inprocess", "proxy")


def _child(
    mode: str, config: Path, body: str, counts: dict[str, int], warm: int, every: int
) -> None:
    """Under callgrind: warm every variant up, then drive ``counts`` requests of each."""
    import asyncio

    import uvloop

    from bench.usage_tap import CHAT_REQUEST, chat_app, drive

    async def main() -> None:
        if mode == "proxy":
            from gateway.commands.server import GatewayApp
            from gateway.config import load_config
            from gateway.metering.gate import CreditGate

            app: Any = GatewayApp(CreditGate(load_config(config)), sync=False)
            gate = app.gate
        else:
            app = chat_app(config)
            gate = next(m.kwargs["gate"] for m in app.user_middleware)
        paths = {v: f"/{prefix}/{body}/v1/chat/completions" for v, prefix in VARIANTS.items()}
        paths.update(SMALL_VARIANTS)
        run = drive if every <= 0 else _counted_drive(gate.meter.settlement, every)
        for variant in counts:
            await run(app, paths[variant], CHAT_REQUEST, warm, 32)
            await gate.meter.drain()
        for variant, n in counts.items():
            await run(app, paths[variant], CHAT_REQUEST, n, 32)
            await gate.meter.drain()
        if mode == "proxy" and app.proxy is not None:
            await app.proxy.aclose()
        await gate.close()
        await asyncio.sleep(0)

    uvloop.run(main())


def _counted_drive(settlement: Any, every: int) -> Callable[..., Awaitable[None]]:
    """bench/usage_tap.py's ``drive`` (``concurrency`` tasks, each request's messages to a
    ``send`` of the bench's own), except that the settles are flushed every ``every``
    complete answers rather than by the settle window's wall-clock tick: under valgrind
    (~50x slower, and slower still on a loaded machine) a 2 ms window held one or two
    settles or a few, varying from run to run, and each flush costs thousands of
    instructions. Now every flush takes ``every`` settles (the last of a batch is queued
    just after the flush, so each flush after the first holds exactly ``every``), the same
    in every run and every variant. The window is pushed out of reach (its timer is still
    set once per flush, as it is in the gateway) and :meth:`~gateway.metering.settlement.
    Settlement.drain`'s steps flush the batch."""
    import asyncio

    from bench.usage_tap import scope_of

    settlement.window_s = 3600.0
    ended = 0

    def flush() -> None:
        handle = settlement._flush_handle
        if handle is not None:
            handle.cancel()
        if settlement._pending:
            settlement._flush()

    async def send(message: dict[str, Any]) -> None:
        nonlocal ended
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                raise RuntimeError(f"unexpected status: {message['status']}")
        elif not message.get("more_body", False):
            ended += 1
            if ended % every == 0:
                flush()

    async def run(app: Any, path: str, body: bytes, requests: int, concurrency: int) -> None:
        async def worker(count: int) -> None:
            for _ in range(count):
                sent = False

                async def receive() -> dict[str, Any]:
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    await asyncio.Event().wait()
                    return {"type": "http.disconnect"}

                await app(scope_of(path, body), receive, send)

        per = max(1, requests // concurrency)
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))

    return run


def _count(
    tree: Path,
    mode: str,
    config: Path,
    body: str,
    counts: dict[str, int],
    warm: int,
    every: int,
) -> int:
    """Total instructions of one child run under callgrind."""
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    spec = ",".join(f"{v}={n}" for v, n in counts.items())
    return child_instructions(
        tree,
        _HERE / "usage_instructions.py",
        [mode, str(config), body, spec, str(warm), str(every)],
        fixed_hash=True,
    )


def per_request(tree: Path, mode: str, config: Path, args: argparse.Namespace) -> dict[str, float]:
    """Instructions per request of each variant (see the module docstring)."""
    variants = args.variants.split(",")
    small = dict.fromkeys(variants, args.small)
    base = _count(tree, mode, config, args.body, small, args.warm, args.settle_every)
    out: dict[str, float] = {}
    for variant in variants:
        total = _count(
            tree,
            mode,
            config,
            args.body,
            {**small, variant: args.large},
            args.warm,
            args.settle_every,
        )
        out[variant] = (total - base) / (args.large - args.small)
    return out


def main() -> None:
    """Print instructions per request per tree, mode and variant, with the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--body", default="openai2k", help="a key of bench.usage_tap.BODIES")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"of {', '.join([*VARIANTS, *SMALL_VARIANTS])}; ratios are to the first",
    )
    parser.add_argument("--warm", type=int, default=128)
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=576)
    parser.add_argument(
        "--settle-every",
        type=int,
        default=16,
        help="flush the settles every N answers (0: by the settle window's tick, as before)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, config, body, spec, warm, every = args.child
        sys.path.insert(0, os.getcwd())  # the tree under test
        counts = {v: int(n) for v, n in (part.split("=") for part in spec.split(","))}
        _child(mode, Path(config), body, counts, int(warm), int(every))
        return

    sys.path.insert(0, str(_HERE.parent))
    from bench.services import free_port, own_redis, stop_process, wait_listening
    from bench.usage_tap import CONFIG

    trees = args.tree or [_HERE.parent]
    for tree in trees:  # (see the module docstring: start-up only)
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree / "gateway"), str(tree / "bench")],
            check=False,
            stdout=subprocess.DEVNULL,
        )
    modes = args.modes.split(",")
    print(f"instructions per request (callgrind; {args.body}; lower is better)")
    with own_redis(1) as redis:
        port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, str(_HERE / "usage_tap.py"), "--serve-upstream", str(port)],
            start_new_session=True,
        )
        try:
            wait_listening(port, upstream)
            workdir = Path(tempfile.mkdtemp(prefix="cg-usage-ir-"))
            for mode in modes:
                for tree in trees:
                    config = workdir / f"{mode}-{uuid.uuid4().hex[:6]}.yaml"
                    config.write_text(
                        CONFIG.format(
                            redis_url=redis.url,
                            upstream=f"http://127.0.0.1:{port}",
                            prefix="cgir" + uuid.uuid4().hex[:8],
                        )
                    )
                    ir = per_request(tree, mode, config, args)
                    fixed = next(iter(ir.values()))
                    print(
                        f"  {mode:<9} {tree!s:<28} "
                        + "  ".join(
                            f"{v} {n / 1000:7.1f} k ({n / fixed:.3f}x)" for v, n in ir.items()
                        ),
                        flush=True,
                    )
        finally:
            stop_process(upstream)


if __name__ == "__main__":
    main()
