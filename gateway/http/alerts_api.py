"""The alerts admin API (contract A11): per-org rules and the webhook deliveries.

``PUT /admin/orgs/{org}/alerts`` overrides the config's defaults for one org (404 for an
org the ledger does not know); ``GET`` the same shows the effective rules.
``GET /admin/webhooks/deliveries?org=`` lists deliveries with their attempts, newest
first; ``POST /admin/webhooks/deliveries/{id}/resend`` queues one again with the same
webhook-id. All need a database and an ``alerts`` section (else 501).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from gateway.alerts.deliveries import (
    UNSET,
    Unset,
    get_rules,
    list_deliveries,
    put_rules,
    resend,
)
from gateway.config.alerts import AlertsConfig, levels_errors, parse_thresholds
from gateway.core.timefmt import iso
from gateway.http.endpoint import Call, Doc, Operation, Reply
from gateway.http.errors import ApiError, invalid, unknown_org
from gateway.http.models.admin import OrgPath
from gateway.http.models.alerts import (
    AlertRules,
    AlertRulesRequest,
    Delivery,
    DeliveryList,
    DeliveryPath,
    DeliveryQuery,
    Resent,
)

__all__ = ["OPERATIONS"]


async def _setup(call: Call) -> tuple[asyncpg.Pool, AlertsConfig]:
    alerts = call.gate.config.alerts
    if alerts is None:
        raise ApiError(501, "alerts_not_configured", "Alerts not configured",
                       "the config has no alerts section")  # fmt: skip
    store = await call.gate.require_store()
    return store.pool, alerts


def _times(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {**data, **{k: iso(data[k]) for k in keys}}


async def put_alerts(call: Call) -> Reply:
    """``PUT /admin/orgs/{org}/alerts``."""
    pool, alerts = await _setup(call)
    org, body = call.parsed(OrgPath).org, call.parsed(AlertRulesRequest)
    errors: list[dict[str, str]] = []
    thresholds = UNSET
    if body.thresholds is not None:
        thresholds = parse_thresholds(  # type: ignore[assignment]
            body.thresholds,
            lambda i, msg: errors.append({"field": f"thresholds[{i}]", "message": msg}),
        )
    # Unlike the other members, an explicit null is given: the config's levels again.
    levels: list[str] | Unset | None = UNSET
    if "levels" in body.model_fields_set:
        levels = body.levels
        if body.levels is not None:
            problems = levels_errors(body.levels, "levels")
            errors.extend({"field": field, "message": msg} for field, msg in problems)
    url = body.webhook_url
    if url and not url.startswith(("http://", "https://")):
        errors.append({"field": "webhook_url", "message": "must be an http(s) URL"})
    if errors:
        raise invalid(errors)
    if await pool.fetchval("SELECT 1 FROM organizations WHERE id = $1", org) is None:
        raise unknown_org(org)
    await put_rules(
        pool, org, webhook_url=UNSET if url is None else url, thresholds=thresholds,
        forecast=UNSET if body.forecast is None else body.forecast, levels=levels,
    )  # fmt: skip
    return await _rules_reply(pool, org, alerts)


async def get_alerts(call: Call) -> Reply:
    """``GET /admin/orgs/{org}/alerts``."""
    pool, alerts = await _setup(call)
    org = call.parsed(OrgPath).org
    if await pool.fetchval("SELECT 1 FROM organizations WHERE id = $1", org) is None:
        raise unknown_org(org)
    return await _rules_reply(pool, org, alerts)


async def _rules_reply(pool: asyncpg.Pool, org: str, alerts: AlertsConfig) -> Reply:
    rules = await get_rules(pool, org, alerts)
    return Reply(AlertRules(**_times(rules, "endpoint_disabled_at", "endpoint_failing_since")))


async def deliveries(call: Call) -> Reply:
    """``GET /admin/webhooks/deliveries``."""
    pool, _ = await _setup(call)
    query = call.parsed(DeliveryQuery)
    items = await list_deliveries(pool, query.org, query.status, query.limit)
    return Reply(
        DeliveryList(
            items=[
                Delivery.model_validate(_times(i, "created_at", "next_attempt_at", "delivered_at"))
                for i in items
            ]
        )
    )


async def resend_delivery(call: Call) -> Reply:
    """``POST /admin/webhooks/deliveries/{delivery_id}/resend``."""
    pool, alerts = await _setup(call)
    delivery_id = call.parsed(DeliveryPath).delivery_id
    if not await resend(pool, delivery_id, alerts.webhook_url):
        raise ApiError(404, "unknown_delivery", "Unknown delivery", f"No delivery {delivery_id!r}")
    return Reply(Resent(id=delivery_id, status="pending"), status=202)


_COMMON = (401, 429, 501, 503)

OPERATIONS: list[Operation] = [
    Operation(
        "PUT", "/admin/orgs/{org}/alerts", put_alerts, "putOrgAlerts",
        "Override an org's alert rules (webhook_url, thresholds, levels, forecast)",
        {200: Doc("The effective rules", AlertRules)}, (*_COMMON, 400, 404, 413, 422),
        security="admin", tag="admin", path_params=OrgPath, body=AlertRulesRequest,
    ),
    Operation(
        "GET", "/admin/orgs/{org}/alerts", get_alerts, "getOrgAlerts",
        "An org's effective alert rules and its endpoint's state",
        {200: Doc("The effective rules", AlertRules)}, (*_COMMON, 404, 422),
        security="admin", tag="admin", path_params=OrgPath,
    ),
    Operation(
        "GET", "/admin/webhooks/deliveries", deliveries, "listDeliveries",
        "Alert webhook deliveries with their attempts, newest first",
        {200: Doc("The deliveries", DeliveryList)}, (*_COMMON, 400),
        security="admin", tag="admin", query=DeliveryQuery,
    ),
    Operation(
        "POST", "/admin/webhooks/deliveries/{delivery_id}/resend", resend_delivery,
        "resendDelivery", "Queue a delivery again (same webhook-id, a fresh retry window)",
        {202: Doc("Queued", Resent)}, (*_COMMON, 404),
        security="admin", tag="admin", path_params=DeliveryPath,
    ),
]  # fmt: skip
