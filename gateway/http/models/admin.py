"""Request and response bodies (and parameters) of the admin API (contract A4)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr

from gateway.http.models.fields import (
    BodyInt,
    ConfigName,
    Moment,
    OneOf,
    QueryDay,
    QueryInt,
    Storable,
    Text,
)
from gateway.http.models.token import (
    MAX_KEY_LENGTH,
    Answer,
    Count,
    DateTime,
    Day,
    Id,
    Key,
    OrgBalance,
    Request,
    UsageByDay,
    UsageByFeature,
    UsageByModel,
)

__all__ = [
    "ApiKey",
    "Grant",
    "GrantRequest",
    "KeyCreated",
    "KeyLevels",
    "KeyList",
    "KeyPatch",
    "KeyPath",
    "KeyRequest",
    "KeysQuery",
    "OrgDetail",
    "OrgList",
    "OrgPath",
    "OrgUsage",
    "OrgsQuery",
    "PlanRequest",
    "PlanResult",
    "TeamInfo",
    "TeamList",
    "TeamPath",
    "TeamPut",
    "TeamRequest",
    "UsageByOrg",
    "UsageTotals",
    "UserInfo",
    "UserPath",
    "UserRequest",
    "UserShare",
    "WindowQuery",
    "WindowUsage",
]

# Strict: a JSON true or 1.5 is refused, not read as the cap 1.
CapsPatch = dict[str, StrictInt | StrictStr | None]
"""Cap overrides by bucket: ``N`` tokens or ``"N%"`` of the allocation; ``null`` clears one."""

MAX_WINDOW_DAYS = 366
MAX_AMOUNT = 10**9


class OrgPath(BaseModel):
    """The ``{org}`` of a path."""

    org: Id


class KeyPath(BaseModel):
    """The ``{key_id}`` of a path (an unknown or unreadable id is 404)."""

    key_id: str


class PlanRequest(Request):
    """``PUT /admin/orgs/{org}``."""

    plan: Annotated[str, Text(MAX_KEY_LENGTH), ConfigName("plans")] | None = None
    period_anchor: date | None = Field(
        None,
        description="Start the org's periods on this date's day of each month (contract"
        " A12; needs period.anchor subscription or created): a new period starts today",
    )


class PlanResult(Answer):
    """The org's plan now and before (``created``: the org did not exist before), and its
    period anchor (``"<day>:<since>"``, contract A12; null: calendar periods)."""

    org: str
    plan: str
    previous_plan: str | None
    created: bool
    period_anchor: str | None = None


class OrgDetail(OrgBalance):
    """``GET /admin/orgs/{org}``: the org's balance, when it was created, its active keys."""

    created_at: DateTime | None
    keys: list[str]


class OrgUsage(Answer):
    """An org and its usage over the listing's window."""

    org: str
    plan: str | None
    tokens: int
    requests: Count
    from_: Day = Field(
        alias="from",
        description="The first day of the org's own current period (contract A12: its"
        " anchor, in the config's period time zone, as the UTC day of the rollups)",
    )


class OrgList(Answer):
    """``GET /admin/orgs``: each org's usage over its own current period, up to ``to``."""

    sort: Literal["spend", "id"]
    from_: Day = Field(
        alias="from",
        description="The first day of the calendar's current period: every org's without"
        " per-org periods; with them, each item's own ``from`` says where its window starts",
    )
    to: Day
    items: list[OrgUsage]


class OrgsQuery(BaseModel):
    """``GET /admin/orgs`` query parameters."""

    sort: Annotated[str, OneOf(("spend", "id"))] = Field(
        "spend", description="spend (default) or id"
    )
    limit: Annotated[int, QueryInt(1, 1000)] = Field(50, description="default 50")
    after: Annotated[str, Storable()] | None = Field(
        None, description="sort=id: the last org id of the previous page"
    )


class GrantRequest(Request):
    """``POST /admin/orgs/{org}/grants``."""

    bucket: Annotated[str, Text(MAX_KEY_LENGTH), ConfigName("buckets", sort=False)]
    amount: Annotated[int, BodyInt(1, MAX_AMOUNT)]
    reference: Key
    expires_at: Annotated[datetime, Moment(future=True)] | None = None


class Grant(Answer):
    """A grant (``created``: false when the reference was granted before)."""

    id: int | None
    org: str
    bucket: str
    amount: int
    reference: str
    expires_at: DateTime | None
    created_at: DateTime | None
    created: bool


class KeyRequest(Request):
    """``POST /admin/keys``: ``team`` and ``caps`` put the key in a team of its org and
    cap it (contract A10)."""

    org: Id
    user: Id | None = None
    name: Annotated[str, Text(200)] | None = None
    team: Id | None = None
    caps: CapsPatch | None = None


