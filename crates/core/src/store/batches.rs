//! Rows of `batches` (the OpenAI batch objects, doubling as the worker queue) and `batch_lines`
//! (every finished request line, persisted so a resumed batch never redoes or loses one).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now, Backend, Store, StoreError};

/// The states of OpenAI's batch lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchStatus {
    /// Created; the input is being validated.
    Validating,
    /// The input had no usable line.
    Failed,
    /// Lines are running.
    InProgress,
    /// Output files are being written.
    Finalizing,
    /// Done; output files are ready.
    Completed,
    /// The completion window passed before the batch finished.
    Expired,
    /// A cancel was requested; finished lines are being written out.
    Cancelling,
    /// Cancelled; finished lines are in the output file.
    Cancelled,
}

impl BatchStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [BatchStatus; 8] = [
        Self::Validating,
        Self::Failed,
        Self::InProgress,
        Self::Finalizing,
        Self::Completed,
        Self::Expired,
        Self::Cancelling,
        Self::Cancelled,
    ];

    /// The wire (and stored) name, e.g. `in_progress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<BatchStatus> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for states a worker still has to act on.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Validating | Self::InProgress | Self::Finalizing | Self::Cancelling
        )
    }

    /// The column holding the time this status was entered.
    fn timestamp_column(self) -> Option<&'static str> {
        Some(match self {
            Self::Validating => return None,
            Self::Failed => "failed_at",
            Self::InProgress => "in_progress_at",
            Self::Finalizing => "finalizing_at",
            Self::Completed => "completed_at",
            Self::Expired => "expired_at",
            Self::Cancelling => "cancelling_at",
            Self::Cancelled => "cancelled_at",
        })
    }
}

/// What a client asks for when creating a batch.
#[derive(Clone, Debug)]
pub struct NewBatch {
    /// `batch_...` identifier.
    pub id: String,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub endpoint: String,
    /// The uploaded JSONL file.
    pub input_file_id: String,
    /// Always `24h`.
    pub completion_window: String,
    /// Window length in seconds.
    pub window_seconds: i64,
    /// Client metadata as a JSON object text.
    pub metadata: Option<String>,
    /// Request lines in the input file.
    pub total: i64,
}

/// A batch as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRecord {
    /// `batch_...` identifier.
    pub id: String,
    /// The endpoint every line must target.
    pub endpoint: String,
    /// The uploaded JSONL file.
    pub input_file_id: String,
    /// `24h`.
    pub completion_window: String,
    /// Where the batch is in its lifecycle.
    pub status: BatchStatus,
    /// Client metadata (JSON object text).
    pub metadata: Option<String>,
    /// Model that answered, once known.
    pub model: Option<String>,
    /// Batch-level errors (JSON array text of `{code, message, param, line}`).
    pub errors: Option<String>,
    /// File of successful output lines.
    pub output_file_id: Option<String>,
    /// File of failed lines.
    pub error_file_id: Option<String>,
    /// Unix seconds of each status change (`None` until it happens).
    pub created_at: i64,
    /// See `created_at`.
    pub in_progress_at: Option<i64>,
    /// When the completion window closes.
    pub expires_at: Option<i64>,
    /// See `created_at`.
    pub finalizing_at: Option<i64>,
    /// See `created_at`.
    pub completed_at: Option<i64>,
    /// See `created_at`.
    pub failed_at: Option<i64>,
    /// See `created_at`.
    pub expired_at: Option<i64>,
    /// See `created_at`.
    pub cancelling_at: Option<i64>,
    /// See `created_at`.
    pub cancelled_at: Option<i64>,
    /// Request lines in the input.
    pub total: i64,
    /// Lines answered successfully.
    pub completed: i64,
    /// Lines that failed.
    pub failed: i64,
    /// Prompt tokens over all answered lines.
    pub input_tokens: i64,
    /// Of those, the tokens served from the engine's prompt cache.
    pub cached_tokens: i64,
    /// Generated tokens over all answered lines.
    pub output_tokens: i64,
    /// Worker holding the lease, if any.
    pub lease_owner: Option<String>,
}

/// Which file a finished line goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A successful response: the output file.
    Output,
    /// A failed line: the error file.
    Error,
}

impl LineKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Error => "error",
        }
    }
}

