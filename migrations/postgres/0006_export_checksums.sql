-- Every export is also written to a file of its own that is never rewritten (a milestone's,
-- a START_TRAINING's), besides the project's latest export file: `path` names that file and
-- `sha256` is the hex SHA-256 of its bytes, so it can be verified. NULL for exports recorded
-- before, whose path is the shared latest file.
ALTER TABLE curation_exports ADD COLUMN sha256 TEXT;
