-- creditgate core schema: organizations, API keys, the token ledger and its rollups.
-- Forward-only. Applied by `creditgate migrate` (gateway/migrate.py) inside one
-- transaction under an advisory lock, and recorded in creditgate_schema_migrations.

-- An organization and its current plan. Redis caches the plan in the org's hash.
CREATE TABLE organizations (
    id          text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
    plan        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys: only the SHA-256 of the key is stored; the key itself is shown once.
CREATE TABLE api_keys (
    id              text PRIMARY KEY,                 -- "key_" + 16 hex, printable handle
    organization_id text NOT NULL REFERENCES organizations(id),
    user_id         text,
    name            text NOT NULL DEFAULT '',
    key_hash        bytea NOT NULL UNIQUE,            -- sha256(full key)
    prefix          text NOT NULL,                    -- first characters, for humans
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_org ON api_keys (organization_id);

-- One row per org and bucket: the balance snapshot, kept in step with Redis by the
-- sync job. `seq` is the org's event sequence number the snapshot reflects; the sync
-- job only moves a snapshot forward (a newer seq), never back.
CREATE TABLE ai_tokens (
    organization_id text NOT NULL REFERENCES organizations(id),
    token_type      text NOT NULL,                    -- bucket name
    balance         bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),   -- plan tokens left
    extra           bigint NOT NULL DEFAULT 0 CHECK (extra >= 0),     -- purchased tokens left
    total_allocated bigint NOT NULL DEFAULT 0,        -- plan allocation this period
    used            bigint NOT NULL DEFAULT 0,        -- net tokens charged this period
    period          text NOT NULL DEFAULT '',         -- period id, e.g. 2026-11
    refresh_date    timestamptz,                      -- when the next reset happens
    seq             bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, token_type)
);

-- The audit trail: one row per metered request that reached the upstream, and one per
-- grant, plan change, reset, expiry and repair. tokens_deducted is the net change taken
-- from the org's balance (negative when tokens were added), so that for every bucket
--   balance_now = balance_at(seq0) - sum(tokens_deducted where seq > seq0).
CREATE TABLE ai_token_usage_log (
    id               bigserial PRIMARY KEY,
    event_id         text NOT NULL UNIQUE,            -- idempotency of the sync job
    organization_id  text NOT NULL,
    user_id          text,
    feature_used     text,
    token_type       text NOT NULL,
    tokens_deducted  bigint NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('charge', 'refund', 'expired_hold', 'grant',
                        'grant_expired', 'plan_change', 'reset', 'repair')),
    request_id       text,
    method           text,
    route            text,
    upstream_status  integer,
    latency_ms       integer,
    balance_after    bigint,
    extra_after      bigint,
    seq              bigint NOT NULL,
    plan             text,
    reference        text,
    created_at       timestamptz NOT NULL,
    synced_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_log_org_created ON ai_token_usage_log (organization_id, created_at DESC, id DESC);

-- Purchased top-ups. `reference` makes a grant idempotent per org.
CREATE TABLE token_grants (
    id              bigserial PRIMARY KEY,
    organization_id text NOT NULL REFERENCES organizations(id),
    token_type      text NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    expires_at      timestamptz,
    reference       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, reference)
);

-- Daily rollups maintained by the sync job, so stats never scan the log.
CREATE TABLE usage_daily (
    organization_id text NOT NULL,
    day             date NOT NULL,
    feature         text NOT NULL,
    user_id         text NOT NULL DEFAULT '',
    token_type      text NOT NULL,
    requests        bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day, feature, user_id)
);
CREATE INDEX usage_daily_day ON usage_daily (day, organization_id);

-- Row-level security keyed by organization. A role without BYPASSRLS sets
--   SET LOCAL creditgate.org_id = '<org>'
-- in its transaction and sees only that org's rows. The table owner (the gateway's own
-- role) is not subject to these policies unless FORCE is set, which it is not.
-- NULLIF: once a session has used SET LOCAL, the setting reads '' (not NULL) after the
-- transaction, and '' must match no org rather than rows with an empty organization_id.
ALTER TABLE organizations      ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys           ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_tokens          ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_token_usage_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE token_grants       ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_daily        ENABLE ROW LEVEL SECURITY;

CREATE POLICY org_isolation ON organizations
    USING (id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON api_keys
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON ai_tokens
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON ai_token_usage_log
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON token_grants
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON usage_daily
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
