"""The OpenAPI 3.1 document of the token API and the admin API, built from the config.

Served at ``{api_prefix}/openapi.json``. It is written by hand (a dict) so that it says
exactly what the handlers in gateway/http/token_api.py and gateway/http/admin_api.py do,
and it is checked
against them by tests/http/test_openapi_fuzz.py (schemathesis). Features, buckets and plans are
enumerated from the config, so clients and fuzzers see the deployment's real names. The
admin operations are listed only when an ``admin_token`` is configured (otherwise every
``/admin`` path is 404).
"""

from __future__ import annotations

from typing import Any

from gateway.__about__ import __version__
from gateway.config import Config
from gateway.identity.principal import MAX_ID_LENGTH

J = dict[str, Any]

# The schemas below are laid out by hand for reading; keep formatters off them.
# fmt: off

_ID_PATTERN = f"^[!-~]{{1,{MAX_ID_LENGTH}}}$"
_PROBLEM = "application/problem+json"


def _ref(name: str) -> J:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: J, required: list[str] | None = None, *, extra: bool = False) -> J:
    schema: J = {"type": "object", "properties": props, "additionalProperties": extra}
    schema["required"] = list(props) if required is None else required
    return schema


def _nullable(schema: J) -> J:
    return {"anyOf": [schema, {"type": "null"}]}


_INT: J = {"type": "integer"}
_NNINT: J = {"type": "integer", "minimum": 0}
_STR: J = {"type": "string"}
_TIME: J = {"type": "string", "format": "date-time"}
_DATE: J = {"type": "string", "format": "date"}
_ID: J = {"type": "string", "pattern": _ID_PATTERN}
_KEY: J = {"type": "string", "minLength": 1, "maxLength": 255}
_QUANTITY: J = {"type": "integer", "minimum": 1, "maximum": 1000}

_PROBLEMS = {
    "400": "The request could not be read (malformed JSON, bad query parameter or cursor)",
    "401": "No or bad credentials",
    "402": "Not enough tokens",
    "403": "Feature not in plan, or user_id names another user",
    "404": "No such resource",
    "409": "Idempotency key in flight, or grant reference reused",
    "413": "Body larger than 64 KiB",
    "422": "Well-formed body with unacceptable values",
    "429": "Rate limited (also: too many bad credentials from this address)",
    "501": "No database configured",
    "503": "Redis or Postgres unreachable (fail closed); retry after Retry-After seconds",
}


def _responses(ok: J, *problems: str) -> J:
    out = dict(ok)
    for code in problems:
        out[code] = {"$ref": f"#/components/responses/P{code}"}
    return out


def _json(description: str, schema: J) -> J:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: J) -> J:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: J, description: str) -> J:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


