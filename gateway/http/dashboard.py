"""The dashboards: an org's page (``{api_prefix}/dashboard``) and the admin page
(``/admin/dashboard``), plain HTML/CSS/JS shipped in ``gateway/static`` (no build step, no
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
from starlette.routing import BaseRoute, Route

from gateway.core.problem import problem_response

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
}
_PAGES = {"org": "org.html", "admin": "admin.html"}


@cache
def _asset(name: str) -> bytes:
    return resources.files("gateway.http").joinpath("static", name).read_bytes()


def render_page(kind: str, base: str) -> bytes:
    """The page for ``kind`` (org or admin); ``base`` is where its JSON API lives."""
    page = _asset(_PAGES[kind]).decode("utf-8")
    return page.replace("{{base}}", html.escape(base, quote=True)).encode("utf-8")


def dashboard_routes(kind: str, base: str | None = None) -> list[BaseRoute]:
    """``/dashboard`` and ``/static/{name}`` for the org page (mounted under the API
    prefix) or, for ``kind="admin"``, ``/admin/dashboard`` and ``/admin/static/{name}``."""
    prefix = "/admin" if kind == "admin" else ""

    async def page(request: Request) -> Response:
        # The API base as the browser sees it: the mount's root path, or /admin.
        api_base = base or (prefix or request.scope.get("root_path", "") or "")
        return Response(
            render_page(kind, api_base),
            media_type="text/html; charset=utf-8",
            headers={**_SECURITY_HEADERS, "Cache-Control": "no-store"},
        )

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _ASSETS:
            return problem_response(404, "not_found", "Not found", f"No asset {name!r}")
        return Response(
            _asset(name),
            media_type=_ASSETS[name],
            headers={**_SECURITY_HEADERS, "Cache-Control": "public, max-age=300"},
        )

    return [
        Route(f"{prefix}/dashboard", page, methods=["GET"]),
        Route(f"{prefix}/static/{{name}}", asset, methods=["GET"]),
    ]
