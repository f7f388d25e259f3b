-- Alerts (contract A11): per-org rule overrides, the outbox of alert events with their
-- delivery state, every delivery attempt, and the state of each webhook endpoint.
-- Depends only on 0001 (organizations, ai_tokens); see docs/ARCHITECTURE.md "Alerts".

-- The arm generation of each bucket: the seq of its newest grant or reset event. An alert
-- fires once per generation (it is part of the outbox key below), so a top-up or a reset
-- re-arms every threshold without deleting anything; the sync job sets it with GREATEST,
-- so a replayed batch cannot move it.
ALTER TABLE ai_tokens ADD COLUMN alert_arm bigint NOT NULL DEFAULT 0;

-- Per-org overrides of the config's `alerts` defaults; a NULL column means "the default".
-- pct/abs are the thresholds split by unit for the set-based evaluation; `thresholds`
-- keeps them as given, for the admin API.
CREATE TABLE alert_rules (
    organization_id text PRIMARY KEY REFERENCES organizations(id),
    webhook_url     text,
    thresholds      jsonb,
    pct             numeric[],
    abs             bigint[],
    forecast        boolean,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The outbox. One row per alert, written in the transaction that caused it. The unique
-- key is the alert's identity: a replayed batch, a second sync worker or a second
-- forecast sweep inserts ON CONFLICT DO NOTHING. `level` and `scope_id` are ready for
-- team/user/key caps (contract A10); the org level has scope_id ''.
CREATE TABLE alert_events (
    id              text PRIMARY KEY,                 -- the webhook-id, msg_...
    organization_id text NOT NULL,
    level           text NOT NULL CHECK (level IN ('org', 'team', 'user', 'key')),
    scope_id        text NOT NULL DEFAULT '',
    token_type      text NOT NULL,
    period          text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('threshold_crossed', 'depleted', 'recovered',
                        'forecast_exhaustion')),
    threshold       text NOT NULL DEFAULT '',         -- '80%', '500' (tokens) or ''
    generation      bigint NOT NULL DEFAULT 0,
    payload         json NOT NULL,                    -- json, not jsonb: the bytes signed
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    retry_from      timestamptz NOT NULL DEFAULT now(),   -- retried until retry_hours after
    delivered_at    timestamptz,
    last_error      text,
    UNIQUE (organization_id, level, scope_id, token_type, period, kind, threshold, generation)
);
-- The deliverer's claim: due pending rows only (delivered ones never slow it down).
CREATE INDEX alert_events_due ON alert_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX alert_events_org ON alert_events (organization_id, created_at DESC);
CREATE INDEX alert_events_status ON alert_events (status);

-- Every attempt of every delivery (the admin API lists them).
CREATE TABLE alert_attempts (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL REFERENCES alert_events(id) ON DELETE CASCADE,
    organization_id text NOT NULL,
    url             text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('delivered', 'failed')),
    response_code   integer,
    error           text,
    duration_ms     integer
);
CREATE INDEX alert_attempts_event ON alert_attempts (event_id, id);

-- Webhook endpoints by URL: failing since when, and disabled after failing for days.
CREATE TABLE alert_endpoints (
    url             text PRIMARY KEY,
    failing_since   timestamptz,
    disabled_at     timestamptz,
    last_success_at timestamptz,
    last_failure_at timestamptz,
    last_error      text
);

ALTER TABLE alert_rules    ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_events   ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_attempts ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON alert_rules
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON alert_events
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON alert_attempts
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
