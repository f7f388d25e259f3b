"""The ASGI apps the benchmarks serve (``bench/serve.py KIND`` runs one under uvicorn).

- ``bare``: a Starlette app answering ``POST /api/v1/leads/generate`` with 100 bytes; the
  baseline, and the upstream of the proxy benchmark.
- ``cg`` / ``cg-redispy``: the same app with ``CreditGateMiddleware`` (added the documented
  way, ``app.add_middleware``) charging every request; with the pipelined script runner
  (gateway/redisio/pipelined.py) or redis-py's (``connect_redis(url, fast=False)``).
- ``naive``: the same app with a Starlette ``BaseHTTPMiddleware`` that does one redis-py
  EVALSHA per request (check the balance, DECRBY, XADD a usage event): the obvious design.
- ``gateway``: ``GatewayApp`` (creditgate's proxy server) in front of ``--upstream``.

The peers that are not Starlette middleware live in bench/pg_peer.py and
bench/aiohttp_proxy.py. Settings (config path, API keys, Redis URL, key prefix) come from
the JSON file bench/run_all.py writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.redisio.lua_scripts import LuaScript
from gateway.redisio.resp import decode_args

PATH = "/api/v1/leads/generate"
FEATURE = "lead_generation"
COST = 1
BODY = b'{"leads":"' + b"x" * 88 + b'"}'
assert len(BODY) == 100

# The naive design's one script: check, take, record. KEYS: balance, event stream.
NAIVE_LUA = """
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
if bal < cost then return -1 end
bal = redis.call('DECRBY', KEYS[1], cost)
redis.call('XADD', KEYS[2], '*', 'o', ARGV[2], 'u', ARGV[3], 'f', ARGV[4], 't', cost,
  'rq', ARGV[5])
return bal
"""


@dataclass(frozen=True, slots=True)
class Settings:
    """What run_all.py hands every server: where things are, and the API keys."""

    config: str  # creditgate YAML
    redis_url: str
    prefix: str  # Redis key prefix of this run
    pg_dsn: str  # the bench database (peer tables live there too)
    keys: dict[str, tuple[str, str]]  # API key -> (org, user)

    @classmethod
    def load(cls, path: str | Path) -> Settings:
        """Read the settings JSON."""
        data = json.loads(Path(path).read_text())
        data["keys"] = {k: tuple(v) for k, v in data["keys"].items()}
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write the settings JSON."""
        data = {f: getattr(self, f) for f in self.__slots__}
        path.write_text(json.dumps(data))

    def key_digests(self) -> dict[bytes, tuple[str, str]]:
        """sha256(API key) -> (org, user): what the peers look keys up by, as creditgate does."""
        return {hashlib.sha256(k.encode()).digest(): v for k, v in self.keys.items()}


def naive_balance_key(prefix: str, org: str) -> str:
    """The naive design's balance key for ``org``."""
    return f"{prefix}:naive:bal:{org}"


def naive_events_key(prefix: str) -> str:
    """The naive design's event stream."""
    return f"{prefix}:naive:events"


async def leads(request: Request) -> Response:
    """The AI route: 100 bytes of JSON, request body not read."""
    return Response(BODY, media_type="application/json")


def bare_app() -> Starlette:
    """The baseline app (also the proxy benchmark's upstream)."""
    return Starlette(routes=[Route(PATH, leads, methods=["POST"])])


def cg_app(settings: Settings, *, fast: bool) -> Starlette:
    """The bare app metered by CreditGateMiddleware (pipelined or redis-py runner)."""
    from gateway.config import load_config
    from gateway.metering.gate import CreditGate
    from gateway.metering.middleware import CreditGateMiddleware
    from gateway.redisio.connect import connect_redis

    config = load_config(Path(settings.config))
    handles = connect_redis(config.redis_url, timeout=config.redis_timeout_seconds, fast=fast)
    app = bare_app()
    app.add_middleware(CreditGateMiddleware, gate=CreditGate(config, redis=handles))
    return app


