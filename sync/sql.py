"""The sync job's SQL, and how a batch's rollups and snapshots become its parameters.

Rollups and snapshots reach Postgres as one text parameter per column: the column's values
joined by ``SEP`` (plus a trailing ``SEP``), split again by ``string_to_array``;
``trim_array`` drops the trailing element, which makes a column of one empty value one
element, not zero. Array parameters would cost asyncpg an ``isinstance`` check per element
(it looks for nested arrays), which was the largest share of the worker's time; joining
strings costs next to nothing. In the nullable columns an empty string means NULL. If a
value holds ``SEP`` itself, that statement's columns are sent as typed arrays instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from gateway.alerts.evaluation import alerting_statement
from sync.aggregate import FEATURE_ROLLUP_WIDTH, USER_ROLLUP_WIDTH, Columns
from sync.records import COPY_COLUMNS

SEP = "\x1f"
LOG = "ai_token_usage_log"
TEMP = "cg_sync_in"
# The ledger's column types (migrations 0001, 0006, 0007) that are not text.
_LOG_TYPES = {
    "tokens_deducted": "bigint", "upstream_status": "integer", "latency_ms": "integer",
    "balance_after": "bigint", "extra_after": "bigint", "seq": "bigint",
    "created_at": "timestamptz", "input_tokens": "bigint", "cached_input_tokens": "bigint",
    "output_tokens": "bigint", "reasoning_tokens": "bigint", "reserved": "bigint",
    "overage": "bigint", "usage_missing": "boolean",
}  # fmt: skip
CREATE_TEMP = (
    f"CREATE TEMP TABLE {TEMP} ("
    + ", ".join(f"{n} {_LOG_TYPES.get(n, 'text')}" for n in COPY_COLUMNS)
    + ") ON COMMIT DROP"
)
_COLS = ", ".join(COPY_COLUMNS)
# The safe path: rows whose event is in the ledger already are skipped. The key is
# (event_id, created_at) since the ledger is partitioned by created_at (migration 0010):
# created_at is the event's own ts, so a redelivery has the same key.
INSERT_FROM_TEMP = (
    f"INSERT INTO {LOG} ({_COLS}) SELECT {_COLS} FROM {TEMP}"
    " ON CONFLICT (event_id, created_at) DO NOTHING RETURNING event_id"
)

# The ledger's partition of the month of a day (created when missing; migration 0010).
# lock_timeout: creating a partition locks the ledger's parent table, so a long reader in
# the way fails this (the worker retries the batch later) instead of queueing every
# writer and reader of the ledger behind it.
PARTITION_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"
ENSURE_PARTITION = "SELECT creditgate_usage_log_partition($1::date)"

# Taken first by every batch transaction: writers of one shard take turns.
LOCK = "SELECT pg_advisory_xact_lock($1, $2)"
# The same for a batch folding several shards' entries (sync/worker.py): every shard's
# lock, in shard order (the subquery's sort runs before the aggregate takes them), so two
# such transactions never wait for each other in a cycle.
LOCK_MANY = (
    "SELECT count(pg_advisory_xact_lock($1, s))"
    " FROM (SELECT unnest($2::int[]) AS s ORDER BY 1) AS q"
)

# Orgs first (ai_tokens references them; the FK check runs at the end of the statement
# and sees the CTE's rows), then seq-0 placeholders for buckets the ledger lacks. The
# NOT EXISTS filters are cheaper than letting ON CONFLICT reject rows that exist; ON
# CONFLICT still settles races with other writers (the org may come from the API).
INSERT_ORGS_AND_PLACEHOLDERS = """
WITH orgs AS (
    INSERT INTO organizations (id, plan)
    SELECT o.id, coalesce(o.plan, $3) FROM unnest($1::text[], $2::text[]) AS o(id, plan)
    WHERE NOT EXISTS (SELECT 1 FROM organizations x WHERE x.id = o.id)
    ON CONFLICT (id) DO NOTHING
)
INSERT INTO ai_tokens (organization_id, token_type, seq)
SELECT s.org, s.bucket, 0 FROM unnest($4::text[], $5::text[]) AS s(org, bucket)
WHERE NOT EXISTS (
    SELECT 1 FROM ai_tokens t WHERE t.organization_id = s.org AND t.token_type = s.bucket)
