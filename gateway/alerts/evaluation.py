"""Threshold, depleted and recovered alerts, evaluated inside the sync job's batch transaction.

The sync job moves each (org, bucket) snapshot of ``ai_tokens`` forward with one
``UPDATE`` per batch (sync/sql.py). With alerts configured, that ``UPDATE`` becomes the
first part of one statement (:func:`alerting_statement`)::

    WITH upd AS (UPDATE ai_tokens ... RETURNING the snapshot after),
         pre AS (upd LEFT JOIN alert_rules, only rows that could fire),
         cur AS (pre JOIN ai_tokens AS before),
         fired AS (the alerts each row crosses),
         ins AS (INSERT INTO alert_events ... ON CONFLICT DO NOTHING)
    SELECT count(upd), count(ins)

Every part of one statement reads the same snapshot, so ``ai_tokens`` read in ``cur`` is
the row *before* the update while ``upd`` returns it after: before and after of every
bucket the batch touched, compared set-based, with no extra round trip. A bucket under
its lowest threshold, not depleted and not re-armed costs a hash-join probe of the rules
and a few comparisons; only the others read their before state, only crossings insert.

When an alert fires (per bucket, at the org level; the caps of teams, users and API keys
are evaluated by gateway/alerts/levels.py, in the same transaction, into the same outbox
with their own ``level`` and ``scope_id``):

- ``threshold_crossed`` (each threshold): used reaches the threshold now and did not
  before in the same generation (percent of used + remaining, or tokens used);
- ``depleted``: nothing remains (plan and purchased tokens) of a bucket that had some;
- ``recovered``: a grant or reset in this batch (a new generation) takes a bucket that
  was depleted or over its lowest threshold back under every threshold.

A generation is the bucket's period plus ``ai_tokens.alert_arm``, the seq of its newest
grant or reset event (set by the update with GREATEST, so a replay cannot move it). The
outbox's unique key (org, level, scope, bucket, period, kind, threshold, generation) makes
each alert fire
at most once per generation, whatever replays, second workers or refunds that dip under a
threshold and cross it again do; a top-up or a reset re-arms everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.config.alerts import ALERT_LEVELS, AlertsConfig, parse_thresholds

__all__ = ["AlertDefaults", "alerting_statement", "payload_sql"]


@dataclass(frozen=True, slots=True)
class AlertDefaults:
    """The config's rule defaults, as the statement's parameters."""

    pct: tuple[Decimal, ...]
    abs: tuple[int, ...]
    has_url: bool
    forecast: bool
    # The levels alerts watch by default (``alerts.levels``; an org's rule may override
    # them): org buckets (this module) and/or the caps of teams, users and API keys
    # (gateway/alerts/levels.py).
    levels: frozenset[str] = frozenset(ALERT_LEVELS)

    @classmethod
    def of(cls, alerts: AlertsConfig) -> AlertDefaults:
        """From a checked ``alerts`` section."""
        parsed = parse_thresholds(alerts.thresholds)
        return cls(
            pct=tuple(t.value for t in parsed if t.unit == "percent"),
            abs=tuple(int(t.value) for t in parsed if t.unit == "tokens"),
            has_url=alerts.webhook_url is not None,
            forecast=alerts.forecast,
            levels=frozenset(alerts.levels),
        )

    @property
    def default_levels(self) -> list[str]:
        """The default levels as the statements' ``text[]`` parameter (in a fixed order)."""
        return [level for level in ALERT_LEVELS if level in self.levels]

    def params(self) -> list[Any]:
        """Default percents, default token thresholds, whether a default URL exists, the
        lowest of each kind (None: none) and the default levels.

        The levels are a parameter, not a choice of statement: an org's rule may watch a
        level the config does not (``alert_rules.levels``, migration 0013), so both
        statements always run and each row is kept or dropped by its own org's levels."""
        return [
            list(self.pct), list(self.abs), self.has_url,
            min(self.pct, default=None), min(self.abs, default=None),
            self.default_levels,
        ]  # fmt: skip


_ISO = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""


def payload_sql(
    *,
    event_id: str = "f.id",
    kind: str = "f.kind",
    org: str = "f.org",
    bucket: str = "f.bucket",
    threshold: str = "f.thr",
    unit: str = "f.unit",
    used: str = "f.used",
    allocated: str = "f.total_allocated",
    remaining: str = "f.rem",
    period: str = "f.period",
    refresh: str = "f.refresh_date",
    exhaustion: str = "NULL::timestamptz",
) -> str:
    """The SQL expression of an alert's JSON payload (contract A11), from column exprs.

    ``{id, type, created_at, data: {org, level, bucket, threshold?, threshold_unit?, used,
    allocated, remaining, period, refresh_at, projected_exhaustion_at?}}``; absent keys are
    left out, not null. ``created_at`` is the time of the transaction that fired it.
    """
    return f"""json_build_object(
        'id', {event_id}, 'type', 'balance.' || {kind},
        'created_at', {_ISO.format("now()")},
        'data', json_strip_nulls(json_build_object(
            'org', {org}, 'level', 'org', 'bucket', {bucket},
            'threshold', {threshold}, 'threshold_unit', {unit},
            'used', {used}, 'allocated', {allocated}, 'remaining', {remaining},
            'period', {period}, 'refresh_at', {_ISO.format(refresh)},
            'projected_exhaustion_at', {_ISO.format(exhaustion)})))"""


