-- Alert outbox metrics without counting the outbox, and its retention (issue 9).
--
-- /metrics used to count every alert_events row by status on each scrape: a scan that
-- grows with every alert ever delivered. Now the delivered and failed outcomes are
-- counters (alert_delivery_totals), bumped by a trigger when an event's status changes to
-- one of them, however it changes (the deliverer, a resend that fails again), exactly
-- once per change: a repeated update to the same status is not a change. They only grow,
-- so /metrics serves them as Prometheus counters, and they survive the retention below
-- deleting old events. Pending and failed events still in the outbox are counted through
-- the status index, a range of the rows in that status only.
CREATE TABLE alert_delivery_totals (
    status text PRIMARY KEY CHECK (status IN ('delivered', 'failed')),
    n      bigint NOT NULL DEFAULT 0
);
-- Start from what the outbox holds now, so the counters keep the history.
INSERT INTO alert_delivery_totals (status, n)
SELECT s, (SELECT count(*) FROM alert_events WHERE status = s)
FROM (VALUES ('delivered'), ('failed')) AS v(s);

CREATE FUNCTION creditgate_count_alert_outcome() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE alert_delivery_totals SET n = n + 1 WHERE status = NEW.status;
    RETURN NULL;
END
$$;

CREATE TRIGGER alert_events_outcome
    AFTER UPDATE OF status ON alert_events
    FOR EACH ROW
    WHEN (NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN ('delivered', 'failed'))
    EXECUTE FUNCTION creditgate_count_alert_outcome();

-- Retention (alerts.retention_days, gateway/alerts/retention.py) deletes delivered and
-- failed events older than the window: this index finds them by age without reading the
-- pending ones or the recent ones.
CREATE INDEX alert_events_finished ON alert_events (created_at) WHERE status <> 'pending';
