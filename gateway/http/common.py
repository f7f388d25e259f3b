"""What the token API and the admin API share: problem+json answers, input parsing, guards.

Every error either API answers is ``application/problem+json`` (DESIGN A3), with the same
``code`` names the metered path uses. Handlers raise :class:`ApiError` for a refusal;
``guarded`` turns that, and the outages of Redis or Postgres (503 with ``Retry-After``),
into problem responses, so no handler has to repeat the mapping.

Input rules, the same in both APIs: a body that is not a JSON object is **400**
``bad_request``; a query parameter or cursor that cannot be read is **400** ``bad_request``;
a well-formed body with unacceptable values is **422** ``invalid_request`` with an
``errors`` list (``[{field, message}]``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.core.errors import (
    DatabaseUnavailable,
    IdentityUnavailable,
    LedgerUnavailable,
    NoDatabase,
    RedisUnavailable,
)
from gateway.core.problem import problem_response
from gateway.identity.principal import valid_id

log = logging.getLogger("creditgate.api")

MAX_BODY_BYTES = 64 * 1024
MAX_KEY_LENGTH = 255

Handler = Callable[[Request], Awaitable[Response]]

# An outage of a store we depend on: the client should retry (503), never a 500.
_UNAVAILABLE = (
    RedisUnavailable,
    LedgerUnavailable,
    IdentityUnavailable,
    DatabaseUnavailable,
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)


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


def error_response(exc: ApiError) -> Response:
    """The problem+json response of an ApiError."""
    return problem_response(
        exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.facts
    )


def unavailable(retry_after: int, detail: str) -> Response:
    """503 ``unavailable`` with ``Retry-After`` (fail closed)."""
    return problem_response(
        503, "unavailable", "Service unavailable", detail, retry_after=retry_after
    )


def guarded(retry_after: int) -> Callable[[Handler], Handler]:
    """Decorate a handler: ApiError -> its problem, outages -> 503, bugs -> 500 problem."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except NoDatabase as exc:
                return problem_response(501, "not_configured", "No database", str(exc))
            except _UNAVAILABLE as exc:
                log.warning("%s %s: store unavailable: %s", request.method, request.url.path, exc)
                return unavailable(retry_after, "A backing store is unreachable; retry shortly")
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return problem_response(
                    500, "internal_error", "Internal error", "The request failed unexpectedly"
                )

        return wrapper

    return decorate


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


# -- input ------------------------------------------------------------------------------


def bad_request(detail: str, **facts: Any) -> ApiError:
    """400 ``bad_request``: the request could not be read."""
    return ApiError(400, "bad_request", "Bad request", detail, **facts)


def invalid(errors: list[dict[str, str]]) -> ApiError:
    """422 ``invalid_request`` listing every problem with the body's values."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return ApiError(422, "invalid_request", "Invalid request", detail, errors=errors)


async def json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (400 when it is not one, 413 when too large)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(
                413, "payload_too_large", "Payload too large",
                f"The body may be at most {MAX_BODY_BYTES} bytes",
            )  # fmt: skip
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise bad_request("The body must be a JSON object")
    return doc


def storable(text: str) -> bool:
    """Whether Postgres text can hold ``text`` (valid UTF-8, no NUL): JSON allows both."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON)
        return False
    return True


class Fields:
    """Reads a JSON object's fields, collecting every problem before raising 422 once."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.errors: list[dict[str, str]] = []

    def _fail(self, name: str, message: str) -> None:
        self.errors.append({"field": name, "message": message})

    def string(
        self, name: str, *, required: bool = False, max_length: int = MAX_KEY_LENGTH,
        ident: bool = False,
    ) -> str | None:  # fmt: skip
        """A string field (``ident``: 1..200 printable ASCII, no spaces, like ids)."""
        value = self.doc.get(name)
        if value is None:
            if required:
                self._fail(name, "is required")
            return None
        if not isinstance(value, str):
            self._fail(name, "must be a string")
        elif not storable(value):
            self._fail(name, "must be UTF-8 text without NUL characters")
        elif ident and not valid_id(value):
            self._fail(name, "must be 1-200 printable ASCII characters without spaces")
        elif not 0 < len(value) <= max_length:
            self._fail(name, f"must be 1-{max_length} characters")
        else:
            return value
        return None

    def integer(
        self, name: str, *, default: int | None = None, minimum: int = 1, maximum: int = 10**9
    ) -> int | None:
        """An integer field within [minimum, maximum]; absent -> ``default`` (None: required)."""
        value = self.doc.get(name)
        if value is None:
            if default is None:
                self._fail(name, "is required")
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 5.0 is the integer 5
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(name, "must be an integer")
            return None
        if not minimum <= value <= maximum:
            self._fail(name, f"must be between {minimum} and {maximum}")
            return None
        return value

    def timestamp(self, name: str) -> datetime | None:
        """An optional ISO 8601 timestamp with a time zone."""
        value = self.doc.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.utcoffset() is not None:
                return parsed.astimezone(UTC)
        self._fail(name, "must be an ISO 8601 date-time with a time zone")
        return None

    def done(self) -> None:
        """Raise 422 if any field was refused."""
        if self.errors:
            raise invalid(self.errors)


def query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter within bounds (400 otherwise)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
    if not minimum <= value <= maximum:
        raise bad_request(f"{name} must be between {minimum} and {maximum}")
    return value


def query_date(request: Request, name: str, default: date) -> date:
    """A ``YYYY-MM-DD`` query parameter (400 otherwise)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise bad_request(f"{name} must be a date (YYYY-MM-DD)") from None


# -- output -----------------------------------------------------------------------------
