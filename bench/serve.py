"""Serve one benchmark app: ``python bench/serve.py KIND --port P --settings FILE``.

KIND: bare, floor, cg, cg-redispy, cg-stub, naive, gateway, gateway-aiohttp, pg-peer,
pg-peer-async, aiohttp-proxy (see bench/apps.py, bench/pg_peer.py, bench/aiohttp_proxy.py).
Diagnostics: ``cg-stub`` is the metered app with Redis replaced by canned replies (what the
middleware's own Python costs); ``gateway-aiohttp`` is GatewayApp with aiohttp's client
(``upstream_client: aiohttp``) instead of the default lean one. Everything but aiohttp-proxy runs
under uvicorn: 1 worker (this process), uvloop, httptools, no access log; the gateway kinds
with ``creditgate serve``'s protocol and options. bench/run_all.py
starts these pinned to a core and stops them with SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apps import (
    Settings,
    StubRunner,
    bare_app,
    cg_app,
    floor_app,
    gate_of,
    gateway_app,
    naive_app,
)

KINDS = (
    "bare",
    "floor",
    "cg",
    "cg-redispy",
    "cg-stub",
    "naive",
    "gateway",
    "gateway-aiohttp",
    "pg-peer",
    "pg-peer-async",
    "aiohttp-proxy",
)


def build(kind: str, settings: Settings, upstream: str | None) -> Any:
    """The ASGI app of ``kind``."""
    if kind == "bare":
        return bare_app()
    if kind == "floor":
        return floor_app(settings)
    if kind in ("cg", "cg-redispy", "cg-stub"):
        app = cg_app(settings, fast=kind != "cg-redispy")
        if kind == "cg-stub":
            gate_of(app).redis.runner = StubRunner()
        return app
    if kind == "naive":
        return naive_app(settings)
    if kind in ("gateway", "gateway-aiohttp"):
        assert upstream, "gateway needs --upstream"
        return gateway_app(settings, upstream, "aiohttp" if kind == "gateway-aiohttp" else "lean")
    if kind in ("pg-peer", "pg-peer-async"):
        from bench.pg_peer import pg_peer_app

        return pg_peer_app(settings, synchronous_commit=kind == "pg-peer")
    raise ValueError(f"unknown kind {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--upstream")
    parser.add_argument(
        "--upstream-limit",
        type=int,
        default=1000,
        help="aiohttp-proxy: upstream connections at once (0: no limit)",
    )
    args = parser.parse_args()
    settings = Settings.load(args.settings)
    if args.kind == "aiohttp-proxy":
        import uvloop
        from aiohttp import web

        from bench.aiohttp_proxy import aiohttp_proxy_app

        assert args.upstream, "aiohttp-proxy needs --upstream"
        web.run_app(
            aiohttp_proxy_app(settings, args.upstream, args.upstream_limit),
            host="127.0.0.1",
            port=args.port,
            access_log=None,
            print=None,
            loop=uvloop.new_event_loop(),
        )
        return
    import uvicorn

    app = build(args.kind, settings, args.upstream)
    options: dict[str, Any] = {"http": "httptools"}
    if args.kind in ("gateway", "gateway-aiohttp"):
        # The proxy is served as `creditgate serve` serves it (gateway/commands/cli.py): its
        # HTTP protocol with the `server:` limits and the cheaper response head, uvicorn's
        # proxy headers off, and no Server/Date headers of its own (the upstream's pass
        # through). The other kinds keep plain uvicorn: the baseline is unchanged.
        from gateway.commands.server import server_options

        options = {
            **server_options(app.gate.config),
            "proxy_headers": False,
            "server_header": False,
            "date_header": False,
        }
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        log_level="warning",
        access_log=False,
        lifespan="on",
        **options,
    )


if __name__ == "__main__":
    main()
