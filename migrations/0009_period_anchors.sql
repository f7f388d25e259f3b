-- Per-org period anchors (contract A12; gateway/core/anchors.py).
--
-- period_anchor_day: the day of the month the org's periods start on (1-31; a month
-- without that day starts on its last day). period_anchor_since: the local date (in the
-- config's period timezone) the anchor was set; its first period starts that day. Both
-- NULL: calendar periods. Set by the admin API, a Stripe subscription's webhook, or at the
-- org's creation with `anchor: created`; seeded into the org's Redis hash (field pa).
ALTER TABLE organizations
    ADD COLUMN period_anchor_day smallint CHECK (period_anchor_day BETWEEN 1 AND 31),
    ADD COLUMN period_anchor_since date,
    ADD CONSTRAINT organizations_period_anchor_both
        CHECK ((period_anchor_day IS NULL) = (period_anchor_since IS NULL));
