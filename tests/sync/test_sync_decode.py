"""The sync job's decoder and reductions against their references (no servers needed).

- ``canonical`` + the ``COPY`` renderings yield exactly the ledger row that
  ``gateway.core.events.decode`` implies (and the usage columns its usage fields imply),
  or raise what it raises, for any entry;
- ``snapshots`` (the fast whole-row rule plus the column rule for partial events) equals
  the plain column-by-column rule.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.events import KINDS, decode
from sync.aggregate import orgs_of, plans, rollups, snapshots
from sync.batch import decode_entries
from sync.records import (
    ALLOC,
    BAL,
    BUCKET,
    COPY_COLUMNS,
    EXTRA,
    FEATURE,
    FIELDS,
    FIELDS_EXT,
    KIND,
    ORG,
    PERIOD,
    PLAN,
    SEQ,
    TOKENS,
    TS,
    USAGE_FIELDS,
    USED,
    USER,
    Times,
    canonical,
    careful_payload,
    copy_line,
    fast_payload,
)

_KEYS = [*FIELDS_EXT, "tm"]
_VALUES = [
    "",
    "0",
    "7",
    "-3",
    " 12",
    "1_000",
    "007",
    "٣",
    "9" * 30,
    "9" * 250,
    "1795469836271",
    "2026-11",
    "2026-W48",
    "2026-11-23",
    "2026-13",
    "2026-02-30",
    "charge",
    "refund",
    "expired_hold",
    "grant",
    "bogus",
    "acme",
    "été",
    "tab\there",
    "back\\slash",
    "new\nline",
    "\\N",
    "cr\r",
]
# The reference row's columns (_reference_row), by name: a COPY line is read into them
# through COPY_COLUMNS, whatever order the writer's lines take.
_ROW_COLUMNS = (
    "event_id", "organization_id", "user_id", "feature_used", "token_type",
    "tokens_deducted", "kind", "request_id", "method", "route", "upstream_status",
    "latency_ms", "balance_after", "extra_after", "seq", "plan", "reference", "created_at",
    "model", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "reserved", "overage", "cost_source", "usage_missing", "team_id",
)  # fmt: skip
_INT_COLUMNS = {
    "tokens_deducted", "upstream_status", "latency_ms", "balance_after", "extra_after", "seq",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "reserved",
    "overage",
}  # fmt: skip
assert sorted(_ROW_COLUMNS) == sorted(COPY_COLUMNS)


def _usage_reference(fields: Any) -> tuple[Any, ...]:
    """The usage columns an entry's usage fields imply (migrations/0006_usage_columns.sql):
    NULL when absent or empty, but overage 0 and usage_missing false."""

    def get(name: str) -> str:
        raw = fields.get(name, fields.get(name.encode(), ""))
        return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw

    rs, ov, mdl, ui, uc, uo, ur, cs, um = (get(n) for n in USAGE_FIELDS)

    def count(v: str) -> int | None:
        return int(v) if v else None

    return (
        mdl or None, count(ui), count(uc), count(uo), count(ur), count(rs), count(ov) or 0,
        cs or None, um == "1",
    )  # fmt: skip


def _reference_row(fields: Any) -> tuple[Any, ...]:
    """The ledger row gateway.core.events.decode implies (coalesce(seq, 0) as the writer)."""
    if not isinstance(fields, dict):  # a flat list: later duplicates win
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    ev = decode(fields)
    return (
        ev.event_id, ev.org, ev.user, ev.feature, ev.bucket, ev.tokens, ev.kind,
        ev.request_id, ev.method, ev.route, ev.upstream_status, ev.latency_ms,
        ev.balance_after, ev.extra_after, ev.seq or 0, ev.plan, ev.reference, ev.created_at,
        *_usage_reference(fields), ev.team,
    )  # fmt: skip


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            nxt = value[i + 1]
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_copy_line(line: str, null: str) -> tuple[Any, ...]:
    """What Postgres reads from one text COPY line (NULL marker ``null``), as the reference
    row's columns."""
    out: dict[str, Any] = {}
    for name, raw in zip(COPY_COLUMNS, line.split("\t"), strict=True):
        if raw == null:
            out[name] = None
            continue
        value = _unescape(raw) if null == "\\N" else raw
        if name in _INT_COLUMNS:
            out[name] = int(value)
        elif name == "usage_missing":
            out[name] = {"0": False, "1": True}[value]
        elif name == "created_at":
            out[name] = datetime.fromisoformat(value)
        else:
            out[name] = value
    return tuple(out[name] for name in _ROW_COLUMNS)