/// One finished input line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLine {
    /// 1-based line number in the input file.
    pub line_no: i64,
    /// The line's `custom_id`, when it had one.
    pub custom_id: Option<String>,
    /// Output or error.
    pub kind: LineKind,
    /// The complete JSONL line (without newline).
    pub body: String,
    /// Prompt tokens used.
    pub input_tokens: i64,
    /// Of those, the tokens served from the engine's prompt cache.
    pub cached_tokens: i64,
    /// Tokens generated.
    pub output_tokens: i64,
}

const COLUMNS: &str = "id, endpoint, input_file_id, completion_window, status, metadata, model, errors, \
     output_file_id, error_file_id, created_at, in_progress_at, expires_at, finalizing_at, completed_at, \
     failed_at, expired_at, cancelling_at, cancelled_at, total, completed, failed, input_tokens, \
     cached_tokens, output_tokens, lease_owner";

fn from_row(row: &AnyRow) -> Result<BatchRecord, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(BatchRecord {
        id: row.try_get("id")?,
        endpoint: row.try_get("endpoint")?,
        input_file_id: row.try_get("input_file_id")?,
        completion_window: row.try_get("completion_window")?,
        status: BatchStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("batch status {status:?}")))?,
        metadata: row.try_get("metadata")?,
        model: row.try_get("model")?,
        errors: row.try_get("errors")?,
        output_file_id: row.try_get("output_file_id")?,
        error_file_id: row.try_get("error_file_id")?,
        created_at: row.try_get("created_at")?,
        in_progress_at: row.try_get("in_progress_at")?,
        expires_at: row.try_get("expires_at")?,
        finalizing_at: row.try_get("finalizing_at")?,
        completed_at: row.try_get("completed_at")?,
        failed_at: row.try_get("failed_at")?,
        expired_at: row.try_get("expired_at")?,
        cancelling_at: row.try_get("cancelling_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
        total: row.try_get("total")?,
        completed: row.try_get("completed")?,
        failed: row.try_get("failed")?,
        input_tokens: row.try_get("input_tokens")?,
        cached_tokens: row.try_get("cached_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        lease_owner: row.try_get("lease_owner")?,
    })
}

/// Text PostgreSQL cannot store: U+0000. Refused before the query on both backends (SQLite could
/// store it) so a value fails the same way everywhere, as an encoding error naming the column.
#[derive(Debug, thiserror::Error)]
#[error("{column} must not contain the NUL character (U+0000)")]
pub struct NulInText {
    /// The column the value was meant for.
    pub column: &'static str,
}

/// Refuses `value` for `column` when it holds U+0000 (see [`NulInText`]).
fn check_text(column: &'static str, value: &str) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::Database(sqlx::Error::Encode(Box::new(
            NulInText { column },
        ))));
    }
    Ok(())
}

/// The statuses of a batch a worker still has to act on, as an SQL list: a file such a batch
/// uses is never deleted (here, and by retention in `files.rs`).
pub(super) const ACTIVE: &str = "'validating', 'in_progress', 'finalizing', 'cancelling'";

/// What [`Store::delete_file_if_unused`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileDeletion {
    /// The file's row is gone.
    Deleted,
    /// There was no such file.
    NotFound,
    /// An unfinished batch reads this file as its input; nothing was deleted.
    InUse {
        /// That batch.
        batch_id: String,
        /// Its status (validating, in_progress, finalizing or cancelling).
        status: BatchStatus,
    },
}

