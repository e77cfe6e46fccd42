-- Files (OpenAI Files API) and batches (OpenAI Batches API), with the worker queue's lease columns.
-- Timestamps are unix seconds, JSON documents are TEXT: the same shapes as migrations/postgres.

CREATE TABLE files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    lines       BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT
);
CREATE INDEX files_purpose ON files (purpose, seq);

CREATE TABLE batches (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT NOT NULL UNIQUE,
    endpoint           TEXT NOT NULL,
    input_file_id      TEXT NOT NULL,
    completion_window  TEXT NOT NULL,
    status             TEXT NOT NULL,
    metadata           TEXT,
    model              TEXT,
    errors             TEXT,
    output_file_id     TEXT,
    error_file_id      TEXT,
    created_at         BIGINT NOT NULL,
    in_progress_at     BIGINT,
    expires_at         BIGINT,
    finalizing_at      BIGINT,
    completed_at       BIGINT,
    failed_at          BIGINT,
    expired_at         BIGINT,
    cancelling_at      BIGINT,
    cancelled_at       BIGINT,
    total              BIGINT NOT NULL DEFAULT 0,
    completed          BIGINT NOT NULL DEFAULT 0,
    failed             BIGINT NOT NULL DEFAULT 0,
    input_tokens       BIGINT NOT NULL DEFAULT 0,
    output_tokens      BIGINT NOT NULL DEFAULT 0,
    lease_owner        TEXT,
    lease_expires_at   BIGINT
);
CREATE INDEX batches_queue ON batches (status, lease_expires_at);

-- One row per finished input line: the exactly-once record a resumed batch relies on.
CREATE TABLE batch_lines (
    batch_id       TEXT NOT NULL,
    line_no        BIGINT NOT NULL,
    custom_id      TEXT,
    kind           TEXT NOT NULL,          -- 'output' or 'error'
    body           TEXT NOT NULL,          -- the whole output/error JSONL line
    input_tokens   BIGINT NOT NULL DEFAULT 0,
    output_tokens  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line_no)
);
