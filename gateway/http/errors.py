"""How the token API and the admin API refuse: problem+json answers (contract A3).

Every error either API answers is ``application/problem+json`` (built by
gateway.core.problem), with the same ``code`` names the metered path uses. Handlers raise
:class:`ApiError` for a refusal; :func:`response_for` turns that, and everything else a
handler may raise, into the answer, so no handler repeats the mapping:

- an outage of Redis or Postgres (gateway.core.errors.UNAVAILABLE): **503**
  ``unavailable`` with ``Retry-After``, never a 500 and never "your key is wrong";
- no database configured for a call that needs one: **501** ``not_configured``;
- an id the library refuses (gateway.core.ids): **400** ``bad_request``;
- anything else is a bug: logged, **500** ``internal_error``.

Input rules, the same in both APIs (gateway.http.inputs): a body that is not a JSON object
is **400** ``bad_request``; a query parameter or cursor that cannot be read is **400**
``bad_request``; a well-formed body (or path) with unacceptable values is **422**
``invalid_request`` with an ``errors`` list (``[{field, message}]``).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.core.errors import UNAVAILABLE, NoDatabase
from gateway.core.ids import InvalidId
from gateway.core.problem import problem_response

__all__ = [
    "ApiError",
    "bad_request",
    "http_exception_handler",
    "invalid",
    "response_for",
    "unknown_org",
]

log = logging.getLogger("creditgate.api")


class ApiError(Exception):
    """A refusal to answer with problem+json; ``facts`` become extra members."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **facts: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.headers = headers or {}
        self.facts = facts

    def response(self) -> Response:
        """This refusal as a problem+json response."""
        return problem_response(
            self.status, self.code, self.title, self.detail, headers=self.headers, **self.facts
        )


def bad_request(detail: str, **facts: Any) -> ApiError:
    """400 ``bad_request``: the request could not be read."""
    return ApiError(400, "bad_request", "Bad request", detail, **facts)


def invalid(errors: list[dict[str, str]]) -> ApiError:
    """422 ``invalid_request`` listing every problem with the request's values."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ApiError(422, "invalid_request", "Invalid request", detail, errors=errors)


def unknown_org(org: str) -> ApiError:
    """404 ``unknown_org``: the admin API names an org the ledger does not know."""
    return ApiError(
        404, "unknown_org", "Unknown organization",
        f"No organization {org!r}: create it with PUT /admin/orgs/{{org}}", org=org,
    )  # fmt: skip


def response_for(exc: Exception, request: Request, retry_after: int) -> Response:
    """The answer to a handler's exception (see the module docstring)."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, NoDatabase):
        return problem_response(501, "not_configured", "No database", str(exc))
    if isinstance(exc, UNAVAILABLE):
        log.warning("%s %s: store unavailable: %s", request.method, request.url.path, exc)
        return problem_response(
            503, "unavailable", "Service unavailable",
            "A backing store is unreachable; retry shortly", retry_after=retry_after,
        )  # fmt: skip
    if isinstance(exc, InvalidId):
        return bad_request(str(exc)).response()
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, "internal_error", "Internal error", "The request failed unexpectedly"
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method) as problem+json too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
        return problem_response(
            405, "method_not_allowed", "Method not allowed",
            f"{request.method} is not supported on {request.url.path}", headers=headers,
        )  # fmt: skip
    if status == 404:
        detail = f"No such endpoint: {request.url.path}"
        return problem_response(404, "not_found", "Not found", detail)
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    return problem_response(status, "http_error", "HTTP error", str(detail))
