"""The proxy server: ``creditgate serve`` runs the app built here under uvicorn.

Requests under the gateway's own prefixes (the token API, ``/admin``, ``/webhooks``, and
the ops endpoints) are served by creditgate itself; every other request goes through
``CreditGateMiddleware`` to ``UpstreamProxy``: metered when its route is in the config,
passed through untouched otherwise. The sync job runs in the server's event loop unless
disabled.

``server_options(config)`` gives the uvicorn options that apply the config's connection
limits (``server:``: header size and count, header-read and keep-alive timeouts; see
gateway.commands.limited_protocol); ``serve`` and ``demo`` pass them to uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.commands.limited_protocol import LimitedHttpToolsProtocol
from gateway.commands.open_files import raise_open_files_limit
from gateway.config import Config, load_config, resolve_config_path
from gateway.metering.gate import CreditGate
from gateway.metering.middleware import CreditGateMiddleware
from gateway.proxy.app import UpstreamProxy

if TYPE_CHECKING:
    from sync.worker import SyncWorker

log = logging.getLogger("creditgate.server")


class GatewayApp:
    """Dispatch between creditgate's own endpoints and the metered upstream."""

    def __init__(
        self,
        gate: CreditGate,
        *,
        upstream: ASGIApp | None = None,
        own: ASGIApp | None = None,
        sync: bool = True,
        tune_gc: bool = False,
    ) -> None:
        config = gate.config
        self.gate = gate
        self.proxy: UpstreamProxy | None = None
        if upstream is None:
            if not config.upstream:
                raise ValueError("proxy mode needs `upstream` in the config")
            self.proxy = UpstreamProxy(
                config.upstream,
                timeout=config.upstream_timeout_seconds,
                connect_timeout=config.upstream_connect_timeout_seconds,
                client=config.upstream_client,
                max_connections=config.upstream_max_connections,
                pool_wait=config.upstream_pool_wait_seconds,
                retry_after=config.retry_after_unavailable_seconds,
            )
            upstream = self.proxy
        self.metered = CreditGateMiddleware(upstream, gate=gate)
        if own is None:
            from gateway.http.app import build_ops_app

            own = build_ops_app(gate)
        self.own = own
        self.own_prefixes: tuple[str, ...] = (
            config.api_prefix.rstrip("/") + "/", "/admin/", "/webhooks/",
        )  # fmt: skip
        self.own_paths = frozenset(
            {"/healthz", "/readyz", "/metrics", config.api_prefix.rstrip("/"), "/admin"}
        )
        self.sync_enabled = sync
        self._tune_gc = tune_gc  # serve's: see tune_collector()
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_worker: SyncWorker | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.http_call(scope, receive, send)

    def http_call(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The call for a request (HTTP or websocket): the awaitable of the endpoint it goes
        to, creditgate's own or the metered upstream. ``serve``'s protocol calls it for each
        HTTP request instead of the app (gateway/commands/limited_protocol.py ``HTTP_CALL``):
        one coroutine level fewer in the request's task."""
        path: str = scope.get("path", "")
        if path in self.own_paths or path.startswith(self.own_prefixes):
            return self.own(scope, receive, send)
        return self.metered(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # report to the server instead of crashing it
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start the sync job in this loop (unless disabled); then, with ``tune_gc``, tune
        the cycle collector for the heap built so far (:func:`tune_collector`)."""
        await self._start_sync()
        if self._tune_gc:
            tune_collector()

    async def _start_sync(self) -> None:
        if self.sync_enabled and self.gate.config.database_url:
            from sync.worker import SyncWorker

            store = await self.gate.require_store()
            # Inside the server the sync job shares the event loop with requests: keep its
            # Postgres concurrency modest (a standalone `creditgate sync` can use more).
            worker = SyncWorker(
                redis=self.gate.redis.client,
                pool=store.pool,
                keyspace=self.gate.keys,
                default_plan=self.gate.config.default_plan,
                timezone=self.gate.config.period.timezone,  # contract A12
                variable_features=self.gate.config.variable_features,  # contract A8
                concurrency=2,
                batch_size=5000,  # bounds the server's memory while catching up a backlog
            )
            self._sync_worker = worker
            self.gate.sync_worker = worker  # /metrics and /readyz report its progress
            self._sync_task = asyncio.create_task(worker.run(), name="creditgate-sync")

    async def shutdown(self) -> None:
        """Stop the sync job after its batch in flight, settle what is queued, close."""
        if self._sync_task is not None and self._sync_worker is not None:
            self._sync_worker.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._sync_task, timeout=10)
            self.gate.sync_worker = None
        if self.proxy is not None:
            await self.proxy.aclose()
        await self.gate.close()


# The cycle collector's first threshold under serve: CPython 3.13's default (3.11 and
# 3.12: 700). See tune_collector().
GEN0_THRESHOLD = 2000


def tune_collector() -> None:
    """Collect once, move every object the process holds to the cycle collector's permanent
    generation (``gc.freeze``: the modules, the config, the gate, the pools), and raise the
    collector's first threshold to :data:`GEN0_THRESHOLD` (never lower it).

    The collector's passes walk objects that are nearly all alive: a full pass every one
    the ~90k a served gateway holds after startup, and a young pass (every 700 net new
    objects) the ~2,500 objects of 64 requests in flight, ~1M instructions each, ~20k per
    proxied request on average (BENCHMARKS.md section 2c). A request leaves no reference
    cycle behind, so the passes find next to nothing; with the threshold at 2,000 they
    came 5 times in 6,400 requests instead of 149. Frozen objects are still freed by their
    reference counts as usual; only a reference cycle through one of them would never be
    collected, and the collection before the freeze leaves none that is already garbage.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GEN0_THRESHOLD:  # 0: collection switched off by the embedder; leave it
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def server_options(config: Config) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` enforcing ``config.server``.

    The HTTP protocol is always httptools (uvicorn's default when it is installed, and a
    dependency of creditgate), with the limits added; a partial rather than a class made on
    the fly, so that it pickles to ``--workers`` processes.
    """
    return {"http": functools.partial(LimitedHttpToolsProtocol, limits=config.server)}


def create_app() -> GatewayApp:
    """uvicorn factory: config from $CREDITGATE_CONFIG, sync unless $CREDITGATE_NO_SYNC."""
    config: Config = load_config(resolve_config_path(None))
    # Here, in each worker process: a limit is per process, and uvicorn's workers are
    # processes of their own.
    raise_open_files_limit(config.upstream_max_connections)
    sync = os.environ.get("CREDITGATE_NO_SYNC", "") not in ("1", "true", "yes")
    return GatewayApp(CreditGate(config), sync=sync, tune_gc=True)
