//! Rows of the curation tables: Label Studio webhook events as delivered, the projects, tasks,
//! annotations and predictions they describe, the exports written and the accuracy records kept.
//!
//! Writes that come from webhook events go through a [`CurationTx`], so that one event is
//! applied, and marked processed, atomically. Every upsert is guarded so that a replayed or
//! reordered delivery cannot undo a newer state (see [`CurationTx::upsert_annotation`]).

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{now, Store, StoreError};

/// A webhook delivery to record.
#[derive(Clone, Debug)]
pub struct NewWebhookEvent<'a> {
    /// sha256 of the body: the same delivery twice has the same key.
    pub delivery_key: &'a str,
    /// Label Studio's `action`.
    pub action: &'a str,
    /// The project the event is about, when the body says.
    pub project_id: Option<i64>,
    /// The body as delivered.
    pub body: &'a str,
}

/// A recorded webhook delivery waiting to be processed.
#[derive(Clone, Debug)]
pub struct WebhookEvent {
    /// Order of arrival.
    pub id: i64,
    /// Label Studio's `action`.
    pub action: String,
    /// The body as delivered.
    pub body: String,
    /// Failed attempts at the work it asked for (a START_TRAINING's export) so far.
    pub attempts: i64,
}

/// How many deliveries were recorded, how many still wait and how many could not be applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WebhookEventCounts {
    /// Every delivery recorded.
    pub received: i64,
    /// Deliveries not processed yet.
    pub pending: i64,
    /// Deliveries that could not be applied (see [`Store::fail_event`]).
    pub failed: i64,
}

/// A delivery that could not be applied, as the project status shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FailedWebhookEvent {
    /// The stored event.
    pub id: i64,
    /// Label Studio's `action`.
    pub action: String,
    /// Why it could not be applied.
    pub reason: String,
    /// When it arrived (unix seconds, as every time in the store).
    pub received_at: i64,
}

/// The start of every failed event's `outcome`, so failures can be told from other outcomes.
/// (Before it existed, failures were recorded as `error: ...` or `unreadable body: ...`.)
pub const FAILED_OUTCOME: &str = "failed: ";

/// SQL condition matching failed events' outcomes, the older spellings included.
const FAILED_CONDITION: &str =
    "(outcome LIKE 'failed: %' OR outcome LIKE 'error: %' OR outcome LIKE 'unreadable body%')";

/// A Label Studio project as batchlab last heard of it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectRow {
    /// Label Studio's project id.
    pub id: i64,
    /// Its title.
    pub title: String,
    /// Its labeling config (XML); empty when only the id is known.
    pub label_config: String,
    /// Whether Label Studio deleted it.
    pub deleted: bool,
}

/// A task's data.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRow {
    /// Label Studio's task id.
    pub id: i64,
    /// Its project.
    pub project_id: i64,
    /// The task's `data` object as JSON text.
    pub data: String,
}

/// An annotation as last delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct AnnotationRow {
    /// Label Studio's annotation id.
    pub id: i64,
    /// Its project.
    pub project_id: i64,
    /// Its task.
    pub task_id: i64,
    /// The `result` list as JSON text.
    pub result: String,
    /// Starred as ground truth.
    pub ground_truth: bool,
    /// The annotator skipped the task.
    pub was_cancelled: bool,
    /// Seconds the annotator spent.
    pub lead_time: Option<f64>,
    /// The annotator's user id.
    pub completed_by: Option<i64>,
    /// Label Studio's ISO timestamp of creation.
    pub created_at: Option<String>,
    /// Label Studio's ISO timestamp of the last change.
    pub updated_at: Option<String>,
    /// `updated_at` in unix microseconds, for ordering.
    pub updated_at_us: i64,
    /// Whether the result fits the project's labeling config.
    pub valid: bool,
    /// Why it does not, when it does not.
    pub invalid_reason: Option<String>,
}

/// A prediction batchlab made for a task.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictionRow {
    /// Its project.
    pub project_id: i64,
    /// Its task.
    pub task_id: i64,
    /// The model version Label Studio sees.
    pub model_version: String,
    /// `import` (a batch's results) or `ml_backend`.
    pub source: String,
    /// The prediction's overall score.
    pub score: Option<f64>,
    /// The `result` list as JSON text.
    pub result: String,
}

