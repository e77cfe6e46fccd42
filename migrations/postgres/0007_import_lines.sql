-- Which of a batch's lines are tasks of a Label Studio project, so that an import that failed
-- half-way can be run again without creating its tasks twice. A line is marked sent (task_id
-- NULL) before the request that creates its task and gets the task's id once Label Studio has
-- answered, or once a later run found the task in Label Studio by its custom_id.
CREATE TABLE ls_import_lines (
    project_id  BIGINT NOT NULL,
    batch_id    TEXT NOT NULL,
    custom_id   TEXT NOT NULL,
    task_id     BIGINT,                 -- NULL: sent, Label Studio's answer not seen yet
    sent_at     BIGINT NOT NULL,
    imported_at BIGINT,
    PRIMARY KEY (project_id, batch_id, custom_id)
);
