-- Label Studio instances. Label Studio's ids are unique only within one Label Studio database,
-- so every row that holds them is keyed by (instance, id): `instance` names the Label Studio
-- the row came from (`label_studio.instance`, or the one in the webhook URL). Rows stored
-- before belong to the default instance, 'default'. A project's `created_at` (Label Studio's
-- ISO timestamp) tells a project re-created under the same id (a fresh Label Studio database)
-- from the one batchlab knows.
--
-- SQLite cannot change a primary key or a column's UNIQUE in place: each table is rebuilt
-- (create, copy, drop, rename) with its indexes; ids, and so AUTOINCREMENT sequences, are kept.

CREATE TABLE webhook_events_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    instance      TEXT NOT NULL DEFAULT 'default',
    delivery_key  TEXT NOT NULL,            -- sha256 of the body
    action        TEXT NOT NULL,
    project_id    BIGINT,
    body          TEXT NOT NULL,
    received_at   BIGINT NOT NULL,
    processed_at  BIGINT,
    outcome       TEXT,
    attempts      BIGINT NOT NULL DEFAULT 0,
    retry_at      BIGINT,
    UNIQUE (instance, delivery_key)
);
INSERT INTO webhook_events_new (id, delivery_key, action, project_id, body, received_at,
    processed_at, outcome, attempts, retry_at)
SELECT id, delivery_key, action, project_id, body, received_at, processed_at, outcome,
    attempts, retry_at FROM webhook_events;
DROP TABLE webhook_events;
ALTER TABLE webhook_events_new RENAME TO webhook_events;
CREATE INDEX webhook_events_pending ON webhook_events (processed_at, id);
CREATE INDEX webhook_events_project ON webhook_events (instance, project_id);

CREATE TABLE ls_projects_new (
    instance      TEXT NOT NULL DEFAULT 'default',
    id            BIGINT NOT NULL,
    title         TEXT NOT NULL DEFAULT '',
    label_config  TEXT NOT NULL DEFAULT '',
    updated_at_us BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0,
    created_at    TEXT,                     -- Label Studio's; NULL until an event carries it
    PRIMARY KEY (instance, id)
);
INSERT INTO ls_projects_new (id, title, label_config, updated_at_us, deleted)
SELECT id, title, label_config, updated_at_us, deleted FROM ls_projects;
DROP TABLE ls_projects;
ALTER TABLE ls_projects_new RENAME TO ls_projects;

CREATE TABLE ls_tasks_new (
    instance      TEXT NOT NULL DEFAULT 'default',
    id            BIGINT NOT NULL,
    project_id    BIGINT NOT NULL,
    data          TEXT NOT NULL,
    updated_at_us BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (instance, id)
);
INSERT INTO ls_tasks_new (id, project_id, data, updated_at_us, deleted)
SELECT id, project_id, data, updated_at_us, deleted FROM ls_tasks;
DROP TABLE ls_tasks;
ALTER TABLE ls_tasks_new RENAME TO ls_tasks;
CREATE INDEX ls_tasks_project ON ls_tasks (instance, project_id, id);

CREATE TABLE ls_annotations_new (
    instance       TEXT NOT NULL DEFAULT 'default',
    id             BIGINT NOT NULL,
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
    invalid_reason TEXT,
    PRIMARY KEY (instance, id)
);
INSERT INTO ls_annotations_new (id, project_id, task_id, result, ground_truth, was_cancelled,
    lead_time, completed_by, created_at, updated_at, updated_at_us, deleted, valid, invalid_reason)
SELECT id, project_id, task_id, result, ground_truth, was_cancelled, lead_time, completed_by,
    created_at, updated_at, updated_at_us, deleted, valid, invalid_reason FROM ls_annotations;
DROP TABLE ls_annotations;
ALTER TABLE ls_annotations_new RENAME TO ls_annotations;
CREATE INDEX ls_annotations_project ON ls_annotations (instance, project_id, task_id);
CREATE INDEX ls_annotations_task ON ls_annotations (instance, task_id);

CREATE TABLE ls_predictions_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    instance       TEXT NOT NULL DEFAULT 'default',
    project_id     BIGINT NOT NULL,
    task_id        BIGINT NOT NULL,
    model_version  TEXT NOT NULL,
    source         TEXT NOT NULL,
    score          DOUBLE PRECISION,
    result         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    UNIQUE (instance, task_id, model_version, source)
);
INSERT INTO ls_predictions_new (id, project_id, task_id, model_version, source, score, result,
    created_at)
SELECT id, project_id, task_id, model_version, source, score, result, created_at
FROM ls_predictions;
DROP TABLE ls_predictions;
ALTER TABLE ls_predictions_new RENAME TO ls_predictions;
CREATE INDEX ls_predictions_project ON ls_predictions (instance, project_id, model_version, task_id);

CREATE TABLE curation_exports_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    instance     TEXT NOT NULL DEFAULT 'default',
    project_id   BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    milestone    BIGINT,
    path         TEXT NOT NULL,
    tasks        BIGINT NOT NULL,
    annotations  BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    written      BIGINT NOT NULL DEFAULT 1,
    sha256       TEXT
);
INSERT INTO curation_exports_new (id, project_id, reason, milestone, path, tasks, annotations,
    created_at, written, sha256)
SELECT id, project_id, reason, milestone, path, tasks, annotations, created_at, written, sha256
FROM curation_exports;
DROP TABLE curation_exports;
ALTER TABLE curation_exports_new RENAME TO curation_exports;
CREATE UNIQUE INDEX curation_exports_milestone ON curation_exports (instance, project_id, milestone);

CREATE TABLE accuracy_records_new (
    instance     TEXT NOT NULL DEFAULT 'default',
    project_id   BIGINT NOT NULL,
    checkpoint   BIGINT NOT NULL,
    report       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (instance, project_id, checkpoint)
);
INSERT INTO accuracy_records_new (project_id, checkpoint, report, created_at)
SELECT project_id, checkpoint, report, created_at FROM accuracy_records;
DROP TABLE accuracy_records;
ALTER TABLE accuracy_records_new RENAME TO accuracy_records;

CREATE TABLE ls_import_lines_new (
    instance    TEXT NOT NULL DEFAULT 'default',
    project_id  BIGINT NOT NULL,
    batch_id    TEXT NOT NULL,
    custom_id   TEXT NOT NULL,
    task_id     BIGINT,
    sent_at     BIGINT NOT NULL,
    imported_at BIGINT,
    PRIMARY KEY (instance, project_id, batch_id, custom_id)
);
INSERT INTO ls_import_lines_new (project_id, batch_id, custom_id, task_id, sent_at, imported_at)
SELECT project_id, batch_id, custom_id, task_id, sent_at, imported_at FROM ls_import_lines;
DROP TABLE ls_import_lines;
ALTER TABLE ls_import_lines_new RENAME TO ls_import_lines;

-- ls_conflicts has no key on Label Studio's ids: a column and an index are enough.
ALTER TABLE ls_conflicts ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
DROP INDEX ls_conflicts_project;
CREATE INDEX ls_conflicts_project ON ls_conflicts (instance, project_id, id);