/// An export written to the training directory.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ExportRecord {
    /// Its project.
    pub project_id: i64,
    /// `milestone` or `start_training`.
    pub reason: String,
    /// The annotation count it was written for, for milestone exports.
    pub milestone: Option<i64>,
    /// The file written: the export's own file, never rewritten (a copy also went to the
    /// project's latest export file); the latest file itself for exports recorded before that.
    pub path: String,
    /// Hex SHA-256 of the file's bytes, to verify it by; `None` for exports recorded before
    /// checksums were kept.
    pub sha256: Option<String>,
    /// Tasks in the file.
    pub tasks: i64,
    /// Annotations in the file.
    pub annotations: i64,
    /// Unix seconds.
    pub created_at: i64,
}

/// Accuracy of stored predictions at one annotation count.
#[derive(Clone, Debug, PartialEq)]
pub struct AccuracyRecord {
    /// The annotation count crossed.
    pub checkpoint: i64,
    /// The report, JSON text.
    pub report: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// Annotation counts of a project, as exports and milestones count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnnotationCounts {
    /// Tasks not deleted.
    pub tasks: i64,
    /// Annotations not deleted.
    pub annotations: i64,
    /// Valid, non-cancelled annotations: what milestones count.
    pub valid: i64,
    /// Annotations whose result does not fit the labeling config.
    pub invalid: i64,
    /// Skipped tasks.
    pub cancelled: i64,
    /// Valid ground-truth annotations.
    pub ground_truth: i64,
}

const ANNOTATION_COLUMNS: &str =
    "id, project_id, task_id, result, ground_truth, was_cancelled, lead_time, completed_by, \
     created_at, updated_at, updated_at_us, valid, invalid_reason";