ON CONFLICT (organization_id, token_type) DO NOTHING
"""

# usage_daily_user and usage_daily_feature (0002), in one statement: the batch's rows of
# each, reduced in Python (sync/aggregate.py rollups), one per (org, day, user) and one
# per (org, day, feature). Since 0010 the writer keeps them (0002's statement triggers
# did); until 0015 it also stored usage_daily (org, day, feature, user) and grouped these
# two from it, in SQL: a view of the ledger now, so the statement neither stores nor
# groups those finest rows (grouping in Postgres cost a hash aggregate and a sort per
# table, section 11f). No ORDER BY: writers of the same keys never run at once (the
# shard's advisory lock, sync/writer.py), so the order of the upserts cannot deadlock.
_ROLLUP = """
WITH users AS (
    INSERT INTO usage_daily_user AS u (organization_id, day, user_id, requests, tokens)
    SELECT * FROM {users}
    ON CONFLICT (organization_id, day, user_id) DO UPDATE
        SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens
)
INSERT INTO usage_daily_feature AS f (organization_id, day, feature, token_type, requests,
    tokens)
SELECT * FROM {features}
ON CONFLICT (organization_id, day, feature) DO UPDATE
    SET requests = f.requests + EXCLUDED.requests, tokens = f.tokens + EXCLUDED.tokens
"""
_ROLLUP_TYPES = (
    "text", "date", "text", "bigint", "bigint",  # users
    "text", "date", "text", "text", "bigint", "bigint",  # features
)  # fmt: skip
_ROLLUP_NULLABLE = (False,) * 11

# The same rows when their (org, day) has no row in either table yet (FRESH_DAYS found
# none, under the shard's lock): plain insertions. ON CONFLICT costs each row a probe of
# the key before the insertion (which probes it again), a speculative insertion and its
# confirmation: about twice a plain insertion (BENCHMARKS.md section 11h). Every org's
# first batch of each UTC day is of this kind (and a first start: every batch). A row
# that appears in between (another writer of the org outside the shard's lock: a
# rebuild, a shard count change) fails this with a unique violation; the writer then
# writes the batch again with _ROLLUP (sync/writer.py).
_ROLLUP_FRESH = """
WITH users AS (
    INSERT INTO usage_daily_user (organization_id, day, user_id, requests, tokens)
    SELECT * FROM {users}
)
INSERT INTO usage_daily_feature (organization_id, day, feature, token_type, requests, tokens)
SELECT * FROM {features}
"""

# Which of a batch's (org, day) pairs (by position, from 1) have no rollup row yet, in
# either table: their rows go in by _ROLLUP_FRESH. Every request event writes both tables
# in one transaction (and a rebuild both), so a pair has rows in both or in neither; both
# are looked at all the same, since a guess costs a redone batch.
FRESH_DAYS = """
SELECT p.i FROM unnest($1::text[], $2::date[]) WITH ORDINALITY AS p(org, day, i)
WHERE NOT EXISTS (
    SELECT 1 FROM usage_daily_user x WHERE x.organization_id = p.org AND x.day = p.day)
  AND NOT EXISTS (
    SELECT 1 FROM usage_daily_feature y WHERE y.organization_id = p.org AND y.day = p.day)
"""

_MODEL_ROLLUP = """
INSERT INTO usage_daily_model AS d (organization_id, day, model, requests, tokens,
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, overage, usage_missing)
SELECT * FROM {rows}
ON CONFLICT (organization_id, day, model) DO UPDATE
    SET requests = d.requests + EXCLUDED.requests, tokens = d.tokens + EXCLUDED.tokens,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
        overage = d.overage + EXCLUDED.overage,
        usage_missing = d.usage_missing + EXCLUDED.usage_missing
"""
_MODEL_ROLLUP_TYPES = ("text", "date", "text", *("bigint",) * 8)
_MODEL_ROLLUP_NULLABLE = (False,) * 11

# Each column takes the batch's newest non-empty value only if that value's seq is newer
# than the row's (NULL > x is not true, so a column the batch never set stays).
_UPDATE_SNAPSHOTS = """
UPDATE ai_tokens AS t SET
    balance = CASE WHEN s.bal_seq > t.seq THEN s.bal ELSE t.balance END,
    extra = CASE WHEN s.x_seq > t.seq THEN s.x ELSE t.extra END,
    total_allocated = CASE WHEN s.a_seq > t.seq THEN s.a ELSE t.total_allocated END,
    used = CASE WHEN s.used_seq > t.seq THEN s.used ELSE t.used END,
    period = CASE WHEN s.per_seq > t.seq THEN s.per ELSE t.period END,
    refresh_date = CASE WHEN s.per_seq > t.seq THEN s.refresh ELSE t.refresh_date END,
    seq = s.seq,
    updated_at = now()
FROM {rows}
    AS s(org, bucket, seq, bal, bal_seq, x, x_seq, a, a_seq, used, used_seq, per, per_seq,
         refresh)
