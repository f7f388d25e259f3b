"""A batch's effect on the rollups and the balance snapshots, reduced in Python.

Postgres then gets one row per key instead of one per event: one ``usage_daily_user``
upsert per (org, day, user), one ``usage_daily_feature`` upsert per (org, day, feature)
(since 0015 the finer (org, day, feature, user) rows of ``usage_daily`` are neither stored
nor sent: it is a view of the ledger) and one ``ai_tokens`` update per (org, bucket), sent
as columns (see ``Columns``).

- Rollups count only rows the ledger actually inserted (the caller passes those), so a
  redelivered event adds nothing. Only request events (charge, refund, expired_hold) count.
  ``usage_daily_model`` (per org, day, model) counts those whose cost came from the call
  (a cost source) or that name a model: the events with usage fields (sync/records.py).
- Snapshots move only forward in the org's sequence number. An empty field means
  "unchanged", so each column takes the newest non-empty value of the batch with that
  value's seq; the update applies a column only when its seq is newer than the row's.
  Events without a seq, or without any balance field, move nothing. Snapshots may be
  computed over every event of the batch, new or redelivered: applying one twice is a
  no-op.

Flat stay the strings the stream carried (validated integers, see sync/records.py), so
nothing is converted per event but the seq a snapshot is ordered by.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from itertools import compress
from operator import itemgetter
from typing import Any

from sync import compiled
from sync.records import (
    ALLOC,
    BAL,
    BUCKET,
    CACHED_TOKENS,
    COST_SOURCE,
    EXTRA,
    FEATURE,
    IN_TOKENS,
    KIND,
    MODEL,
    ORG,
    OUT_TOKENS,
    OVERAGE,
    PERIOD,
    PLAN,
    REASONING_TOKENS,
    SEQ,
    TOKENS,
    USAGE_AT,
    USAGE_MISSING,
    USED,
    USER,
    Flat,
    refresh_of,
)

REQUEST_KINDS = frozenset({"charge", "refund", "expired_hold"})
# Events that re-arm a bucket's alerts (gateway/alerts/evaluation.py): a top-up, a reset.
REARM_KINDS = frozenset({"grant", "reset"})

# A table of rows as columns, each a sequence of strings ("" = NULL where a column's
# values cannot be empty, see sync/writer.py).
Columns = tuple[Sequence[str], ...]

# usage_daily_user: org, day, user, requests, tokens.
USER_ROLLUP_WIDTH = 5
# usage_daily_feature: org, day, feature, token_type (the min bucket), requests, tokens.
FEATURE_ROLLUP_WIDTH = 6
# usage_daily_model: org, day, model, then the sums of requests, tokens, input_tokens,
# cached_input_tokens, output_tokens, reasoning_tokens, overage, usage_missing.
MODEL_ROLLUP_WIDTH = 11
# ai_tokens: org, bucket, seq, then value and seq of balance, extra, total_allocated, used,
# period, then refresh_date.
SNAPSHOT_WIDTH = 14

_org = itemgetter(ORG)
_plan = itemgetter(PLAN)
# A snapshot row's values, from an event that sets every column (see snapshots()).
_snapshot_values = itemgetter(ORG, BUCKET, SEQ, BAL, EXTRA, ALLOC, USED, PERIOD)

# Keyed by (period, time zone): the same id ends at another instant in another zone, and
# workers of differently configured deployments may share this process (tests, demo).
_refresh_text: dict[tuple[str, str], str] = {}


def _refresh(period: str, timezone: str) -> str:
    """``refresh_of(period, timezone)`` as COPY/array text ("" for None), cached (few
    periods exist; the cache is bounded anyway, since a period is whatever an event says)."""
    key = (period, timezone)
    text = _refresh_text.get(key)
    if text is None:
        if len(_refresh_text) >= 10_000:
            _refresh_text.clear()
        when = refresh_of(period, timezone)
        text = _refresh_text[key] = "" if when is None else when.isoformat()
    return text


def rollups(entries: Sequence[Flat], days: Sequence[str]) -> Columns:
    """The request events' rows of ``usage_daily_user`` and ``usage_daily_feature``
    (``rollups_each``), by the compiled pass when it is in use (sync/compiled.py), which
    answers the same columns (as lists) or None (then ``rollups_each``)."""
    reduce = compiled.rollups
    if reduce is not None and type(entries) is list and type(days) is list:
        got = reduce(entries, days, REQUEST_KINDS)
        if got is not None:
            return got
    return rollups_each(entries, days)


def rollups_each(entries: Iterable[Flat], days: Iterable[str]) -> Columns:
    """The request events' rows of ``usage_daily_user`` (per org, day, user: count, token
    sum) and of ``usage_daily_feature`` (per org, day, feature: min bucket, count, token
    sum), as one table of ``USER_ROLLUP_WIDTH`` then ``FEATURE_ROLLUP_WIDTH`` columns (the
    feature rows may be fewer; sync/sql.py takes each group's length from its first column).

    ``days`` is each event's UTC day (ISO), in step with ``entries``. Keys come out in
    first-seen order (concurrent writers are serialised another way, see sync/writer.py).
    A key seen once keeps its event (its own validated strings, no int() and str()); a
    second event turns it into sums, as model_rollups does.
    """
    users: dict[tuple[str, str, str], list[Any]] = {}
    features: dict[tuple[str, str, str], list[Any]] = {}
    # setdefault: a new key (the usual case) costs one dict operation, not a get and a set.
    uset, fset, kinds, at = users.setdefault, features.setdefault, REQUEST_KINDS, BUCKET
    for v, day in zip(entries, days, strict=True):
        if v[KIND] in kinds:
            org, tokens = v[ORG], v[TOKENS]
            key = (org, day, v[USER])
            cell = uset(key, v)
            if cell is not v:
                if len(cell) > at:  # the key's second event: from its first one's strings
                    first = cell[TOKENS]
                    cell = users[key] = [1, int(first) if first else 0]
                cell[0] += 1
                if tokens:
                    cell[1] += int(tokens)
            key = (org, day, v[FEATURE])
            cell = fset(key, v)
            if cell is not v:
                if len(cell) > at:
                    first = cell[TOKENS]
                    cell = features[key] = [cell[BUCKET], 1, int(first) if first else 0]
                cell[1] += 1
                if tokens:
                    cell[2] += int(tokens)
                if v[BUCKET] < cell[0]:
                    cell[0] = v[BUCKET]
    if not users:
        return ((),) * (USER_ROLLUP_WIDTH + FEATURE_ROLLUP_WIDTH)
    u_counts, u_sums = zip(
        *[
            ("1", c[TOKENS] or "0") if len(c) > at else (str(c[0]), str(c[1]))
            for c in users.values()
        ],
        strict=True,
    )
    f_buckets, f_counts, f_sums = zip(
        *[
            (c[BUCKET], "1", c[TOKENS] or "0") if len(c) > at else (c[0], str(c[1]), str(c[2]))
            for c in features.values()
        ],
        strict=True,
    )
    return (*zip(*users, strict=True), u_counts, u_sums, *zip(*features, strict=True),
            f_buckets, f_counts, f_sums)  # fmt: skip


def take(columns: Columns, mask: Sequence[bool], keep: bool) -> Columns:
    """The rows of ``columns`` whose ``mask`` value is ``keep``."""
    chosen = mask if keep else [not m for m in mask]
    return tuple(list(compress(column, chosen)) for column in columns)


def split_rows(columns: Columns, pairs: Set[tuple[str, str]]) -> tuple[Columns, Columns]:
    """Rollup rows (org and day their first two columns) whose (org, day) is in ``pairs``,
    and the others."""
    mask = [pair in pairs for pair in zip(columns[0], columns[1], strict=True)]
    return take(columns, mask, True), take(columns, mask, False)


def _model_sums(v: Flat) -> list[int]:
    return [
        1, int(v[TOKENS] or 0), int(v[IN_TOKENS] or 0), int(v[CACHED_TOKENS] or 0),
        int(v[OUT_TOKENS] or 0), int(v[REASONING_TOKENS] or 0), int(v[OVERAGE] or 0),
        1 if v[USAGE_MISSING] == "1" else 0,
    ]  # fmt: skip


def _model_row(cell: list[Any]) -> tuple[str, ...]:
    if len(cell) > USAGE_AT:  # one event: its own (validated) strings
        return (
            "1", cell[TOKENS] or "0", cell[IN_TOKENS] or "0", cell[CACHED_TOKENS] or "0",
            cell[OUT_TOKENS] or "0", cell[REASONING_TOKENS] or "0", cell[OVERAGE] or "0",
            "1" if cell[USAGE_MISSING] == "1" else "0",
        )  # fmt: skip
    return tuple(map(str, cell))


def model_rollups(entries: Iterable[Flat], days: Iterable[str]) -> Columns:
    """Per (org, day, model) of the request events with a cost source or a model: the
    count and the sums of tokens, the four token counts, overage and missing usage.

    A key seen once keeps its event (no int() and str() per value); a second event turns
    it into sums."""
    acc: dict[tuple[str, str, str], list[Any]] = {}
    get, kinds, at = acc.get, REQUEST_KINDS, USAGE_AT
    for v, day in zip(entries, days, strict=True):
        if len(v) > at and (v[COST_SOURCE] or v[MODEL]) and v[KIND] in kinds:
            key = (v[ORG], day, v[MODEL])
            cell = get(key)
            if cell is None:
                acc[key] = v
                continue
            if len(cell) > at:
                cell = acc[key] = _model_sums(cell)
            cell[0] += 1
            t, ui, uc, uo, ur, ov = (
                v[TOKENS], v[IN_TOKENS], v[CACHED_TOKENS], v[OUT_TOKENS], v[REASONING_TOKENS],
                v[OVERAGE],
            )  # fmt: skip
            if t:
                cell[1] += int(t)
            if ui:
                cell[2] += int(ui)
            if uc:
                cell[3] += int(uc)
            if uo:
                cell[4] += int(uo)
            if ur:
                cell[5] += int(ur)
            if ov:
                cell[6] += int(ov)
            if v[USAGE_MISSING] == "1":
                cell[7] += 1
    if not acc:
        return ((),) * MODEL_ROLLUP_WIDTH
    orgs, day_list, models = zip(*acc, strict=True)
    return (orgs, day_list, models, *zip(*map(_model_row, acc.values()), strict=True))


def plans(entries: Sequence[Flat]) -> dict[str, str | None]:
    """Each org's plan as of its last event in the batch (None when empty)."""
    # In C (map, zip, dict): a later event's plan replaces an earlier one's.
    last = dict(zip(map(_org, entries), map(_plan, entries), strict=True))
    return {org: plan or None for org, plan in last.items()}


def orgs_of(entries: Sequence[Flat]) -> set[str]:
    """The orgs of ``entries``."""
    return set(map(_org, entries))


def _merge(cur: list[Any] | None, v: Flat, seq: int) -> list[Any]:
    # cur: [seq, bal, bal_seq, x, x_seq, a, a_seq, used, used_seq, per, per_seq]
    if cur is None:
        cur = [seq, "", None, "", None, "", None, "", None, "", None]
    elif seq > cur[0]:
        cur[0] = seq
    for at, col in ((1, BAL), (3, EXTRA), (5, ALLOC), (7, USED), (9, PERIOD)):
        value = v[col]
        if value and (cur[at + 1] is None or seq > cur[at + 1]):
            cur[at] = value
            cur[at + 1] = seq
    return cur


def _seq_text(seq: int | None) -> str:
    return "" if seq is None else str(seq)


# Per (org, bucket): the newest event setting every snapshot column; the keys of the rest.
Newest = tuple[dict[tuple[str, str], Flat], set[tuple[str, str]]]


def _newest_each(entries: Iterable[Flat]) -> Newest:
    """Per (org, bucket), the event with the highest seq among those that set every
    snapshot column (``full``), and the keys of events that set only some (``partial``);
    the compiled ``newest`` answers the same in one pass."""
    full: dict[tuple[str, str], Flat] = {}
    get = full.get
    partial: set[tuple[str, str]] = set()
    for v in entries:
        s = v[SEQ]
        if not s:
            continue
        if v[BAL] and v[EXTRA] and v[ALLOC] and v[USED] and v[PERIOD]:
            # The common case: every column set, so the newest event wins them all.
            key = (v[ORG], v[BUCKET])
            cur = get(key)
            if cur is None or int(s) > int(cur[SEQ]):
                full[key] = v
        elif v[BAL] or v[EXTRA] or v[ALLOC] or v[USED] or v[PERIOD]:
            partial.add((v[ORG], v[BUCKET]))
    return full, partial


def snapshots(entries: Sequence[Flat], timezone: str = "UTC") -> Columns:
    """One row per (org, bucket) the batch moves (see the module docstring); the
    refresh_date column is the period's end at midnight in ``timezone`` (contract A12)."""
    newest = compiled.newest
    got = newest(entries) if newest is not None and type(entries) is list else None
    full, partial = got if got is not None else _newest_each(entries)
    if not full and not partial:
        return ((),) * SNAPSHOT_WIDTH
    merged: dict[tuple[str, str], list[Any]] = {}
    if partial:
        # Keys with partial events: the column-by-column rule, in batch order.
        for v in entries:
            s = v[SEQ]
            key = (v[ORG], v[BUCKET])
            if s and key in partial and (v[BAL] or v[EXTRA] or v[ALLOC] or v[USED] or v[PERIOD]):
                merged[key] = _merge(merged.get(key), v, int(s))
    # Rows of keys whose newest event set every column: each column is that event's value
    # (its seq for every *_seq column), picked in C, one column at a time.
    whole = list(full.values()) if not merged else [v for k, v in full.items() if k not in merged]
    orgs, buckets, seqs, bals, xs, allocs, useds, pers = (
        zip(*map(_snapshot_values, whole), strict=True) if whole else ((),) * 8
    )
    refresh = {per: _refresh(per, timezone) for per in set(pers)}
    refreshes = tuple(map(refresh.__getitem__, pers))
    # The seq column is one object, six times over: sync/sql.py joins it once.
    columns = (
        orgs, buckets, seqs, bals, seqs, xs, seqs, allocs, seqs, useds, seqs, pers, seqs,
        refreshes,
    )  # fmt: skip
    if not merged:
        return columns
    rows = [
        (
            *key, str(c[0]), c[1], _seq_text(c[2]), c[3], _seq_text(c[4]), c[5],
            _seq_text(c[6]), c[7], _seq_text(c[8]), c[9], _seq_text(c[10]),
            _refresh(c[9], timezone) if c[9] else "",
        )
        for key, c in merged.items()
    ]  # fmt: skip
    return tuple(
        (*column, *values) for column, values in zip(columns, zip(*rows, strict=True), strict=True)
    )


def arm_column(entries: Iterable[Flat], snaps: Columns) -> list[str]:
    """Per snapshot row of ``snaps``: the seq of the batch's newest grant or reset event of
    that (org, bucket), or "" (alerts re-arm at these; the update keeps the greatest)."""
    arms: dict[tuple[str, str], int] = {}
    kinds = REARM_KINDS
    for v in entries:
        if v[KIND] in kinds and v[SEQ]:
            key, seq = (v[ORG], v[BUCKET]), int(v[SEQ])
            if seq > arms.get(key, 0):
                arms[key] = seq
    if not arms:
        return [""] * len(snaps[0])
    return [str(arms[key]) if key in arms else "" for key in zip(snaps[0], snaps[1], strict=True)]
