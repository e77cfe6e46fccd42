//! Which lines of a batch are tasks of a Label Studio project (`ls_import_lines`), so that an
//! import that failed half-way can be run again without creating a task twice.
//!
//! A line is marked sent ([`Store::mark_import_sent`], no task id) before the request that
//! creates its task, and gets its task id ([`Store::record_imported_tasks`]) once Label Studio
//! answered or a later run found the task; a mark without a task id means "maybe created" (see
//! `crate::curation::import`).

use sqlx::Row;

use super::{now, NulInText, Store, StoreError};

/// A line of a batch as an import into one project left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedLine {
    /// The line's `custom_id`.
    pub custom_id: String,
    /// Label Studio's task; `None` when it was sent but the answer was not seen.
    pub task_id: Option<i64>,
}

/// Rows written per statement (up to seven parameters each, well under both databases' limits).
const ROWS_PER_STATEMENT: usize = 200;

fn refuse_nul(column: &'static str, value: &str) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::Database(sqlx::Error::Encode(Box::new(
            NulInText { column },
        ))));
    }
    Ok(())
}

/// `($1, $2, $3, $4), ($5, ...)` for `rows` rows of `width` parameters.
fn placeholders(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Every line of `batch_id` an import into `project_id` of `instance` marked or recorded,
    /// by `custom_id`.
    pub async fn imported_lines(
        &self,
        instance: &str,
        project_id: i64,
        batch_id: &str,
    ) -> Result<Vec<ImportedLine>, StoreError> {
        if batch_id.contains('\0') {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT custom_id, task_id FROM ls_import_lines \
             WHERE instance = $3 AND project_id = $1 AND batch_id = $2 ORDER BY custom_id",
        )
        .bind(project_id)
        .bind(batch_id)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ImportedLine {
                    custom_id: r.try_get("custom_id")?,
                    task_id: r.try_get("task_id")?,
                })
            })
            .collect()
    }

    /// Marks lines as sent to `project_id`, committed before the request that creates their
    /// tasks: a line already marked or recorded is left as it is.
    pub async fn mark_import_sent(
        &self,
        instance: &str,
        project_id: i64,
        batch_id: &str,
        custom_ids: &[&str],
    ) -> Result<(), StoreError> {
        refuse_nul("batch_id", batch_id)?;
        for id in custom_ids {
            refuse_nul("custom_id", id)?;
        }
        let mut tx = self.pool.begin().await?;
        let sent_at = now();
        for part in custom_ids.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO ls_import_lines (instance, project_id, batch_id, custom_id, sent_at) VALUES {} \
                 ON CONFLICT (instance, project_id, batch_id, custom_id) DO NOTHING",
                placeholders(part.len(), 5)
            );
            let mut query = sqlx::query(&sql);
            for id in part {
                query = query
                    .bind(instance)
                    .bind(project_id)
                    .bind(batch_id)
                    .bind(*id)
                    .bind(sent_at);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the tasks of lines, `(custom_id, task_id)`, all in one transaction: a line marked
    /// sent gets its task; a line that already has one keeps it.
    pub async fn record_imported_tasks(
        &self,
        instance: &str,
        project_id: i64,
        batch_id: &str,
        tasks: &[(&str, i64)],
    ) -> Result<(), StoreError> {
        refuse_nul("batch_id", batch_id)?;
        for (id, _) in tasks {
            refuse_nul("custom_id", id)?;
        }
        let mut tx = self.pool.begin().await?;
        let at = now();
        for part in tasks.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO ls_import_lines (instance, project_id, batch_id, custom_id, task_id, sent_at, imported_at) \
                 VALUES {} ON CONFLICT (instance, project_id, batch_id, custom_id) \
                 DO UPDATE SET task_id = excluded.task_id, imported_at = excluded.imported_at \
                 WHERE ls_import_lines.task_id IS NULL",
                placeholders(part.len(), 7)
            );
            let mut query = sqlx::query(&sql);
            for (id, task) in part {
                query = query
                    .bind(instance)
                    .bind(project_id)
                    .bind(batch_id)
                    .bind(*id)
                    .bind(*task)
                    .bind(at)
                    .bind(at);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_every_cell() {
        assert_eq!(super::placeholders(2, 2), "($1, $2), ($3, $4)");
    }
}
