"""``python -m sync``: run one sync worker, from a config file or from explicit settings.

    python -m sync --config creditgate.yaml
    python -m sync --redis-url redis://... --database-url postgresql://... [--prefix cg]
                   [--shards 16] [--consumer NAME] [--batch-size N] [--claim-idle-ms MS]
                   [--variable-features summarize,research] [--lease-ms 5000]

Several may run at once: they split the shards between them (``--lease-ms``, see
sync/leases.py). SIGTERM/SIGINT stop it after the batch in flight, hand its shards over
to the others, and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from gateway.core.redis_keys import KeySpace
from sync.leases import DEFAULT_LEASE_MS, check_lease_ms
from sync.worker import DEFAULT_BATCH_SIZE, run_sync, run_worker

# The options that still apply with --config (everything else comes from the file).
_WITH_CONFIG = frozenset({"config", "lease_ms", "log_level"})


def _lease_ms(value: str) -> int:
    try:
        return check_lease_ms(int(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the worker until it is signalled."""
    p = argparse.ArgumentParser(prog="python -m sync", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        help="creditgate.yaml: Redis, Postgres, shards and the rest come from it; only"
        " --lease-ms and --log-level may be given with it",
    )
    p.add_argument("--redis-url")
    p.add_argument("--database-url")
    p.add_argument("--prefix", default="cg")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--consumer")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--claim-idle-ms", type=int, default=30000)
    p.add_argument("--block-ms", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timezone", default="UTC", help="the config's period.timezone (refresh dates)")
    p.add_argument(
        "--variable-features",
        default="",
        help="comma-separated features whose cost is read after the call (usage or header"
        " costs): their expired holds are recorded with usage missing",
    )
    p.add_argument(
        "--lease-ms",
        type=_lease_ms,
        default=DEFAULT_LEASE_MS,
        help="shard lease TTL: the running processes split the shards, and a dead one's are"
        " taken over after this long; 0: every process reads every shard",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.config:
        # An option the config file decides would be silently ignored: say so instead.
        given = [
            "--" + name.replace("_", "-")
            for name, value in vars(args).items()
            if name not in _WITH_CONFIG and value != p.get_default(name)
        ]
        if given:
            p.error(f"{', '.join(given)}: not allowed with --config (the file decides them)")
        asyncio.run(run_sync(args.config, lease_ms=args.lease_ms))
        return
    if not args.redis_url or not args.database_url:
        p.error("give --config, or both --redis-url and --database-url")
    asyncio.run(
        run_worker(
            redis_url=args.redis_url,
            database_url=args.database_url,
            keyspace=KeySpace(args.prefix, args.shards),
            consumer=args.consumer,
            batch_size=args.batch_size,
            claim_idle_ms=args.claim_idle_ms,
            block_ms=args.block_ms,
            concurrency=args.concurrency,
            timezone=args.timezone,
            variable_features=[f for f in args.variable_features.split(",") if f],
            lease_ms=args.lease_ms,
        )
    )


if __name__ == "__main__":
    main()
