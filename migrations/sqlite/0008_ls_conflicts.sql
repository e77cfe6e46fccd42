-- Label Studio objects whose ids contradict what batchlab holds: an annotation id held under
-- another project or another task, a task id held under another project, an id reused for a
-- new annotation (a Label Studio re-created with a fresh database hands out its ids again).
-- The stored row is left as it was and the delivered object is kept here, whole, with the
-- reason, so that nothing an annotator did is dropped without a record and a later reconcile
-- can replay it. One row per contradicting object per event; never deleted by retention.
CREATE TABLE ls_conflicts (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          BIGINT NOT NULL,      -- the webhook event (which retention may delete)
    action            TEXT NOT NULL,        -- its action
    project_id        BIGINT NOT NULL,      -- the project the event claims for the object
    kind              TEXT NOT NULL,        -- e.g. 'annotation_deleted_in_other_project'
    entity            TEXT NOT NULL,        -- 'annotation' or 'task'
    entity_id         BIGINT NOT NULL,
    known_project_id  BIGINT,               -- what batchlab holds for that id
    known_task_id     BIGINT,
    known_deleted     BIGINT NOT NULL DEFAULT 0,
    reason            TEXT NOT NULL,
    body              TEXT NOT NULL,        -- the object as delivered, JSON
    detected_at       BIGINT NOT NULL
);
CREATE INDEX ls_conflicts_project ON ls_conflicts (project_id, id);