def _path(name: str, schema: J) -> J:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _schemas(config: Config) -> J:
    features = sorted(config.features)

    def usage(key: str, schema: J) -> J:
        return _obj({key: schema, "requests": _NNINT, "tokens": _INT})

    bucket = _obj({
        "allocated": _NNINT, "balance": _NNINT, "extra": _NNINT, "used": _INT,
        "available": _NNINT, "in_plan": {"type": "boolean"},
    })  # fmt: skip
    balance = _obj({
        "org": _STR, "plan": _STR, "period": _STR, "period_start": _TIME, "period_end": _TIME,
        "refresh_at": _TIME,
        "buckets": {"type": "object", "additionalProperties": _ref("Bucket")},
        "features": {"type": "object", "additionalProperties": _ref("FeatureInfo")},
    })  # fmt: skip
    forecast = _obj({
        "available": _NNINT, "burn_per_day": {"type": "number", "minimum": 0},
        "days_left": _nullable({"type": "number", "minimum": 0}),
        "empty_on": _nullable(_DATE), "empties_before_refresh": {"type": "boolean"},
    })  # fmt: skip
    log_row = _obj({
        "id": _INT, "event_id": _STR, "created_at": _TIME,
        "kind": {"enum": ["charge", "refund", "expired_hold", "grant", "grant_expired",
                          "plan_change", "reset", "repair"]},
        "feature": _nullable(_STR), "bucket": _STR, "user_id": _nullable(_STR),
        "tokens": _INT, "balance_after": _nullable(_INT), "extra_after": _nullable(_INT),
        "request_id": _nullable(_STR), "method": _nullable(_STR), "route": _nullable(_STR),
        "upstream_status": _nullable(_INT), "latency_ms": _nullable(_INT),
        "plan": _nullable(_STR), "reference": _nullable(_STR),
    })  # fmt: skip
    key = _obj({
        "id": _STR, "org": _STR, "user": _nullable(_STR), "name": _STR, "prefix": _STR,
        "created_at": _TIME, "revoked_at": _nullable(_TIME),
    })  # fmt: skip
    org_usage = _obj({"org": _STR, "plan": _nullable(_STR), "tokens": _INT, "requests": _NNINT})
    return {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": _STR, "title": _STR, "status": _INT, "detail": _STR, "code": _STR,
                "feature": _STR, "cost": _INT, "balance": _INT, "refresh_at": _TIME,
                "retry_after": _INT, "plan": _STR,
                "errors": {"type": "array", "items": _obj({"field": _STR, "message": _STR})},
            },
        },
        "Bucket": bucket,
        "FeatureInfo": _obj({"cost": _INT, "bucket": _STR, "allowed": {"type": "boolean"}}),
        "Balance": balance,
        "CheckRequest": _obj({
            "feature": {"enum": features},
            "quantity": _nullable(_QUANTITY),
        }, ["feature"], extra=True),
        "CheckResult": _obj({
            "allowed": {"type": "boolean"},
            "code": _nullable({"enum": ["feature_not_in_plan", "insufficient_tokens"]}),
            "feature": _STR, "bucket": _STR, "cost": _INT, "balance": _NNINT,
            "refresh_at": _TIME,
        }),
        "DeductRequest": _obj({
            "feature": {"enum": features},
            "quantity": _nullable(_QUANTITY),
            "idempotency_key": _nullable(_KEY),
            "user_id": _nullable(_ID),
        }, ["feature"], extra=True),
        "DeductResult": _obj({
            "charged": _NNINT, "replayed": {"type": "boolean"}, "remaining": _NNINT,
            "feature": _STR, "bucket": _STR, "request_id": _nullable(_STR),
        }),
        "UsageByFeature": usage("feature", _STR),
        "UsageByUser": usage("user_id", _nullable(_STR)),
        "UsageByDay": usage("day", _DATE),
        "Forecast": forecast,
        "Stats": _obj({
            "org": _STR, "days": _INT, "from": _DATE, "to": _DATE, "period": _STR,
            "refresh_at": _TIME,
            "by_feature": {"type": "array", "items": _ref("UsageByFeature")},
            "by_user": {"type": "array", "items": _ref("UsageByUser")},
            "by_day": {"type": "array", "items": _ref("UsageByDay")},
            "forecast": {"type": "object", "additionalProperties": _ref("Forecast")},
        }),
        "LogRow": log_row,
        "UsagePage": _obj({
            "items": {"type": "array", "items": _ref("LogRow")},
            "next_cursor": _nullable(_STR),
        }),
        "PlanRequest": _obj({"plan": {"enum": sorted(config.plans)}}, extra=True),
        "PlanResult": _obj({
            "org": _STR, "plan": _STR, "previous_plan": _nullable(_STR),
            "created": {"type": "boolean"},
        }),
        "OrgDetail": _obj({
            **balance["properties"], "created_at": _nullable(_TIME),
            "keys": {"type": "array", "items": _STR},
        }),
        "OrgUsage": org_usage,
        "OrgList": _obj({
            "sort": {"enum": ["spend", "id"]}, "from": _DATE, "to": _DATE,
            "items": {"type": "array", "items": _ref("OrgUsage")},
        }),
        "GrantRequest": _obj({
            "bucket": {"enum": list(config.buckets)},
            "amount": {"type": "integer", "minimum": 1, "maximum": 10**9},
            "reference": _KEY,
            "expires_at": _nullable(_TIME),
        }, ["bucket", "amount", "reference"], extra=True),
        "Grant": _obj({
            "id": _nullable(_INT), "org": _STR, "bucket": _STR, "amount": _INT,
            "reference": _STR, "expires_at": _nullable(_TIME),
            "created_at": _nullable(_TIME), "created": {"type": "boolean"},
        }),
        "KeyRequest": _obj({
            "org": _ID, "user": _nullable(_ID),
            "name": _nullable({"type": "string", "minLength": 1, "maxLength": 200}),
        }, ["org"], extra=True),
        "Key": key,
        "KeyCreated": _obj({**key["properties"], "key": _STR}),
        "KeyList": _obj({"items": {"type": "array", "items": _ref("Key")}}),
        "WindowUsage": _obj({
            "from": _DATE, "to": _DATE,
            "totals": _obj({"requests": _NNINT, "tokens": _INT, "orgs": _NNINT}),
            "by_feature": {"type": "array", "items": _ref("UsageByFeature")},
            "by_day": {"type": "array", "items": _ref("UsageByDay")},
            "by_org": {"type": "array", "items": usage("org", _STR)},
            "by_user": {"type": "array", "items": _obj({
                "org": _STR, "user_id": _nullable(_STR), "requests": _NNINT, "tokens": _INT,
                "share": {"type": "number"},
            })},
        }),
    }


