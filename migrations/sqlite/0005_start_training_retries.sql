-- START_TRAINING is marked processed only once its export is written. Until then it stays
-- pending: `retry_at` holds it back (while a pass exports it, and after a failed export, the
-- back-off) and `attempts` counts its failed exports, so that one that keeps failing ends
-- `failed: ...` (counted and shown like any poison event) instead of being retried forever.
ALTER TABLE webhook_events ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_events ADD COLUMN retry_at BIGINT;
