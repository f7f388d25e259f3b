-- Coarser usage rollups for the stats endpoints (gateway/stats.py), derived from usage_daily.
--
-- usage_daily has one row per (org, day, feature, user): an org with hundreds of users has
-- tens of thousands of rows a month, and summing them per request is too slow for
-- GET /stats. These two tables hold the same sums at the granularity each answer needs:
--   usage_daily_user     (org, day, user)    -> top users
--   usage_daily_feature  (org, day, feature) -> by feature, by day, the burn rate, and the
--                                               admin's top spenders / usage by feature
-- Each primary key INCLUDEs the sums, so a window of one org is an index-only scan.
--
-- They are kept in step by statement-level triggers on usage_daily (transition tables: one
-- aggregated upsert per statement, not per row), inside the sync job's own transaction, so
-- they are exactly as durable and as exactly-once as usage_daily itself. Rows are upserted
-- in key order, so concurrent sync workers lock them in one order (no deadlocks).

CREATE TABLE usage_daily_user (
    organization_id text NOT NULL,
    day             date NOT NULL,
    user_id         text NOT NULL,
    requests        bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, user_id) INCLUDE (requests, tokens)
);

CREATE TABLE usage_daily_feature (
    organization_id text NOT NULL,
    day             date NOT NULL,
    feature         text NOT NULL,
    token_type      text NOT NULL,
    requests        bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, feature) INCLUDE (token_type, requests, tokens)
);
-- Windows over every org (admin: top spenders, usage by feature and day).
CREATE INDEX usage_daily_feature_day ON usage_daily_feature (day)
    INCLUDE (organization_id, feature, requests, tokens);

-- Adds what a statement changed in usage_daily (as signed deltas) to both derived tables.
-- The key of a usage_daily row never changes in practice; an UPDATE is still taken as
-- "subtract the old row, add the new one", which is right whatever changed.
CREATE FUNCTION creditgate_usage_daily_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO usage_daily_user AS u (organization_id, day, user_id, requests, tokens)
        SELECT organization_id, day, user_id, sum(requests), sum(tokens)
        FROM new_rows GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, user_id) DO UPDATE
            SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens;
        INSERT INTO usage_daily_feature AS f (organization_id, day, feature, token_type,
            requests, tokens)
        SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)
        FROM new_rows GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, feature) DO UPDATE
            SET requests = f.requests + EXCLUDED.requests, tokens = f.tokens + EXCLUDED.tokens;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO usage_daily_user AS u (organization_id, day, user_id, requests, tokens)
        SELECT organization_id, day, user_id, sum(requests), sum(tokens)
        FROM (SELECT organization_id, day, feature, user_id, token_type, requests, tokens
              FROM new_rows
              UNION ALL
              SELECT organization_id, day, feature, user_id, token_type,
                     -requests AS requests, -tokens AS tokens
              FROM old_rows) AS d
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, user_id) DO UPDATE
            SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens;
        INSERT INTO usage_daily_feature AS f (organization_id, day, feature, token_type,
            requests, tokens)
        SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)
        FROM (SELECT organization_id, day, feature, user_id, token_type, requests, tokens
              FROM new_rows
              UNION ALL
              SELECT organization_id, day, feature, user_id, token_type,
                     -requests AS requests, -tokens AS tokens
              FROM old_rows) AS d
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, feature) DO UPDATE
            SET requests = f.requests + EXCLUDED.requests, tokens = f.tokens + EXCLUDED.tokens;
    ELSE  -- DELETE
        INSERT INTO usage_daily_user AS u (organization_id, day, user_id, requests, tokens)
        SELECT organization_id, day, user_id, sum(requests), sum(tokens)
        FROM (SELECT organization_id, day, feature, user_id, token_type,
                     -requests AS requests, -tokens AS tokens
              FROM old_rows) AS d
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, user_id) DO UPDATE
            SET requests = u.requests + EXCLUDED.requests, tokens = u.tokens + EXCLUDED.tokens;
        INSERT INTO usage_daily_feature AS f (organization_id, day, feature, token_type,
            requests, tokens)
        SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)
        FROM (SELECT organization_id, day, feature, user_id, token_type,
                     -requests AS requests, -tokens AS tokens
              FROM old_rows) AS d
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (organization_id, day, feature) DO UPDATE
            SET requests = f.requests + EXCLUDED.requests, tokens = f.tokens + EXCLUDED.tokens;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION creditgate_usage_daily_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE usage_daily_user, usage_daily_feature;
    RETURN NULL;
END $$;

-- An INSERT ... ON CONFLICT DO UPDATE (the sync job's upsert) fires both the INSERT and
-- the UPDATE statement triggers, each with the rows it inserted or updated.
CREATE TRIGGER usage_daily_inserted AFTER INSERT ON usage_daily
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_usage_daily_changed();
CREATE TRIGGER usage_daily_updated AFTER UPDATE ON usage_daily
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_usage_daily_changed();
CREATE TRIGGER usage_daily_deleted AFTER DELETE ON usage_daily
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_usage_daily_changed();
CREATE TRIGGER usage_daily_truncated AFTER TRUNCATE ON usage_daily
    FOR EACH STATEMENT EXECUTE FUNCTION creditgate_usage_daily_truncated();

-- Rollups written before this migration.
INSERT INTO usage_daily_user (organization_id, day, user_id, requests, tokens)
SELECT organization_id, day, user_id, sum(requests), sum(tokens)
FROM usage_daily GROUP BY 1, 2, 3;
INSERT INTO usage_daily_feature (organization_id, day, feature, token_type, requests, tokens)
SELECT organization_id, day, feature, min(token_type), sum(requests), sum(tokens)
FROM usage_daily GROUP BY 1, 2, 3;

-- Same row-level security as the other tables (see 0001_core.sql).
ALTER TABLE usage_daily_user    ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_daily_feature ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON usage_daily_user
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON usage_daily_feature
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