# {update} is sync/sql.py's snapshot UPDATE (which also keeps alert_arm); ${..} are this
# module's parameters. `pre` keeps only rows that can fire anything, judged on the after
# state alone (over the lowest threshold, depleted, or re-armed in this batch), so a bucket
# crossing nothing never costs the join with its before state; and only rows of orgs
# whose levels (their rule's, else the config's) include `org`: threshold, depleted and
# recovered alerts of buckets all belong to that level.
_TAIL = """
WITH upd AS (
    {update}
    RETURNING t.organization_id AS org, t.token_type AS bucket, t.balance, t.extra,
        t.total_allocated, t.used, t.period, t.refresh_date, t.alert_arm, s.arm AS armed
),
pre AS (
    SELECT u.*, u.balance + u.extra AS rem, u.used + u.balance + u.extra AS cap,
        coalesce(r.pct, ${pct}::numeric[]) AS pct, coalesce(r.abs, ${abs}::bigint[]) AS abs
    FROM upd u
    LEFT JOIN alert_rules r ON r.organization_id = u.org
    WHERE (r.webhook_url IS NOT NULL OR ${has_url}::boolean)
      AND 'org' = ANY(coalesce(r.levels, ${levels}::text[]))
      AND (u.armed IS NOT NULL
           OR (u.used + u.balance + u.extra > 0
               AND (u.balance + u.extra = 0
                    OR u.used * 100 >= (CASE WHEN r.pct IS NULL THEN ${min_pct}::numeric
                        ELSE (SELECT min(x) FROM unnest(r.pct) x) END)
                       * (u.used + u.balance + u.extra)
                    OR u.used >= (CASE WHEN r.abs IS NULL THEN ${min_abs}::bigint
                        ELSE (SELECT min(x) FROM unnest(r.abs) x) END))))
),
cur AS (
    SELECT p.*, b.used AS b_used, b.used + b.balance + b.extra AS b_cap,
        b.balance + b.extra AS b_rem,
        (b.period = p.period AND b.alert_arm = p.alert_arm) AS same_gen
    FROM pre p
    JOIN ai_tokens b ON b.organization_id = p.org AND b.token_type = p.bucket
),
fired AS (
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', '') AS id, c.*, k.*
    FROM cur c CROSS JOIN LATERAL (
        SELECT 'threshold_crossed' AS kind, p::text || '%' AS key, p AS thr,
            'percent' AS unit
        FROM unnest(c.pct) AS p
        WHERE c.cap > 0 AND c.used * 100 >= p * c.cap
          AND NOT (c.same_gen AND c.b_cap > 0 AND c.b_used * 100 >= p * c.b_cap)
        UNION ALL
        SELECT 'threshold_crossed', a::text, a, 'tokens'
        FROM unnest(c.abs) AS a
        WHERE c.used >= a AND NOT (c.same_gen AND c.b_used >= a)
        UNION ALL
        SELECT 'depleted', '', NULL, NULL
        WHERE c.cap > 0 AND c.rem = 0 AND NOT (c.same_gen AND c.b_cap > 0 AND c.b_rem = 0)
        UNION ALL
        SELECT 'recovered', '', NULL, NULL
        WHERE NOT c.same_gen AND c.rem > 0 AND c.b_cap > 0
          AND (c.b_rem = 0
               OR EXISTS (SELECT 1 FROM unnest(c.pct) p WHERE c.b_used * 100 >= p * c.b_cap)
               OR EXISTS (SELECT 1 FROM unnest(c.abs) a WHERE c.b_used >= a))
          AND NOT EXISTS (SELECT 1 FROM unnest(c.pct) p WHERE c.used * 100 >= p * c.cap)
          AND NOT EXISTS (SELECT 1 FROM unnest(c.abs) a WHERE c.used >= a)
    ) AS k
),
ins AS (
    INSERT INTO alert_events (id, organization_id, level, scope_id, token_type, period,
        kind, threshold, generation, payload)
    SELECT f.id, f.org, 'org', '', f.bucket, f.period, f.kind, f.key, f.alert_arm,
        {payload}
    FROM fired f
    ON CONFLICT (organization_id, level, scope_id, token_type, period, kind, threshold,
        generation) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd) AS snapshots, (SELECT count(*) FROM ins) AS alerts
"""


def alerting_statement(update_sql: str, first: int) -> str:
    """``update_sql`` (an ``UPDATE ai_tokens AS t ... FROM ... AS s(...)`` whose ``s`` has
    an ``arm`` column: the batch's newest grant/reset seq of the row, or NULL) as the
    statement described in the module docstring; :meth:`AlertDefaults.params` follow the
    update's parameters, numbered from ``first``."""
    return _TAIL.format(
        update=update_sql.strip(),
        pct=first,
        abs=first + 1,
        has_url=first + 2,
        min_pct=first + 3,
        min_abs=first + 4,
        levels=first + 5,
        payload=payload_sql(),
    )
