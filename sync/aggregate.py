"""A batch's effect on the rollups and the balance snapshots, reduced in Python.

Postgres then gets one row per key instead of one per event: one row per (org, day,
feature, user), which the rollup statement groups into ``usage_daily_user`` and
``usage_daily_feature`` (sync/sql.py), and one ``ai_tokens`` update per (org, bucket), sent
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

from collections.abc import Iterable, Sequence
from typing import Any

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

# The rollup rows (usage_daily's columns, a view since 0015): org, day, feature, user,
# token_type, requests, tokens.
ROLLUP_WIDTH = 7
# usage_daily_model: org, day, model, then the sums of requests, tokens, input_tokens,
# cached_input_tokens, output_tokens, reasoning_tokens, overage, usage_missing.
MODEL_ROLLUP_WIDTH = 11
# ai_tokens: org, bucket, seq, then value and seq of balance, extra, total_allocated, used,
# period, then refresh_date.
SNAPSHOT_WIDTH = 14

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


def rollups(entries: Iterable[Flat], days: Iterable[str]) -> Columns:
    """Per (org, day, feature, user) of the request events: min bucket, count, token sum.

    ``days`` is each event's UTC day (ISO), in step with ``entries``. Keys come out in
    first-seen order (concurrent writers are serialised another way, see sync/writer.py).
    """
    acc: dict[tuple[str, str, str, str], list[Any]] = {}
    get = acc.get
    for v, day in zip(entries, days, strict=True):
        if v[KIND] in REQUEST_KINDS:
            key = (v[ORG], day, v[FEATURE], v[USER])
            tokens = v[TOKENS]
            cell = get(key)
            if cell is None:
                acc[key] = [v[BUCKET], 1, int(tokens) if tokens else 0]
            else:
                cell[1] += 1
                if tokens:
                    cell[2] += int(tokens)
                if v[BUCKET] < cell[0]:
                    cell[0] = v[BUCKET]
    if not acc:
        return ((),) * ROLLUP_WIDTH
    orgs, day_list, features, users = zip(*acc, strict=True)
    buckets, counts, sums = zip(*acc.values(), strict=True)
    return (
        orgs, day_list, features, users, buckets,
        list(map(str, counts)), list(map(str, sums)),
    )  # fmt: skip


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


def plans(entries: Iterable[Flat]) -> dict[str, str | None]:
    """Each org's plan as of its last event in the batch (None when empty)."""
    out: dict[str, str | None] = {}
    for v in entries:
        out[v[ORG]] = v[PLAN]
    return {org: plan or None for org, plan in out.items()}


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


def snapshots(entries: Sequence[Flat], timezone: str = "UTC") -> Columns:
    """One row per (org, bucket) the batch moves (see the module docstring); the
    refresh_date column is the period's end at midnight in ``timezone`` (contract A12)."""
    full: dict[tuple[str, str], tuple[int, Flat]] = {}
    get = full.get
    partial: set[tuple[str, str]] = set()
    for v in entries:
        s = v[SEQ]
        if not s:
            continue
        if v[BAL] and v[EXTRA] and v[ALLOC] and v[USED] and v[PERIOD]:
            # The common case: every column set, so the newest event wins them all.
            seq = int(s)
            key = (v[ORG], v[BUCKET])
            cur = get(key)
            if cur is None or seq > cur[0]:
                full[key] = (seq, v)
        elif v[BAL] or v[EXTRA] or v[ALLOC] or v[USED] or v[PERIOD]:
            partial.add((v[ORG], v[BUCKET]))
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
    rows: list[tuple[str, ...]] = []
    for key, (_, v) in full.items():
        if key in merged:
            continue
        per, s = v[PERIOD], v[SEQ]
        rows.append((*key, s, v[BAL], s, v[EXTRA], s, v[ALLOC], s, v[USED], s, per, s,
                     _refresh(per, timezone)))  # fmt: skip
    for key, c in merged.items():
        per = c[9]
        rows.append(
            (
                *key, str(c[0]), c[1], _seq_text(c[2]), c[3], _seq_text(c[4]), c[5],
                _seq_text(c[6]), c[7], _seq_text(c[8]), per, _seq_text(c[10]),
                _refresh(per, timezone) if per else "",
            )
        )  # fmt: skip
    return tuple(zip(*rows, strict=True))


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
