//! Rows of the `files` table: metadata of uploaded and generated files (bodies live in blobs).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::batches::ACTIVE;
use super::{Store, StoreError};

/// A file's metadata, as the Files API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// `file-...` identifier.
    pub id: String,
    /// Name given at upload (or made up for generated files).
    pub filename: String,
    /// `batch`, `batch_output`, `fine-tune`, ...
    pub purpose: String,
    /// Size of the body in bytes.
    pub bytes: i64,
    /// Number of lines in the body (JSONL request count for batch inputs).
    pub lines: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which the file may be removed, if any.
    pub expires_at: Option<i64>,
}

const COLUMNS: &str = "id, filename, purpose, bytes, lines, created_at, expires_at";

fn from_row(row: &AnyRow) -> Result<FileRecord, sqlx::Error> {
    Ok(FileRecord {
        id: row.try_get("id")?,
        filename: row.try_get("filename")?,
        purpose: row.try_get("purpose")?,
        bytes: row.try_get("bytes")?,
        lines: row.try_get("lines")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

impl Store {
    /// Records a file whose body is already in the blob store.
    pub async fn insert_file(&self, f: &FileRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO files (id, filename, purpose, bytes, lines, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&f.id)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.bytes)
        .bind(f.lines)
        .bind(f.created_at)
        .bind(f.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One file by id.
    pub async fn get_file(&self, id: &str) -> Result<Option<FileRecord>, StoreError> {
        if id.contains('\0') {
            // No stored id holds U+0000 (writes refuse it), and PostgreSQL cannot compare one.
            return Ok(None);
        }
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(from_row).transpose()?)
    }

    /// A page of files, optionally of one purpose, newest first (or oldest first when
    /// `ascending`), starting after the file `after`. Fetches `limit + 1` rows so callers can
    /// tell whether there are more.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        ascending: bool,
    ) -> Result<Vec<FileRecord>, StoreError> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM files \
             WHERE ($1 IS NULL OR purpose = $1) \
               AND ($2 IS NULL OR seq {cmp} (SELECT seq FROM files WHERE id = $2)) \
             ORDER BY seq {order} LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(purpose)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// Deletes a file's row; `false` when there was none.
    pub async fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes the rows of up to `limit` files whose `expires_at` is before `now` (unix
    /// seconds), oldest upload first, and answers them; the caller removes their bodies. A file
    /// an unfinished batch (validating, in_progress, finalizing or cancelling: the statuses for
    /// which `DELETE /v1/files` answers 409, see [`Store::delete_file_if_unused`]) uses as its
    /// input, output or error file is kept, in the same statement, however long ago it expired;
    /// it goes in a later pass once the batch has ended. One bounded statement per call: call
    /// again until fewer than `limit` come back.
    pub async fn delete_expired_files(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<FileRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "DELETE FROM files WHERE id IN ( \
               SELECT f.id FROM files f \
               WHERE f.expires_at IS NOT NULL AND f.expires_at < $1 \
                 AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.status IN ({ACTIVE}) \
                   AND (b.input_file_id = f.id OR b.output_file_id = f.id OR b.error_file_id = f.id)) \
               ORDER BY f.seq LIMIT $2) \
             RETURNING {COLUMNS}"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }
}
