-- usage_daily becomes a view (issue 10 item 4; BENCHMARKS.md section 11f).
--
-- usage_daily (org, day, feature, user) was the finest rollup and the costliest to keep:
-- nearly every event of a sync batch has a key of its own there, so it was about 40 % of
-- the rows the sync job's rollup statement wrote, and no API reads it (/stats, /usage by
-- day, the admin windows and the forecast read usage_daily_user, usage_daily_feature and
-- usage_daily_model). The sync job now stops writing it and derives usage_daily_user and
-- usage_daily_feature straight from the batch's rows (sync/sql.py _ROLLUP).
--
-- A view of the same name and columns takes its place, so SQL of your own over
-- usage_daily keeps working and gives the same rows: it groups the ledger's request events
-- (the sync job's rule: charge, refund and expired_hold, per UTC day) and adds the months
-- the ledger no longer holds (retention, `creditgate ledger prune`) from
-- usage_daily_pruned, which keeps their per-(feature, user) sums: the rows of such months
-- as they stood here, and each month a prune drops from then on (gateway/ledger/
-- partitions.py archives it before dropping it). The view is security_invoker: a reader is
-- held to the row-level security of the ledger and of usage_daily_pruned, as it was to
-- usage_daily's own. It reads the ledger, so a query over it costs a scan of the ledger's
-- rows it covers (filter by organization_id: the ledger's index leads with it); it
-- cannot be written (write ai_token_usage_log, then creditgate_rebuild_usage_rollups()).

-- The per-(org, day, feature, user) sums of months the ledger no longer holds.
CREATE TABLE usage_daily_pruned (
    organization_id text NOT NULL,
    day             date NOT NULL,
    feature         text NOT NULL,
    user_id         text NOT NULL DEFAULT '',
    token_type      text NOT NULL,
    requests        bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, feature, user_id)
);
ALTER TABLE usage_daily_pruned ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON usage_daily_pruned
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));

-- The rows of months without a ledger partition (pruned before this migration) are
-- history only usage_daily held; every other row is what the ledger's events sum to, and
-- the view computes it from them.
INSERT INTO usage_daily_pruned
SELECT organization_id, day, feature, user_id, token_type, requests, tokens
FROM usage_daily
WHERE to_regclass('ai_token_usage_log_p' || to_char(day, 'YYYYMM')) IS NULL;

DROP TABLE usage_daily;

CREATE VIEW usage_daily WITH (security_invoker = true) AS
SELECT organization_id, day, feature, user_id, token_type, requests, tokens
FROM usage_daily_pruned
UNION ALL
SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, coalesce(feature_used, ''),
       coalesce(user_id, ''), min(token_type), count(*), sum(tokens_deducted)::bigint
FROM ai_token_usage_log
WHERE kind IN ('charge', 'refund', 'expired_hold')
GROUP BY 1, 2, 3, 4;

-- Archives one month of the ledger in usage_daily_pruned, per (org, day, feature, user),
-- before a prune drops it (gateway/ledger/partitions.py; the month's partition is passed
-- by name, so only its rows are read). Adds to rows already there: a month pruned, then
-- recreated by a late event and pruned again. Returns the rows written.
CREATE FUNCTION creditgate_archive_usage_month(partition regclass) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
BEGIN
    EXECUTE format(
        'INSERT INTO usage_daily_pruned AS p (organization_id, day, feature, user_id,'
        ' token_type, requests, tokens)'
        ' SELECT organization_id, (created_at AT TIME ZONE ''UTC'')::date,'
        ' coalesce(feature_used, ''''), coalesce(user_id, ''''), min(token_type), count(*),'
        ' sum(tokens_deducted) FROM %s'
        ' WHERE kind IN (''charge'', ''refund'', ''expired_hold'')'
        ' GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4'
        ' ON CONFLICT (organization_id, day, feature, user_id) DO UPDATE'
        ' SET requests = p.requests + EXCLUDED.requests, tokens = p.tokens + EXCLUDED.tokens',
        partition);
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END $$;

-- 0010's definition read usage_daily's rows and rewrote them; usage_daily is a view now.
-- usage_daily_user and usage_daily_feature are grouped from the ledger itself (the sync
-- job's rule: sync/sql.py), usage_daily_model as before, for the days from `since`, by
-- default the first day the ledger still holds (pruned history is kept, not wiped). Locks
-- as before (run it as a statement of its own). Returns the rollup rows written (user,
-- feature and model).
CREATE OR REPLACE FUNCTION creditgate_rebuild_usage_rollups(since date DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    start date := coalesce(since, creditgate_usage_log_first_day(), '-infinity'::date);
    users bigint;
    features bigint;
    models bigint;
BEGIN
    LOCK TABLE usage_daily_user, usage_daily_feature, usage_daily_model IN EXCLUSIVE MODE;
    DELETE FROM usage_daily_user WHERE day >= start;
    INSERT INTO usage_daily_user (organization_id, day, user_id, requests, tokens)
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, coalesce(user_id, ''),
           count(*), sum(tokens_deducted)
    FROM ai_token_usage_log
    WHERE kind IN ('charge', 'refund', 'expired_hold')
      AND created_at >= start::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS users = ROW_COUNT;
    DELETE FROM usage_daily_feature WHERE day >= start;
    INSERT INTO usage_daily_feature (organization_id, day, feature, token_type, requests,
        tokens)
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, coalesce(feature_used, ''),
           min(token_type), count(*), sum(tokens_deducted)
    FROM ai_token_usage_log
    WHERE kind IN ('charge', 'refund', 'expired_hold')
      AND created_at >= start::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS features = ROW_COUNT;
    DELETE FROM usage_daily_model WHERE day >= start;
    INSERT INTO usage_daily_model (organization_id, day, model, requests, tokens,
        input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, overage,
        usage_missing)
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, coalesce(model, ''),
           count(*), sum(tokens_deducted), coalesce(sum(input_tokens), 0),
           coalesce(sum(cached_input_tokens), 0), coalesce(sum(output_tokens), 0),
           coalesce(sum(reasoning_tokens), 0), sum(overage), count(*) FILTER (WHERE usage_missing)
    FROM ai_token_usage_log
    WHERE kind IN ('charge', 'refund', 'expired_hold')
      AND (cost_source IS NOT NULL OR model IS NOT NULL)
      AND created_at >= start::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS models = ROW_COUNT;
    RETURN users + features + models;
END $$;

-- 0010's creditgate_derive_usage_rollups() recomputed usage_daily_user and
-- usage_daily_feature from usage_daily after it was written by hand. It still works (it
-- reads the view: the ledger and the pruned months), and it is no longer needed for
-- anything the sync job writes.
