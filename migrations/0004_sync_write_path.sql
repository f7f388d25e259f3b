-- Storage settings for the sync job's write path (sync/writer.py; measured with
-- bench/sync_throughput.py).
--
-- Every sync batch updates rows of usage_daily (rollup increments) and ai_tokens (balance
-- snapshots) in place. At the default fillfactor (100) a page has no room for the new row
-- version, so each update is a non-HOT update (a new entry in every index, and about three
-- times the cost of a HOT update, which stays on its page). Half-empty pages keep these
-- updates HOT. Only pages written from now on get the room.
ALTER TABLE usage_daily SET (fillfactor = 50);
ALTER TABLE ai_tokens SET (fillfactor = 50);

-- Since 0002, nothing reads usage_daily by day (stats and admin windows read
-- usage_daily_feature and usage_daily_user); this index only cost every rollup insert.
DROP INDEX IF EXISTS usage_daily_day;
