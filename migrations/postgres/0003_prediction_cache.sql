-- Predictions the ML backend made (keyed by model version, labeling config and task data) and
-- predictions imported from batch results (keyed by config and data): the next /predict for the
-- same task is answered from here at once, by any ML backend process sharing the database.
CREATE TABLE prediction_cache (
    cache_key     TEXT PRIMARY KEY,        -- sha256 hex of (namespace, config, canonical data)
    model_version TEXT NOT NULL,           -- the version that made it ('imported:...' for batches)
    prediction    TEXT NOT NULL,           -- {"result": [...], "score": x|null}
    created_at    BIGINT NOT NULL
);
