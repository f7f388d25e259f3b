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

URLs (``?option=value`` may follow any of them):
- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS): one server;
- ``redis-cluster://[[user]:password@]host[:port][,host[:port]...]``, ``rediss-cluster://``;
- ``memory://[name]``: an in-process fakeredis server shared by every URL with that name.
Options: ``timeout`` (seconds, overrides the ``timeout`` argument), ``connections`` (sockets
of the pipelined client per server), ``ssl_cert_reqs`` (``required``/``optional``/``none``)
and ``ssl_ca_certs`` (a CA bundle path) for TLS.
Nothing connects until first use, so handles can be built before the event loop runs.

redis-py caveats handled here: the single-node client gets a ``BlockingConnectionPool`` (100
sockets; more concurrent commands wait, up to the timeout, where redis-py's default pool
raises MaxConnectionsError). redis-py's ``RedisCluster`` fails commands sent concurrently
with its lazy first initialisation; ``RedisPyRunner`` awaits ``initialize()`` first, and
other users of a cluster ``client`` should do the same at startup.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote

import redis.asyncio
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core.errors import RedisUnavailable
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
]

DEFAULT_PORT = 6379
_SCHEMES: dict[str, tuple[Literal["single", "cluster", "memory"], bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis-cluster": ("cluster", False),
    "rediss-cluster": ("cluster", True),
    "memory": ("memory", False),
}
_CERT_REQS = ("required", "optional", "none")
_OPTIONS = ("timeout", "connections", "ssl_cert_reqs", "ssl_ca_certs")


class ScriptRunner(Protocol):
    """Runs the gateway's Lua scripts; the hot path's only use of Redis."""

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


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed Redis URL (see the module docstring)."""

    kind: Literal["single", "cluster", "memory"]
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    name: str = ""
    timeout: float | None = None
    connections: int = 1
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None


def _redact(url: str) -> str:
    # Never echo a password in an error message.
    return re.sub(r"(://[^:/@,]*:)[^@]*@", r"\1***@", url)


def _parse_host(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"redis URL {url!r}: bad IPv6 address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"redis URL {url!r}: missing host name")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"redis URL {url!r}: bad port {port_text!r} for host {host!r}")
    return host, int(port_text)


def parse_redis_url(url: str) -> RedisURL:
    """Parse a Redis URL; a bad one raises ``ValueError`` saying what is wrong with it."""
    shown = _redact(url)
    scheme, sep, rest = url.partition("://")
    schemes = "redis://, rediss://, redis-cluster://, rediss-cluster:// or memory://"
    if not sep:
        raise ValueError(f"redis URL {shown!r}: missing scheme; use {schemes}")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"redis URL {shown!r}: unknown scheme {scheme!r}; use {schemes}")
    kind, tls = _SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError(f"redis URL {shown!r}: fragments ('#') are not allowed")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        options[key] = _option(key, value, tls, kind, shown)
    if kind == "memory":
        return RedisURL("memory", name=rest.strip("/"), **options)

    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError(
                f"redis URL {shown!r}: user name without a password; "
                "write redis://user:password@host or redis://:password@host"
            )
        username, password = unquote(user) or None, unquote(secret)
    if not netloc:
        raise ValueError(f"redis URL {shown!r}: missing host name")
    nodes = tuple(_parse_host(part, shown) for part in netloc.split(","))
    if kind == "single" and len(nodes) > 1:
        raise ValueError(
            f"redis URL {shown!r}: several hosts need redis-cluster:// or rediss-cluster://"
        )
    path = path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"redis URL {shown!r}: database must be a number, not {path!r}")
    db = int(path or 0)
    if kind == "cluster" and db:
        raise ValueError(f"redis URL {shown!r}: Redis Cluster has only database 0")
    return RedisURL(kind, tls, nodes, db=db, username=username, password=password, **options)


def _option(key: str, value: str, tls: bool, kind: str, shown: str) -> Any:
    if kind == "memory" or key not in _OPTIONS:
        known = "" if kind == "memory" else f"; known: {', '.join(_OPTIONS)}"
        raise ValueError(f"redis URL {shown!r}: unknown option {key!r}{known}")
    if key.startswith("ssl_") and not tls:
        raise ValueError(f"redis URL {shown!r}: option {key!r} needs rediss:// (TLS)")
    bad = ValueError(f"redis URL {shown!r}: bad value {value!r} for option {key!r}")
    if key == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise bad from None
        if not 0 < seconds < float("inf"):
            raise bad
        return seconds
    if key == "connections":
        if not value.isdigit() or int(value) < 1:
            raise bad
        return int(value)
    if not value or (key == "ssl_cert_reqs" and value not in _CERT_REQS):
        raise bad
    return value


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