def _check(given_fields: Any, reference_fields: Any) -> None:
    """The worker's decoder (decode_entries, and canonical alone) against the reference:
    the same exception, or lines that Postgres reads as the reference row."""
    try:
        expected: Any = _reference_row(reference_fields)
    except Exception as exc:
        expected = type(exc)
    times = Times()
    decoded = decode_entries([("1-0", given_fields)], times)
    if not given_fields:  # an entry deleted while pending: counted, never decoded
        assert decoded.vanished == 1 and not decoded.bad and not len(decoded.rows)
        return
    if decoded.bad:
        assert decoded.bad[0][2].startswith(f"decode: {expected.__name__}: ")
        with pytest.raises(expected):  # the time is converted by Times, not canonical
            Times()[canonical(given_fields)[TS]]
        return
    assert isinstance(expected, tuple), f"accepted what decode rejects ({expected})"
    rows = decoded.rows
    f, line = rows.flats[0], rows.lines[0]
    assert f == canonical(given_fields)
    assert line == copy_line(f, times[f[TS]][0])  # the loop's inlined copy of copy_line
    careful = _parse_copy_line(careful_payload([f], times).decode()[:-1], "\\N")
    assert careful == expected
    if fast_payload(rows.lines, rows.empty_bucket) is not None:
        assert _parse_copy_line(line, "") == expected


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
    st.sampled_from(["charge", "reset", "nope", None]),
    st.sampled_from(
        [
            "dict",
            "bytes",
            "flat",
            "canonical",
            "canonical_usage",
            "canonical_team",
            "canonical_usage_team",
        ]
    ),
)
def test_copy_rows_match_the_reference_decoder(
    fields: dict[str, str], kind: str | None, shape: str
) -> None:
    if kind is not None:
        fields = {"id": "e1", "o": "acme", **fields, "k": kind}
    given_fields: Any = fields
    if shape == "bytes":
        given_fields = {k.encode(): v.encode() for k, v in fields.items()}
    elif shape == "flat" or shape.startswith("canonical"):
        # Every field, in the order the Lua scripts write them, with the usage fields
        # settle.lua appends, and with the team last (contract A10).
        names = FIELDS_EXT if "usage" in shape else FIELDS
        fields = {k: fields.get(k, "") for k in names} if shape != "flat" else fields
        if shape.endswith("_team"):
            fields["tm"] = fields.get("tm") or "red"
        given_fields = [x for kv in fields.items() for x in kv]
    _check(given_fields, given_fields if shape == "bytes" else fields)


_INT_FIELDS = ("t", "bal", "x", "a", "used", "s", "ts", "st", "lat")
_GOOD_INTS = ["", "0", "7", "42", "1795469836271", "007"]
_ODD_INTS = ["-3", " 12", "1_000", "\u0663", "9" * 30, "9" * 250, "x"]
_TEXT_VALUES = ["", "acme", "u1", "\u00e9t\u00e9", "tab\there", "back\\slash", "\\N", "cr\r"]
_USAGE_INTS = ("rs", "ov", "ui", "uc", "uo", "ur")


@st.composite
def lua_entries(draw: st.DrawFn) -> dict[str, str]:
    """Entries as the Lua scripts write them (every field, in order), values mostly sane
    (so that the fast path is taken often) with an odd one here and there."""

    def pick(good: list[str], odd: list[str]) -> str:
        return draw(st.sampled_from(odd if draw(st.integers(0, 19)) == 0 else good))

    out = {}
    names = FIELDS_EXT if draw(st.booleans()) else FIELDS
    for name in (*names, "tm") if draw(st.booleans()) else names:
        if name == "k":
            out[name] = pick(sorted(KINDS), ["nope", ""])
        elif name in ("id", "o"):
            out[name] = pick(["e1", "acme"], ["", "tab\there", "cr\r"])
        elif name == "per":
            out[name] = pick(["", "2026-11", "2026-W48", "2026-11-23"], ["2026-13", "x"])
        elif name in _INT_FIELDS or name in _USAGE_INTS:
            out[name] = pick(_GOOD_INTS, _ODD_INTS)
        elif name == "um":
            out[name] = pick(["", "1"], ["0", "true", "x"])
        elif name == "cs":
            out[name] = pick(["", "usage", "header", "app", "policy", "reservation"], _TEXT_VALUES)
        elif name == "tm":
            out[name] = pick(["red", "team-1", "\u00e9quipe"], _TEXT_VALUES)
        elif name == "mdl":
            out[name] = pick(["", "gpt-4o-mini", "claude-3-5-sonnet"], _TEXT_VALUES)
        else:
            out[name] = pick(["", "acme", "u1", "\u00e9t\u00e9"], _TEXT_VALUES)
    return out


