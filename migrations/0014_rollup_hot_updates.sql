-- The sync job's rollup upserts as HOT updates (sync/sql.py _ROLLUP; measured with
-- bench/sync_throughput.py's warm pass, BENCHMARKS.md section 11c).
--
-- In a deployment that has run for a while, most of a batch's usage_daily_user and
-- usage_daily_feature rows exist already, so the rollup statement's ON CONFLICT takes
-- the UPDATE branch. 0002 made the sums part of both primary keys (INCLUDE) and of
-- usage_daily_feature_day, for index-only scans: an update that changes an indexed
-- column can never be HOT, so every increment wrote a new row version elsewhere and a
-- new entry in every index of the table. Without the sums in any index, and with room on
-- each page (fillfactor 50, as 0004 did for usage_daily and ai_tokens), the increment
-- stays on its page and touches no index. The reads lose their index-only scans: a
-- window of one org fetches its rows from the heap (about 10 % slower on 5,400 rows of a
-- 200-user org in 30 days); their rows of the current day were never all-visible anyway,
-- since the sync job updates them all day.
--
-- Only pages written from now on get the room (as in 0004); the indexes are rebuilt here.
ALTER TABLE usage_daily_user
    DROP CONSTRAINT usage_daily_user_pkey,
    ADD PRIMARY KEY (organization_id, day, user_id);
ALTER TABLE usage_daily_user SET (fillfactor = 50);

ALTER TABLE usage_daily_feature
    DROP CONSTRAINT usage_daily_feature_pkey,
    ADD PRIMARY KEY (organization_id, day, feature);
ALTER TABLE usage_daily_feature SET (fillfactor = 50);

-- Windows over every org (admin: top spenders, usage by feature and day), by day.
DROP INDEX usage_daily_feature_day;
CREATE INDEX usage_daily_feature_day ON usage_daily_feature (day);
