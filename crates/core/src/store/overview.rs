//! What batchlab-api's status page, `/v1/status`, `/v1/models` and `/metrics` show at a glance:
//! batches by status and the queue's depth, every Label Studio project the curation tables know
//! with its counts, milestones and latest accuracy, and the workers seen lately (the `workers`
//! table, refreshed by each worker's heartbeat).
//!
//! Project figures come from the same queries as `GET /v1/label-studio/projects/{id}`
//! ([`Store::annotation_counts`], [`Store::exports`], [`Store::accuracy_records`]), so both
//! always agree.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::batches::ACTIVE;
use super::{now, AccuracyRecord, AnnotationCounts, BatchStatus, Store, StoreError};

/// Batches by status and how many wait for a worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BatchCounts {
    /// Every status (zero included) → batches in it.
    pub by_status: BTreeMap<&'static str, i64>,
    /// Batches a worker still has to act on and that no live lease holds: what the next
    /// [`Store::claim_batch`] would pick from.
    pub queue_depth: i64,
}

/// One milestone whose export was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MilestoneReached {
    /// The valid-annotation count it stands for.
    pub milestone: i64,
    /// The export's own file name (without its directory).
    pub file: String,
    /// The export's full path as recorded.
    pub path: String,
    /// Hex SHA-256 of the file, when recorded.
    pub sha256: Option<String>,
    /// When it was written, unix seconds.
    pub created_at: i64,
}

/// One accuracy record, reduced to the model version it compared most answers of.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AccuracyPoint {
    /// The annotation count crossed.
    pub checkpoint: i64,
    /// When it was kept, unix seconds.
    pub created_at: i64,
    /// The model version shown (the one with the most comparisons); `None` when the record
    /// compared no version.
    pub model_version: Option<String>,
    /// Agreement over all fields of that version (0..1), `None` when nothing was compared.
    pub overall: Option<f64>,
    /// Field → agreement (0..1) of that version; fields with nothing compared are left out.
    pub fields: BTreeMap<String, f64>,
}

/// A Label Studio project the curation tables know, at a glance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectOverview {
    /// The Label Studio instance it belongs to.
    pub instance: String,
    /// Label Studio's project id.
    pub id: i64,
    /// Its title (empty when only its id is known).
    pub title: String,
    /// Whether Label Studio deleted it.
    pub deleted: bool,
    /// Tasks and annotations, as `GET /v1/label-studio/projects/{id}` counts them.
    pub counts: AnnotationCounts,
    /// Milestones whose export was written, oldest first.
    pub milestones: Vec<MilestoneReached>,
    /// Exports written for any reason (milestones and START_TRAINING).
    pub exports: i64,
    /// Accuracy records, oldest checkpoint first (what the status page charts).
    pub accuracy_history: Vec<AccuracyPoint>,
    /// The newest record's agreement per field (0..1): what `batchlab_project_accuracy` shows.
    pub latest_accuracy: BTreeMap<String, f64>,
}

/// What a worker reports on each heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerHeartbeat<'a> {
    /// Its `worker.id`, the name its leases carry.
    pub id: &'a str,
    /// The loaded model's id (`engine.model_id`).
    pub model: &'a str,
    /// The GGUF it loaded.
    pub model_path: &'a str,
    /// That file's SHA-256, when known (the engine hashes it as it loads).
    pub model_sha256: Option<&'a str>,
    /// Tokens generated since it started.
    pub generated_tokens: i64,
    /// Tokens per second over the last heartbeat interval.
    pub tokens_per_second: f64,
    /// When it started, unix seconds.
    pub started_at: i64,
}

/// A worker as its last heartbeat left it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerRecord {
    /// Its `worker.id`.
    pub id: String,
    /// The loaded model's id.
    pub model: String,
    /// The GGUF it loaded.
    pub model_path: String,
    /// That file's SHA-256, when known.
    pub model_sha256: Option<String>,
    /// Tokens generated since it started.
    pub generated_tokens: i64,
    /// Tokens per second over its last heartbeat interval.
    pub tokens_per_second: f64,
    /// The batch it held a live lease on at its last heartbeat.
    pub batch_id: Option<String>,
    /// When it started, unix seconds.
    pub started_at: i64,
    /// Its last heartbeat, unix seconds.
    pub last_seen: i64,
}

