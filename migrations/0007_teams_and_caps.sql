-- Teams, users and API keys inside an org, with caps (issue 9, DESIGN A10).
--
-- A team belongs to one org; a user (org_users) and an API key may belong to one team of
-- their own org: the foreign keys include the org, so no row can point at another org's
-- team, and deleting a team leaves its members without a team (ON DELETE SET NULL of the
-- team column only). caps are cap overrides per bucket, {"bucket": N | "N%"} (the admin
-- API's spelling; gateway/core/caps.py); plan-level defaults live in the config. Redis
-- mirrors all of it in the org's hash (gateway/metering/levels.py), seeded from here.
CREATE TABLE org_teams (
    organization_id text NOT NULL REFERENCES organizations(id),
    team_id         text NOT NULL CHECK (length(team_id) BETWEEN 1 AND 200),
    name            text NOT NULL DEFAULT '',
    caps            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, team_id)
);

CREATE TABLE org_users (
    organization_id text NOT NULL REFERENCES organizations(id),
    user_id         text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    team_id         text,
    caps            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id),
    FOREIGN KEY (organization_id, team_id) REFERENCES org_teams (organization_id, team_id)
        ON DELETE SET NULL (team_id)
);
CREATE INDEX org_users_team ON org_users (organization_id, team_id);

ALTER TABLE api_keys
    ADD COLUMN team_id text,
    ADD COLUMN caps    jsonb NOT NULL DEFAULT '{}',
    ADD CONSTRAINT api_keys_team FOREIGN KEY (organization_id, team_id)
        REFERENCES org_teams (organization_id, team_id) ON DELETE SET NULL (team_id);
CREATE INDEX api_keys_team ON api_keys (organization_id, team_id);

-- The request's team (event field tm), NULL when it had none or for events of other kinds.
ALTER TABLE ai_token_usage_log ADD COLUMN team_id text;

ALTER TABLE org_teams ENABLE ROW LEVEL SECURITY;
ALTER TABLE org_users ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON org_teams
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
CREATE POLICY org_isolation ON org_users
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
