-- The webhook processor's queue: the events not processed yet, in order of arrival. Processed
-- events stay for days (retention.webhook_events_days, 30 by default), so without an index of the pending ones
-- alone every pass walked past all of them; this partial index holds only what is waiting.
-- (webhook_events_pending, on (processed_at, id), stays: retention deletes by processed_at.)
CREATE INDEX webhook_events_queue ON webhook_events (id) WHERE processed_at IS NULL;

-- Bodies (a few KB each from Label Studio) are moved out of the row into TOAST storage, even
-- compressed ones that would fit: each event's row is updated when it is claimed and again when
-- settled, and PostgreSQL writes a new version of the whole row each time (and logs it), while
-- an unchanged out-of-line body is only pointed to. This applies to rows stored from now on.
ALTER TABLE webhook_events SET (toast_tuple_target = 128);