def _token_paths(config: Config) -> J:
    html = {"description": "The page", "content": {"text/html": {"schema": _STR}}}
    return {
        "/balance": {"get": {
            "tags": ["tokens"], "operationId": "getBalance",
            "summary": "Plan, period and every bucket's balance",
            "responses": _responses({"200": _json("The balance", _ref("Balance"))},
                                    "401", "429", "503"),
        }},
        "/check": {"post": {
            "tags": ["tokens"], "operationId": "check",
            "summary": "Would a call of this feature be allowed now, and why not",
            "requestBody": _body(_ref("CheckRequest")),
            "responses": _responses({"200": _json("The answer", _ref("CheckResult"))},
                                    "400", "401", "413", "422", "429", "503"),
        }},
        "/deduct": {"post": {
            "tags": ["tokens"], "operationId": "deduct",
            "summary": "Charge a feature without proxying (same refusals as the proxy)",
            "description": "An Idempotency-Key (header or body) charges at most once; a "
            "replay of a completed key answers 200 with charged 0 and replayed true. A "
            "credential bound to a user may only name that user (else 403 user_mismatch).",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": _KEY,
                            "description": "Same as the body's idempotency_key (422 if both"
                            " are given and differ)"}],
            "requestBody": _body(_ref("DeductRequest")),
            "responses": _responses({"200": _json("Charged (or replayed)", _ref("DeductResult"))},
                                    "400", "401", "402", "403", "409", "413", "422", "429", "503"),
        }},
        "/stats": {"get": {
            "tags": ["tokens"], "operationId": "getStats",
            "summary": "Usage by feature, user and day, and a forecast per bucket",
            "parameters": [_query("days", {"type": "integer", "minimum": 1, "maximum": 366},
                                  "Window in days, today included (default 30)")],
            "responses": _responses({"200": _json("The stats", _ref("Stats"))},
                                    "400", "401", "429", "501", "503"),
        }},
        "/usage": {"get": {
            "tags": ["tokens"], "operationId": "getUsage",
            "summary": "The org's audit rows, newest first, paginated",
            "parameters": [
                _query("cursor", {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
                       "next_cursor of the previous page, unchanged (400 if it is not one)"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500},
                       "Rows per page (default 50)"),
            ],
            "responses": _responses({"200": _json("A page", _ref("UsagePage"))},
                                    "400", "401", "429", "501", "503"),
        }},
        "/dashboard": {"get": {
            "tags": ["tokens"], "operationId": "dashboard", "security": [],
            "summary": "The org's dashboard page (asks for the API key itself)",
            "responses": {"200": html},
        }},
        "/openapi.json": {"get": {
            "tags": ["tokens"], "operationId": "openapi", "security": [],
            "summary": "This document",
            "responses": {"200": _json("The OpenAPI document", {"type": "object"})},
        }},
    }  # fmt: skip


