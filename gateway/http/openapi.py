"""The OpenAPI 3.1 document of the token API and the admin API, generated.

Served at ``{api_prefix}/openapi.json``. Every path, parameter, body and answer comes from
the operations the routes are built from (:data:`TOKEN_OPERATIONS`,
:data:`ADMIN_OPERATIONS`, gateway.http.endpoint.Operation) and from their pydantic models
(gateway.http.models), so the document cannot say anything the handlers do not do; it is
also checked against the running handlers by tests/http/test_openapi_fuzz.py
(schemathesis). Features, buckets and plans are enumerated from the config, so clients
and fuzzers see the deployment's real names. The admin operations are listed only when
an ``admin_token`` is configured (otherwise every ``/admin`` path is 404).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import CoreSchema
from starlette.responses import JSONResponse, Response

from gateway.__about__ import __version__
from gateway.config import Config
from gateway.http import admin_api, alerts_api, token_api
from gateway.http.dashboard import ADMIN_PAGE, ORG_PAGE
from gateway.http.endpoint import Call, Doc, Operation
from gateway.http.models.problem import Problem

__all__ = ["ADMIN_OPERATIONS", "OPENAPI", "TOKEN_OPERATIONS", "openapi_document"]

J = dict[str, Any]

_REF = "#/components/schemas/{model}"
_PROBLEM_MEDIA = "application/problem+json"
_PROBLEMS = {
    400: "The request could not be read (malformed JSON, bad query parameter or cursor)",
    401: "No or bad credentials",
    402: "Not enough tokens",
    403: "Feature not in plan, or user_id names another user",
    404: "No such resource",
    409: "Idempotency key in flight (retry after Retry-After seconds) or its response cannot"
    " be replayed, grant reference reused, or reservation expired",
    413: "Body larger than 64 KiB",
    422: "Well-formed body with unacceptable values, or an Idempotency-Key reused for another"
    " request",
    429: "Rate limited (also: too many bad credentials from this address)",
    501: "No database configured",
    503: "Redis or Postgres unreachable (fail closed); retry after Retry-After seconds",
}
_SECURITY: dict[str, list[J] | None] = {"key": None, "admin": [{"adminToken": []}], "public": []}


async def openapi_json(call: Call) -> Response:
    """``GET {api_prefix}/openapi.json``: this deployment's document (built once)."""
    memo = call.api.memo
    if "openapi" not in memo:
        memo["openapi"] = openapi_document(call.gate.config)
    return JSONResponse(memo["openapi"])


OPENAPI = Operation(
    "GET", "/openapi.json", openapi_json, "openapi", "This document",
    {200: Doc("The OpenAPI document", media="application/json", schema={"type": "object"})},
    security="public",
)  # fmt: skip

#: The token API's operations, mounted under ``config.api_prefix``.
TOKEN_OPERATIONS: list[Operation] = [*token_api.OPERATIONS, ORG_PAGE, OPENAPI]
#: The admin API's operations (absolute paths), served only with an admin token.
ADMIN_OPERATIONS: list[Operation] = [*admin_api.OPERATIONS, *alerts_api.OPERATIONS, ADMIN_PAGE]


class _Schemas(GenerateJsonSchema):
    """pydantic's generator without a ``title`` on every property (names say it)."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def _config_names(schema: Any, config: Config) -> Any:
    """Replace the ``x-config`` markers of gateway.http.models.fields.ConfigName by an
    enum of the config's names."""
    if isinstance(schema, list):
        return [_config_names(item, config) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "x-config" in schema:
        names = list(getattr(config, schema["x-config"]))
        return {"enum": sorted(names) if schema.get("x-config-sorted") else names}
    return {key: _config_names(value, config) for key, value in schema.items()}


def _not_null(schema: J) -> J:
    """A parameter's schema without the ``null`` branch of an optional field."""
    branches = schema.get("anyOf")
    if not branches:
        return schema
    rest = [b for b in branches if b != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**rest[0], **out} if len(rest) == 1 else {**out, "anyOf": rest}


def _parameters(model: type[BaseModel] | None, where: str) -> list[J]:
    if model is None:
        return []
    schema = model.model_json_schema(by_alias=True, schema_generator=_Schemas)
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema["properties"].items():
        prop = _not_null(dict(prop))
        description = prop.pop("description", None)
        param: J = {"name": name, "in": where, "required": where == "path" or name in required}
        param["schema"] = prop
        if description:
            param["description"] = description
        out.append(param)
    return out


def _key(model: type[Any]) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def _operation(op: Operation, refs: dict[tuple[str, JsonSchemaMode], J]) -> J:
    responses: J = {}
    for status, doc in op.responses.items():
        answer: J = {"description": doc.description}
        if doc.model is not None:
            schema = refs[(_key(doc.model), "serialization")]
            answer["content"] = {"application/json": {"schema": schema}}
        elif doc.media is not None:
            answer["content"] = {doc.media: {"schema": dict(doc.schema or {})}}
        responses[str(status)] = answer
    for status in op.problems:
        responses[str(status)] = {"$ref": f"#/components/responses/P{status}"}
    out: J = {"tags": [op.tag], "operationId": op.operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    security = _SECURITY[op.security]
    if security is not None:
        out["security"] = security
    parameters = [
        *_parameters(op.path_params, "path"),
        *_parameters(op.query, "query"),
        *_parameters(op.headers, "header"),
    ]
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        schema = refs[(_key(op.body), "validation")]
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    out["responses"] = responses
    return out


def _models(operations: Iterable[Operation]) -> list[tuple[type[Any], JsonSchemaMode]]:
    wanted: list[tuple[type[Any], JsonSchemaMode]] = [(Problem, "serialization")]
    for op in operations:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        wanted += [(d.model, "serialization") for d in op.responses.values() if d.model]
    return list(dict.fromkeys(wanted))


def openapi_document(config: Config) -> J:
    """The OpenAPI 3.1 document for this deployment's token API (and admin API)."""
    prefix = config.api_prefix.rstrip("/")
    operations = [(prefix + op.path, op) for op in TOKEN_OPERATIONS]
    tags = [{"name": "tokens", "description": "The token API: an org's own balances and usage"}]
    if config.admin_token:
        operations += [(op.path, op) for op in ADMIN_OPERATIONS]
        tags.append({"name": "admin", "description": "Operators: plans, grants, keys, usage"})
    wanted = _models(op for _, op in operations)
    refs, defs = TypeAdapter.json_schemas(
        [(_key(model), mode, TypeAdapter(model)) for model, mode in wanted],
        ref_template=_REF,
        schema_generator=_Schemas,
    )
    paths: J = {}
    for path, op in operations:
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, refs)
    responses = {
        f"P{status}": {
            "description": text,
            "content": {_PROBLEM_MEDIA: {"schema": refs[(_key(Problem), "serialization")]}},
            **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}}
               if status in (409, 429, 503) else {}),
        }
        for status, text in _PROBLEMS.items()
    }  # fmt: skip
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "creditgate",
            "version": __version__,
            "description": "Token budgets for AI features. Errors are RFC 9457 problem "
            "details with a stable `code`. The organization always comes from the "
            "credentials.",
        },
        "tags": tags,
        "security": [{"apiKey": []}, {"apiKeyHeader": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "An API key (cg_...) or an accepted JWT"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The config's admin_token"},
            },
            "schemas": defs.get("$defs", {}),
            "responses": responses,
        },
    }  # fmt: skip
    result: J = _config_names(document, config)
    return result
