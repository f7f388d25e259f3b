"""The audit event format written by the Lua scripts to each shard's stream.

Every stream entry is one ledger row to be (``sync/``). The scripts write it with one
function, ``audit_event`` in ``lua/_prelude.lua``. Fields, all strings, in this order
(:data:`FIELDS`):

==========  =================================================================
``id``      event id, unique: the request id for request events (charge,
            refund, expired_hold); ``<kind>:<op id>:<bucket>`` otherwise
``k``       kind: charge | refund | expired_hold | grant | grant_expired |
            plan_change | reset | repair
``o``       organization id
``u``       user id ("" when none)
``f``       feature ("" when the event is not a request's)
``b``       bucket (token_type)
``t``       tokens_deducted: net tokens taken from the balance by this event,
            negative when tokens were added (grant, reset up, plan upgrade)
``bal``     plan tokens left in the bucket after the event ("" = unchanged)
``x``       purchased (extra) tokens left after the event ("" = unchanged)
``a``       the bucket's allocation this period ("" = unchanged)
``used``    net tokens used this period after the event ("" = unchanged)
``per``     the bucket's period id (e.g. ``2026-11``) after the event
``s``       the org's sequence number after the event ("" when it has no
            snapshot: an expired_hold swept without org state in Redis);
            snapshots only move forward in ``s``
``ts``      event time, milliseconds since the epoch
``rq``      request id ("" when none)
``st``      upstream status code ("" when none; "0" = connection error)
``lat``     upstream latency in milliseconds ("" when none)
``m``       HTTP method; ``r`` the route template that matched
``p``       the org's plan when the event happened
``ref``     grant reference / operation reference ("" when none)
==========  =================================================================

Request events whose charge was decided after the call (contract A8 usage and header costs,
A9 reservations) append the usage fields (:data:`USAGE_FIELDS`), all strings, "" when
none; every other event (fixed costs, grants, resets ...) and every event written before
them has the 21 fields above only (lua/_prelude.lua, ``audit_event``):

==========  =================================================================
``rs``      tokens held at admission (the reserve)
``ov``      overage: the part of the actual cost the balance could not cover
            (recorded, not owed: never taken, the balance stays at 0 and the next
            requests are admitted by the balance as usual); "" when none
``mdl``     the model named by the response ("" when unknown)
``ui``      uncached input tokens; ``uc`` cached input tokens; ``uo`` output
            tokens; ``ur`` reasoning tokens (gateway.usage.model.Usage; "" when
            no usage was read)
``cs``      cost source: usage | header | app | policy | reservation (an
            expired hold of a usage or header cost says policy)
``um``      "1" when the usage never came (``t`` then follows the feature's
            on_missing_usage policy, or for an ``expired_hold`` is the reserve:
            the call's gateway never settled it, or a reservation's app never
            reported), else ""
==========  =================================================================

``t`` stays the net tokens taken from the balance: the actual charge minus the overage.

A request event of a request with a team (contract A10: an API key's team, a JWT claim,
the middleware scope, or its user's team) ends with :data:`TEAM_FIELD` ``tm``, the team
id, after the 21 fields or after the usage fields; events without a team do not have it.

A request event whose hold drew from capped levels then ends with :data:`LEVELS_FIELD`
``lv`` (after ``tm``, which is ``""`` when the request had no team): the capped levels'
figures after the event, ``"<team counter> <user counter> <key counter> <team cap> <user
cap> <key cap>[ <key id>]"`` (hexadecimal; a cap ``-`` where a level is not capped, the key
id only when its level is capped; the counters are of the event's period), for the cap
alerts (contract A11).
It is not a ledger column and :func:`decode` ignores it; the sync job sets it aside
(sync/levels.py).

Invariant (per org and bucket): the plan balance plus extra at sequence ``s1`` equals the
same at ``s0`` minus the sum of ``t`` over events with ``s0 < s <= s1``, minus the tokens of
holds still open at ``s1`` (those are taken at admission and written at settle).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

KINDS = frozenset(
    {"charge", "refund", "expired_hold", "grant", "grant_expired", "plan_change", "reset", "repair"}
)
# Every entry's fields, in the order the Lua scripts write them (lua/_prelude.lua).
FIELDS = (
    "id", "k", "o", "u", "f", "b", "t", "bal", "x", "a", "used", "per", "s", "ts",
    "rq", "st", "lat", "m", "r", "p", "ref",
)  # fmt: skip
# The usage fields some request events append after FIELDS, in this order.
USAGE_FIELDS = ("rs", "ov", "mdl", "ui", "uc", "uo", "ur", "cs", "um")
# The request's team, last when present (contract A10).
TEAM_FIELD = "tm"
# The capped levels' figures, after tm, when the request drew from capped levels.
LEVELS_FIELD = "lv"
# What ``cs`` may say.
COST_SOURCES = frozenset({"usage", "header", "app", "policy", "reservation"})


def _int_or_none(value: str) -> int | None:
    return int(value) if value != "" else None


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded stream entry."""

    event_id: str
    kind: str
    org: str
    user: str | None
    feature: str | None
    bucket: str
    tokens: int
    balance_after: int | None
    extra_after: int | None
    allocated: int | None
    used: int | None
    period: str | None
    seq: int | None
    created_at: datetime
    request_id: str | None
    upstream_status: int | None
    latency_ms: int | None
    method: str | None
    route: str | None
    plan: str | None
    reference: str | None
    # The usage fields (None when the event has none, as fixed-cost events).
    reserved: int | None = None
    overage: int = 0
    model: str | None = None
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_source: str | None = None
    usage_missing: bool = False
    # The request's team (contract A10), None when it had none.
    team: str | None = None


