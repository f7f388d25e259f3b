"""A batch's effect on the rollups and the balance snapshots, reduced in Python.

Postgres then gets one row per key instead of one per event: one ``usage_daily`` upsert
per (org, day, feature, user) and one ``ai_tokens`` update per (org, bucket), sent as
columns (see ``Columns``).

- Rollups count only rows the ledger actually inserted (the caller passes those), so a
  redelivered event adds nothing. Only request events (charge, refund, expired_hold) count.
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
    EXTRA,
    FEATURE,
    KIND,
    ORG,
    PERIOD,
    PLAN,
    SEQ,
    TOKENS,
    USED,
    USER,
    Flat,
    refresh_of,
)

REQUEST_KINDS = frozenset({"charge", "refund", "expired_hold"})

# A table of rows as columns, each a sequence of strings ("" = NULL where a column's
# values cannot be empty, see sync/writer.py).
Columns = tuple[Sequence[str], ...]

# usage_daily: org, day, feature, user, token_type, requests, tokens.
ROLLUP_WIDTH = 7
# ai_tokens: org, bucket, seq, then value and seq of balance, extra, total_allocated, used,
# period, then refresh_date.
SNAPSHOT_WIDTH = 14

_refresh_text: dict[str, str] = {}


def _refresh(period: str) -> str:
    """``refresh_of(period)`` as COPY/array text ("" for None), cached (few periods exist;
    the cache is bounded anyway, since a period is whatever an event says)."""
    text = _refresh_text.get(period)
    if text is None:
        if len(_refresh_text) >= 10_000:
            _refresh_text.clear()
        when = refresh_of(period)
        text = _refresh_text[period] = "" if when is None else when.isoformat()
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


def snapshots(entries: Sequence[Flat]) -> Columns:
    """One row per (org, bucket) the batch moves (see the module docstring)."""
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
                     _refresh(per)))  # fmt: skip
    for key, c in merged.items():
        per = c[9]
        rows.append(
            (
                *key, str(c[0]), c[1], _seq_text(c[2]), c[3], _seq_text(c[4]), c[5],
                _seq_text(c[6]), c[7], _seq_text(c[8]), per, _seq_text(c[10]),
                _refresh(per) if per else "",
            )
        )  # fmt: skip
    return tuple(zip(*rows, strict=True))
