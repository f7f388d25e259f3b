"""Instructions per metered request, counted by valgrind: a figure a loaded machine cannot blur.

    .venv/bin/python bench/instructions.py                      # this tree
    .venv/bin/python bench/instructions.py --tree /tmp/oldtree   # another checkout, same venv
    .venv/bin/python bench/instructions.py --orgs 256 [--only-many]  # the wrk run's orgs

Wall-clock and CPU-time benchmarks need a quiet machine: on a shared 2-core box the noise of
``bench/middleware_cpu.py`` is ±2 µs on a ~28 µs request, as large as the differences a
refactoring makes. Valgrind's callgrind counts the instructions the gateway process executes
(user space, every thread), which do not depend on what else runs. The request is the same as
``bench/middleware_cpu.py``'s: the middleware in process, the real pipelined Redis client on a
private Redis, API keys from the in-process cache, the settles batched as in production.

Method: the same process drives ``--small`` requests in one run and ``--large`` in another
(after an identical warm-up of 640 requests); the difference of the two totals divided by the
difference of the counts is the cost of one request, without start-up and imports. The key
cache lives an hour here: under valgrind the run is ~50x slower, and with the default 5 s
the keys of many orgs would be re-resolved within the run, which a real run at full speed
never does. Compare trees in the same run; kernel time (socket writes) is not counted.

Needs ``valgrind`` (Debian: ``apt-get install -y valgrind``). ~2 minutes per tree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _hour_long_key_cache(config: Path) -> None:
    """Keep API keys cached for the whole run (see the module's docstring)."""
    text = config.read_text()
    config.write_text(
        text.replace("trusted_headers: false}", "trusted_headers: false, key_cache_seconds: 3600}")
    )


def _long_redis_timeout(config: Path) -> None:
    """Under valgrind on a busy machine a reply can take longer than the default 2 s
    deadline (a 503 fails the run), as in bench/hotpath_parts.py."""
    config.write_text(config.read_text() + "redis_timeout_seconds: 60\n")


async def _touch_every_key(app: object, keys: list[str]) -> None:
    """One request per key: with more orgs than ``drive``'s warm-up reaches (its 64 tasks
    start at keys 0-63 and walk 10 on), the measured run would otherwise resolve keys never
    seen (a Redis and Postgres lookup each), which a long run at full speed does not."""
    from bench.middleware_cpu import make_request

    async def send(message: dict[str, object]) -> None:
        return None

    for key in keys:
        scope, receive = make_request(key)
        await app(scope, receive, send)  # type: ignore[operator]


def _drive(requests: int, orgs: int, total_orgs: int = 64) -> None:
    """The child: drive ``requests`` metered requests (after a warm-up) and exit; ``orgs``
    is 1 (the first org's keys) or anything else (the other ``total_orgs`` orgs' keys)."""
    sys.path.insert(0, os.getcwd())  # the tree under test (bench/ and gateway/ of its own)
    from bench.apps import cg_app
    from bench.middleware_cpu import drive
    from bench.run_all import prepare
    from bench.services import own_postgres, own_redis

    async def main(redis_url: str, dsn: str) -> None:
        settings = await prepare(
            Path(tempfile.mkdtemp(prefix="cg-ir-")), redis_url, dsn, total_orgs
        )
        _hour_long_key_cache(Path(settings.config))
        _long_redis_timeout(Path(settings.config))
        one = [k for k, (org, _) in settings.keys.items() if org == "bench-org-0000"]
        many = [k for k in settings.keys if k not in one]
        keys = one if orgs == 1 else many
        app = cg_app(settings, fast=True)
        await drive(app, keys, 640, 64)  # warm-up: caches, templates, seeded orgs
        await _touch_every_key(app, keys)
        await drive(app, keys, requests, 64)

    with own_redis(1) as redis, own_postgres(1) as pg:
        import uvloop

        uvloop.run(main(redis.url, pg.url))


def _count(tree: Path, requests: int, orgs: int, total_orgs: int) -> int:
    """Total instructions of one child run under callgrind."""
    # Imported here: a child runs this file with an older tree first on its path.
    from bench.callgrind import child_instructions

    return child_instructions(
        tree, _HERE / "instructions.py", [str(requests), str(orgs), str(total_orgs)]
    )


def main() -> None:
    """Print instructions per metered request for each tree, 1 org and ``--orgs`` orgs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--small", type=int, default=640)
    parser.add_argument("--large", type=int, default=6400)
    parser.add_argument("--orgs", type=int, default=64, help="orgs in the many-orgs runs")
    parser.add_argument("--only-many", action="store_true", help="skip the 1-org runs")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _drive(*args.child)
        return
    trees = args.tree or [_HERE.parent]
    print("instructions per metered request (callgrind; lower is better)")
    for orgs in (args.orgs,) if args.only_many else (1, args.orgs):
        for tree in trees:
            small = _count(tree, args.small, orgs, args.orgs)
            large = _count(tree, args.large, orgs, args.orgs)
            per = (large - small) / (args.large - args.small)
            print(f"  {tree!s:<28} {orgs:>3} org(s): {per / 1000:8.1f} k")


if __name__ == "__main__":
    main()
