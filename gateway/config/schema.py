"""The creditgate configuration schema: pydantic models with unknown keys rejected.

Loading happens in three steps, in the manner of envoy's ratelimit config:
1. YAML is parsed and every string value gets ``${VAR}`` / ``${VAR:-default}`` expansion;
2. the structure is validated by pydantic with unknown keys rejected everywhere;
3. meaning is checked (features, plans and buckets referenced anywhere exist, rate strings
   parse, routes are unique and their templates compile), collecting every error.

Every error names the file and the key path (``routes[3].feature``). ``ConfigError``
carries all of them; ``creditgate check-config`` prints them and exits 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    field_validator,
    model_validator,
)

from gateway.config.alerts import AlertsConfig
from gateway.config.costs import CostSpec, VariableCostConfig, build_prices, parse_cost
from gateway.config.refunds import DEFAULT_REFUND_ON
from gateway.config.source import ConfigError
from gateway.core.anchors import Calendar
from gateway.core.caps import cap_tokens, parse_cap
from gateway.usage.prices import PriceTable

__all__ = ["Config", "ConfigError", "parse_rate"]

_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(second|minute|hour|day)s?\s*", re.IGNORECASE)
_UNIT_MS = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


def parse_rate(text: str) -> tuple[int, int]:
    """Parse ``N/unit`` or ``N/Munits`` (unit: second, minute, hour, day) into (N, period ms)."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"malformed rate {text!r} (expected N/second, N/minute, N/hour or N/day,"
            " optionally with a multiplier: 100/5minutes)"
        )
    count, multiplier, unit = int(match.group(1)), match.group(2), match.group(3).lower()
    if count <= 0:
        raise ValueError(f"malformed rate {text!r}: the count must be positive")
    if multiplier and int(multiplier) <= 0:
        raise ValueError(f"malformed rate {text!r}: the multiplier must be positive")
    return count, int(multiplier or 1) * _UNIT_MS[unit]


def _no_bool(value: Any) -> Any:
    # YAML's `true` would otherwise pass as the integer 1.
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]


class _Strict(BaseModel):
    """Base for every config section: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PeriodConfig(_Strict):
    """``period: {every, anchor, timezone}`` (contract A12); meaning checked in checks.py."""

    every: Literal["month", "week", "day"] = "month"
    anchor: Literal["calendar", "subscription", "created"] = "calendar"
    timezone: str = "UTC"


_PERIOD_NAMES = {"monthly": "month", "weekly": "week", "daily": "day"}


def _period_name(value: Any) -> Any:
    # `period: monthly` (contract A2) is {every: month}: calendar periods in UTC.
    if isinstance(value, str):
        if value not in _PERIOD_NAMES:
            raise ValueError(
                f"must be monthly, weekly, daily or {{every, anchor, timezone}}, got {value!r}"
            )
        return {"every": _PERIOD_NAMES[value]}
    return value


class JwtConfig(_Strict):
    """Verify bearer JWTs (e.g. Supabase access tokens) locally."""

    secret: str | None = None
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    org_claim: str = "org_id"
    user_claim: str = "sub"
    # The claim naming the request's team (contract A10); None: JWTs name no team.
    team_claim: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: Int = 0


class IdentityConfig(_Strict):
    """How a request names its organization and user."""

    api_keys: bool = True
    jwt: JwtConfig | None = None
    trusted_headers: bool = False
    # Bad credentials from one client address beyond this many per minute get 429.
    bad_credentials_per_minute: Int = 30
    # Seconds a resolved API key is trusted in process before it is looked up again;
    # this bounds how long a revoked key keeps working.
    key_cache_seconds: float = 5.0
    # Peers (CIDRs or addresses) whose forwarding header names the client address that
    # the bad-credential limiter counts (gateway.identity.client_address). Empty: the
    # TCP peer counts and forwarding headers are ignored, since anyone can write them.
    trusted_proxies: list[str] = Field(default_factory=list)
    # The one header those proxies write. Only one is read: a proxy that appends to
    # X-Forwarded-For passes a client's own `Forwarded` through untouched, and the reverse.
    forwarded_header: Literal["X-Forwarded-For", "Forwarded"] = "X-Forwarded-For"

    @field_validator("forwarded_header", mode="before")
    @classmethod
    def _header_case(cls, value: Any) -> Any:
        # Header names are case-insensitive: accept x-forwarded-for as well.
        canonical = {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}
        return canonical.get(value.lower(), value) if isinstance(value, str) else value


class ServerConfig(_Strict):
    """Connection limits of ``creditgate serve`` and ``creditgate demo`` (per connection)."""

    # The request line and headers together, in bytes; over it the client gets 431.
    max_request_header_bytes: Int = 65536
    # Header fields per request; over it the client gets 431.
    max_request_headers: Int = 100
    # From the connection's first byte of a request (or its opening) to the end of the
    # request's headers; a client that stops halfway is disconnected.
    header_read_timeout_seconds: float = 10.0
    # How long an idle connection waits for the next request after a response.
    keep_alive_timeout_seconds: float = 5.0


class FeatureConfig(_Strict):
    """A metered feature: its cost per call and the bucket it draws from.

    ``cost`` in the file is an integer (fixed) or a mapping (contract A8: by usage or from a
    header; :mod:`gateway.config.costs`). The attribute ``cost`` is always an integer: the
    fixed cost, or for a variable cost what code that knows only fixed costs must hold (its
    numeric reserve, else its ``max``); the mapping itself is :attr:`variable`.
    """

    cost: Annotated[int, BeforeValidator(parse_cost)]
    bucket: str | None = None  # defaults to the feature's own name
    # Response statuses that refund the call: codes (429) or classes ("4xx"); see
    # gateway/config/refunds.py. Any other status is charged.
    refund_on: list[Int | str] = Field(default_factory=lambda: list(DEFAULT_REFUND_ON))
    # The `cost:` mapping of a variable cost; None for a fixed one. Private so the file
    # keeps one key, `cost` (whose attribute stays an int for every existing reader).
    _variable: VariableCostConfig | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_variable_cost(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        feature = handler(data)  # parse_cost validated a mapping and kept its hold in `cost`
        raw = data.get("cost") if isinstance(data, Mapping) else None
        if isinstance(raw, Mapping):
            feature._variable = VariableCostConfig.model_validate(dict(raw))
        return feature

    @property
    def variable(self) -> VariableCostConfig | None:
        """The ``cost:`` mapping of a usage or header cost; ``None`` for a fixed cost."""
        return self._variable

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (see pydantic); a new integer ``cost`` makes the copy a fixed cost."""
        copied = super().model_copy(update=update, deep=deep)
        if update and "cost" in update:
            copied._variable = None
        return copied