class _KeyRecord(Answer):
    """The members every answer about an API key starts with."""

    id: str
    org: str
    user: str | None
    name: str
    prefix: str
    created_at: DateTime
    revoked_at: DateTime | None


class ApiKey(_KeyRecord):
    """An API key's record (never the key itself), with its team and cap overrides
    (contract A10: added after the members answered before)."""

    team: str | None = None
    caps: dict[str, int | str] = {}


class KeyCreated(_KeyRecord):
    """A new key: the record and the key, shown this once; then its team and caps (added
    by contract A10 after every member answered before, so ``key`` keeps its place)."""

    key: str
    team: str | None = None
    caps: dict[str, int | str] = {}


class KeyList(Answer):
    """``GET /admin/keys``: an org's keys, revoked ones included."""

    items: list[ApiKey]


class KeysQuery(BaseModel):
    """``GET /admin/keys`` query parameters."""

    org: Id = Field(description="an org id")


class WindowQuery(BaseModel):
    """``GET /admin/usage`` query parameters (read in this order: the first bad one is
    the one reported)."""

    to: Annotated[date, QueryDay()] | None = Field(None, description="Last day (default today)")
    days: Annotated[int, QueryInt(1, MAX_WINDOW_DAYS)] | None = Field(
        None, description="Window length when `from` is absent"
    )
    from_: Annotated[date, QueryDay()] | None = Field(
        None,
        alias="from",
        description="First day (default: `to` - days + 1, or the period start)",
    )
    limit: Annotated[int, QueryInt(1, 1000)] = Field(
        20, description="Top orgs and users (default 20)"
    )


class UsageTotals(Answer):
    """Sums over the window."""

    requests: Count
    tokens: int
    orgs: Count


class UsageByOrg(Answer):
    """Requests and tokens of one org."""

    org: str
    requests: Count
    tokens: int


class UserShare(Answer):
    """A user's usage and its share of the org's tokens."""

    org: str
    user_id: str | None
    requests: Count
    tokens: int
    share: float


class WindowUsage(Answer):
    """``GET /admin/usage``: usage by feature, day, org, user and model over a window."""

    from_: Day = Field(alias="from")
    to: Day
    totals: UsageTotals
    by_feature: list[UsageByFeature]
    by_day: list[UsageByDay]
    by_org: list[UsageByOrg]
    by_user: list[UserShare]
    by_model: list[UsageByModel] = Field(
        description="The top models (as many as `limit`) of the requests whose cost came"
        " from the call"
    )
    overage: int = Field(description="Tokens charged over what the balances could cover")


# -- teams, users and keys' caps (contract A10) ---------------------------------------


class TeamPath(BaseModel):
    """The ``{org}`` and ``{team}`` of a path."""

    org: Id
    team: Id


class UserPath(BaseModel):
    """The ``{org}`` and ``{user}`` of a path."""

    org: Id
    user: Id


class TeamRequest(Request):
    """``PUT /admin/orgs/{org}/teams/{team}``: absent members stay as they are."""

    name: Annotated[str, Text(200)] | None = None
    caps: CapsPatch | None = None


class TeamInfo(Answer):
    """A team, its cap overrides and how many users and active keys it has."""

    org: str
    team: str
    name: str
    caps: dict[str, int | str]
    users: int
    keys: int


class TeamPut(TeamInfo):
    """A team after ``PUT``."""

    created: bool


class TeamList(Answer):
    """``GET /admin/orgs/{org}/teams``."""

    items: list[TeamInfo]


class UserRequest(Request):
    """``PUT /admin/orgs/{org}/users/{user}``: ``team: null`` takes the user out of its
    team; absent members stay as they are."""

    # null is kept (not read as absent, gateway.http.inputs): it clears the team.
    NULL_MEMBERS: ClassVar[frozenset[str]] = frozenset({"team"})

    team: Id | None = None
    caps: CapsPatch | None = None


class UserInfo(Answer):
    """A user's team and cap overrides."""

    org: str
    user: str
    team: str | None
    caps: dict[str, int | str]


class KeyPatch(Request):
    """``PATCH /admin/keys/{key_id}``: ``team: null`` takes the key out of its team."""

    # null is kept (not read as absent, gateway.http.inputs): it clears the team.
    NULL_MEMBERS: ClassVar[frozenset[str]] = frozenset({"team"})

    team: Id | None = None
    caps: CapsPatch | None = None


class KeyLevels(Answer):
    """An API key's org, user, team and cap overrides."""

    id: str
    org: str
    user: str | None
    team: str | None
    caps: dict[str, int | str]