WHERE t.organization_id = s.org AND t.token_type = s.bucket AND s.seq > t.seq
"""
_SNAP_TYPES = (
    "text", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint",
    "bigint", "bigint", "text", "bigint", "timestamptz",
)  # fmt: skip
_SNAP_NULLABLE = (False, False, *(True,) * 12)

# Without alerts, buckets the writer has not seen get their rows with the batch's
# snapshot already in them: INSERT_ORGS_AND_PLACEHOLDERS followed by _UPDATE_SNAPSHOTS
# would write each such row twice and check its foreign key twice (Postgres checks it
# again when a row inserted by the same transaction is updated), the larger part of a
# first start's cost per bucket (BENCHMARKS.md section 11h). Each value is what the
# update makes of a seq-0 placeholder: a column whose seq is newer than 0 takes the
# batch's value, the others keep 0001's defaults (0, 0, 0, 0, '', NULL), and a row whose
# seq is not newer than 0 stays a placeholder. Buckets that exist (another writer, or a
# memory emptied by a restart) are left to the update, which runs whenever one was
# skipped (sync/writer.py). It returns the rows inserted and, of those, the rows moved.
# Orgs first, as in INSERT_ORGS_AND_PLACEHOLDERS ($15-$17: ids, plans, the default plan).
_INSERT_SNAPSHOTS = """
WITH orgs AS (
    INSERT INTO organizations (id, plan)
    SELECT o.id, coalesce(o.plan, $17) FROM unnest($15::text[], $16::text[]) AS o(id, plan)
    WHERE NOT EXISTS (SELECT 1 FROM organizations x WHERE x.id = o.id)
    ON CONFLICT (id) DO NOTHING
), ins AS (
    INSERT INTO ai_tokens (organization_id, token_type, balance, extra, total_allocated, used,
        period, refresh_date, seq)
    SELECT s.org, s.bucket,
        CASE WHEN s.seq > 0 AND s.bal_seq > 0 THEN s.bal ELSE 0 END,
        CASE WHEN s.seq > 0 AND s.x_seq > 0 THEN s.x ELSE 0 END,
        CASE WHEN s.seq > 0 AND s.a_seq > 0 THEN s.a ELSE 0 END,
        CASE WHEN s.seq > 0 AND s.used_seq > 0 THEN s.used ELSE 0 END,
        CASE WHEN s.seq > 0 AND s.per_seq > 0 THEN s.per ELSE '' END,
        CASE WHEN s.seq > 0 AND s.per_seq > 0 THEN s.refresh END,
        GREATEST(s.seq, 0)
    FROM {rows}
        AS s(org, bucket, seq, bal, bal_seq, x, x_seq, a, a_seq, used, used_seq, per, per_seq,
             refresh)
    WHERE NOT EXISTS (
        SELECT 1 FROM ai_tokens t WHERE t.organization_id = s.org AND t.token_type = s.bucket)
    ON CONFLICT (organization_id, token_type) DO NOTHING
    RETURNING seq
)
SELECT count(*), count(*) FILTER (WHERE seq > 0) FROM ins
"""

# The same without ON CONFLICT, the form a batch tries first: the NOT EXISTS filters leave
# out every org and bucket committed before the statement began, so a conflict can only
# come from another transaction inserting the same key meanwhile (an org created through
# the API at that moment, a writer of the org outside the shard's lock). ON CONFLICT costs
# each new row a probe before its insertion, a speculative insertion and its confirmation
# (about a fifth of this statement's backend CPU: 312 orgs and 1,560 buckets, 22.8-27.5 ms
# with it, 18.5-21.4 without; BENCHMARKS.md section 11i). A unique violation here rolls the
# batch back and the writer writes it again with _INSERT_SNAPSHOTS (sync/writer.py).
_INSERT_SNAPSHOTS_PLAIN = _INSERT_SNAPSHOTS.replace(
    "    ON CONFLICT (id) DO NOTHING\n", ""
).replace("    ON CONFLICT (organization_id, token_type) DO NOTHING\n", "")
assert "ON CONFLICT" not in _INSERT_SNAPSHOTS_PLAIN

# With alerts: the same update, which also keeps alert_arm from one more column (the
# batch's newest grant/reset seq of the row, or NULL), wrapped in the alert evaluation
# (gateway/alerts/evaluation.py). Its alert parameters follow the 15 columns.
_UPDATE_SNAPSHOTS_ARMED = _UPDATE_SNAPSHOTS.replace(
    "updated_at = now()", "updated_at = now(),\n    alert_arm = GREATEST(t.alert_arm, s.arm)"
).replace("per_seq,\n         refresh)", "per_seq,\n         refresh, arm)")
assert _UPDATE_SNAPSHOTS_ARMED.count("s.arm") == 1 and "refresh, arm)" in _UPDATE_SNAPSHOTS_ARMED
_ALERT_SNAPSHOTS = alerting_statement(_UPDATE_SNAPSHOTS_ARMED, len(_SNAP_TYPES) + 2)

# kind -> (SQL, column types, nullable columns, the widths of its groups of columns: one
# set of rows each, in the SQL's placeholders' order).
_KINDS: dict[str, tuple[str, tuple[str, ...], tuple[bool, ...], tuple[int, ...]]] = {
    "rollup": (_ROLLUP, _ROLLUP_TYPES, _ROLLUP_NULLABLE, (USER_ROLLUP_WIDTH, FEATURE_ROLLUP_WIDTH)),
    "rollup_fresh": (
        _ROLLUP_FRESH,
        _ROLLUP_TYPES,
        _ROLLUP_NULLABLE,
        (USER_ROLLUP_WIDTH, FEATURE_ROLLUP_WIDTH),
    ),
    "insert_snapshots": (_INSERT_SNAPSHOTS, _SNAP_TYPES, _SNAP_NULLABLE, (14,)),
    "insert_snapshots_plain": (_INSERT_SNAPSHOTS_PLAIN, _SNAP_TYPES, _SNAP_NULLABLE, (14,)),
    "model_rollup": (_MODEL_ROLLUP, _MODEL_ROLLUP_TYPES, _MODEL_ROLLUP_NULLABLE, (11,)),
    "snapshots": (_UPDATE_SNAPSHOTS, _SNAP_TYPES, _SNAP_NULLABLE, (14,)),
    "alert_snapshots": (_ALERT_SNAPSHOTS, (*_SNAP_TYPES, "bigint"), (*_SNAP_NULLABLE, True), (15,)),
}
assert all(len(t) == len(n) == sum(g) for _, t, n, g in _KINDS.values())


def _unnest(types: Sequence[str], nullable: Sequence[bool], packed: bool, first: int = 1) -> str:
    cols = []
    for i, (typ, null) in enumerate(zip(types, nullable, strict=True), start=first):
        if packed:
            null_arg = ", ''" if null else ""
            cols.append(f"trim_array(string_to_array(${i}, E'\\x1f'{null_arg}), 1)::{typ}[]")
        else:
            cols.append(f"${i}::{typ}[]")
    return "unnest(" + ", ".join(cols) + ")"


def _format(sql: str, types: Sequence[str], nullable: Sequence[bool], groups: Sequence[int],
            packed: bool) -> str:  # fmt: skip
    if len(groups) == 1:
        return sql.format(rows=_unnest(types, nullable, packed))
    users = groups[0]  # then the features' columns
    return sql.format(
        users=_unnest(types[:users], nullable[:users], packed),
        features=_unnest(types[users:], nullable[users:], packed, first=users + 1),
    )


_STATEMENTS = {
    (kind, packed): _format(sql, types, nullable, groups, packed)
    for kind, (sql, types, nullable, groups) in _KINDS.items()
    for packed in (True, False)
}


def _typed(value: str, typ: str, nullable: bool) -> Any:
    if nullable and value == "":
        return None
    if typ == "bigint":
        return int(value)
    if typ == "date":
        return date.fromisoformat(value)
    if typ == "timestamptz":
        return datetime.fromisoformat(value)
    return value


def _starts(groups: Sequence[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for width in groups:
        out.append((at, width))
        at += width
    return out


def statement(kind: str, columns: Columns) -> tuple[str, list[Any]]:
    """The ``"rollup"`` or ``"rollup_fresh"`` (the user rows' columns, then the feature
    rows'), ``"model_rollup"``, ``"snapshots"``, ``"insert_snapshots"`` or
    ``"insert_snapshots_plain"`` (the snapshots' columns; the caller appends the new orgs'
    parameters; it returns one row: rows inserted,
    rows moved) or ``"alert_snapshots"`` (the snapshots' columns plus the arm column; it
    returns one row: snapshots moved, alerts inserted) statement and its parameters for
    ``columns``."""
    _, types, nullable, groups = _KINDS[kind]
    # Each group's columns hold as many values as its first one.
    sizes = [len(columns[at]) for at, width in _starts(groups) for _ in range(width)]
    # A column passed more than once (the snapshots' seq) is joined and checked once.
    joined: dict[int, str] = {}
    packed = []
    for col, n in zip(columns, sizes, strict=True):
        text = joined.get(id(col))
        if text is None:
            text = joined[id(col)] = SEP.join(col) + SEP
            if text.count(SEP) != n:
                break
        packed.append(text)
    else:
        return _STATEMENTS[(kind, True)], packed
    arrays = [
        [_typed(v, typ, null) for v in col]
        for col, typ, null in zip(columns, types, nullable, strict=True)
    ]
    return _STATEMENTS[(kind, False)], arrays
