-- A faster ledger for years of a large deployment (issue 10 item 4).
--
-- 1. Rollups written by the sync job, not by triggers. Since 0002, statement triggers on
--    usage_daily kept usage_daily_user and usage_daily_feature in step: transition tables
--    captured every upserted row and a PL/pgSQL function re-aggregated them, about a fifth
--    of the sync job's Postgres time. The sync job now upserts all three tables (and
--    usage_daily_model) itself, from the same batch rows, in one statement of the batch's
--    transaction (sync/sql.py), so they stay exactly as exact and exactly-once as before.
--    Anything else that writes usage_daily by hand calls creditgate_derive_usage_rollups()
--    afterwards; creditgate_rebuild_usage_rollups() recomputes every rollup from the ledger.
--
-- 2. ai_token_usage_log partitioned by month of created_at (declarative, RANGE). Inserts
--    touch only the current month's indexes, a month's scan touches one partition, and
--    retention drops a month (`creditgate ledger prune --before YYYY-MM`) instead of
--    deleting rows. Months are created ahead: here (every month holding rows, the current
--    one and the next two) and by the sync job (each month its batches meet, and the month
--    after it: sync/writer.py), with creditgate_usage_log_partition().
--
--    Exactly-once rows: a unique key of a partitioned table must include the partition
--    key, so the key is now PRIMARY KEY (event_id, created_at). created_at is the event's
--    own ts (set once by the Lua script that wrote the event; a redelivery carries the
--    same fields), so a redelivered event has the same (event_id, created_at), lands in the
--    same partition and meets its row there, even across a month boundary. Chosen over a
--    separate unpartitioned event_id table: that would be a second index insert per row
--    (the very cost this issue removes) and a table growing forever that retention could
--    not drop by month. The id column stays (a sequence, the keyset tiebreaker of the
--    audit pages) without an index of its own: nothing references it, and one index fewer
--    per inserted row is part of the speed-up.
--
-- Existing rows are copied into the new table in this migration's transaction (time in
-- proportion to the rows; plan a maintenance window for a very large ledger), then the
-- old table is dropped. The rollups are not touched: they already hold these rows.

DROP TRIGGER usage_daily_inserted ON usage_daily;
DROP TRIGGER usage_daily_updated ON usage_daily;
DROP TRIGGER usage_daily_deleted ON usage_daily;
DROP TRIGGER usage_daily_truncated ON usage_daily;
DROP FUNCTION creditgate_usage_daily_changed();
DROP FUNCTION creditgate_usage_daily_truncated();

-- The old table steps aside under another name (its indexes too: index names share the
-- schema's namespace with the new table's).
ALTER TABLE ai_token_usage_log RENAME TO ai_token_usage_log_unpartitioned;
ALTER INDEX ai_token_usage_log_pkey RENAME TO ai_token_usage_log_unpartitioned_pkey;
ALTER INDEX ai_token_usage_log_event_id_key RENAME TO ai_token_usage_log_unpartitioned_event_id;
ALTER INDEX usage_log_org_created RENAME TO usage_log_unpartitioned_org_created;

-- The same columns in the same order, with their defaults (the id's sequence included),
-- NOT NULLs and CHECKs (LIKE: whatever columns earlier migrations added), so rows copy as
-- they are. Indexes are not copied: the new key and the one index are below.
CREATE TABLE ai_token_usage_log (
    LIKE ai_token_usage_log_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE ai_token_usage_log_id_seq OWNED BY ai_token_usage_log.id;
CREATE INDEX usage_log_org_created ON ai_token_usage_log (organization_id, created_at DESC, id DESC);

-- Row-level security on the parent (0001): readers query the parent, whose policy applies
-- to every partition's rows (and each partition has the same policy, below).
ALTER TABLE ai_token_usage_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ai_token_usage_log
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));

