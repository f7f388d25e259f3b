-- Stripe webhook events creditgate has handled (gateway/webhooks.py).
--
-- `event_id` makes a redelivered event a no-op once it was applied. Events that were
-- ignored (unknown price, no org...) are recorded too, but a redelivery re-evaluates
-- them: after fixing the config, "resend" in Stripe's dashboard applies the event.
-- The latest applied subscription event per org orders plan changes, because Stripe
-- does not deliver events in order.
CREATE TABLE stripe_events (
    event_id        text PRIMARY KEY,
    event_type      text NOT NULL,
    organization_id text,                 -- NULL when the event named no usable org
    object_id       text,                 -- the subscription or checkout session id
    event_created   timestamptz NOT NULL, -- Stripe's `created` of the event
    outcome         text NOT NULL CHECK (outcome IN ('applied', 'ignored', 'stale')),
    detail          text NOT NULL DEFAULT '',
    processed_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX stripe_events_subscriptions
    ON stripe_events (organization_id, event_created DESC, processed_at DESC)
    WHERE outcome = 'applied' AND event_type LIKE 'customer.subscription.%';

ALTER TABLE stripe_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON stripe_events
    USING (organization_id = NULLIF(current_setting('creditgate.org_id', true), ''));