def _s(fields: dict[bytes, bytes] | dict[str, str], name: str) -> str:
    raw = fields.get(name) if name in fields else fields.get(name.encode())  # type: ignore[call-overload]
    if raw is None:
        return ""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def decode(fields: dict[bytes, bytes] | dict[str, str]) -> Event:
    """Decode one stream entry's fields; raises ValueError on a malformed entry."""
    kind = _s(fields, "k")
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    event_id = _s(fields, "id")
    org = _s(fields, "o")
    if not event_id or not org:
        raise ValueError("event without id or org")
    return Event(
        event_id=event_id,
        kind=kind,
        org=org,
        user=_s(fields, "u") or None,
        feature=_s(fields, "f") or None,
        bucket=_s(fields, "b"),
        tokens=int(_s(fields, "t") or "0"),
        balance_after=_int_or_none(_s(fields, "bal")),
        extra_after=_int_or_none(_s(fields, "x")),
        allocated=_int_or_none(_s(fields, "a")),
        used=_int_or_none(_s(fields, "used")),
        period=_s(fields, "per") or None,
        seq=_int_or_none(_s(fields, "s")),
        created_at=datetime.fromtimestamp(int(_s(fields, "ts") or "0") / 1000, tz=UTC),
        request_id=_s(fields, "rq") or None,
        upstream_status=_int_or_none(_s(fields, "st")),
        latency_ms=_int_or_none(_s(fields, "lat")),
        method=_s(fields, "m") or None,
        route=_s(fields, "r") or None,
        plan=_s(fields, "p") or None,
        reference=_s(fields, "ref") or None,
        reserved=_int_or_none(_s(fields, "rs")),
        overage=int(_s(fields, "ov") or "0"),
        model=_s(fields, "mdl") or None,
        input_tokens=_int_or_none(_s(fields, "ui")),
        cached_input_tokens=_int_or_none(_s(fields, "uc")),
        output_tokens=_int_or_none(_s(fields, "uo")),
        reasoning_tokens=_int_or_none(_s(fields, "ur")),
        cost_source=_s(fields, "cs") or None,
        usage_missing=_s(fields, "um") == "1",
        team=_s(fields, "tm") or None,
    )
