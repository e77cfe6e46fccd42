-- Workers as they last said they were: every batchlab-worker upserts its row every few seconds
-- (crates/worker/src/presence.rs), so batchlab-api's status page, /v1/models and /metrics can
-- tell which models are loaded right now and how fast they generate. A row not refreshed for a
-- while is a worker gone; timestamps are unix seconds.
CREATE TABLE workers (
    id                 TEXT PRIMARY KEY,          -- worker.id, the name its leases carry
    model              TEXT NOT NULL,             -- engine.model_id, what requests name
    model_path         TEXT NOT NULL,             -- the GGUF it loaded
    model_sha256       TEXT,                      -- that file's SHA-256, NULL when unknown
    generated_tokens   BIGINT NOT NULL DEFAULT 0, -- tokens generated since it started
    tokens_per_second  DOUBLE PRECISION NOT NULL DEFAULT 0, -- over its last heartbeat interval
    batch_id           TEXT,                      -- the batch it holds a live lease on, if any
    started_at         BIGINT NOT NULL,
    last_seen          BIGINT NOT NULL
);
CREATE INDEX workers_last_seen ON workers (last_seen);