const WORKER_COLUMNS: &str = "id, model, model_path, model_sha256, generated_tokens, \
     tokens_per_second, batch_id, started_at, last_seen";

fn worker_from_row(row: &AnyRow) -> Result<WorkerRecord, sqlx::Error> {
    Ok(WorkerRecord {
        id: row.try_get("id")?,
        model: row.try_get("model")?,
        model_path: row.try_get("model_path")?,
        model_sha256: row.try_get("model_sha256")?,
        generated_tokens: row.try_get("generated_tokens")?,
        tokens_per_second: row.try_get("tokens_per_second")?,
        batch_id: row.try_get("batch_id")?,
        started_at: row.try_get("started_at")?,
        last_seen: row.try_get("last_seen")?,
    })
}

/// Reduces one accuracy record (its report: model version → `{overall_accuracy,
/// field_accuracy, counts}`, as curation keeps it) to the version with the most comparisons
/// (ties: the first by name). An unreadable report gives a point with no version.
pub fn accuracy_point(record: &AccuracyRecord) -> AccuracyPoint {
    let report: Value = serde_json::from_str(&record.report).unwrap_or(Value::Null);
    let best = report.as_object().and_then(|versions| {
        versions
            .iter()
            .filter(|(_, r)| r.is_object())
            .max_by(|(an, a), (bn, b)| {
                let comparisons = |r: &Value| r["counts"]["comparisons"].as_u64().unwrap_or(0);
                comparisons(a).cmp(&comparisons(b)).then_with(|| bn.cmp(an))
            })
    });
    let (model_version, overall, fields) = match best {
        None => (None, None, BTreeMap::new()),
        Some((version, r)) => (
            Some(version.clone()),
            r["overall_accuracy"].as_f64(),
            r["field_accuracy"]
                .as_object()
                .map(|f| {
                    f.iter()
                        .filter_map(|(name, v)| Some((name.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        ),
    };
    AccuracyPoint {
        checkpoint: record.checkpoint,
        created_at: record.created_at,
        model_version,
        overall,
        fields,
    }
}

impl Store {
    /// Batches by status (every status listed, zero included) and the queue's depth.
    pub async fn batch_counts(&self) -> Result<BatchCounts, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut by_status: BTreeMap<&'static str, i64> =
            BatchStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for row in &rows {
            let status: String = row.try_get("status")?;
            let status = BatchStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("batch status {status:?}")))?;
            by_status.insert(status.as_str(), row.try_get("n")?);
        }
        let queue_depth: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM batches WHERE status IN ({ACTIVE}) \
             AND (lease_expires_at IS NULL OR lease_expires_at < $1)"
        ))
        .bind(now())
        .fetch_one(&self.pool)
        .await?;
        Ok(BatchCounts {
            by_status,
            queue_depth,
        })
    }

    /// Up to `limit` Label Studio projects the curation tables know — a project row, or
    /// annotations under its id — ordered by instance and id, each with its counts, milestones
    /// reached and accuracy.
    pub async fn project_overviews(&self, limit: i64) -> Result<Vec<ProjectOverview>, StoreError> {
        let rows = sqlx::query(
            "SELECT k.instance, k.id, p.title, p.deleted FROM ( \
               SELECT instance, id FROM ls_projects \
               UNION SELECT DISTINCT instance, project_id AS id FROM ls_annotations) k \
             LEFT JOIN ls_projects p ON p.instance = k.instance AND p.id = k.id \
             ORDER BY k.instance, k.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let instance: String = row.try_get("instance")?;
            let id: i64 = row.try_get("id")?;
            let title: Option<String> = row.try_get("title")?;
            let deleted: Option<i64> = row.try_get("deleted")?;
            out.push(
                self.project_overview(instance, id, title.unwrap_or_default(), deleted == Some(1))
                    .await?,
            );
        }
        Ok(out)
    }

    async fn project_overview(
        &self,
        instance: String,
        id: i64,
        title: String,
        deleted: bool,
    ) -> Result<ProjectOverview, StoreError> {
        let counts = self.annotation_counts(&instance, id).await?;
        let exports = self.exports(&instance, id).await?;
        let history: Vec<AccuracyPoint> = self
            .accuracy_records(&instance, id)
            .await?
            .iter()
            .map(accuracy_point)
            .collect();
        let latest_accuracy = history.last().map(|p| p.fields.clone()).unwrap_or_default();
        Ok(ProjectOverview {
            milestones: exports
                .iter()
                .filter_map(|e| {
                    Some(MilestoneReached {
                        milestone: e.milestone?,
                        file: std::path::Path::new(&e.path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| e.path.clone()),
                        path: e.path.clone(),
                        sha256: e.sha256.clone(),
                        created_at: e.created_at,
                    })
                })
                .collect(),
            exports: exports.len() as i64,
            instance,
            id,
            title,
            deleted,
            counts,
            accuracy_history: history,
            latest_accuracy,
        })
    }

    /// Records a worker's heartbeat: its row is created or replaced, stamped now, with the
    /// batch it holds a live lease on (read in the same statement).
    pub async fn upsert_worker(&self, w: &WorkerHeartbeat<'_>) -> Result<(), StoreError> {
        let t = now();
        sqlx::query(&format!(
            "INSERT INTO workers (id, model, model_path, model_sha256, generated_tokens, \
               tokens_per_second, batch_id, started_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6, \
               (SELECT b.id FROM batches b WHERE b.lease_owner = $1 AND b.status IN ({ACTIVE}) \
                  AND b.lease_expires_at >= $8 ORDER BY b.seq LIMIT 1), $7, $8) \
             ON CONFLICT (id) DO UPDATE SET model = excluded.model, model_path = excluded.model_path, \
               model_sha256 = excluded.model_sha256, generated_tokens = excluded.generated_tokens, \
               tokens_per_second = excluded.tokens_per_second, batch_id = excluded.batch_id, \
               started_at = excluded.started_at, last_seen = excluded.last_seen"
        ))
        .bind(w.id)
        .bind(w.model)
        .bind(w.model_path)
        .bind(w.model_sha256)
        .bind(w.generated_tokens)
        .bind(w.tokens_per_second)
        .bind(w.started_at)
        .bind(t)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Workers whose last heartbeat is at most `seconds` old, by model then id.
    pub async fn workers_seen_within(&self, seconds: i64) -> Result<Vec<WorkerRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE last_seen >= $1 ORDER BY model, id"
        ))
        .bind(now().saturating_sub(seconds))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(worker_from_row).collect::<Result<_, _>>()?)
    }

    /// Deletes the rows of workers not seen for more than `seconds` (gone for good); answers
    /// how many went.
    pub async fn forget_workers_unseen_for(&self, seconds: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM workers WHERE last_seen < $1")
            .bind(now().saturating_sub(seconds))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::{accuracy_point, AccuracyRecord};

    #[test]
    fn accuracy_points_show_the_version_with_most_comparisons() {
        let record = AccuracyRecord {
            checkpoint: 100,
            created_at: 7,
            report: r#"{"a": {"overall_accuracy": 0.5, "field_accuracy": {"x": 0.5, "y": null},
                          "counts": {"comparisons": 4}},
                        "b": {"overall_accuracy": 0.75, "field_accuracy": {"x": 1.0, "y": 0.5},
                          "counts": {"comparisons": 8}}}"#
                .into(),
        };
        let p = accuracy_point(&record);
        assert_eq!(p.model_version.as_deref(), Some("b"));
        assert_eq!(p.overall, Some(0.75));
        assert_eq!(p.fields.len(), 2);
        assert_eq!(p.fields["x"], 1.0);

        let empty = accuracy_point(&AccuracyRecord {
            report: "{}".into(),
            ..record.clone()
        });
        assert_eq!((empty.model_version, empty.fields.len()), (None, 0));
        let corrupt = accuracy_point(&AccuracyRecord {
            report: "not json".into(),
            ..record
        });
        assert_eq!(corrupt.overall, None);
    }
}
