-- The overage of an org's buckets this period (issue 8: GET /balance shows it per bucket).
--
-- Overage (0006) is recorded only in the audit rows; /balance sums an org's rows with
-- overage > 0 since its period started. Those rows are rare (a call that cost more than
-- the balance could cover), so a partial index holds only them: the sum reads a handful of
-- index entries, never the org's whole month of rows. Created on the partitioned parent
-- (0010), so every monthly partition, present and future, gets its own.
CREATE INDEX usage_log_overage ON ai_token_usage_log (organization_id, created_at, token_type)
    INCLUDE (overage) WHERE overage > 0;
