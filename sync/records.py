"""Stream entry -> ledger row: the sync job's decoder and its ``COPY`` text lines.

An entry's fields (gateway/core/events.py) become a ``Flat``: the list of its values alone,
in ``FIELDS`` order (a v2 entry's value split on its tabs is one as it is; a v1 entry's
``[name, value, ...]`` list gives its values, ``fields[1::2]``, once the names are checked),
validated the way ``gateway.core.events.decode`` validates them (an entry ``decode`` rejects
is rejected here, with the same exception). Values are read at fixed positions (``ORG`` ...
below). From it, ``copy_line`` renders the entry's row of ``ai_token_usage_log`` in
Postgres' text ``COPY`` format, and sync/aggregate.py derives the rollups and snapshots.
Keeping the list ``str.split`` returned, rather than building a dict, a tuple or a list of
names and values per entry, saves both the copying and the garbage collector's work.

Why text ``COPY`` built from the strings Redis returned: the Lua scripts write every field
in one order with canonical decimal integers, so for almost every entry a row is one
``"\\t".join`` of strings already in hand. No ``int()`` per column, no ``datetime`` per
event (a timestamp is rendered once per distinct millisecond), and no per-value binary
encoding in asyncpg: at 100k events/s that is most of the worker's CPU. Anything unusual
(other field order, missing fields, non-canonical integers, bytes) takes the reference
path, ``decode`` itself, and is rendered from the ``Event`` it returns.

Usage fields (issue 8): request events of features whose cost comes from the call append
``rs ov mdl ui uc uo ur cs um`` (gateway/core/events.py) after ``ref``; other events (and
every event written before) do not have them. A ``Flat`` is then ``FIELDS_EXT`` long
(``len(f) > USAGE_AT``), otherwise ``FIELDS`` long; the usage columns of a row without them
are NULL, with ``overage`` 0 and ``usage_missing`` false. An entry that has them in another
order, or only some of them, takes the reference path, which reads them by name.

The team (issue 9, contract A10): a request event of a request with a team ends with
``tm <team>``, after ``ref`` or after the usage fields; the row's ``team_id`` is then the
team, else NULL. A ``Flat`` with a team is one longer (its last value: its length is one
of ``TEAMED``): the four canonical shapes are ``FIELDS``, ``FIELDS_EXT``,
each with or without ``tm`` (21, 30, 22 and 31 values), all four take the fast path, and
``len(f) > USAGE_AT`` still says whether the usage fields are there.

The ``COPY`` column order (``COPY_COLUMNS``) is the entry's own order, minus the values
that are not ledger columns (``a``, ``used``, ``per``) and with ``ts`` as ``created_at``:
most of a line is then runs of the entry's values as they come (the compiled decode,
sync/_entries.c, copies them into the line as it splits the entry).

Two renderings exist. The fast one writes NULL as the empty string (``COPY ... NULL ''``)
and escapes nothing; it is valid for a batch only when no value holds a tab, newline,
carriage return or backslash and no entry has an empty bucket (the one text column where
``''`` is a value, not NULL): ``fast_payload`` checks that over the whole batch at C speed
(unless the compiled decode already knows it: ``Rows.clean``) and returns None otherwise.
The careful one escapes every value and writes ``\\N``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, TypeVar, cast

from gateway.core.anchors import period_end
from gateway.core.events import KINDS, decode, unpacked
from sync import compiled

FIELDS = (
    "id", "k", "o", "u", "f", "b", "t", "bal", "x", "a", "used",
    "per", "s", "ts", "rq", "st", "lat", "m", "r", "p", "ref",
)  # fmt: skip
FIELD_LIST = list(FIELDS)
# The usage fields, in the order settle.lua appends them after ``ref``.
USAGE_FIELDS = ("rs", "ov", "mdl", "ui", "uc", "uo", "ur", "cs", "um")
FIELDS_EXT = FIELDS + USAGE_FIELDS
FIELD_LIST_EXT = list(FIELDS_EXT)
# The request's team, last when present (gateway/core/events.py TEAM_FIELD).
TEAM = "tm"
FIELD_LIST_TEAM = [*FIELDS, TEAM]
FIELD_LIST_EXT_TEAM = [*FIELDS_EXT, TEAM]
# Positions of the values in a ``Flat``.
ID, KIND, ORG, USER, FEATURE, BUCKET, TOKENS, BAL, EXTRA, ALLOC, USED = range(11)
PERIOD, SEQ, TS, REQUEST, STATUS, LATENCY, METHOD, ROUTE, PLAN, REF = range(11, 21)
# ... and of the usage values, present when ``len(f) > USAGE_AT``.
RESERVED, OVERAGE, MODEL, IN_TOKENS, CACHED_TOKENS, OUT_TOKENS, REASONING_TOKENS = range(21, 28)
COST_SOURCE, USAGE_MISSING = 28, 29
_org = itemgetter(ORG)
_T = TypeVar("_T")
# The longest Flat without usage fields (FIELDS and a team): longer ones have them.
USAGE_AT = len(FIELDS) + 1
# The lengths of a Flat with a team (its last value): FIELDS or FIELDS_EXT, and tm.
TEAMED = frozenset({len(FIELDS) + 1, len(FIELDS_EXT) + 1})

# The ledger columns a line fills, in line order, which is the entry's (FIELDS; a, used
# and per are not ledger columns, ts is created_at): these ...
LOG_COLUMNS = (
    "event_id", "kind", "organization_id", "user_id", "feature_used", "token_type",
    "tokens_deducted", "balance_after", "extra_after", "seq", "created_at", "request_id",
    "upstream_status", "latency_ms", "method", "route", "plan", "reference",
)  # fmt: skip
# ... then the usage columns (migrations/0006_usage_columns.sql), in USAGE_FIELDS order;
# COPY_COLUMNS is a line.
USAGE_COLUMNS = (
    "reserved", "overage", "model", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens", "cost_source", "usage_missing",
)  # fmt: skip
# ... then the team (migrations/0007_teams_and_caps.sql), last: a line without one ends
# with an empty (NULL) value.
TEAM_COLUMNS = ("team_id",)
COPY_COLUMNS = LOG_COLUMNS + USAGE_COLUMNS + TEAM_COLUMNS
_TABS_PER_LINE = len(COPY_COLUMNS) - 1
# The end of the line of an entry without usage fields: the usage columns NULL, but
# overage 0 and usage_missing false (0). Fast rendering (NULL is ''), with the tab before
# the team column, then careful (\N).
NO_USAGE = "\t" + "\t".join(("", "0", "", "", "", "", "", "", "0")) + "\t"
NO_USAGE_CAREFUL = "\t" + "\t".join(("\\N", "0", *("\\N",) * 6, "0"))

# A canonical entry: its values, in the order of FIELDS (or FIELDS_EXT), and the team last
# when the event has one (see the module docstring).
Flat = list[str]
# An entry's fields as a client returns them: a flat [name, value, ...] list (the raw
# reply of FastRedis) or a mapping (redis-py, str or bytes).
Fields = Sequence[Any] | Mapping[Any, Any]

# Integer fields, all digits: bounded so that int() of them can never fail (Python refuses
# int() of over 4300 digits); longer ones take the reference path, which raises as
# decode does or yields a value Postgres then rejects as out of range.
MAX_DIGITS = 200


def refresh_of(period: str, timezone: str = "UTC") -> datetime | None:
    """When the period named ``period`` ends (gateway/core/anchors.py ids): ``2026-11``
    (monthly), ``2026-W48`` (ISO week), ``2026-11-23`` (daily) or an anchored
    ``2027-01-31..2027-02-28`` (contract A12); None otherwise. Ids are local dates, so the
    end is midnight in ``timezone`` (the config's ``period.timezone``)."""
    return period_end(period, timezone)


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _usage_value(fields: Mapping[Any, Any], name: str) -> str | None:
    raw = fields.get(name) if name in fields else fields.get(name.encode())
    return None if raw is None else _text(raw)


def _count(value: str) -> str:
    # An integer usage field, canonical ("" stays ""); int() raises as decode does on t.
    return "" if value == "" else str(int(value))


def reference_flat(fields: Fields) -> Flat:
    """The canonical entry through ``gateway.core.events.decode`` (raises exactly as it does);
    the usage fields, when the entry has any, read by name (``FIELDS_EXT`` long then), and
    the team last when it has a non-empty one."""
    fields = unpacked(fields)  # a v2 entry: its v1 fields (raises as decode does)
    if not isinstance(fields, Mapping):
        # A flat list: later duplicates win, as in the dict redis-py would build.
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    ev = decode(cast("dict[str, str]", fields))
    raw_ts = fields.get("ts") if "ts" in fields else fields.get(b"ts")
    ts = int(_text(raw_ts) or "0") if raw_ts is not None else 0
    values: list[str] = [
        ev.event_id, ev.kind, ev.org, ev.user or "", ev.feature or "", ev.bucket,
        str(ev.tokens), _opt(ev.balance_after), _opt(ev.extra_after), _opt(ev.allocated),
        _opt(ev.used), ev.period or "", _opt(ev.seq), str(ts), ev.request_id or "",
        _opt(ev.upstream_status), _opt(ev.latency_ms), ev.method or "", ev.route or "",
        ev.plan or "", ev.reference or "",
    ]  # fmt: skip
    usage = [_usage_value(fields, name) for name in USAGE_FIELDS]
    team = [ev.team] if ev.team else []
    if all(v is None for v in usage):
        return values + team
    rs, ov, mdl, ui, uc, uo, ur, cs, um = (v or "" for v in usage)
    values += (
        _count(rs), _count(ov), mdl, _count(ui), _count(uc), _count(uo), _count(ur), cs,
        "1" if um == "1" else "",
    )  # fmt: skip
    return values + team


def usage_fast(f: Flat) -> bool:
    """Whether the usage values of a ``FIELDS_EXT`` entry are canonical as they are."""
    digits = "".join((f[21], f[22], f[24], f[25], f[26], f[27]))
    return (
        (not digits or (digits.isdigit() and digits.isascii()))
        and len(digits) <= MAX_DIGITS
        and f[29] in ("", "1")
    )


def checked(f: Flat) -> bool:
    """Whether the values of ``f``, in a canonical shape, need no ``decode``: a known kind,
    an id and an org, and every integer field (those of ``FIELDS``) canonical digits."""
    digits = "".join((f[6], f[7], f[8], f[9], f[10], f[12], f[13], f[15], f[16]))
    return bool(
        f[1] in KINDS
        and f[0]
        and f[2]
        and digits.isdigit()
        and digits.isascii()
        and len(digits) <= MAX_DIGITS
    )


def canonical(fields: Fields) -> Flat:
    """The entry as a validated ``Flat``; raises (ValueError ...) when ``decode`` would."""
    if type(fields) is list:
        names = fields[::2]
        if names in (FIELD_LIST, FIELD_LIST_TEAM):
            f: Flat = fields[1::2]
        elif names in (FIELD_LIST_EXT, FIELD_LIST_EXT_TEAM) and usage_fast(fields[1::2]):
            f = fields[1::2]
        else:
            return reference_flat(fields)
    elif isinstance(fields, Mapping) and (
        list(fields) in (FIELD_LIST, FIELD_LIST_EXT, FIELD_LIST_TEAM, FIELD_LIST_EXT_TEAM)
    ):
        f = list(fields.values())
        if len(f) > USAGE_AT and not usage_fast(f):
            return reference_flat(fields)
    else:
        return reference_flat(fields)
    return f if checked(f) else reference_flat(fields)


class Times:
    """``ts`` (ms since the epoch, as a string) -> (created_at as COPY text, UTC day, ISO).

    Events of one batch share few distinct milliseconds, so each is converted once. The
    conversion is ``decode``'s: ``datetime.fromtimestamp(ms / 1000, UTC)``.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.cache: dict[str, tuple[str, str]] = {}
        self._max = max_entries

    def __getitem__(self, ts: str) -> tuple[str, str]:
        hit = self.cache.get(ts)
        if hit is not None:
            return hit
        created = datetime.fromtimestamp(int(ts or "0") / 1000, tz=UTC)
        if len(self.cache) >= self._max:
            self.cache.clear()
        hit = self.cache[ts] = (created.isoformat(sep=" "), created.date().isoformat())
        return hit


def copy_line(f: Flat, created: str) -> str:
    """The row, fast rendering: NULL is ``''``, nothing escaped (see the module docstring)."""
    line = "\t".join(
        (f[0], f[1], f[2], f[3], f[4], f[5], f[6] or "0", f[7], f[8], f[12] or "0", created,
         f[14], f[15], f[16], f[17], f[18], f[19], f[20])
    )  # fmt: skip
    line += usage_line(f) if len(f) > USAGE_AT else NO_USAGE
    return line + f[-1] if len(f) in TEAMED else line


def usage_line(f: Flat) -> str:
    """The usage columns of a ``FIELDS_EXT`` entry, fast rendering (with the leading tab),
    and the tab before the team column (its value, when there is one, comes after)."""
    return "\t" + "\t".join(
        (f[21], f[22] or "0", f[23], f[24], f[25], f[26], f[27], f[28], f[29] or "0", "")
    )


def org_order(flats: Sequence[Flat]) -> list[int] | None:
    """``org_order_each``, by the compiled pass when it is in use (sync/compiled.py)."""
    order = compiled.org_order
    if order is not None and type(flats) is list:
        got = order(flats)
        if got is True:
            return None
        if type(got) is list:
            return got
    return org_order_each(flats)


def org_order_each(flats: Sequence[Flat]) -> list[int] | None:
    """The positions of ``flats`` with each org's together: the orgs in the order they first
    appear, each org's entries in stream order; None when they are together already (one
    org, or each org's entries in one run).

    The order the writer works a batch in (sync/writer.py): the ledger's ``COPY`` and the
    rollup and snapshot rows. The ledger's index on (organization_id, created_at, id), and
    the rollups' and ``ai_tokens``' keys, which lead with the org too, then take an org's
    rows one after the other on the same leaf pages instead of one random page per row,
    which is most of the cost of a row's insertion (BENCHMARKS.md section 11h). Each org's
    rows still get their ``id`` values in stream order, so every per-org order (``/usage``
    pages by (created_at, id)) is the same; only the ids' interleaving across orgs, which
    nothing reads, differs. The reductions' results do not depend on the order but for
    the order of their keys (sync/aggregate.py)."""
    groups: dict[str, list[int]] = {}
    group = groups.get
    last, runs = None, 0
    for i, org in enumerate(map(_org, flats)):
        if org != last:
            runs += 1
            last = org
        got = group(org)
        if got is None:
            groups[org] = [i]
        else:
            got.append(i)
    if runs == len(groups):
        return None
    return [i for positions in groups.values() for i in positions]


def in_order(items: list[_T], order: list[int] | None) -> list[_T]:
    """``items`` in ``order`` (``org_order``), or ``items`` themselves for None.

    One ``itemgetter`` call picks them all: ~40 % less time than ``map`` over
    ``__getitem__`` (one C call per item), which the writer pays three times per batch on
    the lines, flats and days (BENCHMARKS.md section 11i)."""
    if order is None:
        return items
    if len(order) < 2:  # an itemgetter of one position answers the item, not a tuple
        return [items[i] for i in order]
    return list(itemgetter(*order)(items))


def fast_payload(lines: Sequence[str], empty_bucket: bool, clean: bool = False) -> bytes | None:
    """The batch's ``COPY ... NULL ''`` data, or None when the fast rendering is not exact.

    ``clean``: the caller knows that no value holds a tab, newline, carriage return or
    backslash (sync/batch.py ``Rows.clean``), so the lines are not looked through again."""
    if empty_bucket or not lines:
        return None
    text = "\n".join(lines)
    if not clean and (
        text.count("\t") != _TABS_PER_LINE * len(lines)
        or text.count("\n") != len(lines) - 1
        or "\\" in text
        or "\r" in text
    ):
        return None
    text += "\n"
    return text.encode("utf-8")


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _esc(value: str) -> str:
    return value.translate(_ESCAPES) if value else "\\N"


def careful_line(f: Flat, created: str) -> str:
    """The row with every value escaped and NULL as ``\\N`` (default text COPY)."""
    line = "\t".join(
        (_esc(f[0]), _esc(f[1]), _esc(f[2]), _esc(f[3]), _esc(f[4]), f[5].translate(_ESCAPES),
         f[6] or "0", _esc(f[7]), _esc(f[8]), f[12] or "0", created, _esc(f[14]), _esc(f[15]),
         _esc(f[16]), _esc(f[17]), _esc(f[18]), _esc(f[19]), _esc(f[20]))
    )  # fmt: skip
    team = "\t" + _esc(f[-1] if len(f) in TEAMED else "")
    if len(f) <= USAGE_AT:
        return line + NO_USAGE_CAREFUL + team
    usage = (
        _esc(f[21]), f[22] or "0", _esc(f[23]), _esc(f[24]), _esc(f[25]), _esc(f[26]),
        _esc(f[27]), _esc(f[28]), f[29] or "0",
    )  # fmt: skip
    return line + "\t" + "\t".join(usage) + team


def careful_payload(entries: Sequence[Flat], times: Times) -> bytes:
    """The batch's default-format ``COPY`` data (always exact)."""
    return "".join(careful_line(f, times[f[TS]][0]) + "\n" for f in entries).encode("utf-8")