class RateLimitConfig(_Strict):
    """One rate limiter of a plan: ``limit`` is ``N/second|minute|hour|day``."""

    per: Literal["org", "user"]
    limit: str


Cap = Annotated[int | str, BeforeValidator(_no_bool)]


class CapsConfig(_Strict):
    """A plan's default caps (contract A10): what each team, user and API key of an org
    may draw per bucket per period, ``N`` tokens or ``"N%"`` of the bucket's allocation;
    absent: no cap at that level. Admin overrides replace them per team, user or key."""

    team: Cap | None = None
    user: Cap | None = None
    key: Cap | None = None


class PlanConfig(_Strict):
    """A plan: tokens per bucket per period, its rate limits and default caps."""

    allocations: dict[str, Int] = Field(default_factory=dict)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    caps: CapsConfig = Field(default_factory=CapsConfig)


class TopUpConfig(_Strict):
    """A Stripe checkout price that buys tokens."""

    bucket: str
    amount: Int
    expires_in_days: Int | None = None


class StripeConfig(_Strict):
    """Stripe webhook verification and price-id mappings."""

    webhook_secret: str
    plans: dict[str, str] = Field(default_factory=dict)
    topups: dict[str, TopUpConfig] = Field(default_factory=dict)
    tolerance_seconds: Int = 300


class BillingConfig(_Strict):
    """Billing integrations (optional)."""

    stripe: StripeConfig | None = None


class RouteConfig(_Strict):
    """A metered route: first match wins; ``cost`` overrides the feature's cost."""

    method: str
    path: str
    feature: str
    cost: Int | None = None

    @field_validator("method")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.strip().upper()


@dataclass(frozen=True, slots=True)
class ParsedRateLimit:
    """A plan's rate limiter: ``count`` requests per ``period_ms``, per org or per user.

    ``id`` (e.g. ``u:60/60000``) names the limiter's state (a per-user key; per-org state is
    the org hash's field ``rl:o:<count>/<period>``, see lua/charge.lua); it depends only on
    the limit, so two plans with the same limit share a limiter and a plan change keeps it.
    """

    per: Literal["org", "user"]
    count: int
    period_ms: int
    id: str