class StubRunner:
    """A ScriptRunner answering every charge "ok" and every settle 1 without Redis: at once
    (``sync``), or one loop iteration later through a future, as a round trip would."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync

    async def run(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Return the canned reply of ``script``."""
        reply = ["ok", 999, 10**9, 10**9 - 1, 1] if script.name == "charge" else [1] * int(args[1])
        return await self._answer(reply)

    async def run_encoded(self, script: LuaScript, count: int, encoded: bytes) -> Any:
        """Return the canned reply of ``script`` (a settle's: one 1 per item; settle.lua's
        item count follows its keys, the first argument)."""
        if script.name == "charge":
            return await self._answer(["ok", 999, 10**9, 10**9 - 1, 1])
        numkeys = int(decode_args(encoded, 1)[0])
        return await self._answer([1] * int(decode_args(encoded, numkeys + 3)[-1]))

    async def _answer(self, reply: Any) -> Any:
        if self.sync:
            return reply
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        loop.call_soon(fut.set_result, reply)
        return await fut

    async def close(self) -> None:
        """Nothing to release."""


def gate_of(app: Starlette) -> Any:
    """The CreditGate of an app built by ``cg_app``."""
    return next(m.kwargs["gate"] for m in app.user_middleware if "gate" in m.kwargs)


def bearer_identity(
    header: str | None, digests: dict[bytes, tuple[str, str]]
) -> tuple[str, str] | None:
    """(org, user) for ``Authorization: Bearer <key>``, by the key's SHA-256, or None."""
    if not header or not header.startswith("Bearer "):
        return None
    return digests.get(hashlib.sha256(header[7:].strip().encode()).digest())


class NaiveMeter(BaseHTTPMiddleware):
    """The obvious design: BaseHTTPMiddleware, one redis-py EVALSHA before the app."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        super().__init__(app)
        self.prefix = settings.prefix
        self.digests = settings.key_digests()
        self.events = naive_events_key(settings.prefix)
        self.redis: Any = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        self.script = self.redis.register_script(NAIVE_LUA)  # EVALSHA, loads on NOSCRIPT

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        """Charge metered requests, pass the rest."""
        if request.method != "POST" or request.url.path != PATH:
            return await call_next(request)
        ident = bearer_identity(request.headers.get("authorization"), self.digests)
        if ident is None:
            return JSONResponse({"code": "unauthenticated"}, status_code=401)
        org, user = ident
        left = await self.script(
            keys=[naive_balance_key(self.prefix, org), self.events],
            args=[COST, org, user, FEATURE, uuid.uuid4().hex],
        )
        if left < 0:
            return JSONResponse({"code": "insufficient_tokens"}, status_code=402)
        response = await call_next(request)
        response.headers["x-tokens-remaining"] = str(left)
        return response


def naive_app(settings: Settings) -> Starlette:
    """The bare app behind NaiveMeter."""
    app = bare_app()
    app.add_middleware(NaiveMeter, settings=settings)
    return app


def floor_app(settings: Settings) -> Any:
    """The bare app behind the least a metering middleware can do: one pipelined EVALSHA of
    a script that only returns 1, nothing else (the cost floor of "one round trip per
    request" on this server stack)."""
    from gateway.redisio.connect import connect_redis
    from gateway.redisio.lua_scripts import LuaScript

    runner = connect_redis(settings.redis_url).runner
    script = LuaScript.from_source("floor", "return 1")
    key = [f"{settings.prefix}:floor"]
    inner = bare_app()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await runner.run(script, key, ())
        await inner(scope, receive, send)

    return app


def gateway_app(settings: Settings, upstream: str, client: str = "lean") -> Any:
    """creditgate's proxy server (GatewayApp) in front of ``upstream`` with the given
    upstream HTTP client (``upstream_client``); no sync job; its cycle collector tuned at
    startup as ``creditgate serve``'s is (gateway/commands/server.py ``tune_collector``)."""
    from gateway.commands.server import GatewayApp
    from gateway.config import load_config
    from gateway.metering.gate import CreditGate

    config = load_config(Path(settings.config)).model_copy(
        update={"upstream": upstream, "upstream_client": client}
    )
    return GatewayApp(CreditGate(config), sync=False, tune_gc=True)
