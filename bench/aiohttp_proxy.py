"""The plain streaming proxy creditgate's proxy is compared with: aiohttp both ways.

An aiohttp web server whose one handler identifies the API key (SHA-256 lookup), runs one
redis-py EVALSHA (bench/apps.py's naive script: check, DECRBY, XADD) and forwards the
request to the upstream with an aiohttp ClientSession, streaming the request body up
(``data=request.content``) and the response body down (``iter_any`` -> ``write``), without
buffering either. Hop-by-hop headers are dropped both ways, as a proxy must.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import aiohttp
import redis.asyncio
from aiohttp import web

from bench.apps import (
    COST,
    FEATURE,
    NAIVE_LUA,
    PATH,
    Settings,
    bearer_identity,
    naive_balance_key,
    naive_events_key,
)

_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


def aiohttp_proxy_app(settings: Settings, upstream: str, limit: int = 1000) -> web.Application:
    """The proxy as an aiohttp Application (run it with ``web.run_app``).

    ``limit``: upstream connections at once (aiohttp's ``TCPConnector(limit=)``; 0 = no
    limit). 1,000 suits the request benchmarks; bench/streams.py passes 0 because every
    open stream holds a connection and a cap would queue streams, not measure them."""
    digests = settings.key_digests()
    events = naive_events_key(settings.prefix)
    state: dict[str, Any] = {}

    async def startup(app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        state["redis"] = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        state["script"] = state["redis"].register_script(NAIVE_LUA)

    async def cleanup(app: web.Application) -> None:
        await state["session"].close()
        await state["redis"].aclose()

    async def proxy(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path == PATH:
            ident = bearer_identity(request.headers.get("Authorization"), digests)
            if ident is None:
                return web.json_response({"code": "unauthenticated"}, status=401)
            org, user = ident
            left = await state["script"](
                keys=[naive_balance_key(settings.prefix, org), events],
                args=[COST, org, user, FEATURE, uuid.uuid4().hex],
            )
            if left < 0:
                return web.json_response({"code": "insufficient_tokens"}, status=402)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        body = request.content if request.body_exists else None
        async with state["session"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            response = web.StreamResponse(
                status=up.status,
                headers=[(k, v) for k, v in up.headers.items() if k.lower() not in _HOP],
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    # wrk closes its connections with requests in flight at the end of each run; aiohttp
    # would log each of those as an error.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app
