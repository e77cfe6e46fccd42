-- Failed processing attempts of a batch: the queue serves batches with fewer failures first and
-- a batch that keeps failing ends `failed` (batch.max_attempts), so it cannot block the queue.
ALTER TABLE batches ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;

-- Deleting a file checks whether an unfinished batch still reads it.
CREATE INDEX batches_input_file ON batches (input_file_id);
