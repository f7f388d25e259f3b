"""Redis URLs, and the two Redis handles built from one: a redis-py client and a script runner.

``connect_redis(url)`` returns ``RedisHandles``:
- ``client``: redis-py's asyncio ``Redis`` / ``RedisCluster`` (fakeredis for ``memory://``),
  for everything off the hot path;
- ``runner``: a ``ScriptRunner`` for the hot path, the auto-pipelined client of
  ``gateway/redisio/pipelined.py`` when possible (``RedisPyRunner`` for ``memory://`` or
  ``fast=False``).

Both decode replies to ``str`` (``decode_responses=True``), and neither retries anything on
its own: a command that timed out may have run (a debit may have committed), so only the
caller can know whether a retry is safe. Errors reach callers of the runner as
``RedisUnavailable`` (connection trouble, timeouts, CLUSTERDOWN ...; the gateway answers 503)
or ``RedisReplyError``, whichever runner is used.

URLs (parsed by gateway/core/redis_urls.py, which the config checks use too):
``redis://``, ``rediss://`` (one server), ``redis-cluster://h1:p1,h2:p2``,
``rediss-cluster://`` (every listed node a seed of redis-py's ``startup_nodes`` and of the
pipelined cluster client) and ``memory://[name]`` (an in-process fakeredis server shared by
every URL with that name), with the options ``timeout`` (seconds, overrides the ``timeout``
argument), ``connections``, ``ssl_cert_reqs`` and ``ssl_ca_certs``.
Nothing connects until first use, so handles can be built before the event loop runs.

redis-py caveats handled here: the single-node client gets a ``BlockingConnectionPool`` (100
sockets; more concurrent commands wait, up to the timeout, where redis-py's default pool
raises MaxConnectionsError). redis-py's ``RedisCluster`` fails commands sent concurrently
with its lazy first initialisation; ``RedisPyRunner`` awaits ``initialize()`` first, and
other users of a cluster ``client`` should do the same at startup.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core.errors import RedisUnavailable
from gateway.core.redis_urls import RedisURL, parse_redis_url, redact_url
from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.pipelined import (
    ConnectionSettings,
    FastRedis,
    RedisReplyError,
    reply_error,
)
from gateway.redisio.pipelined_cluster import FastRedisCluster
from gateway.redisio.resp import ScriptArg, decode_args

if TYPE_CHECKING:
    from fakeredis import FakeServer

__all__ = [
    "RedisHandles",
    "RedisPyRunner",
    "RedisReplyError",
    "RedisURL",
    "RedisUnavailable",
    "ScriptRunner",
    "connect_redis",
    "parse_redis_url",
    "probe_redis",
]


class ScriptRunner(Protocol):
    """Runs the gateway's Lua scripts; the hot path's only use of Redis.

    A runner on one Redis server may say so with ``cross_slot = True`` (read with
    ``getattr``, False when absent: a cluster, or a client that may be one): a script may
    then touch keys of several shards in one call (settle.lua's multi-shard form).
    """

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` (by SHA, loading it on NOSCRIPT) and return its reply.

        Raises ``RedisUnavailable`` or ``RedisReplyError``; never retries anything but NOSCRIPT.
        """
        ...

    async def run_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Any:
        """``run`` with the keys and arguments already encoded: ``encoded`` holds ``count``
        RESP bulk strings, ``len(keys), *keys, *args`` (``ArgTemplate.fill`` or
        ``encode_args`` of :mod:`gateway.redisio.resp`). The hot path's call: most of a
        charge's arguments are encoded once per org and route instead of once per request.

        Same reply, errors and NOSCRIPT handling as ``run``.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class RedisPyRunner:
    """A ``ScriptRunner`` on redis-py's script API (any asyncio ``Redis``/``RedisCluster``,
    fakeredis included): the fallback, and the baseline of ``bench/redis_client.py``.

    The client should not retry on its own (``connect_redis`` builds it so) and should
    decode responses, to return what the pipelined runners return.
    """

    def __init__(
        self, client: redis.asyncio.Redis | redis.asyncio.RedisCluster, *, close_client: bool = True
    ) -> None:
        self._client: Any = client
        self._close_client = close_client
        self._initialized = not isinstance(client, redis.asyncio.RedisCluster)

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` by SHA; on NOSCRIPT load it and run it once more."""
        return await self._evalsha(script, len(keys), [*keys, *args])

    async def run_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Any:
        """``run`` with encoded keys and arguments: decoded again for redis-py's API."""
        try:
            numkeys, *keys_and_args = decode_args(encoded, count)
        except ValueError as exc:
            raise RedisReplyError(f"ERR {script.name}: bad encoded arguments: {exc}") from None
        return await self._evalsha(script, int(numkeys), keys_and_args)

    async def _evalsha(
        self, script: LuaScript, numkeys: int, keys_and_args: Sequence[ScriptArg]
    ) -> Any:
        client = self._client
        try:
            if not self._initialized:
                # redis-py's RedisCluster loses commands sent concurrently with its lazy
                # first initialisation ("Connection closed by server"); initialize() is
                # locked inside, so every first caller waits for one initialisation.
                await client.initialize()
                self._initialized = True
            try:
                return await client.evalsha(script.sha, numkeys, *keys_and_args)
            except rexc.NoScriptError:
                # NOSCRIPT means nothing ran: loading and running again is safe.
                await client.script_load(script.source)
                return await client.evalsha(script.sha, numkeys, *keys_and_args)
        except (rexc.ResponseError, rexc.ClusterError) as exc:
            code = getattr(exc, "status_code", None)
            raise reply_error(f"{code} {exc}" if code else str(exc)) from exc
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as exc:
            # ConnectionError, TimeoutError, "cluster cannot be connected", ...
            raise RedisUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the client, if this runner owns it."""
        if self._close_client:
            await self._client.aclose()


@dataclass
class RedisHandles:
    """What ``connect_redis`` returns: a redis-py client and the hot-path script runner."""

    client: redis.asyncio.Redis | redis.asyncio.RedisCluster
    runner: ScriptRunner
    cluster: bool

    async def close(self) -> None:
        """Close the runner and the client."""
        await self.runner.close()
        await self.client.aclose()


def _ssl_context(parsed: RedisURL) -> ssl.SSLContext | None:
    if not parsed.tls:
        return None
    context = ssl.create_default_context(cafile=parsed.ssl_ca_certs)
    if parsed.ssl_cert_reqs != "required":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE if parsed.ssl_cert_reqs == "none" else ssl.CERT_OPTIONAL
    return context


def _redis_py_kwargs(parsed: RedisURL, timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "username": parsed.username,
        "password": parsed.password,
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No retries: a command that timed out may have run.
        "retry": Retry(NoBackoff(), 0),
    }
    if parsed.tls:
        kwargs.update(
            ssl=True,
            ssl_cert_reqs=parsed.ssl_cert_reqs,
            ssl_ca_certs=parsed.ssl_ca_certs,
            ssl_check_hostname=parsed.ssl_cert_reqs == "required",
        )
    return kwargs


_memory_servers: dict[str, FakeServer] = {}
_memory_lock = threading.Lock()


def _memory_handles(name: str) -> RedisHandles:
    try:
        import fakeredis
        from fakeredis.aioredis import FakeRedis
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("memory:// needs the fakeredis[lua] package") from exc
    with _memory_lock:
        server = _memory_servers.get(name)
        if server is None:
            server = _memory_servers[name] = fakeredis.FakeServer()
    client = FakeRedis(server=server, decode_responses=True)
    return RedisHandles(client, RedisPyRunner(client, close_client=False), cluster=False)


def connect_redis(url: str, *, timeout: float = 2.0, fast: bool = True) -> RedisHandles:
    """Build the Redis handles for ``url`` without connecting (see the module docstring).

    ``timeout`` bounds connecting and each command (the URL's ``?timeout=`` wins);
    ``fast=False`` runs scripts through redis-py instead of the pipelined client.
    """
    parsed = parse_redis_url(url)
    if parsed.kind == "memory":
        return _memory_handles(parsed.name)
    if parsed.timeout is not None:
        timeout = parsed.timeout
    kwargs = _redis_py_kwargs(parsed, timeout)
    settings = ConnectionSettings(
        username=parsed.username,
        password=parsed.password,
        db=parsed.db,
        ssl=_ssl_context(parsed),
        timeout=timeout,
    )
    runner: ScriptRunner
    if parsed.kind == "cluster":
        cluster = redis.asyncio.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes], **kwargs
        )
        runner = (
            FastRedisCluster(parsed.nodes, settings=settings)
            if fast
            else RedisPyRunner(cluster, close_client=False)
        )
        return RedisHandles(cluster, runner, cluster=True)
    host, port = parsed.nodes[0]
    if parsed.tls:
        kwargs.pop("ssl")
        kwargs["connection_class"] = redis.asyncio.SSLConnection
    # redis-py's default pool raises MaxConnectionsError past 100 commands in flight; this one
    # makes the excess wait for a connection (up to the timeout) instead.
    pool = redis.asyncio.BlockingConnectionPool(
        host=host, port=port, db=parsed.db, max_connections=100, timeout=timeout, **kwargs
    )
    client = redis.asyncio.Redis.from_pool(pool)
    runner = (
        FastRedis(host, port, settings=settings, connections=parsed.connections)
        if fast
        else RedisPyRunner(client, close_client=False)
    )
    return RedisHandles(client, runner, cluster=False)


async def probe_redis(url: str, *, command_timeout: float = 2.0) -> list[str]:
    """Check at startup that ``url`` can be used: PING every server it names (for a
    cluster every seed, then the slot map through redis-py's ``initialize``).

    Returns one line (``host:port: why``) per seed that did not answer while another did:
    a cluster starts through any seed. Raises ``RedisUnavailable`` naming every server and
    why when none answered, or when the cluster cannot be used (no slot map, not a cluster
    node). ``memory://`` needs nothing. ``command_timeout`` bounds connecting and each
    command; the URL's ``?timeout=`` wins over it.
    """
    parsed = parse_redis_url(url)
    if parsed.kind == "memory":
        return []
    timeout = parsed.timeout if parsed.timeout is not None else command_timeout
    kwargs = _redis_py_kwargs(parsed, timeout)
    shown = redact_url(url)
    failures: list[str] = []
    for host, port in parsed.nodes:
        client = redis.asyncio.Redis(host=host, port=port, db=parsed.db, **kwargs)
        try:
            await client.ping()
        except (rexc.RedisError, OSError) as exc:
            failures.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
        finally:
            await client.aclose()
    if len(failures) == len(parsed.nodes):
        what = "no seed of the Redis Cluster" if parsed.kind == "cluster" else "no Redis"
        raise RedisUnavailable(f"{what} answered at {shown}: " + "; ".join(failures))
    if parsed.kind == "cluster":
        cluster = redis.asyncio.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes], **kwargs
        )
        try:
            await cluster.initialize()
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as exc:
            raise RedisUnavailable(f"the Redis Cluster at {shown} cannot be used: {exc}") from exc
        finally:
            await cluster.aclose()
    return failures
