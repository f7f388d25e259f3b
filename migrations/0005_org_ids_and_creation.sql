-- Organizations: what an id may be, and which orgs were created on purpose.
--
-- configured_at: when the org was first put on a plan on purpose (`PUT /admin/orgs/{org}`,
-- `creditgate orgs set-plan`, the library's set_plan, a Stripe subscription, or a grant or
-- key for a new org; gateway/ledger/store.py Store.set_plan). The sync job also inserts an
-- org's row when it meets the org's first events (sync/sql.py), and that row says nothing
-- about whether anyone created the org: it leaves configured_at NULL. So "was this org
-- created by this call" is exact even when the sync job wrote the row a moment before
-- (it moves the very plan_change event the call queued in Redis). Orgs that exist before
-- this migration count as configured: nobody can tell their rows apart any more.
ALTER TABLE organizations ADD COLUMN configured_at timestamptz;
UPDATE organizations SET configured_at = created_at;

-- The id rule of gateway/core/ids.py (ID_PATTERN: 1-200 printable ASCII characters, no
-- spaces), so the ledger accepts exactly the ids every entry point accepts. NOT VALID: rows
-- written before are not checked (an update of such a row is).
ALTER TABLE organizations ADD CONSTRAINT organizations_id_rule
    CHECK (id ~ '^[!-~]{1,200}$') NOT VALID;
