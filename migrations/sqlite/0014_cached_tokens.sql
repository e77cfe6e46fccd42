-- Prompt tokens served from the engine's prompt cache: per line, and summed per batch for the
-- batch object's usage.input_tokens_details.cached_tokens (OpenAI's field).
ALTER TABLE batches ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batch_lines ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
