"""Reading a request's inputs with the API models (gateway.http.models).

- The JSON body: at most 64 KiB (413), a JSON object (400), then the operation's body
  model; a member that is ``null`` counts as absent, except the members a model names in
  ``NULL_MEMBERS`` where ``null`` means something (``team: null``: out of the team).
- Path parameters and headers: validated with the body, so one 422 lists every refused
  value (``errors``: ``[{field, message}]``, the messages of gateway.http.models.fields;
  checks against the config or the clock come after the others, as they always have).
- Query parameters: an empty one counts as absent; the first refused one is a 400
  ``bad_request`` naming it (``days must be between 1 and 366``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.http.errors import ApiError, bad_request
from gateway.http.models.fields import ERROR_TYPE, LATE_ERROR_TYPE

__all__ = [
    "MAX_BODY_BYTES",
    "field_errors",
    "header_values",
    "json_object",
    "read_query",
    "validate",
]

MAX_BODY_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)


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


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] in (ERROR_TYPE, LATE_ERROR_TYPE):
        return str(error["msg"])
    if error["type"] == "missing":
        return "is required"
    return str(error["msg"])  # pydantic's own words, for checks no marker makes


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """``[{field, message}]`` of a validation error, late checks last."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] == LATE_ERROR_TYPE)
    return [
        {"field": ".".join(str(part) for part in e["loc"]), "message": _message(e)} for e in errors
    ]


def validate(
    model: type[M], data: Mapping[str, Any], *, context: Mapping[str, Any] | None = None
) -> tuple[M | None, list[dict[str, str]]]:
    """``data`` as ``model`` (None members dropped, except the model's ``NULL_MEMBERS``),
    or None and the refused values."""
    keep: frozenset[str] = getattr(model, "NULL_MEMBERS", frozenset())
    present = {k: v for k, v in data.items() if v is not None or k in keep}
    try:
        return model.model_validate(present, context=dict(context or {})), []
    except ValidationError as exc:
        return None, field_errors(exc)


def read_query(model: type[M], request: Request) -> M:
    """The query parameters as ``model``, or a 400 naming the first refused one."""
    params = {k: v for k, v in request.query_params.items() if v != ""}
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        if first["type"] == "missing":
            field = next(f for n, f in model.model_fields.items() if (f.alias or n) == name)
            why = f" ({field.description})" if field.description else ""
            raise bad_request(f"{name} is required{why}") from None
        raise bad_request(f"{name} {_message(first)}") from None


def header_values(model: type[BaseModel], request: Request) -> dict[str, str]:
    """The headers ``model`` reads, by their names (absent ones left out)."""
    out = {}
    for name, field in model.model_fields.items():
        header = field.alias or name
        value = request.headers.get(header)
        if value is not None:
            out[header] = value
    return out