fn status_list(statuses: &[BatchStatus]) -> String {
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Queues a new batch in `validating`.
    pub async fn insert_batch(&self, b: &NewBatch) -> Result<BatchRecord, StoreError> {
        check_text("batches.id", &b.id)?;
        check_text("batches.endpoint", &b.endpoint)?;
        check_text("batches.input_file_id", &b.input_file_id)?;
        check_text(
            "batches.metadata",
            b.metadata.as_deref().unwrap_or_default(),
        )?;
        let created = now();
        sqlx::query(
            "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, \
             created_at, expires_at, total) VALUES ($1, $2, $3, $4, 'validating', $5, $6, $7, $8)",
        )
        .bind(&b.id)
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(&b.metadata)
        .bind(created)
        .bind(created + b.window_seconds)
        .bind(b.total)
        .execute(&self.pool)
        .await?;
        self.get_batch(&b.id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("batch {} vanished", b.id)))
    }

    /// One batch by id.
    pub async fn get_batch(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        if id.contains('\0') {
            // No stored id holds U+0000 (writes refuse it), and PostgreSQL cannot compare one.
            return Ok(None);
        }
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM batches WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// A page of batches, newest first, starting after batch `after`; `limit + 1` rows at most.
    pub async fn list_batches(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM batches \
             WHERE ($1 IS NULL OR seq < (SELECT seq FROM batches WHERE id = $1)) \
             ORDER BY seq DESC LIMIT $2"
        ))
        .bind(after)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Asks for a batch to be cancelled: an active batch moves to `cancelling` (a worker then
    /// writes out its finished lines and ends it `cancelled`). Returns the batch as it now is.
    pub async fn request_cancel(&self, id: &str) -> Result<Option<BatchRecord>, StoreError> {
        sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $2 \
             WHERE id = $1 AND status IN ('validating', 'in_progress', 'finalizing')",
        )
        .bind(id)
        .bind(now())
        .execute(&self.pool)
        .await?;
        self.get_batch(id).await
    }

    /// Claims the oldest batch that needs a worker and has no live lease, leasing it to
    /// `worker` for `lease_seconds`; batches that failed fewer processing attempts come first
    /// (see [`Store::note_failed_attempt`]), so a batch that keeps failing cannot hold up the
    /// queue. On PostgreSQL, `FOR UPDATE SKIP LOCKED` lets many workers poll at once without
    /// blocking each other; SQLite serialises writers anyway.
    pub async fn claim_batch(
        &self,
        worker: &str,
        lease_seconds: i64,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let t = now();
        let row = sqlx::query(&format!(
            "UPDATE batches SET lease_owner = $1, lease_expires_at = $2 WHERE id = ( \
               SELECT id FROM batches \
               WHERE status IN ({ACTIVE}) \
                 AND (lease_expires_at IS NULL OR lease_expires_at < $3) \
               ORDER BY attempts, seq LIMIT 1 {lock}) \
             RETURNING {COLUMNS}"
        ))
        .bind(worker)
        .bind(t + lease_seconds)
        .bind(t)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Extends `worker`'s lease on a batch; `false` when the lease was lost to another worker.
    pub async fn renew_lease(
        &self,
        id: &str,
        worker: &str,
        lease_seconds: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE batches SET lease_expires_at = $3 WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(worker)
        .bind(now() + lease_seconds)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Gives a lease up so another worker may claim the batch at once.
    pub async fn release_lease(&self, id: &str, worker: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE batches SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2")
            .bind(id)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves a leased batch from one of `from` to `to`, stamping `to`'s timestamp. Returns
    /// `false` (and changes nothing) when the batch is in another state or leased elsewhere.
    pub async fn transition(
        &self,
        id: &str,
        worker: &str,
        from: &[BatchStatus],
        to: BatchStatus,
    ) -> Result<bool, StoreError> {
        let stamp = to
            .timestamp_column()
            .map(|c| format!(", {c} = COALESCE({c}, $3)"))
            .unwrap_or_default();
        let sql = format!(
            "UPDATE batches SET status = '{}'{stamp} WHERE id = $1 AND lease_owner = $2 AND status IN ({})",
            to.as_str(),
            status_list(from)
        );
        let query = sqlx::query(&sql).bind(id).bind(worker);
        let query = if stamp.is_empty() {
            query
        } else {
            query.bind(now())
        };
        Ok(query.execute(&self.pool).await?.rows_affected() > 0)
    }

    /// Fails an unfinished batch leased to `worker` (one whose input had no usable line, or
    /// that cannot run at all), with its errors (JSON array text of `errors.data[]`). `false`
    /// when the batch is leased elsewhere or already ended.
    pub async fn fail_batch(
        &self,
        id: &str,
        worker: &str,
        errors: &str,
    ) -> Result<bool, StoreError> {
        check_text("batches.errors", errors)?;
        let done = sqlx::query(&format!(
            "UPDATE batches SET status = 'failed', failed_at = $3, errors = $4 \
             WHERE id = $1 AND lease_owner = $2 AND status IN ({ACTIVE})"
        ))
        .bind(id)
        .bind(worker)
        .bind(now())
        .bind(errors)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Counts a failed processing attempt of a batch leased to `worker`: the batch goes behind
    /// batches with fewer failures in [`Store::claim_batch`]. Returns the attempts so far, or
    /// `None` when the batch is leased elsewhere (nothing changes then). The lease is kept (the
    /// caller may still fail the batch) until [`Store::release_lease`].
    pub async fn note_failed_attempt(
        &self,
        id: &str,
        worker: &str,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "UPDATE batches SET attempts = attempts + 1 WHERE id = $1 AND lease_owner = $2 RETURNING attempts",
        )
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get::<i64, _>("attempts")).transpose()?)
    }

    /// Deletes a file's row unless an unfinished batch (validating, in_progress, finalizing or
    /// cancelling) reads it as its input, in one statement, so a worker never finds the input
    /// of a queued batch gone. The caller removes the body after [`FileDeletion::Deleted`].
    pub async fn delete_file_if_unused(&self, file_id: &str) -> Result<FileDeletion, StoreError> {
        let deleted = sqlx::query(&format!(
            "DELETE FROM files WHERE id = $1 AND NOT EXISTS ( \
               SELECT 1 FROM batches WHERE input_file_id = $1 AND status IN ({ACTIVE}))"
        ))
        .bind(file_id)
        .execute(&self.pool)
        .await?;
        if deleted.rows_affected() > 0 {
            return Ok(FileDeletion::Deleted);
        }
        let user = sqlx::query(&format!(
            "SELECT id, status FROM batches WHERE input_file_id = $1 AND status IN ({ACTIVE}) ORDER BY seq LIMIT 1"
        ))
        .bind(file_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = user else {
            return Ok(FileDeletion::NotFound);
        };
        let status: String = row.try_get("status")?;
        Ok(FileDeletion::InUse {
            batch_id: row.try_get("id")?,
            status: BatchStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("batch status {status:?}")))?,
        })
    }

    /// Records the request count found by validation and the model that will answer.
    pub async fn set_total(&self, id: &str, total: i64, model: &str) -> Result<(), StoreError> {
        check_text("batches.model", model)?;
        sqlx::query("UPDATE batches SET total = $2, model = $3 WHERE id = $1")
            .bind(id)
            .bind(total)
            .bind(model)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the output and error files of a finalized batch.
    pub async fn set_output_files(
        &self,
        id: &str,
        output_file_id: Option<&str>,
        error_file_id: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE batches SET output_file_id = $2, error_file_id = $3 WHERE id = $1")
            .bind(id)
            .bind(output_file_id)
            .bind(error_file_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Persists one finished line and counts it, atomically and at most once: `false` when the
    /// line was already recorded (by an earlier, killed worker), in which case nothing changes.
    ///
    /// Text holding U+0000 (which PostgreSQL cannot store) is refused on every backend.
    pub async fn record_line(&self, batch_id: &str, line: &BatchLine) -> Result<bool, StoreError> {
        check_text(
            "batch_lines.custom_id",
            line.custom_id.as_deref().unwrap_or_default(),
        )?;
        check_text("batch_lines.body", &line.body)?;
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO batch_lines (batch_id, line_no, custom_id, kind, body, input_tokens, \
             cached_tokens, output_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (batch_id, line_no) DO NOTHING",
        )
        .bind(batch_id)
        .bind(line.line_no)
        .bind(&line.custom_id)
        .bind(line.kind.as_str())
        .bind(&line.body)
        .bind(line.input_tokens)
        .bind(line.cached_tokens)
        .bind(line.output_tokens)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            let counter = match line.kind {
                LineKind::Output => "completed",
                LineKind::Error => "failed",
            };
            sqlx::query(&format!(
                "UPDATE batches SET {counter} = {counter} + 1, input_tokens = input_tokens + $2, \
                 cached_tokens = cached_tokens + $3, output_tokens = output_tokens + $4 \
                 WHERE id = $1"
            ))
            .bind(batch_id)
            .bind(line.input_tokens)
            .bind(line.cached_tokens)
            .bind(line.output_tokens)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Line numbers of a batch already finished (to skip them when resuming).
    pub async fn finished_line_numbers(&self, batch_id: &str) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("SELECT line_no FROM batch_lines WHERE batch_id = $1")
            .bind(batch_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get::<i64, _>("line_no"))
            .collect::<Result<_, _>>()?)
    }

    /// Up to `limit` finished lines of one kind with line numbers above `after`, in order.
    pub async fn batch_lines(
        &self,
        batch_id: &str,
        kind: LineKind,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BatchLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT line_no, custom_id, body, input_tokens, cached_tokens, output_tokens \
             FROM batch_lines \
             WHERE batch_id = $1 AND kind = $2 AND line_no > $3 ORDER BY line_no LIMIT $4",
        )
        .bind(batch_id)
        .bind(kind.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BatchLine {
                    line_no: r.try_get("line_no")?,
                    custom_id: r.try_get("custom_id")?,
                    kind,
                    body: r.try_get("body")?,
                    input_tokens: r.try_get("input_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    output_tokens: r.try_get("output_tokens")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
