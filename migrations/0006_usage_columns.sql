-- What an AI call cost (issue 8, DESIGN A8): the audit row carries the model, the usage the
-- provider reported, the reserve, the overage and where the charge came from; a daily
-- rollup per model feeds /stats, /admin/usage and the dashboards.
--
-- Every new column of ai_token_usage_log is nullable or has a default, so the rows written
-- before stay valid as they are (ADD COLUMN with a constant default rewrites nothing). The
-- sync job (sync/records.py) fills them from the audit event's fields rs, ov, mdl, ui, uc,
-- uo, ur, cs, um (gateway/core/events.py); events without them (fixed-cost requests,
-- grants, resets, events written before) leave NULL, 0 and false.
--   tokens_deducted stays the net tokens taken from the balance; the actual charge of a
--   request is tokens_deducted + overage (overage: what the balance could not cover).
ALTER TABLE ai_token_usage_log
    ADD COLUMN model               text,
    ADD COLUMN input_tokens        bigint,   -- uncached input tokens, as the provider reported
    ADD COLUMN cached_input_tokens bigint,
    ADD COLUMN output_tokens       bigint,
    ADD COLUMN reasoning_tokens    bigint,
    ADD COLUMN reserved            bigint,   -- tokens held at admission
    ADD COLUMN overage             bigint NOT NULL DEFAULT 0,
    ADD COLUMN cost_source         text,     -- usage | header | app | policy | reservation
    ADD COLUMN usage_missing       boolean NOT NULL DEFAULT false;

-- Per (org, UTC day, model): the request events (charge, refund, expired_hold) whose cost
-- came from the call (a cost source) or that name a model. model is '' when none was
-- reported (a header or app cost, usage that never came). tokens is the sum of
-- tokens_deducted; the token counts treat NULL as 0; usage_missing counts the requests
-- whose usage was missing. Kept exact by the sync job in the same transaction as the log
-- rows (one set-based upsert per batch, from the rows actually inserted), and rebuildable
-- from the log with creditgate_rebuild_usage_daily_model() below.
CREATE TABLE usage_daily_model (
    organization_id     text NOT NULL,
    day                 date NOT NULL,
    model               text NOT NULL,
    requests            bigint NOT NULL DEFAULT 0,
    tokens              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    reasoning_tokens    bigint NOT NULL DEFAULT 0,
    overage             bigint NOT NULL DEFAULT 0,
    usage_missing       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, model)
) WITH (fillfactor = 50);  -- room for HOT updates of the sums (see 0004)
-- Windows over every org (admin usage by model).
CREATE INDEX usage_daily_model_day ON usage_daily_model (day);

-- Same row-level security as the other per-org tables (see 0001_core.sql).
ALTER TABLE usage_daily_model ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON usage_daily_model
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));

-- Recomputes usage_daily_model from ai_token_usage_log (the same rule as the sync job's
-- sync/aggregate.py model_rollups) and returns the number of rows it wrote. The table
-- lock waits for sync transactions that already upserted rollups and holds off the next
-- ones until the rebuild commits, whose log rows the rebuild then does not see and their
-- own upserts add: run it as a statement of its own (READ COMMITTED, the default), e.g.
--   SELECT creditgate_rebuild_usage_daily_model();
CREATE FUNCTION creditgate_rebuild_usage_daily_model() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
BEGIN
    LOCK TABLE usage_daily_model IN EXCLUSIVE MODE;
    DELETE FROM usage_daily_model;
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
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END $$;

-- Rows written before this migration name no model and no cost source: nothing to add,
-- but the rule is the rule.
SELECT creditgate_rebuild_usage_daily_model();