fn annotation_from_row(row: &AnyRow) -> Result<AnnotationRow, sqlx::Error> {
    Ok(AnnotationRow {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        task_id: row.try_get("task_id")?,
        result: row.try_get("result")?,
        ground_truth: row.try_get::<i64, _>("ground_truth")? != 0,
        was_cancelled: row.try_get::<i64, _>("was_cancelled")? != 0,
        lead_time: row.try_get("lead_time")?,
        completed_by: row.try_get("completed_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        updated_at_us: row.try_get("updated_at_us")?,
        valid: row.try_get::<i64, _>("valid")? != 0,
        invalid_reason: row.try_get("invalid_reason")?,
    })
}

fn prediction_from_row(row: &AnyRow) -> Result<PredictionRow, sqlx::Error> {
    Ok(PredictionRow {
        project_id: row.try_get("project_id")?,
        task_id: row.try_get("task_id")?,
        model_version: row.try_get("model_version")?,
        source: row.try_get("source")?,
        score: row.try_get("score")?,
        result: row.try_get("result")?,
    })
}

fn project_from_row(row: &AnyRow) -> Result<ProjectRow, sqlx::Error> {
    Ok(ProjectRow {
        id: row.try_get("id")?,
        title: row.try_get("title")?,
        label_config: row.try_get("label_config")?,
        deleted: row.try_get::<i64, _>("deleted")? != 0,
    })
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

impl Store {
    /// Records a delivery unless the same body was recorded before. Answers the event's id and
    /// whether it is new.
    pub async fn insert_webhook_event(
        &self,
        e: &NewWebhookEvent<'_>,
    ) -> Result<(i64, bool), StoreError> {
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO webhook_events (delivery_key, action, project_id, body, received_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (delivery_key) DO NOTHING RETURNING id",
        )
        .bind(e.delivery_key)
        .bind(e.action)
        .bind(e.project_id)
        .bind(e.body)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = inserted {
            return Ok((id, true));
        }
        let id: i64 = sqlx::query_scalar("SELECT id FROM webhook_events WHERE delivery_key = $1")
            .bind(e.delivery_key)
            .fetch_one(&self.pool)
            .await?;
        Ok((id, false))
    }

    /// The oldest deliveries not processed yet, in order of arrival; those held back until a
    /// later time (see [`CurationTx::keep_pending`]) are left out until then.
    pub async fn pending_webhook_events(
        &self,
        limit: i64,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, action, body, attempts FROM webhook_events \
             WHERE processed_at IS NULL AND (retry_at IS NULL OR retry_at <= $1) ORDER BY id LIMIT $2",
        )
        .bind(now())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WebhookEvent {
                    id: r.try_get("id")?,
                    action: r.try_get("action")?,
                    body: r.try_get("body")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Deliveries recorded, still pending and failed; of one project when `project` is given.
    pub async fn webhook_event_counts(
        &self,
        project: Option<i64>,
    ) -> Result<WebhookEventCounts, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) AS received, COALESCE(SUM(CASE WHEN processed_at IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
             COALESCE(SUM(CASE WHEN {FAILED_CONDITION} THEN 1 ELSE 0 END), 0) AS failed \
             FROM webhook_events WHERE ($1 IS NULL OR project_id = $1)"
        );
        let row = sqlx::query(&sql)
            .bind(project)
            .fetch_one(&self.pool)
            .await?;
        Ok(WebhookEventCounts {
            received: row.try_get("received")?,
            pending: row.try_get("pending")?,
            failed: row.try_get("failed")?,
        })
    }

    /// The latest `limit` deliveries about `project` that could not be applied, newest first.
    pub async fn failed_webhook_events(
        &self,
        project: i64,
        limit: i64,
    ) -> Result<Vec<FailedWebhookEvent>, StoreError> {
        let sql = format!(
            "SELECT id, action, outcome, received_at FROM webhook_events WHERE project_id = $1 AND {FAILED_CONDITION} \
             ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(project)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let outcome: String = r.try_get("outcome")?;
                Ok(FailedWebhookEvent {
                    id: r.try_get("id")?,
                    action: r.try_get("action")?,
                    reason: outcome
                        .strip_prefix(FAILED_OUTCOME)
                        .unwrap_or(&outcome)
                        .to_owned(),
                    received_at: r.try_get("received_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Starts applying one event: the transaction first claims the event (its first statement is
    /// a write, so SQLite takes its write lock at once instead of failing to upgrade later).
    /// `None` when another processor already handled it, or holds it (see
    /// [`CurationTx::keep_pending`]).
    pub async fn begin_event(
        &self,
        event_id: i64,
        outcome: &str,
    ) -> Result<Option<CurationTx>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE webhook_events SET processed_at = $1, outcome = $2 \
             WHERE id = $3 AND processed_at IS NULL AND (retry_at IS NULL OR retry_at <= $1)",
        )
        .bind(now())
        .bind(outcome)
        .bind(event_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(CurationTx { tx, event_id }))
    }

    /// Marks an event processed after applying it failed, so that one bad ("poison") event
    /// cannot stall the ones behind it; the reason stays in `outcome`, after [`FAILED_OUTCOME`].
    pub async fn fail_event(&self, event_id: i64, reason: &str) -> Result<(), StoreError> {
        // PostgreSQL text cannot hold NUL; a reason may quote hostile input.
        let outcome = format!("{FAILED_OUTCOME}{}", reason.replace('\0', "\u{FFFD}"));
        sqlx::query("UPDATE webhook_events SET processed_at = $1, outcome = $2 WHERE id = $3 AND processed_at IS NULL")
            .bind(now())
            .bind(outcome)
            .bind(event_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks an event that [`CurationTx::keep_pending`] left pending processed, now that the
    /// work it asked for is done; `outcome` says what was done. False when it was not pending.
    pub async fn complete_event(&self, event_id: i64, outcome: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_events SET processed_at = $1, outcome = $2, retry_at = NULL \
             WHERE id = $3 AND processed_at IS NULL",
        )
        .bind(now())
        .bind(outcome)
        .bind(event_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// Records a failed attempt at a pending event's work: it keeps `attempts` failures and
    /// `outcome` (why), and is held back until `retry_at` (unix seconds) before the next try.
    pub async fn retry_event_later(
        &self,
        event_id: i64,
        attempts: i64,
        outcome: &str,
        retry_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_events SET attempts = $1, outcome = $2, retry_at = $3 \
             WHERE id = $4 AND processed_at IS NULL",
        )
        .bind(attempts)
        .bind(outcome.replace('\0', "\u{FFFD}"))
        .bind(retry_at)
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes up to `limit` webhook events processed before `processed_before` (unix
    /// seconds), oldest first, and answers how many went. Processed means applied or failed
    /// (both set `processed_at`), so a failed event stays listed in its project's status until
    /// the same age. A pending event (never processed, or a START_TRAINING waiting for its
    /// export, [`CurationTx::keep_pending`]) is never deleted, however old. Once an event is
    /// gone, a redelivery of the same body is stored and applied again; the guarded upserts make
    /// that a no-op for any state that is newer. One bounded statement per call: call again
    /// until fewer than `limit` are deleted.
    pub async fn delete_processed_webhook_events(
        &self,
        processed_before: i64,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM webhook_events WHERE id IN ( \
               SELECT id FROM webhook_events \
               WHERE processed_at IS NOT NULL AND processed_at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(processed_before)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Makes every held-back event due now, as if its retry time had passed (tests only).
    #[cfg(test)]
    pub(crate) async fn make_retries_due(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE webhook_events SET retry_at = 0 WHERE retry_at IS NOT NULL")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A project, when batchlab has heard of it.
    pub async fn get_project(&self, id: i64) -> Result<Option<ProjectRow>, StoreError> {
        let row =
            sqlx::query("SELECT id, title, label_config, deleted FROM ls_projects WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(project_from_row).transpose()?)
    }

    /// Records a project (from the import or setup path) without touching a newer webhook state.
    pub async fn ensure_project(
        &self,
        id: i64,
        title: &str,
        label_config: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_projects (id, title, label_config) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET title = excluded.title, label_config = excluded.label_config \
             WHERE ls_projects.updated_at_us = 0",
        )
        .bind(id)
        .bind(title)
        .bind(label_config)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Counts of a project's tasks and annotations.
    pub async fn annotation_counts(&self, project_id: i64) -> Result<AnnotationCounts, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS annotations, \
               COALESCE(SUM(CASE WHEN valid = 1 AND was_cancelled = 0 THEN 1 ELSE 0 END), 0) AS valid, \
               COALESCE(SUM(CASE WHEN valid = 0 THEN 1 ELSE 0 END), 0) AS invalid, \
               COALESCE(SUM(CASE WHEN was_cancelled = 1 THEN 1 ELSE 0 END), 0) AS cancelled, \
               COALESCE(SUM(CASE WHEN valid = 1 AND was_cancelled = 0 AND ground_truth = 1 THEN 1 ELSE 0 END), 0) AS ground_truth \
             FROM ls_annotations WHERE project_id = $1 AND deleted = 0",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?;
        let tasks: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ls_tasks WHERE project_id = $1 AND deleted = 0",
        )
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(AnnotationCounts {
            tasks,
            annotations: row.try_get("annotations")?,
            valid: row.try_get("valid")?,
            invalid: row.try_get("invalid")?,
            cancelled: row.try_get("cancelled")?,
            ground_truth: row.try_get("ground_truth")?,
        })
    }

    /// Up to `limit` tasks of a project after task id `after`, in id order.
    pub async fn tasks_page(
        &self,
        project_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, project_id, data FROM ls_tasks WHERE project_id = $1 AND deleted = 0 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(project_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskRow {
                    id: r.try_get("id")?,
                    project_id: r.try_get("project_id")?,
                    data: r.try_get("data")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A project's live annotations on tasks `first..=last`, by task then id.
    pub async fn annotations_in_range(
        &self,
        project_id: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations \
             WHERE project_id = $1 AND deleted = 0 AND task_id >= $2 AND task_id <= $3 ORDER BY task_id, id"
        ))
        .bind(project_id)
        .bind(first)
        .bind(last)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(annotation_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// A project's valid ground-truth annotations (the newest per task when several).
    pub async fn ground_truth(&self, project_id: i64) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE project_id = $1 AND deleted = 0 AND ground_truth = 1 \
             AND valid = 1 AND was_cancelled = 0 ORDER BY task_id, updated_at_us DESC"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<AnnotationRow> = Vec::with_capacity(rows.len());
        for row in &rows {
            let a = annotation_from_row(row)?;
            if out.last().is_none_or(|prev| prev.task_id != a.task_id) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// The live tasks of a project that hold a valid ground-truth annotation (few-shot examples).
    pub async fn ground_truth_tasks(&self, project_id: i64) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, project_id, data FROM ls_tasks WHERE project_id = $1 AND deleted = 0 AND id IN \
             (SELECT task_id FROM ls_annotations WHERE project_id = $1 AND deleted = 0 AND ground_truth = 1 \
              AND valid = 1 AND was_cancelled = 0) ORDER BY id",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskRow {
                    id: r.try_get("id")?,
                    project_id: r.try_get("project_id")?,
                    data: r.try_get("data")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A project's annotations that do not fit its labeling config.
    pub async fn invalid_annotations(
        &self,
        project_id: i64,
        limit: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE project_id = $1 AND deleted = 0 AND valid = 0 \
             ORDER BY id LIMIT $2"
        ))
        .bind(project_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(annotation_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Records predictions (replacing one of the same task, model version and source).
    pub async fn upsert_predictions(&self, rows: &[PredictionRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for p in rows {
            sqlx::query(
                "INSERT INTO ls_predictions (project_id, task_id, model_version, source, score, result, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (task_id, model_version, source) \
                 DO UPDATE SET score = excluded.score, result = excluded.result, created_at = excluded.created_at",
            )
            .bind(p.project_id)
            .bind(p.task_id)
            .bind(&p.model_version)
            .bind(&p.source)
            .bind(p.score)
            .bind(&p.result)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A project's stored predictions on tasks `first..=last` (all tasks with `i64::MIN..=i64::MAX`).
    pub async fn predictions_in_range(
        &self,
        project_id: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<PredictionRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, task_id, model_version, source, score, result FROM ls_predictions \
             WHERE project_id = $1 AND task_id >= $2 AND task_id <= $3 ORDER BY task_id, id",
        )
        .bind(project_id)
        .bind(first)
        .bind(last)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(prediction_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Claims a milestone export: true once per project and milestone, unless an earlier claim
    /// was never written (its process died) and is older than `stale_after` seconds, in which
    /// case this call takes it over.
    pub async fn claim_milestone(
        &self,
        project_id: i64,
        milestone: i64,
        path: &str,
        stale_after: i64,
    ) -> Result<bool, StoreError> {
        let t = now();
        let inserted = sqlx::query(
            "INSERT INTO curation_exports (project_id, reason, milestone, path, tasks, annotations, created_at, written) \
             VALUES ($1, 'milestone', $2, $3, 0, 0, $4, 0) ON CONFLICT (project_id, milestone) DO NOTHING",
        )
        .bind(project_id)
        .bind(milestone)
        .bind(path)
        .bind(t)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(true);
        }
        let taken_over = sqlx::query(
            "UPDATE curation_exports SET created_at = $1 \
             WHERE project_id = $2 AND milestone = $3 AND written = 0 AND created_at < $4",
        )
        .bind(t)
        .bind(project_id)
        .bind(milestone)
        .bind(t - stale_after)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken_over == 1)
    }

    /// Gives a claimed milestone back after its export failed, so that it is tried again.
    pub async fn release_milestone(
        &self,
        project_id: i64,
        milestone: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM curation_exports WHERE project_id = $1 AND milestone = $2 AND written = 0",
        )
        .bind(project_id)
        .bind(milestone)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records what an export wrote: fills in a claimed milestone, or adds an on-demand export.
    pub async fn record_export(&self, e: &ExportRecord) -> Result<(), StoreError> {
        let updated = match e.milestone {
            Some(m) => sqlx::query(
                "UPDATE curation_exports SET path = $1, tasks = $2, annotations = $3, created_at = $4, written = 1, \
                 sha256 = $7 WHERE project_id = $5 AND milestone = $6",
            )
                .bind(&e.path)
                .bind(e.tasks)
                .bind(e.annotations)
                .bind(e.created_at)
                .bind(e.project_id)
                .bind(m)
                .bind(&e.sha256)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            None => 0,
        };
        if updated == 0 {
            sqlx::query(
                "INSERT INTO curation_exports (project_id, reason, milestone, path, tasks, annotations, created_at, sha256) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(e.project_id)
            .bind(&e.reason)
            .bind(e.milestone)
            .bind(&e.path)
            .bind(e.tasks)
            .bind(e.annotations)
            .bind(e.created_at)
            .bind(&e.sha256)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// A project's written exports, oldest first.
    pub async fn exports(&self, project_id: i64) -> Result<Vec<ExportRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, reason, milestone, path, sha256, tasks, annotations, created_at FROM curation_exports \
             WHERE project_id = $1 AND written = 1 ORDER BY id",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExportRecord {
                    project_id: r.try_get("project_id")?,
                    reason: r.try_get("reason")?,
                    milestone: r.try_get("milestone")?,
                    path: r.try_get("path")?,
                    sha256: r.try_get("sha256")?,
                    tasks: r.try_get("tasks")?,
                    annotations: r.try_get("annotations")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Keeps an accuracy record for a checkpoint unless one exists; true when this call kept it.
    pub async fn insert_accuracy_record(
        &self,
        project_id: i64,
        checkpoint: i64,
        report: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO accuracy_records (project_id, checkpoint, report, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project_id, checkpoint) DO NOTHING",
        )
        .bind(project_id)
        .bind(checkpoint)
        .bind(report)
        .bind(now())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// A project's accuracy records, oldest checkpoint first.
    pub async fn accuracy_records(
        &self,
        project_id: i64,
    ) -> Result<Vec<AccuracyRecord>, StoreError> {
        let rows = sqlx::query("SELECT checkpoint, report, created_at FROM accuracy_records WHERE project_id = $1 ORDER BY checkpoint")
            .bind(project_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AccuracyRecord {
                    checkpoint: r.try_get("checkpoint")?,
                    report: r.try_get("report")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

/// One webhook event being applied: every write commits together with the event's claim.
pub struct CurationTx {
    tx: Transaction<'static, Any>,
    event_id: i64,
}

impl CurationTx {
    /// The event this transaction applies.
    pub fn event_id(&self) -> i64 {
        self.event_id
    }

    /// Sets what processing did (overwriting the outcome given to [`Store::begin_event`]).
    pub async fn set_outcome(&mut self, outcome: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE webhook_events SET outcome = $1 WHERE id = $2")
            .bind(outcome)
            .bind(self.event_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Leaves the event pending instead of marking it processed when this transaction commits
    /// (its writes still commit): for an event whose work is done after the commit (a
    /// START_TRAINING's export) and marks it processed only then ([`Store::complete_event`]).
    /// No processor takes it up again before `hold_until` (unix seconds), so a process that
    /// dies in between has it retried after that.
    pub async fn keep_pending(&mut self, outcome: &str, hold_until: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_events SET processed_at = NULL, outcome = $1, retry_at = $2 WHERE id = $3",
        )
        .bind(outcome)
        .bind(hold_until)
        .bind(self.event_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records a project's title and config unless a newer state is stored. True when the
    /// stored labeling config changed.
    pub async fn upsert_project(
        &mut self,
        id: i64,
        title: &str,
        label_config: &str,
        updated_at_us: i64,
    ) -> Result<bool, StoreError> {
        let before: Option<String> =
            sqlx::query_scalar("SELECT label_config FROM ls_projects WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *self.tx)
                .await?;
        sqlx::query(
            "INSERT INTO ls_projects (id, title, label_config, updated_at_us) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET title = excluded.title, label_config = excluded.label_config, \
             updated_at_us = excluded.updated_at_us WHERE excluded.updated_at_us >= ls_projects.updated_at_us",
        )
        .bind(id)
        .bind(title)
        .bind(label_config)
        .bind(updated_at_us)
        .execute(&mut *self.tx)
        .await?;
        let after: String =
            sqlx::query_scalar("SELECT label_config FROM ls_projects WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *self.tx)
                .await?;
        Ok(before.as_deref() != Some(after.as_str()))
    }

    /// Marks a project deleted.
    pub async fn delete_project(&mut self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_projects (id, deleted) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET deleted = 1",
        )
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// The stored labeling config of a project, if any.
    pub async fn project_config(&mut self, id: i64) -> Result<Option<String>, StoreError> {
        let config: Option<String> =
            sqlx::query_scalar("SELECT label_config FROM ls_projects WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *self.tx)
                .await?;
        Ok(config.filter(|c| !c.is_empty()))
    }

    /// Records a task's data unless a newer state (or its deletion) is stored.
    pub async fn upsert_task(
        &mut self,
        task: &TaskRow,
        updated_at_us: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_tasks (id, project_id, data, updated_at_us) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id, data = excluded.data, \
             updated_at_us = excluded.updated_at_us \
             WHERE ls_tasks.deleted = 0 AND excluded.updated_at_us >= ls_tasks.updated_at_us",
        )
        .bind(task.id)
        .bind(task.project_id)
        .bind(&task.data)
        .bind(updated_at_us)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Marks tasks deleted (a tombstone when unknown), with their annotations.
    pub async fn delete_tasks(&mut self, project_id: i64, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            sqlx::query(
                "INSERT INTO ls_tasks (id, project_id, data, deleted) VALUES ($1, $2, '{}', 1) \
                 ON CONFLICT (id) DO UPDATE SET deleted = 1",
            )
            .bind(id)
            .bind(project_id)
            .execute(&mut *self.tx)
            .await?;
            sqlx::query("UPDATE ls_annotations SET deleted = 1 WHERE task_id = $1")
                .bind(id)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }

    /// Records an annotation unless a newer state or its deletion is stored: an older update
    /// arriving after a newer one, or a creation replayed after a deletion, changes nothing.
    /// A ground-truth annotation takes the star from the task's other annotations, as Label
    /// Studio does without sending events for them. True when the row was written.
    pub async fn upsert_annotation(&mut self, a: &AnnotationRow) -> Result<bool, StoreError> {
        let written = sqlx::query(&format!(
            "INSERT INTO ls_annotations ({ANNOTATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id, task_id = excluded.task_id, \
             result = excluded.result, ground_truth = excluded.ground_truth, was_cancelled = excluded.was_cancelled, \
             lead_time = excluded.lead_time, completed_by = excluded.completed_by, created_at = excluded.created_at, \
             updated_at = excluded.updated_at, updated_at_us = excluded.updated_at_us, valid = excluded.valid, \
             invalid_reason = excluded.invalid_reason \
             WHERE ls_annotations.deleted = 0 AND excluded.updated_at_us >= ls_annotations.updated_at_us"
        ))
        .bind(a.id)
        .bind(a.project_id)
        .bind(a.task_id)
        .bind(&a.result)
        .bind(flag(a.ground_truth))
        .bind(flag(a.was_cancelled))
        .bind(a.lead_time)
        .bind(a.completed_by)
        .bind(&a.created_at)
        .bind(&a.updated_at)
        .bind(a.updated_at_us)
        .bind(flag(a.valid))
        .bind(&a.invalid_reason)
        .execute(&mut *self.tx)
        .await?
        .rows_affected()
            == 1;
        if written && a.ground_truth {
            sqlx::query(
                "UPDATE ls_annotations SET ground_truth = 0 \
                 WHERE task_id = $1 AND id <> $2 AND ground_truth = 1 AND updated_at_us <= $3",
            )
            .bind(a.task_id)
            .bind(a.id)
            .bind(a.updated_at_us)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(written)
    }

    /// Marks annotations deleted; an id not seen yet leaves a tombstone that a late creation
    /// cannot overwrite.
    pub async fn delete_annotations(
        &mut self,
        project_id: i64,
        ids: &[i64],
    ) -> Result<(), StoreError> {
        for id in ids {
            sqlx::query(
                "INSERT INTO ls_annotations (id, project_id, task_id, result, deleted, valid) VALUES ($1, $2, 0, '[]', 1, 0) \
                 ON CONFLICT (id) DO UPDATE SET deleted = 1",
            )
            .bind(id)
            .bind(project_id)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// A project's live annotations, for re-validation after its config changed.
    pub async fn project_annotations(
        &mut self,
        project_id: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE project_id = $1 AND deleted = 0"
        ))
        .bind(project_id)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows
            .iter()
            .map(annotation_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Sets an annotation's validity.
    pub async fn set_validity(
        &mut self,
        id: i64,
        invalid_reason: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE ls_annotations SET valid = $1, invalid_reason = $2 WHERE id = $3")
            .bind(flag(invalid_reason.is_none()))
            .bind(invalid_reason)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Commits the event's writes and its claim together.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
