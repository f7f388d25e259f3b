"""Threshold alerts of team, user and API-key caps (contracts A10, A11), evaluated inside
the sync job's batch transaction.

What a capped level drew and its cap come with the request events themselves (``lv``,
written by settle.lua and sweep_holds.lua from the counters charge.lua enforces; see
sync/levels.py): no cap is resolved and nothing is summed here, so the figures are exactly
those admission used, and an org without caps has no such events and pays nothing.
sync/levels.py reduces a batch to one row per (org, level, id, bucket, period, cap) with
the highest used; :data:`CAP_ALERTS` takes those rows and, in one statement:

- joins the org's rule (``alert_rules``: its thresholds, URL and levels override the
  config's, never another org's: the join is on the row's own org) and keeps the rows of
  the levels the org watches;
- keeps the thresholds the level has reached: percent of the cap (``used * 100 >= p *
  cap``, a cap of 0 reaches none) or tokens used (``used >= N``);
- skips those already in the outbox (an index probe of its unique key), builds the
  payload of the rest and inserts them ``ON CONFLICT DO NOTHING``.

Once per (org, level, id, bucket, period, threshold, generation), whatever replays,
second workers or refunds that dip under a threshold do. The generation of a percent
threshold is the cap in tokens: a cap changed (raised, lowered, or a share of an
allocation that a plan change moved) re-arms the level's percent thresholds, which fire
again when used reaches them against the new cap; going back to a cap already alerted on
in the period does not fire again. A token threshold measures used alone, so its
generation is 0: only a new period re-arms it. A new period re-arms everything (the
period is in the key). Only ``threshold_crossed`` is written for levels: 100% is "the cap
is reached"; depleted, recovered and forecast stay org-level (contract A11).
"""

from __future__ import annotations

__all__ = ["CAP_ALERTS", "CAP_LEVELS", "level_payload_sql"]

# The levels with caps (contract A10): what :data:`CAP_ALERTS` evaluates; ``org`` (buckets)
# is gateway/alerts/evaluation.py's.
CAP_LEVELS: frozenset[str] = frozenset({"team", "user", "key"})

_ISO = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""


def level_payload_sql(alias: str = "c") -> str:
    """The JSON payload of a cap alert (contract A11) from the columns of ``alias``.

    ``{id, type: balance.threshold_crossed, created_at, data: {org, level, team | user |
    key, bucket, threshold, threshold_unit, cap, used, allocated, remaining, period,
    refresh_at}}``: ``allocated`` is the cap (what the level may draw this period, the
    same figure as ``cap``) and ``remaining`` what is left of it; absent keys are left out.
    """
    a = alias
    return f"""json_build_object(
        'id', {a}.id, 'type', 'balance.threshold_crossed',
        'created_at', {_ISO.format("now()")},
        'data', json_strip_nulls(json_build_object(
            'org', {a}.org, 'level', {a}.level,
            'team', CASE WHEN {a}.level = 'team' THEN {a}.scope END,
            'user', CASE WHEN {a}.level = 'user' THEN {a}.scope END,
            'key', CASE WHEN {a}.level = 'key' THEN {a}.scope END,
            'bucket', {a}.bucket, 'threshold', {a}.thr, 'threshold_unit', {a}.unit,
            'cap', {a}.cap, 'used', {a}.used, 'allocated', {a}.cap,
            'remaining', greatest({a}.cap - {a}.used, 0),
            'period', {a}.period, 'refresh_at', {_ISO.format(f"{a}.refresh_date")})))"""


# $1..$7: the batch's level rows (sync/levels.py level_columns); $8, $9, $10, $11: the
# config's default percents, token thresholds, whether a default URL exists and levels
# (AlertDefaults.params). An org without a URL (its own or the default) fires nothing, nor
# a level its levels (its own or the default) leave out.
CAP_ALERTS = f"""
WITH f AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::bigint[], $7::bigint[]) AS f(org, level, scope, bucket, period, cap, used)
),
pre AS (
    SELECT f.*, coalesce(r.pct, $8::numeric[]) AS pct, coalesce(r.abs, $9::bigint[]) AS abs
    FROM f
    LEFT JOIN alert_rules r ON r.organization_id = f.org
    WHERE (r.webhook_url IS NOT NULL OR $10::boolean)
      AND f.level = ANY(coalesce(r.levels, $11::text[]))
),
crossed AS (
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', '') AS id, p.org, p.level,
        p.scope, p.bucket, p.period, p.cap, p.used, k.key, k.thr, k.unit, k.gen,
        t.refresh_date
    FROM pre p
    CROSS JOIN LATERAL (
        SELECT x::text || '%' AS key, x AS thr, 'percent' AS unit, p.cap AS gen
        FROM unnest(p.pct) AS x
        WHERE p.cap > 0 AND p.used * 100 >= x * p.cap
        UNION ALL
        SELECT a::text, a, 'tokens', 0::bigint
        FROM unnest(p.abs) AS a
        WHERE p.used >= a
    ) AS k
    LEFT JOIN ai_tokens t ON t.organization_id = p.org AND t.token_type = p.bucket
    WHERE NOT EXISTS (
        SELECT 1 FROM alert_events e
        WHERE e.organization_id = p.org AND e.level = p.level AND e.scope_id = p.scope
          AND e.token_type = p.bucket AND e.period = p.period
          AND e.kind = 'threshold_crossed' AND e.threshold = k.key AND e.generation = k.gen)
),
ins AS (
    INSERT INTO alert_events (id, organization_id, level, scope_id, token_type, period,
        kind, threshold, generation, payload)
    SELECT c.id, c.org, c.level, c.scope, c.bucket, c.period, 'threshold_crossed', c.key,
        c.gen, {level_payload_sql("c")}
    FROM crossed c
    ON CONFLICT (organization_id, level, scope_id, token_type, period, kind, threshold,
        generation) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM ins
"""
