//! Rows of the `learned_models` table (the classifiers the ML backend learns from a project's
//! annotations) and what training reads: a project's annotations with their tasks' data.

use sqlx::Row;

use super::{now, Store, StoreError};

/// One control's learned classifier for a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedModel {
    /// The control tag's name.
    pub control: String,
    /// Hash of the labeling config it was trained for.
    pub config_hash: String,
    /// Fingerprint of the annotations it was trained on.
    pub fingerprint: String,
    /// The classifier's parameters, as JSON text.
    pub classifier: String,
    /// Its cross-validated evaluation, as JSON text.
    pub evaluation: String,
    /// When it was trained, unix seconds (set by the store on save).
    pub trained_at: i64,
}

/// One annotation to learn from: its task's data and its result.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingAnnotation {
    /// Label Studio's task id.
    pub task_id: i64,
    /// The task's data object, as JSON text.
    pub data: String,
    /// The annotation's `result` list, as JSON text.
    pub result: String,
    /// Starred as ground truth.
    pub ground_truth: bool,
}

/// Where a project's annotations stand, cheap to ask on every prediction request: training
/// runs again when this changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AnnotationState {
    /// Valid, not cancelled, not deleted annotations.
    pub annotations: i64,
    /// The newest change among them, unix microseconds.
    pub newest_us: i64,
}

impl Store {
    /// A project's learned classifiers.
    pub async fn learned_models(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<Vec<LearnedModel>, StoreError> {
        let rows = sqlx::query(
            "SELECT control, config_hash, fingerprint, classifier, evaluation, trained_at \
             FROM learned_models WHERE instance = $1 AND project_id = $2 ORDER BY control",
        )
        .bind(instance)
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LearnedModel {
                    control: r.try_get("control")?,
                    config_hash: r.try_get("config_hash")?,
                    fingerprint: r.try_get("fingerprint")?,
                    classifier: r.try_get("classifier")?,
                    evaluation: r.try_get("evaluation")?,
                    trained_at: r.try_get("trained_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Replaces a project's learned classifiers with `models` in one transaction.
    pub async fn save_learned_models(
        &self,
        instance: &str,
        project_id: i64,
        models: &[LearnedModel],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM learned_models WHERE instance = $1 AND project_id = $2")
            .bind(instance)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        for m in models {
            sqlx::query(
                "INSERT INTO learned_models (instance, project_id, control, config_hash, fingerprint, \
                 classifier, evaluation, trained_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(instance)
            .bind(project_id)
            .bind(&m.control)
            .bind(&m.config_hash)
            .bind(&m.fingerprint)
            .bind(&m.classifier)
            .bind(&m.evaluation)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// How many annotations a project has to learn from, and the newest change among them.
    pub async fn annotation_state(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<AnnotationState, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS annotations, COALESCE(MAX(updated_at_us), 0) AS newest_us \
             FROM ls_annotations WHERE instance = $1 AND project_id = $2 AND deleted = 0 \
             AND valid = 1 AND was_cancelled = 0",
        )
        .bind(instance)
        .bind(project_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(AnnotationState {
            annotations: row.try_get("annotations")?,
            newest_us: row.try_get("newest_us")?,
        })
    }

    /// A project's annotations to learn from: valid, not cancelled, on live tasks; one per task
    /// (a ground-truth one when there is one, else the newest), newest tasks first, at most
    /// `limit` (read from the newest `4 × limit` annotations, so memory stays bounded).
    pub async fn training_annotations(
        &self,
        instance: &str,
        project_id: i64,
        limit: i64,
    ) -> Result<Vec<TrainingAnnotation>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.task_id, t.data, a.result, a.ground_truth FROM ls_annotations a \
             JOIN ls_tasks t ON t.instance = a.instance AND t.id = a.task_id AND t.deleted = 0 \
             WHERE a.instance = $1 AND a.project_id = $2 AND a.deleted = 0 AND a.valid = 1 \
             AND a.was_cancelled = 0 ORDER BY a.task_id DESC, a.ground_truth DESC, a.updated_at_us DESC \
             LIMIT $3",
        )
        .bind(instance)
        .bind(project_id)
        .bind(limit.saturating_mul(4))
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<TrainingAnnotation> = Vec::new();
        for r in &rows {
            let a = TrainingAnnotation {
                task_id: r.try_get("task_id")?,
                data: r.try_get("data")?,
                result: r.try_get("result")?,
                ground_truth: r.try_get::<i64, _>("ground_truth")? != 0,
            };
            if out.last().is_none_or(|prev| prev.task_id != a.task_id) {
                out.push(a);
            }
        }
        out.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(out)
    }
}
