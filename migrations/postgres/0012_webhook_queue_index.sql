-- The webhook processor's queue: the events not processed yet, in order of arrival. Processed
-- events stay for days (retention.webhook_events_days, 30 by default), so without an index of the pending ones
-- alone every pass walked past all of them; this partial index holds only what is waiting.
-- (webhook_events_pending, on (processed_at, id), stays: retention deletes by processed_at.)
CREATE INDEX webhook_events_queue ON webhook_events (id) WHERE processed_at IS NULL;