def _admin_paths(config: Config) -> J:
    sec: list[J] = [{"adminToken": []}]
    org = _path("org", _ID)

    def op(summary: str, ok: J, *problems: str, **extra: Any) -> J:
        return {"tags": ["admin"], "security": sec, "summary": summary,
                "responses": _responses(ok, "401", "429", "503", *problems), **extra}  # fmt: skip

    return {
        "/admin/orgs": {"get": op(
            "Organizations: top spenders this period (sort=spend) or by id",
            {"200": _json("The orgs", _ref("OrgList"))}, "400", "501",
            operationId="listOrgs", parameters=[
                _query("sort", {"enum": ["spend", "id"]}, "spend (default) or id"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 50"),
                _query("after", _STR, "sort=id: the last org id of the previous page"),
            ])},
        "/admin/orgs/{org}": {
            "parameters": [org],
            "put": op("Create an org or change its plan (at once)", {
                "200": _json("Plan changed", _ref("PlanResult")),
                "201": _json("Org created", _ref("PlanResult")),
            }, "400", "413", "422", operationId="putOrg", requestBody=_body(_ref("PlanRequest"))),
            "get": op("An org's plan, balances and active key ids",
                      {"200": _json("The org", _ref("OrgDetail"))}, "404", "422",
                      operationId="getOrg"),
        },
        "/admin/orgs/{org}/grants": {"parameters": [org], "post": op(
            "Add purchased tokens (idempotent by reference)", {
                "200": _json("Already granted (same reference)", _ref("Grant")),
                "201": _json("Granted", _ref("Grant")),
            }, "400", "404", "409", "413", "422",
            operationId="grant", requestBody=_body(_ref("GrantRequest")))},
        "/admin/keys": {
            "post": op("Create an API key (shown once)",
                       {"201": _json("The key", _ref("KeyCreated"))}, "400", "404", "413",
                       "422", "501", operationId="createKey",
                       requestBody=_body(_ref("KeyRequest"))),
            "get": op("An org's API keys (revoked ones included)",
                      {"200": _json("The keys", _ref("KeyList"))}, "400", "501",
                      operationId="listKeys",
                      parameters=[{**_query("org", _ID, "The org"), "required": True}]),
        },
        "/admin/keys/{key_id}": {"parameters": [_path("key_id", _STR)], "delete": op(
            "Revoke an API key", {"204": {"description": "Revoked"}}, "404", "501",
            operationId="revokeKey")},
        "/admin/usage": {"get": op(
            "Usage by feature, day, org and user over a window (at most 366 days, else 400)",
            {"200": _json("The usage", _ref("WindowUsage"))}, "400", "501",
            operationId="windowUsage", parameters=[
                _query("from", _DATE, "First day (default: `to` - days + 1, or the period start)"),
                _query("to", _DATE, "Last day (default today)"),
                _query("days", {"type": "integer", "minimum": 1, "maximum": 366},
                       "Window length when `from` is absent"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "Top orgs and users (default 20)"),
            ])},
        "/admin/dashboard": {"get": {
            "tags": ["admin"], "security": [], "operationId": "adminDashboard",
            "summary": "The operator dashboard page (asks for the admin token itself)",
            "responses": {"200": {"description": "The page",
                                  "content": {"text/html": {"schema": _STR}}}},
        }},
    }  # fmt: skip


def openapi_document(config: Config) -> J:
    """The OpenAPI 3.1 document for this deployment's token API (and admin API)."""
    prefix = config.api_prefix.rstrip("/")
    paths = {prefix + p: item for p, item in _token_paths(config).items()}
    tags = [{"name": "tokens", "description": "The token API: an org's own balances and usage"}]
    if config.admin_token:
        paths.update(_admin_paths(config))
        tags.append({"name": "admin", "description": "Operators: plans, grants, keys, usage"})
    responses = {
        f"P{code}": {
            "description": text,
            "content": {_PROBLEM: {"schema": _ref("Problem")}},
            **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}}
               if code in ("429", "503") else {}),
        }
        for code, text in _PROBLEMS.items()
    }  # fmt: skip
    return {
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
            "schemas": _schemas(config),
            "responses": responses,
        },
    }
