"""creditgate's own endpoints: liveness, readiness, the token API and the admin API."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.billing.stripe_webhook import StripeWebhook
from gateway.http.admin_api import admin_routes
from gateway.http.common import http_exception_handler
from gateway.http.metrics import metrics_endpoint, readiness_endpoint
from gateway.http.token_api import api_routes
from gateway.metering.gate import CreditGate


def build_ops_app(gate: CreditGate) -> Starlette:
    """The Starlette app serving /healthz, /readyz, the token API and /admin."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readiness_endpoint(gate)),
        Route("/metrics", metrics_endpoint(gate)),
        Route("/webhooks/stripe", StripeWebhook(gate).endpoint, methods=["POST"]),
    ]
    routes += api_routes(gate) + admin_routes(gate)
    return Starlette(routes=routes, exception_handlers={HTTPException: http_exception_handler})
