-- Label Studio curation: webhook events as delivered, and the projects, tasks, annotations and
-- predictions they describe; exports written and accuracy records kept.
-- Label Studio's timestamps are kept as its ISO strings for output and as unix microseconds
-- (*_us) for ordering; flags are 0/1 BIGINTs so both databases read them the same way.

-- Every delivery, stored before it is processed; the same body twice is one row.
CREATE TABLE webhook_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_key  TEXT NOT NULL UNIQUE,     -- sha256 of the body
    action        TEXT NOT NULL,
    project_id    BIGINT,
    body          TEXT NOT NULL,
    received_at   BIGINT NOT NULL,
    processed_at  BIGINT,
    outcome       TEXT                      -- what processing did, or why it failed
);
CREATE INDEX webhook_events_pending ON webhook_events (processed_at, id);

CREATE TABLE ls_projects (
    id            BIGINT PRIMARY KEY,
    title         TEXT NOT NULL DEFAULT '',
    label_config  TEXT NOT NULL DEFAULT '',
    updated_at_us BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE ls_tasks (
    id            BIGINT PRIMARY KEY,
    project_id    BIGINT NOT NULL,
    data          TEXT NOT NULL,
    updated_at_us BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX ls_tasks_project ON ls_tasks (project_id, id);

-- A deletion that arrives before its creation leaves a tombstone (deleted = 1) that wins.
CREATE TABLE ls_annotations (
    id             BIGINT PRIMARY KEY,
    project_id     BIGINT NOT NULL,
    task_id        BIGINT NOT NULL,
    result         TEXT NOT NULL,
    ground_truth   BIGINT NOT NULL DEFAULT 0,
    was_cancelled  BIGINT NOT NULL DEFAULT 0,
    lead_time      DOUBLE PRECISION,
    completed_by   BIGINT,
    created_at     TEXT,
    updated_at     TEXT,
    updated_at_us  BIGINT NOT NULL DEFAULT 0,
    deleted        BIGINT NOT NULL DEFAULT 0,
    valid          BIGINT NOT NULL DEFAULT 1,
    invalid_reason TEXT
);
CREATE INDEX ls_annotations_project ON ls_annotations (project_id, task_id);
-- Ground-truth hand-over and task deletion find a task's annotations inside the event's write
-- transaction: without this index each of them scanned the whole table under SQLite's lock.
CREATE INDEX ls_annotations_task ON ls_annotations (task_id);

-- Predictions batchlab made: imported with a batch's results, or answered by the ML backend.
CREATE TABLE ls_predictions (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id     BIGINT NOT NULL,
    task_id        BIGINT NOT NULL,
    model_version  TEXT NOT NULL,
    source         TEXT NOT NULL,           -- 'import' or 'ml_backend'
    score          DOUBLE PRECISION,
    result         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    UNIQUE (task_id, model_version, source)
);
CREATE INDEX ls_predictions_project ON ls_predictions (project_id, model_version, task_id);

-- Exports written to the training directory: one per milestone at most (the unique index; NULL
-- milestones, on-demand exports, are not limited). A milestone row is claimed (written = 0)
-- before its file is written and marked written after; only written rows are shown.
CREATE TABLE curation_exports (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id   BIGINT NOT NULL,
    reason       TEXT NOT NULL,             -- 'milestone' or 'start_training'
    milestone    BIGINT,
    path         TEXT NOT NULL,
    tasks        BIGINT NOT NULL,
    annotations  BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    written      BIGINT NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX curation_exports_milestone ON curation_exports (project_id, milestone);

-- Accuracy of stored predictions against ground truth, kept at every accuracy checkpoint.
CREATE TABLE accuracy_records (
    project_id   BIGINT NOT NULL,
    checkpoint   BIGINT NOT NULL,           -- the annotation count crossed
    report       TEXT NOT NULL,             -- JSON: per model_version
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (project_id, checkpoint)
);
