-- Per-org override of what threshold alerts watch (contract A11: "rules per org"; the
-- config's `alerts.levels`): the org's buckets (`org`) and the caps of its teams, users
-- and API keys. NULL, as every existing row has, means "the config's default", like the
-- other columns of alert_rules (0008), so no row needs rewriting and nothing changes for
-- an org until the admin API sets it. The admin API refuses anything but distinct known
-- levels, at least one; the CHECK keeps other writers to known levels too.
-- alert_rules' row-level security policy (0008) is per row, so it covers the new column.
ALTER TABLE alert_rules
    ADD COLUMN levels text[]
        CHECK (cardinality(levels) > 0
               AND levels <@ ARRAY['org', 'team', 'user', 'key']::text[]);