-- Creates the partition of the UTC month holding `month` (any day of it) if it is missing;
-- returns its name when it created it, NULL when it was there. Partitions are named
-- ai_token_usage_log_pYYYYMM (gateway/ledger/partitions.py reads the month from the
-- name). The advisory lock makes two creators of one month take turns instead of one
-- failing on the catalog's unique index.
CREATE FUNCTION creditgate_usage_log_partition(month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month)::date;
    name text := 'ai_token_usage_log_p' || to_char(date_trunc('month', month), 'YYYYMM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('creditgate_usage_log_partition'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF ai_token_usage_log FOR VALUES FROM (%L) TO (%L)',
        name, first::text || ' 00:00:00+00',
        (first + interval '1 month')::date::text || ' 00:00:00+00');
    -- The parent's policy covers reads through the parent; a role granted every table
    -- (GRANT SELECT ON ALL TABLES) could read a partition directly, so each has its own.
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', name);
    EXECUTE format('CREATE POLICY org_isolation ON %I USING (organization_id = '
        'NULLIF(current_setting(''creditgate.org_id'', true), ''''))', name);
    RETURN name;
END $$;

-- Every month holding rows, this month and the next two.
SELECT creditgate_usage_log_partition(m::date)
FROM (SELECT DISTINCT date_trunc('month', created_at, 'UTC') AS m
      FROM ai_token_usage_log_unpartitioned
      UNION
      SELECT date_trunc('month', now(), 'UTC') + n * interval '1 month'
      FROM generate_series(0, 2) AS n) AS months
ORDER BY 1;

INSERT INTO ai_token_usage_log SELECT * FROM ai_token_usage_log_unpartitioned;
DROP TABLE ai_token_usage_log_unpartitioned;

-- The first day of the oldest month the ledger still holds (NULL without partitions):
-- rollups before it are history the ledger no longer has (pruned months).
CREATE FUNCTION creditgate_usage_log_first_day() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT min(to_date(substring(c.relname FROM '_p([0-9]{6})$'), 'YYYYMM'))
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'ai_token_usage_log'::regclass AND c.relkind = 'r'
$$;

-- usage_daily_user and usage_daily_feature from usage_daily, for the days from `since`
-- (all days when NULL): what the triggers did, for anything that writes usage_daily by
-- hand. Returns the rows written.
CREATE FUNCTION creditgate_derive_usage_rollups(since date DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    users bigint;
    features bigint;
BEGIN
    LOCK TABLE usage_daily_user, usage_daily_feature IN EXCLUSIVE MODE;
    DELETE FROM usage_daily_user WHERE since IS NULL OR day >= since;
    DELETE FROM usage_daily_feature WHERE since IS NULL OR day >= since;
    INSERT INTO usage_daily_user (organization_id, day, user_id, requests, tokens)
    SELECT organization_id, day, user_id, sum(requests), sum(tokens)
    FROM usage_daily WHERE since IS NULL OR day >= since
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS users = ROW_COUNT;
    INSERT INTO usage_daily_feature (organization_id, day, feature, token_type, requests, tokens)
    SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)
    FROM usage_daily WHERE since IS NULL OR day >= since
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS features = ROW_COUNT;
    RETURN users + features;
END $$;

-- Every rollup recomputed from the ledger (the sync job's rules: sync/aggregate.py), for
-- the days from `since`, by default the first day the ledger still holds, so the history
-- of pruned months is kept, not wiped. Locks as 0006's model rebuild does (run it as a
-- statement of its own): sync transactions that already wrote rollups are waited for,
-- later ones wait and then add their own rows. Returns the usage_daily rows written.
CREATE FUNCTION creditgate_rebuild_usage_rollups(since date DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    start date := coalesce(since, creditgate_usage_log_first_day(), '-infinity'::date);
    written bigint;
BEGIN
    LOCK TABLE usage_daily, usage_daily_user, usage_daily_feature, usage_daily_model
        IN EXCLUSIVE MODE;
    DELETE FROM usage_daily WHERE day >= start;
    INSERT INTO usage_daily (organization_id, day, feature, user_id, token_type, requests,
        tokens)
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, coalesce(feature_used, ''),
           coalesce(user_id, ''), min(token_type), count(*), sum(tokens_deducted)
    FROM ai_token_usage_log
    WHERE kind IN ('charge', 'refund', 'expired_hold')
      AND created_at >= start::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;
    GET DIAGNOSTICS written = ROW_COUNT;
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
    PERFORM creditgate_derive_usage_rollups(CASE WHEN start = '-infinity' THEN NULL ELSE start END);
    RETURN written;
END $$;
