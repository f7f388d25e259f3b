"""creditgate's own endpoints as Starlette routes: one line to serve them in any app.

:func:`creditgate_routes` gives ``/healthz``, ``/readyz``, ``/metrics``, the Stripe
webhook (``/webhooks/stripe``), the token API with its dashboard and OpenAPI document
(under ``config.api_prefix``) and, when an ``admin_token`` is configured, the admin API
and its dashboard (under ``/admin``). The proxy serves them through
:func:`build_ops_app`; in middleware mode they join the app's own routes::

    gate = CreditGate.from_config("creditgate.yaml")
    app = Starlette(routes=[...], lifespan=creditgate_lifespan(gate))
    app.add_middleware(CreditGateMiddleware, gate=gate)
    app.routes.extend(creditgate_routes(gate))

(``creditgate_lifespan``, from gateway.http.lifespan, runs the sync job in the app's event
loop; re-exported here.) The token and admin APIs are mounted as
small Starlette apps of their own, so their 404 and 405 answers are problem+json whatever
the host app answers elsewhere; routes the host app lists first win.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.billing.stripe_webhook import StripeWebhook
from gateway.http.dashboard import asset_route
from gateway.http.endpoint import Api, Operation, routes_of
from gateway.http.errors import http_exception_handler
from gateway.http.lifespan import creditgate_lifespan
from gateway.http.metrics import metrics_endpoint, readiness_endpoint
from gateway.http.openapi import ADMIN_OPERATIONS, TOKEN_OPERATIONS
from gateway.metering.gate import CreditGate

__all__ = ["build_ops_app", "creditgate_lifespan", "creditgate_routes"]

_PROBLEM_HANDLERS = {HTTPException: http_exception_handler}


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers (liveness; readiness is ``/readyz``)."""
    return JSONResponse({"status": "ok"})


# An encoded slash inside a path segment stands for no character an id may hold: it
# becomes this one (outside the id alphabet of gateway.core.ids), so the segment stays one
# segment and the id check answers 422 naming the parameter, as for any other bad id.
_SLASH_IN_SEGMENT = "\ufffd"


class _SegmentSlashes:
    """Routes a path whose segments hold an encoded slash (``%2F``) by its segments.

    ASGI's ``path`` is percent-decoded, so ``/admin/orgs/a%2Fb`` would be routed as
    ``/admin/orgs/a/b``: a 404 "no such endpoint", a 405 for a lone ``%2F``, or another
    operation's route when the rest of the id spells one (``acme%2Fgrants``). The path is
    rebuilt from ``raw_path`` with the slash kept inside its segment (as
    :data:`_SLASH_IN_SEGMENT`); any other path passes untouched (one bytes search)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    @property
    def routes(self) -> list[BaseRoute]:
        """The wrapped app's routes (what ``Mount.routes`` and ``url_path_for`` look at)."""
        return self.app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw and (b"%2f" in raw or b"%2F" in raw) and raw.isascii():
            segments = raw.decode("latin-1").split("/")
            path = "/".join(
                unquote(s, errors="replace").replace("/", _SLASH_IN_SEGMENT) for s in segments
            )
            scope = {**scope, "path": path}
        await self.app(scope, receive, send)


def _api_app(operations: list[Operation], api: Api, mounted_at: str = "") -> ASGIApp:
    """The operations (paths made relative to ``mounted_at``) and the pages' assets."""
    relative = [replace(op, path=op.path.removeprefix(mounted_at)) for op in operations]
    routes: list[BaseRoute] = [*routes_of(relative, api), asset_route()]
    return _SegmentSlashes(Starlette(routes=routes, exception_handlers=_PROBLEM_HANDLERS))


def creditgate_routes(gate: CreditGate) -> list[BaseRoute]:
    """Every endpoint creditgate serves itself, for ``gate`` (see the module docstring)."""
    api = Api.of(gate)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readiness_endpoint(gate, admin=api.admin)),
        Route("/metrics", metrics_endpoint(gate)),
        Route("/webhooks/stripe", StripeWebhook(gate).endpoint, methods=["POST"]),
        Mount(gate.config.api_prefix.rstrip("/"), app=_api_app(TOKEN_OPERATIONS, api)),
    ]
    if api.admin.configured:
        routes.append(Mount("/admin", app=_api_app(ADMIN_OPERATIONS, api, "/admin")))
    return routes


def build_ops_app(gate: CreditGate) -> Starlette:
    """The Starlette app serving only creditgate's own endpoints (the proxy's ``own``)."""
    return Starlette(routes=creditgate_routes(gate), exception_handlers=_PROBLEM_HANDLERS)