@settings(max_examples=1500, deadline=None)
@given(lua_entries(), st.booleans())
def test_lua_shaped_entries_match_the_reference_decoder(fields: dict[str, str], flat: bool) -> None:
    given_fields: Any = [x for kv in fields.items() for x in kv] if flat else fields
    _check(given_fields, fields)


def _reference_snapshots(entries: list[list[str]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Column by column, in batch order: the rule sync/aggregate.py implements faster."""
    acc: dict[tuple[str, str], list[Any]] = {}
    for v in entries:
        if not v[SEQ]:
            continue
        cols = [v[i] for i in (BAL, EXTRA, ALLOC, USED, PERIOD)]
        if not any(cols):
            continue
        seq = int(v[SEQ])
        cur = acc.setdefault((v[ORG], v[BUCKET]), [seq] + [None] * 10)
        cur[0] = max(cur[0], seq)
        for j, value in enumerate(cols):
            if value and (cur[2 + 2 * j] is None or seq > cur[2 + 2 * j]):
                cur[1 + 2 * j] = int(value) if j < 4 else value
                cur[2 + 2 * j] = seq
    return {k: tuple(c) for k, c in acc.items()}


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["x", "y", ""]),
            st.sampled_from(["", "1", "2", "3", "10"]),
            st.lists(st.sampled_from(["", "5", "7"]), min_size=5, max_size=5),
        ),
        max_size=30,
    )
)
def test_snapshot_reduction_matches_the_column_rule(
    events: list[tuple[str, str, str, list[str]]],
) -> None:
    entries = []
    for org, bucket, seq, cols in events:
        v = [""] * len(FIELDS)
        v[ORG], v[BUCKET], v[SEQ] = org, bucket, seq
        for i, value in zip((BAL, EXTRA, ALLOC, USED, PERIOD), cols, strict=True):
            v[i] = value if i != PERIOD or not value else f"2026-{int(value):02d}"
        entries.append(v)
    arrays = snapshots(entries)
    got = {
        (row[0], row[1]): tuple(
            (x or None) if i == 9 else (int(x) if x else None) for i, x in enumerate(row[2:13])
        )
        for row in zip(*arrays, strict=True)
    }
    assert got == _reference_snapshots(entries)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["charge", "refund", "expired_hold", "grant", "reset"]),
            st.sampled_from(["a", "b"]),
            st.sampled_from(["f", "g", ""]),
            st.sampled_from(["u", ""]),
            st.sampled_from(["x", "y", ""]),
            st.sampled_from(["", "0", "3", "12"]),
            st.sampled_from(["2026-11-14", "2026-11-15"]),
            st.sampled_from(["", "pro", "free"]),
        ),
        max_size=30,
    )
)
def test_rollup_and_plan_reductions_match_the_plain_rule(
    events: list[tuple[str, str, str, str, str, str, str, str]],
) -> None:
    """rollups() (the user and the feature rows, a key seen once kept as its event's
    strings) and plans() (reduced in C) give what a plain loop over the events gives."""
    entries, days = [], []
    for kind, org, feature, user, bucket, tokens, day, plan in events:
        v = [""] * len(FIELDS)
        v[KIND], v[ORG], v[FEATURE], v[USER], v[BUCKET] = kind, org, feature, user, bucket
        v[TOKENS], v[PLAN] = tokens, plan
        entries.append(v)
        days.append(day)
    users: dict[tuple[str, ...], list[int]] = {}
    features: dict[tuple[str, ...], list[Any]] = {}
    for v, day in zip(entries, days, strict=True):
        if v[KIND] in ("charge", "refund", "expired_hold"):
            user = users.setdefault((v[ORG], day, v[USER]), [0, 0])
            user[0] += 1
            user[1] += int(v[TOKENS] or 0)
            feature = features.setdefault((v[ORG], day, v[FEATURE]), [v[BUCKET], 0, 0])
            feature[0] = min(feature[0], v[BUCKET])
            feature[1] += 1
            feature[2] += int(v[TOKENS] or 0)
    columns = rollups(entries, days)
    got_users = {row[:3]: [int(row[3]), int(row[4])] for row in zip(*columns[:5], strict=True)}
    got_features = {
        row[:3]: [row[3], int(row[4]), int(row[5])] for row in zip(*columns[5:], strict=True)
    }
    assert (got_users, got_features) == (users, features)
    last: dict[str, str | None] = {}
    for v in entries:
        last[v[ORG]] = v[PLAN] or None
    assert plans(entries) == last
    assert orgs_of(entries) == set(last)
