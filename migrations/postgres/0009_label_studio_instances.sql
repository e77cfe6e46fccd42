-- Label Studio instances. Label Studio's ids are unique only within one Label Studio database,
-- so every row that holds them is keyed by (instance, id): `instance` names the Label Studio
-- the row came from (`label_studio.instance`, or the one in the webhook URL). Rows stored
-- before belong to the default instance, 'default'. A project's `created_at` (Label Studio's
-- ISO timestamp) tells a project re-created under the same id (a fresh Label Studio database)
-- from the one batchlab knows.

ALTER TABLE webhook_events ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE webhook_events DROP CONSTRAINT webhook_events_delivery_key_key;
ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_instance_delivery_key_key
    UNIQUE (instance, delivery_key);
CREATE INDEX webhook_events_project ON webhook_events (instance, project_id);

ALTER TABLE ls_projects ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE ls_projects ADD COLUMN created_at TEXT;
ALTER TABLE ls_projects DROP CONSTRAINT ls_projects_pkey;
ALTER TABLE ls_projects ADD PRIMARY KEY (instance, id);

ALTER TABLE ls_tasks ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE ls_tasks DROP CONSTRAINT ls_tasks_pkey;
ALTER TABLE ls_tasks ADD PRIMARY KEY (instance, id);
DROP INDEX ls_tasks_project;
CREATE INDEX ls_tasks_project ON ls_tasks (instance, project_id, id);

ALTER TABLE ls_annotations ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE ls_annotations DROP CONSTRAINT ls_annotations_pkey;
ALTER TABLE ls_annotations ADD PRIMARY KEY (instance, id);
DROP INDEX ls_annotations_project;
DROP INDEX ls_annotations_task;
CREATE INDEX ls_annotations_project ON ls_annotations (instance, project_id, task_id);
CREATE INDEX ls_annotations_task ON ls_annotations (instance, task_id);

ALTER TABLE ls_predictions ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE ls_predictions DROP CONSTRAINT ls_predictions_task_id_model_version_source_key;
ALTER TABLE ls_predictions ADD CONSTRAINT ls_predictions_instance_task_key
    UNIQUE (instance, task_id, model_version, source);
DROP INDEX ls_predictions_project;
CREATE INDEX ls_predictions_project ON ls_predictions (instance, project_id, model_version, task_id);

ALTER TABLE curation_exports ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
DROP INDEX curation_exports_milestone;
CREATE UNIQUE INDEX curation_exports_milestone ON curation_exports (instance, project_id, milestone);

ALTER TABLE accuracy_records ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE accuracy_records DROP CONSTRAINT accuracy_records_pkey;
ALTER TABLE accuracy_records ADD PRIMARY KEY (instance, project_id, checkpoint);

ALTER TABLE ls_import_lines ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
ALTER TABLE ls_import_lines DROP CONSTRAINT ls_import_lines_pkey;
ALTER TABLE ls_import_lines ADD PRIMARY KEY (instance, project_id, batch_id, custom_id);

ALTER TABLE ls_conflicts ADD COLUMN instance TEXT NOT NULL DEFAULT 'default';
DROP INDEX ls_conflicts_project;
CREATE INDEX ls_conflicts_project ON ls_conflicts (instance, project_id, id);
