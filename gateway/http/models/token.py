"""Request and response bodies (and query parameters) of the token API (contract A4)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.http.models.fields import (
    BodyInt,
    ConfigName,
    Documented,
    Ident,
    OneOf,
    QueryInt,
    Text,
)

__all__ = [
    "Balance",
    "Bucket",
    "CheckRequest",
    "CheckResult",
    "DeductHeaders",
    "DeductRequest",
    "DeductResult",
    "FeatureInfo",
    "Forecast",
    "LevelBucket",
    "LevelInfo",
    "LogRow",
    "OrgBalance",
    "Stats",
    "StatsQuery",
    "UsageByDay",
    "UsageByFeature",
    "UsageByGroup",
    "UsageByModel",
    "UsageByUser",
    "UsagePage",
    "UsageQuery",
]

MAX_QUANTITY = 1000
MAX_KEY_LENGTH = 255

# Response field types: the format the document names, and the bounds the values keep.
DateTime = Annotated[str, Documented({"type": "string", "format": "date-time"})]
Day = Annotated[str, Documented({"type": "string", "format": "date"})]
Count = Annotated[int, Field(ge=0)]
# Request field types.
Feature = Annotated[str, Text(MAX_KEY_LENGTH), ConfigName("features", strict=False)]
Quantity = Annotated[int, BodyInt(1, MAX_QUANTITY)]
Key = Annotated[str, Text(MAX_KEY_LENGTH)]
Id = Annotated[str, Ident()]


class Request(BaseModel):
    """A JSON request body: unknown members are ignored; ``null`` is the same as absent."""

    model_config = ConfigDict(extra="allow")


class Answer(BaseModel):
    """A JSON response body: exactly these members, in this order."""

    model_config = ConfigDict(extra="forbid")


class Bucket(Answer):
    """One bucket of an org this period."""

    allocated: Count
    balance: Count
    extra: Count
    used: int
    available: Count
    in_plan: bool
    overage: Count | None = Field(
        None,
        description="Tokens this period's calls cost beyond what the bucket could cover"
        " (contract A8; recorded, never owed), from the ledger, so as of the sync lag;"
        " null when there is no ledger or it did not answer",
    )


class FeatureInfo(Answer):
    """A feature's cost and bucket, and whether the org's plan includes it."""

    cost: int
    bucket: str
    allowed: bool


class LevelBucket(Answer):
    """A level's cap of one bucket this period (contract A10)."""

    cap: Count
    used: Count
    remaining: Count


class LevelInfo(Answer):
    """One of the caller's levels inside the org: its team, user or API key, and its
    caps per bucket (only the capped buckets; the org's balance still decides)."""

    level: Literal["team", "user", "key"]
    id: str
    buckets: dict[str, LevelBucket]


class OrgBalance(Answer):
    """An org's plan, period and every bucket's balance (``GET /balance`` without the
    caller's levels: what ``GET /admin/orgs/{org}`` starts with)."""

    org: str
    plan: str
    period: str
    period_start: DateTime
    period_end: DateTime
    refresh_at: DateTime
    buckets: dict[str, Bucket]
    features: dict[str, FeatureInfo]


class Balance(OrgBalance):
    """``GET /balance``: plan, period, every bucket's balance and the caller's levels
    (contract A10: added after every member answered before)."""

    levels: list[LevelInfo] = []


class CheckRequest(Request):
    """``POST /check``."""

    feature: Feature
    quantity: Quantity | None = 1


class CheckResult(Answer):
    """Would the call be allowed now, and why not."""

    allowed: bool
    code: Literal["feature_not_in_plan", "insufficient_tokens"] | None
    feature: str
    bucket: str
    cost: int
    balance: Count
    refresh_at: DateTime


class DeductRequest(Request):
    """``POST /deduct``."""

    feature: Feature
    quantity: Quantity | None = 1
    idempotency_key: Key | None = None
    user_id: Id | None = None


class DeductHeaders(BaseModel):
    """The headers ``POST /deduct`` reads."""

    idempotency_key: Key | None = Field(
        None,
        alias="Idempotency-Key",
        description="Same as the body's idempotency_key (422 if both are given and differ)",
    )


class DeductResult(Answer):
    """What a deduct charged (0 for a replayed Idempotency-Key)."""

    charged: Count
    replayed: bool
    remaining: Count
    feature: str
    bucket: str
    request_id: str | None


