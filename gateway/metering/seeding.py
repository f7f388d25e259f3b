"""Seeding: creating an org's Redis state when charge.lua finds none (lua/seed.lua).

That happens on an org's first metered request, and after Redis lost its data. The gate
seeds from the ledger (balances, purchased lots, sequence number); without a ledger, a
new org starts on the default plan.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from gateway.core.redis_keys import KeySpace
from gateway.redisio.connect import RedisHandles
from gateway.redisio.lua_scripts import load

__all__ = ["Seeding"]


class Seeding:
    """Seeds org state in Redis, once per org per process at a time.

    ``from_ledger(org)``, when given, must call :meth:`seed_state` with what the ledger
    knows of the org; without it, :meth:`seed` gives the org ``default_plan`` and nothing
    else.
    """

    def __init__(
        self,
        redis: RedisHandles,
        keys: KeySpace,
        *,
        default_plan: str,
        from_ledger: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.script = load("seed")
        self._default_plan = default_plan
        self._from_ledger = from_ledger
        self._seeding: dict[str, asyncio.Future[None]] = {}

    async def seed(self, org: str) -> None:
        """Create the org's Redis state (once per process at a time; seed.lua is set-if-absent)."""
        pending = self._seeding.get(org)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seeding[org] = fut
        try:
            if self._from_ledger is not None:
                await self._from_ledger(org)
            else:
                await self.seed_state(org, self._default_plan, 0, [])
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._seeding[org]

    async def seed_state(
        self,
        org: str,
        plan: str,
        seq: int,
        buckets: Sequence[Sequence[str | int]],
        levels: Mapping[str, str] | None = None,
        anchor: str = "",
    ) -> bool:
        """Run seed.lua with explicit state: buckets are 7-tuples (see lua/seed.lua);
        ``levels`` the org hash fields of its teams, members and cap overrides;
        ``anchor`` the org's period anchor (contract A12, ``""``: none).

        Returns False when the org already had state (seed.lua then writes nothing)."""
        args: list[str | int] = [plan, seq, len(buckets)]
        for b in buckets:
            args.extend(b)
        if levels or anchor:
            args.append(len(levels or ()))
            for name, value in (levels or {}).items():
                args += [name, value]
        if anchor:
            args.append(anchor)  # the org's period anchor (contract A12)
        reply = await self.redis.runner.run(self.script, [self.keys.org(org)], args)
        return int(reply) == 1
