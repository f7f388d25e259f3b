"""RFC 9457 problem details (``application/problem+json``) for every error creditgate answers.

One shape for all errors: ``type``, ``title``, ``status``, ``detail`` and ``code`` (the stable,
machine-readable name clients switch on), plus whatever facts the client needs to act
(``feature``, ``cost``, ``balance``, ``refresh_at``, ``retry_after``...). Facts whose value is
``None`` are left out, so callers can pass what they have without branching.

This module is the only place that builds a problem document. Two thin adapters answer it:
:func:`send_problem` on a raw ASGI ``send`` (the middleware and the proxy, which never build a
Starlette response on the hot path) and :func:`problem_response`, a Starlette ``Response``
(the token and admin APIs, the dashboards, the Stripe webhook). Both add the same headers: a
``retry_after`` fact also sets ``Retry-After`` (whole seconds, rounded up) unless the caller
set one.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from starlette.responses import Response

PROBLEM_CONTENT_TYPE = b"application/problem+json"
PROBLEM_TYPE_BASE = "https://creditgate.dev/problems/"

# The members RFC 9457 defines plus our `code`; a fact may not overwrite them.
_RESERVED = frozenset({"type", "title", "status", "detail", "instance", "code"})

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _default(value: object) -> object:
    """Serialise the few non-JSON types facts commonly hold (stdlib json path only)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"problem fact of type {type(value).__name__} is not JSON serialisable")


try:
    import orjson  # type: ignore[import-not-found, unused-ignore]

    def _dumps(doc: dict[str, object]) -> bytes:
        result: bytes = orjson.dumps(doc, default=_default)
        return result

except ImportError:  # orjson is an optional speed-up; the output is the same JSON
    import json

    def _dumps(doc: dict[str, object]) -> bytes:
        return json.dumps(doc, default=_default, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8"
        )


def problem_body(status: int, code: str, title: str, detail: str, **facts: object) -> bytes:
    """Return the UTF-8 JSON body of a problem document.

    ``type`` is ``https://creditgate.dev/problems/<code>``. Facts equal to ``None`` are
    omitted; a fact named like a standard member (``type``, ``title``...) is a bug and
    raises ``ValueError``.
    """
    clash = _RESERVED.intersection(facts)
    if clash:
        raise ValueError(f"problem facts may not redefine {sorted(clash)}")
    doc: dict[str, object] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    for key, value in facts.items():
        if value is not None:
            doc[key] = value
    return _dumps(doc)


def retry_after_header(facts: Mapping[str, object], names: Iterable[str]) -> str | None:
    """The ``Retry-After`` value a problem with these facts needs, or None.

    None when there is no numeric ``retry_after`` fact or ``names`` (the header names the
    caller already sets, any case) include ``Retry-After``.
    """
    value = facts.get("retry_after")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if any(name.lower() == "retry-after" for name in names):
        return None
    return str(max(0, math.ceil(value)))


async def send_problem(
    send: Send,
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    **facts: object,
) -> None:
    """Answer an ASGI HTTP request with a complete problem+json response.

    ``headers`` are added after content-type and content-length; ``Retry-After`` as
    described in the module docstring.
    """
    body = problem_body(status, code, title, detail, **facts)
    out = [
        (b"content-type", PROBLEM_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    out.extend(headers)
    retry = retry_after_header(facts, (name.decode("latin-1") for name, _ in headers))
    if retry is not None:
        out.append((b"retry-after", retry.encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **facts: object,
) -> Response:
    """The same answer as a Starlette ``Response`` (for endpoints that return one)."""
    out = dict(headers or {})
    retry = retry_after_header(facts, out)
    if retry is not None:
        out["Retry-After"] = retry
    return Response(
        problem_body(status, code, title, detail, **facts),
        status_code=status,
        headers=out,
        media_type=PROBLEM_CONTENT_TYPE.decode("ascii"),
    )