class UsageByFeature(Answer):
    """Requests and tokens of one feature."""

    feature: str
    requests: Count
    tokens: int


class UsageByUser(Answer):
    """Requests and tokens of one user (null: calls without a user)."""

    user_id: str | None
    requests: Count
    tokens: int


class UsageByGroup(Answer):
    """Requests and tokens of one team or user (``/stats?group=``; null: requests
    without one)."""

    id: str | None
    requests: Count
    tokens: int


class UsageByDay(Answer):
    """Requests and tokens of one day."""

    day: Day
    requests: Count
    tokens: int


class UsageByModel(Answer):
    """Requests, tokens and the provider's token counts of one model (null: requests whose
    cost came from the call but that named no model)."""

    model: str | None
    requests: Count
    tokens: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    overage: int
    usage_missing_requests: Count


class Forecast(Answer):
    """A bucket's recent burn rate and when it runs out at that rate."""

    available: Count
    burn_per_day: Annotated[float, Field(ge=0)]
    days_left: Annotated[float, Field(ge=0)] | None
    empty_on: Day | None
    empties_before_refresh: bool


class Stats(Answer):
    """``GET /stats``: usage by feature, user and day, a forecast per bucket, usage by
    model and the overage."""

    org: str
    days: int
    from_: Day = Field(alias="from")
    to: Day
    period: str
    refresh_at: DateTime
    by_feature: list[UsageByFeature]
    by_user: list[UsageByUser]
    by_day: list[UsageByDay]
    forecast: dict[str, Forecast]
    by_model: list[UsageByModel] = Field(
        description="Requests whose cost came from the call (usage, header, app), per model"
    )
    overage: int = Field(description="Tokens charged over what the balances could cover")
    group: Literal["team", "user"] | None = Field(
        None, description="The grouping asked for with ?group= (null: none)"
    )
    by_group: list[UsageByGroup] | None = Field(
        None,
        description="With ?group=team|user: requests and tokens per team or user over the"
        " window, most tokens first, from the audit rows (id null: requests without one)",
    )


class StatsQuery(BaseModel):
    """``GET /stats`` query parameters."""

    days: Annotated[int, QueryInt(1, 366)] = Field(
        30, description="Window in days, today included (default 30)"
    )
    group: Annotated[str, OneOf(("team", "user"))] | None = Field(
        None, description="team or user: add by_group, usage per team or per user"
    )


class LogRow(Answer):
    """One audit row of the ledger."""

    id: int
    event_id: str
    created_at: DateTime
    kind: Literal[
        "charge", "refund", "expired_hold", "grant", "grant_expired", "plan_change", "reset",
        "repair",
    ]  # fmt: skip
    feature: str | None
    bucket: str
    user_id: str | None
    tokens: int
    balance_after: int | None
    extra_after: int | None
    request_id: str | None
    method: str | None
    route: str | None
    upstream_status: int | None
    latency_ms: int | None
    plan: str | None
    reference: str | None
    # What the call cost (contract A8): null (overage 0, usage_missing false) on fixed-cost
    # rows, rows that are not a request's, and rows written before.
    model: str | None = Field(description="The model the upstream named")
    input_tokens: int | None = Field(description="Uncached input tokens the provider reported")
    cached_input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    reserved: int | None = Field(description="Tokens held at admission")
    charged: int | None = Field(
        description="The actual charge of a request's row: tokens + overage (null otherwise)"
    )
    overage: int = Field(
        description="Tokens the actual charge exceeded what the balance could cover"
    )
    cost_source: str | None = Field(
        description="Where the charge came from: usage, header, app, policy or reservation"
        " (null: the feature's fixed cost)"
    )
    usage_missing: bool = Field(
        description="The usage never came and the feature's on_missing_usage policy decided"
    )


class UsagePage(Answer):
    """``GET /usage``: a page of audit rows, newest first."""

    items: list[LogRow]
    next_cursor: str | None


class UsageQuery(BaseModel):
    """``GET /usage`` query parameters."""

    cursor: Annotated[str, Documented({"type": "string", "pattern": "^[A-Za-z0-9_-]+$"})] | None = (
        Field(
            None, description="next_cursor of the previous page, unchanged (400 if it is not one)"
        )
    )
    limit: Annotated[int, QueryInt(1, 500)] = Field(50, description="Rows per page (default 50)")
