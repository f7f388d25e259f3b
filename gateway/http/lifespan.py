"""The sync job in a host app's lifespan (middleware mode).

Every metered request leaves its events in Redis; the sync job (sync.worker.SyncWorker)
moves them to Postgres. The proxy runs it inside ``creditgate serve``; an app that embeds
creditgate runs it either as a separate process (``creditgate sync``) or in its own event
loop with :func:`creditgate_lifespan`::

    app = Starlette(routes=[...], lifespan=creditgate_lifespan(gate))   # or FastAPI(...)

or, inside a lifespan of its own, ``async with sync_job(gate): ...``. Without one of them,
events wait in Redis and the ledger (usage, stats, audit rows) does not move.

In the app's event loop the job keeps its Postgres concurrency modest (2 batches at a
time, at most 5000 events each); a standalone ``creditgate sync`` can use more. Like that
command it has connections of its own, not the gate's: it starts while Postgres is down
(and retries), and it finishes its batch in flight at shutdown even when the gate was
closed first (the middleware closes it when the shutdown begins). It stops after that
batch (committed and acknowledged); ``creditgate_lifespan`` then closes the gate, which
writes the settlements still queued. With no ``database_url`` there is no ledger to sync
to: nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg

from gateway.alerts.evaluation import AlertDefaults
from gateway.metering.gate import CreditGate
from gateway.redisio.connect import RedisHandles, connect_redis
from sync.worker import SyncWorker

__all__ = ["SyncJob", "creditgate_lifespan", "sync_job"]

log = logging.getLogger("creditgate.sync")

STOP_TIMEOUT_S = 10.0


class SyncJob:
    """The sync job of ``gate`` as a task of the running event loop."""

    def __init__(
        self,
        gate: CreditGate,
        *,
        concurrency: int = 2,
        batch_size: int = 5000,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self.gate = gate
        self.stop_timeout_s = stop_timeout_s
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.worker: SyncWorker | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: RedisHandles | None = None
        self._pool: asyncpg.Pool | None = None

    @property
    def running(self) -> bool:
        """Whether the job's task is running."""
        return self._task is not None and not self._task.done()

    async def start(self) -> bool:
        """Start the job (False, and nothing started, without a database)."""
        if self._task is not None:
            return True
        config = self.gate.config
        if not config.database_url:
            log.warning("no database_url: the sync job does not run, events stay in Redis")
            return False
        self._redis = connect_redis(
            config.redis_url, timeout=config.redis_timeout_seconds, fast=False
        )
        # min_size=0: no connection is needed to start, so a ledger outage does not stop
        # the app from starting; the worker retries until Postgres is back.
        self._pool = await asyncpg.create_pool(
            config.database_url, min_size=0, max_size=self.concurrency + 1
        )
        self.worker = SyncWorker(
            redis=self._redis.client,
            pool=self._pool,
            keyspace=self.gate.keys,
            default_plan=config.default_plan,
            alerts=None if config.alerts is None else AlertDefaults.of(config.alerts),
            timezone=config.period.timezone,  # refresh_date at local midnight (A12)
            variable_features=config.variable_features,  # expired holds: usage missing
            concurrency=self.concurrency,
            batch_size=self.batch_size,
        )
        self.gate.sync_worker = self.worker  # /metrics and /readyz report its progress
        self._task = asyncio.create_task(self.worker.run(), name="creditgate-sync")
        log.info("sync job started: events move from Redis to Postgres")
        return True

    async def stop(self) -> None:
        """Stop after the batch in flight (waiting at most ``stop_timeout_s`` seconds)."""
        if self._task is None or self.worker is None:
            return
        self.worker.stop()
        # A batch interrupted by the timeout is not acknowledged: the next run rereads it.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, timeout=self.stop_timeout_s)
        self.gate.sync_worker = None
        self._task = None
        if self._pool is not None:
            await self._pool.close()
        if self._redis is not None:
            await self._redis.close()
        self._pool = self._redis = None


@asynccontextmanager
async def sync_job(gate: CreditGate, **options: Any) -> AsyncIterator[SyncJob]:
    """Run ``gate``'s sync job for the duration of the ``async with`` block."""
    job = SyncJob(gate, **options)
    await job.start()
    try:
        yield job
    finally:
        await job.stop()


def creditgate_lifespan(
    gate: CreditGate, *, sync: bool = True
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A ``lifespan=`` for Starlette or FastAPI: the sync job runs while the app does
    (unless ``sync=False``), and the gate is closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        job = SyncJob(gate)
        if sync:
            await job.start()
        try:
            yield
        finally:
            await job.stop()
            await gate.close()

    return lifespan
