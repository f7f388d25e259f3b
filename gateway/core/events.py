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

Two encodings of the same fields exist (issue 10: a leaner entry). **v1**, the fields as
Redis field/value pairs in the order above (42+ strings per entry). **v2**, written by
the scripts since: one pair, :data:`PACKED_FIELD` ``v2`` and the values alone, in the same
order, joined by a tab (:data:`SEPARATOR`); the number of values says which fields there
are (:data:`PACKED_SHAPES`: the 21, then the usage fields, ``tm``, ``lv`` as above). A tab
cannot occur in a v2 value: an event with one in any value (ids, refs, models and teams
come from clients and configs) is written as v1 instead, so splitting on tabs is exact
and nothing is escaped. Readers take both: :func:`unpacked` turns a v2 entry into its v1
fields, and :func:`decode` does that first. :func:`packed` is the scripts' choice in
Python (benches, tests).

Invariant (per org and bucket): the plan balance plus extra at sequence ``s1`` equals the
same at ``s0`` minus the sum of ``t`` over events with ``s0 < s <= s1``, minus the tokens of
holds still open at ``s1`` (those are taken at admission and written at settle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
# The one field of a v2 entry, and the separator of its values (see the module docstring).
PACKED_FIELD = "v2"
SEPARATOR = "\t"
# A v2 entry's field names by its number of values (lua/_prelude.lua audit_event writes
# these six shapes; ``lv`` always follows a ``tm``, "" when the request had no team).
PACKED_SHAPES: dict[int, tuple[str, ...]] = {
    len(names): names
    for names in (
        FIELDS,
        (*FIELDS, TEAM_FIELD),
        (*FIELDS, TEAM_FIELD, LEVELS_FIELD),
        FIELDS + USAGE_FIELDS,
        (*FIELDS, *USAGE_FIELDS, TEAM_FIELD),
        (*FIELDS, *USAGE_FIELDS, TEAM_FIELD, LEVELS_FIELD),
    )
}
_PACKED_BYTES = PACKED_FIELD.encode()
_PACKED_SHAPES_BYTES = {n: tuple(x.encode() for x in names) for n, names in PACKED_SHAPES.items()}
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


def packed(fields: Mapping[str, str]) -> dict[str, str]:
    """The entry the scripts write for ``fields`` (v1 names and values, in a shape of
    :data:`PACKED_SHAPES`): v2, or ``fields`` as they are (v1) when a value holds a tab or
    the names are not one of the shapes."""
    names = tuple(fields)
    values = list(fields.values())
    if PACKED_SHAPES.get(len(names)) != names or any(SEPARATOR in v for v in values):
        return dict(fields)
    return {PACKED_FIELD: SEPARATOR.join(values)}


def unpacked(fields: Any) -> Any:
    """A v2 entry's fields as the v1 entry of the same event (a flat ``[name, value, ...]``
    list for a list, a dict for a mapping; bytes stay bytes); any other entry as it is.
    Raises ValueError for a v2 entry whose number of values is not a shape's."""
    if type(fields) is list or isinstance(fields, (list, tuple)):
        if len(fields) != 2 or fields[0] not in (PACKED_FIELD, _PACKED_BYTES):
            return fields
        names, values = _split(fields[1])
        return [x for pair in zip(names, values, strict=True) for x in pair]
    if isinstance(fields, Mapping) and len(fields) == 1:
        for key in (PACKED_FIELD, _PACKED_BYTES):
            if key in fields:
                names, values = _split(fields[key])
                return dict(zip(names, values, strict=True))
    return fields


def _split(raw: Any) -> tuple[tuple[Any, ...], list[Any]]:
    # Bytes (a client without decode_responses) give bytes names, as its v1 entries have.
    is_bytes = isinstance(raw, bytes)
    values: list[Any] = raw.split(b"\t" if is_bytes else SEPARATOR)
    names = (_PACKED_SHAPES_BYTES if is_bytes else PACKED_SHAPES).get(len(values))
    if names is None:
        raise ValueError(f"v2 entry with {len(values)} values")
    return names, values


def decode(fields: dict[bytes, bytes] | dict[str, str]) -> Event:
    """Decode one stream entry's fields (v1 or v2); raises ValueError on a malformed entry."""
    fields = unpacked(fields)
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
