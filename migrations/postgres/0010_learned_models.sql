-- Classifiers the ML backend learned from a project's annotations, one row per project and
-- control: every ML backend process on this database predicts with the same one, and it
-- survives restarts. A new training replaces the project's rows in one transaction.
CREATE TABLE learned_models (
    instance     TEXT NOT NULL,
    project_id   BIGINT NOT NULL,
    control      TEXT NOT NULL,           -- the control tag's name
    config_hash  TEXT NOT NULL,           -- of the labeling config it was trained for
    fingerprint  TEXT NOT NULL,           -- of the annotations it was trained on
    classifier   TEXT NOT NULL,           -- JSON: the classifier's parameters
    evaluation   TEXT NOT NULL,           -- JSON: cross-validated accuracy and calibration
    trained_at   BIGINT NOT NULL,         -- unix seconds
    PRIMARY KEY (instance, project_id, control)
);
