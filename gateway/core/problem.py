"""RFC 9457 problem details (``application/problem+json``) for every error creditgate answers.

One shape for all errors: ``type``, ``title``, ``status``, ``detail`` and ``code`` (the stable,
machine-readable name clients switch on), plus whatever facts the client needs to act
(``feature``, ``cost``, ``balance``, ``refresh_at``, ``retry_after``...). Facts whose value is
``None`` are left out, so callers can pass what they have without branching.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

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

    ``headers`` are added after content-type and content-length. When a ``retry_after``
    fact is given (seconds) and ``headers`` has no ``Retry-After``, the header is added too
    (rounded up to whole seconds), as 429 and 503 answers need it.
    """
    body = problem_body(status, code, title, detail, **facts)
    out = [
        (b"content-type", PROBLEM_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    out.extend(headers)
    retry_after = facts.get("retry_after")
    if isinstance(retry_after, int | float) and not any(
        name.lower() == b"retry-after" for name, _ in headers
    ):
        out.append((b"retry-after", str(max(0, math.ceil(retry_after))).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})
