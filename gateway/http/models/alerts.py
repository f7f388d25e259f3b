"""Request and response bodies of the alerts admin API (contract A11)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, Field, WithJsonSchema

from gateway.config.alerts import ALERT_LEVELS
from gateway.http.models.fields import OneOf, QueryInt, Storable
from gateway.http.models.token import Answer, DateTime, Id, Request

__all__ = [
    "AlertRules",
    "AlertRulesRequest",
    "Attempt",
    "Delivery",
    "DeliveryList",
    "DeliveryPath",
    "DeliveryQuery",
    "Resent",
]


_Level = Annotated[Any, WithJsonSchema({"type": "string", "enum": list(ALERT_LEVELS)})]


class AlertRulesRequest(Request):
    """``PUT /admin/orgs/{org}/alerts``: each given member overrides the config's default;
    ``webhook_url: ""`` goes back to the default URL, ``levels: null`` to the default
    levels (the one member where ``null`` is not the same as absent)."""

    NULL_MEMBERS: ClassVar[frozenset[str]] = frozenset({"levels"})

    webhook_url: Annotated[str, Field(max_length=2000)] | None = None
    thresholds: list[Any] | None = Field(
        None, description='percent used (80, "87.5%") or {"tokens": N}; [] for none'
    )
    # Items are checked by the handler (levels_errors), which names each refused one
    # (levels[1]); the document still shows what is accepted.
    levels: list[_Level] | None = Field(
        None,
        description="what threshold alerts watch, distinct values of org (the buckets), team,"
        " user, key (their caps), at least one; null: the config's default (alerts.levels);"
        " absent: unchanged",
    )
    forecast: bool | None = None


class AlertRules(Answer):
    """An org's effective alert rules, which of them are its own, and its endpoint."""

    org: str
    webhook_url: str | None
    thresholds: list[Any]
    levels: list[str]
    forecast: bool
    overrides: list[str]
    endpoint_disabled_at: DateTime | None
    endpoint_failing_since: DateTime | None


class DeliveryQuery(BaseModel):
    """``GET /admin/webhooks/deliveries`` query parameters."""

    org: Id | None = Field(None, description="one org's deliveries (default: every org's)")
    status: Annotated[str, OneOf(("pending", "delivered", "failed"))] | None = None
    limit: Annotated[int, QueryInt(1, 1000)] = Field(100, description="default 100")


class DeliveryPath(BaseModel):
    """The ``{delivery_id}`` of a path (the webhook-id)."""

    delivery_id: Annotated[str, Storable()]


class Attempt(Answer):
    """One attempt to deliver."""

    at: DateTime
    url: str
    outcome: str
    response_code: int | None
    error: str | None
    duration_ms: int | None


class Delivery(Answer):
    """An alert event (its id is the webhook-id) and its delivery so far."""

    id: str
    org: str
    level: str
    bucket: str
    period: str
    type: str
    threshold: str | None
    status: str
    created_at: DateTime
    next_attempt_at: DateTime | None
    delivered_at: DateTime | None
    last_error: str | None
    payload: dict[str, Any]
    attempts: list[Attempt]


class DeliveryList(Answer):
    """Newest first."""

    items: list[Delivery]


class Resent(Answer):
    """A delivery queued again."""

    id: str
    status: str