class Config(_Strict):
    """The whole creditgate.yaml."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str | None = "postgresql://postgres@127.0.0.1:5432/creditgate"
    upstream: str | None = None
    admin_token: str | None = None
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    features: dict[str, FeatureConfig] = Field(default_factory=dict)
    plans: dict[str, PlanConfig] = Field(default_factory=dict)
    default_plan: str = "starter"
    # contract A12: a name (calendar periods in UTC) or {every, anchor, timezone}; read as
    # `calendar` (gateway/core/anchors.py).
    period: Annotated[PeriodConfig, BeforeValidator(_period_name)] = Field(
        default_factory=PeriodConfig
    )
    billing: BillingConfig = Field(default_factory=BillingConfig)
    # contract A11: alert rules' defaults and webhook delivery (gateway/config/alerts.py).
    alerts: AlertsConfig | None = None
    routes: list[RouteConfig] = Field(default_factory=list)
    # contract A8: model glob -> {input, cached_input?, output}, creditgate tokens per 1,000
    # model tokens, plus `default`; first matching glob wins, so the file's order is kept.
    # Checked by gateway.config.costs.price_table_errors; read as `prices`.
    models: dict[str, Any] | None = None

    # Operational settings (extensions of contract A2; all optional).
    fail_open: bool = False
    key_prefix: str = "cg"
    shards: Int = 16
    api_prefix: str = "/api/v1/tokens"
    idempotency_ttl_seconds: Int = 86400
    # The largest response body kept for an Idempotency-Key replay (contract A9); a larger or
    # streamed response is answered 409 on repeat, never forwarded or charged again.
    idempotency_max_body_bytes: Int = 65536
    # How long a hold may stay open before the sync job's sweep turns it into a charge
    # marked unknown. Must exceed the longest upstream response (SSE streams included).
    hold_ttl_seconds: Int = 900
    # Durable settles across a Redis failover (off by default): each settle batch is followed
    # by WAIT for this many replicas (on connections of its own, so hot-path charges never
    # queue behind it) and is sent again until they acknowledge it, for up to 30 s.
    settle_wait_replicas: Int = 0
    settle_wait_timeout_ms: Int = 100
    upstream_timeout_seconds: float = 60.0
    upstream_connect_timeout_seconds: float = 5.0
    # contract A8 usage costs: when the client leaves mid-response, how long creditgate keeps
    # reading the upstream for the usage at the stream's end before it applies the
    # feature's on_missing_usage policy (0: not at all).
    usage_drain_seconds: float = 15.0
    # The proxy's HTTP client: lean (gateway/proxy/lean_client.py, least CPU), aiohttp, or
    # httpx (needs the httpx package, a test dependency).
    upstream_client: Literal["lean", "aiohttp", "httpx"] = "lean"
    # Upstream connections per serve process: each stream (SSE) holds one for its whole
    # length, so this is how many calls can be in flight at once. 10,000 streams need
    # about 20,000 file descriptors with their client sockets: serve raises the soft
    # RLIMIT_NOFILE toward the hard limit and warns when it cannot hold them
    # (gateway/commands/open_files.py).
    upstream_max_connections: Int = 10_000
    # How long a request beyond upstream_max_connections waits for one to free before it
    # gets 503 with Retry-After (and its tokens back); 0 answers at once.
    upstream_pool_wait_seconds: float = 5.0
    redis_timeout_seconds: float = 2.0
    retry_after_unavailable_seconds: Int = 5
    # Match route templates ignoring case, for upstreams that route that way (Express's
    # default): otherwise /API/v1/leads/generate would reach such an upstream unmetered.
    routes_ignore_case: bool = False
    # Forward a request's trailing slash (matching ignores it either way), for upstreams
    # whose routes end in "/" (Django's APPEND_SLASH would otherwise redirect in a loop).
    # Off by default: a Starlette upstream answers "/x/" with a redirect to "/x", and a
    # client following it would be charged twice.
    forward_trailing_slash: bool = False
    # Forward the caller's creditgate API key (Authorization: Bearer cg_..., X-API-Key:
    # cg_...) to the app; off, it authenticates to creditgate only (gateway/core/headers.py).
    forward_credentials: bool = False
    # One JSON line per metered request on the creditgate.access logger (also turned on by
    # CREDITGATE_ACCESS_LOG=1).
    access_log: bool = False
    server: ServerConfig = Field(default_factory=ServerConfig)

    @field_validator("database_url")
    @classmethod
    def _no_database(cls, value: str | None) -> str | None:
        # `${CREDITGATE_DATABASE_URL}` left unset means "run without Postgres".
        return value or None

    # Derived lookups, computed once on first use (the model is frozen). cached_property
    # keeps them in the instance __dict__, which model_copy() copies: drop them there, or
    # a copy with updated features or plans would answer from the original's lookups.
    _DERIVED: ClassVar[tuple[str, ...]] = (
        "_bucket_map", "buckets", "_rate_limits", "prices", "_cost_specs", "calendar",
        "variable_features",
    )  # fmt: skip

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (see pydantic); derived lookups are recomputed for it on first use."""
        copied = super().model_copy(update=update, deep=deep)
        for name in self._DERIVED:
            copied.__dict__.pop(name, None)
        return copied

    @cached_property
    def calendar(self) -> Calendar:
        """The period calendar (contract A12): ``period`` as a :class:`Calendar`."""
        p = self.period
        return Calendar(p.every, p.anchor, p.timezone)

    @cached_property
    def _bucket_map(self) -> dict[str, str]:
        return {name: f.bucket or name for name, f in self.features.items()}

    @cached_property
    def buckets(self) -> tuple[str, ...]:
        """Every bucket some feature draws from, sorted."""
        return tuple(sorted(set(self._bucket_map.values())))

    @cached_property
    def _rate_limits(self) -> dict[str, tuple[ParsedRateLimit, ...]]:
        result = {}
        for name, plan in self.plans.items():
            parsed = []
            for rl in plan.rate_limits:
                count, period_ms = parse_rate(rl.limit)
                rid = f"{rl.per[0]}:{count}/{period_ms}"
                parsed.append(ParsedRateLimit(rl.per, count, period_ms, rid))
            result[name] = tuple(parsed)
        return result

    def bucket_of(self, feature: str) -> str:
        """The bucket ``feature`` draws from; ``KeyError`` for an unknown feature."""
        return self._bucket_map[feature]

    @cached_property
    def prices(self) -> PriceTable | None:
        """The ``models:`` price table (contract A8); ``None`` without one. A checked config
        has one whenever a feature's cost is by usage."""
        return None if self.models is None else build_prices(self.models)

    @cached_property
    def _cost_specs(self) -> dict[str, CostSpec]:
        return {name: CostSpec.of(f.cost, f.variable) for name, f in self.features.items()}

    def cost_of(self, feature: str) -> int:
        """The feature's cost per call; ``KeyError`` for an unknown feature.

        For a variable cost (usage or header, :meth:`cost_spec`) this is what to hold when
        nothing more is known: its reserve when a number, else its ``max``. So code that
        knows only fixed costs (the router's ``RouteMatch.cost``) holds a safe amount; the
        actual charge is decided after the response.
        """
        return self.features[feature].cost

    def cost_spec(self, feature: str) -> CostSpec:
        """How ``feature`` is charged (fixed, by usage or from a header; built once per
        feature); ``KeyError`` for an unknown feature."""
        return self._cost_specs[feature]

    def is_variable(self, feature: str) -> bool:
        """Whether ``feature``'s charge is decided after the response (usage or header);
        ``KeyError`` for an unknown feature."""
        return self.features[feature].variable is not None

    @cached_property
    def variable_features(self) -> tuple[str, ...]:
        """The features whose charge is decided after the response (usage or header costs),
        sorted: the ones whose expired holds the sync job's sweep records with their usage
        missing (lua/sweep_holds.lua)."""
        return tuple(sorted(n for n, f in self.features.items() if f.variable is not None))

    def reserve_for(self, feature: str, body: bytes, *, model: str | None = None) -> int:
        """The tokens to hold before a call of ``feature`` with request ``body``: the cost,
        the numeric reserve, or for ``reserve: auto`` the estimate from the body (see
        :meth:`CostSpec.reserve_for`); ``KeyError`` for an unknown feature."""
        return self._cost_specs[feature].reserve_for(body, self.prices, model=model)

    def rate_limits_of(self, plan: str) -> tuple[ParsedRateLimit, ...]:
        """The plan's rate limiters (empty for a plan without limits or an unknown plan)."""
        return self._rate_limits.get(plan, ())

    def allocation(self, plan: str, bucket: str) -> int | None:
        """Tokens per period of ``bucket`` in ``plan``; None when not in the plan (or no plan)."""
        p = self.plans.get(plan)
        return None if p is None else p.allocations.get(bucket)

    def default_caps(self, plan: str, bucket: str) -> tuple[int, int, int] | None:
        """``plan``'s default caps of ``bucket`` in tokens (team, user, key; -1 = none),
        or None when the plan has no default caps or no such bucket."""
        p = self.plans.get(plan)
        alloc = None if p is None else p.allocations.get(bucket)
        if p is None or alloc is None:
            return None
        given = (p.caps.team, p.caps.user, p.caps.key)
        if all(c is None for c in given):
            return None
        t, u, k = (-1 if c is None else cap_tokens(parse_cap(c), alloc) for c in given)
        return t, u, k

    def plan_allocations(self, bucket: str) -> dict[str, int]:
        """``{plan: allocation}`` for every plan that includes ``bucket``."""
        return {
            name: p.allocations[bucket] for name, p in self.plans.items() if bucket in p.allocations
        }
