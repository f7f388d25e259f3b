"""The dashboards: an org's page (``{api_prefix}/dashboard``) and the admin page
(``/admin/dashboard``), plain HTML/CSS/JS shipped in ``gateway/http/static`` (no build step, no
external assets; charts are inline SVG drawn by the page's own script).

The pages carry no data and need no credentials to load. Their script asks for the API key
(or the admin token), keeps it in ``sessionStorage`` for this tab only, and calls the JSON
endpoints with an ``Authorization`` header. A strict Content-Security-Policy allows only
this origin's own scripts, styles and fetches, so nothing else can run in the page or
read the key; ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store`` keep the
pages out of referrers and caches.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.core.problem import problem_response
from gateway.http.endpoint import Call, Doc, Operation

__all__ = ["ADMIN_PAGE", "ORG_PAGE", "asset_route", "render_page"]

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_ASSETS = {
    "app.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "org.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "admin_actions.js": "text/javascript; charset=utf-8",
}
_PAGES = {"org": "org.html", "admin": "admin.html"}
_HTML = Doc("The page", media="text/html", schema={"type": "string"})


@cache
def _asset(name: str) -> bytes:
    return resources.files("gateway.http").joinpath("static", name).read_bytes()


def render_page(kind: str, base: str) -> bytes:
    """The page for ``kind`` (org or admin); ``base`` is where its JSON API lives."""
    page = _asset(_PAGES[kind]).decode("utf-8")
    return page.replace("{{base}}", html.escape(base, quote=True)).encode("utf-8")


def _page(kind: str, base: str) -> Response:
    return Response(
        render_page(kind, base),
        media_type="text/html; charset=utf-8",
        headers={**_SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


async def org_page(call: Call) -> Response:
    """``{api_prefix}/dashboard``: the page calls the token API under the same prefix."""
    return _page("org", call.gate.config.api_prefix.rstrip("/"))


async def admin_page(call: Call) -> Response:
    """``/admin/dashboard``: the page calls the admin API."""
    return _page("admin", "/admin")


async def asset(request: Request) -> Response:
    """A page's script or style sheet (``.../static/{name}``); anything else is 404."""
    name = request.path_params["name"]
    if name not in _ASSETS:
        return problem_response(404, "not_found", "Not found", f"No asset {name!r}")
    return Response(
        _asset(name),
        media_type=_ASSETS[name],
        headers={**_SECURITY_HEADERS, "Cache-Control": "public, max-age=300"},
    )


def asset_route() -> Route:
    """``/static/{name}``, mounted next to each page (under the API prefix, or ``/admin``)."""
    return Route("/static/{name}", asset, methods=["GET"])


ORG_PAGE = Operation(
    "GET", "/dashboard", org_page, "dashboard",
    "The org's dashboard page (asks for the API key itself)", {200: _HTML}, security="public",
)  # fmt: skip
ADMIN_PAGE = Operation(
    "GET", "/admin/dashboard", admin_page, "adminDashboard",
    "The operator dashboard page (asks for the admin token itself)", {200: _HTML},
    security="public", tag="admin",
)  # fmt: skip
