//! Curation: what Label Studio's webhooks tell batchlab, turned into training data and
//! measurements — events stored first and applied after, annotations validated against the
//! labeling config, milestone exports written exactly once, accuracy against ground truth.

pub mod accuracy;
mod events;
pub mod export;
pub mod import;
pub mod reconcile;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;

use crate::blob::{BlobError, BlobStore};
use crate::config::CurationConfig;
use crate::labelstudio::config::{LabelConfig, LabelConfigError};
use crate::labelstudio::event::WebhookError;
use crate::labelstudio::instance::Instance;
use crate::labelstudio::region::{field_values, FieldValue, Region};
use crate::store::{
    AnnotationCounts, ExportRecord, FailedWebhookEvent, ProjectRow, Store, StoreError,
    WebhookEventCounts,
};

pub use events::Ingested;

/// Why a curation operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CurationError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing an export failed.
    #[error("writing the export failed: {0}")]
    Io(#[from] std::io::Error),
    /// The object store that holds exports failed (or is unreachable).
    #[error("the export storage failed: {0}")]
    ExportStorage(#[from] BlobError),
    /// No export of the project has this file name.
    #[error("project {project} has no export file {name:?}: the project status lists its exports")]
    UnknownExport {
        /// The project asked for.
        project: i64,
        /// The file name asked for.
        name: String,
    },
    /// The webhook body cannot be accepted.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// batchlab has never heard of this project in this Label Studio instance.
    #[error("unknown project {project} of Label Studio instance '{instance}': no Label Studio event about it has arrived")]
    UnknownProject {
        /// The instance asked about.
        instance: Instance,
        /// The project id.
        project: i64,
    },
    /// The project's labeling config is missing or does not parse.
    #[error("project {project}: {reason}")]
    LabelConfig {
        /// The project.
        project: i64,
        /// What is wrong with its config.
        reason: String,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Label Studio failed or refused a call this operation needed.
    #[error(transparent)]
    LabelStudio(#[from] crate::labelstudio::client::LabelStudioError),
    /// Label Studio's project has another creation time than the one batchlab holds under its
    /// id in this instance: another project (a re-created Label Studio). Nothing was changed.
    #[error("project {project} of Label Studio was created at {found}, but batchlab holds project {project} created at {known}. {}", recreated_advice(instance, *project))]
    Recreated {
        /// The instance whose project it is.
        instance: Instance,
        /// The project id.
        project: i64,
        /// The creation time batchlab holds.
        known: String,
        /// The creation time Label Studio reports.
        found: String,
    },
}

/// A milestone claim whose export was never written (the process died while writing) is taken
/// over after this long; so is a START_TRAINING left pending while its export is written.
const STALE_CLAIM_SECONDS: i64 = 600;

/// The curation service: shared by the webhook route, the background processor and the
/// export and accuracy routes. It works on one Label Studio instance's projects
/// ([`Curation::instance`]); [`Curation::with_instance`] gives the same service for another
/// (the processor applies each event in its own instance).
#[derive(Clone)]
pub struct Curation {
    store: Store,
    config: Arc<CurationConfig>,
    instance: Instance,
    wake: Arc<Notify>,
    /// Projects whose milestone export failed (a full disk), with when to try again: the
    /// processor retries them without waiting for another annotation.
    milestone_retries: Arc<std::sync::Mutex<BTreeMap<(Instance, i64), std::time::Instant>>>,
    /// When each project's milestones were last checked, and the projects whose check waits
    /// ([`Curation::milestone_checks`]).
    milestone_checks: Arc<std::sync::Mutex<MilestoneChecks>>,
    /// Where exports go when file bodies are in an object store (`training/` beside them), so
    /// that every machine sees them; `None`: the local `training_dir`.
    export_store: Option<BlobStore>,
}

/// Shortest time between two milestone checks of a project while events keep coming: a check
/// counts all of the project's annotations (and, every `accuracy_every` of them, reads its
/// ground truth), so checking after every pass cost a big project's processor more with each
/// annotation it gained.
const MILESTONE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Milestone checks: when each project was last checked, and the ones put off.
#[derive(Debug, Default)]
struct MilestoneChecks {
    last: BTreeMap<(Instance, i64), std::time::Instant>,
    waiting: std::collections::BTreeSet<(Instance, i64)>,
}

/// Seconds before a failed milestone export is tried again.
const MILESTONE_RETRY_SECONDS: u64 = 5;

/// What `GET /v1/label-studio/projects/{id}` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectStatus {
    /// The Label Studio instance the project belongs to.
    pub instance: String,
    /// Label Studio's project id.
    pub id: i64,
    /// Its title.
    pub title: String,
    /// Whether Label Studio deleted it.
    pub deleted: bool,
    /// Task and annotation counts.
    pub counts: AnnotationCounts,
    /// Milestones configured.
    pub milestones: Vec<u64>,
    /// Milestones whose export was written.
    pub milestones_reached: Vec<i64>,
    /// Every export written, oldest first, each with its own file and that file's SHA-256.
    pub exports: Vec<ExportRecord>,
    /// Up to 100 annotations that do not fit the labeling config, with the reason.
    pub invalid_annotations: Vec<Value>,
    /// Accuracy records kept, oldest first: checkpoint and overall accuracy per model version.
    pub accuracy_history: Vec<Value>,
    /// Webhook deliveries about this project: received, still pending, failed.
    pub webhook_events: WebhookEventCounts,
    /// Up to 100 of the latest deliveries that could not be applied, with the reason.
    pub failed_events: Vec<FailedWebhookEvent>,
    /// Label Studio objects claimed for this project whose ids contradict what batchlab holds
    /// (an id under another project or task, a reused id): kept aside, not in the counts above,
    /// each with its reason; `count` of them and the `latest` 100.
    pub conflicts: crate::store::ConflictSummary,
    /// Set when events claim this project with another creation time than batchlab holds
    /// (`project_recreated` conflicts): what happened and the commands that give the new Label
    /// Studio an instance of its own.
    pub recreated: Option<String>,
}

/// What the status of a project says when Label Studio re-created it under its id.
pub fn recreated_advice(instance: &Instance, project: i64) -> String {
    format!(
        "Label Studio sends project {project} with another creation time than the project \
         {project} batchlab holds for instance '{instance}': Label Studio was re-created with a \
         fresh database (or the id reused). Its events are kept aside as conflicts, nothing of \
         them applied. Give the new Label Studio an instance of its own: \
         `BATCHLAB_LABEL_STUDIO__INSTANCE=<new name> batchlab-api setup-label-studio --title <title> \
         --label-config <file>` (re-points its webhook at /v1/webhooks/label-studio/<new name>), \
         then `BATCHLAB_LABEL_STUDIO__INSTANCE=<new name> batchlab-api reconcile-label-studio \
         --project <id>` for each of its projects, and set the same instance name for the API \
         and the ML backend. Instance '{instance}' and its exports are kept as they are."
    )
}

/// The prefix of training exports beside the file bodies in an object store.
pub const TRAINING_PREFIX: &str = "training";

/// The name of a project's latest export file, rewritten by each export.
pub fn export_name(project_id: i64) -> String {
    format!("project_{project_id}_export.json")
}

/// The name of one export's own file, written once and never rewritten, so that its record keeps
/// pointing at what was exported: `project_{id}_milestone_{m}.json` for a milestone,
/// `project_{id}_{reason}_{unix seconds}_{random}.json` for any other export.
pub fn snapshot_name(project_id: i64, reason: &str, milestone: Option<i64>) -> String {
    match milestone {
        Some(m) => format!("project_{project_id}_milestone_{m}.json"),
        None => {
            let reason: String = reason
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let random = uuid::Uuid::new_v4().simple().to_string();
            format!(
                "project_{project_id}_{reason}_{}_{}.json",
                crate::store::now(),
                &random[..8]
            )
        }
    }
}

impl Curation {
    /// A curation service over `store`, for the projects of Label Studio `instance`.
    pub fn new(store: Store, config: CurationConfig, instance: Instance) -> Curation {
        Curation {
            store,
            config: Arc::new(config),
            instance,
            wake: Arc::new(Notify::new()),
            milestone_retries: Arc::default(),
            milestone_checks: Arc::default(),
            export_store: None,
        }
    }

    /// The same service writing its exports to `files` when that is an object store (under
    /// `training/`, per instance like the directory), so that exports and milestone snapshots
    /// live where the file bodies do and every process can serve them; a local `files` store
    /// changes nothing (exports stay in `training_dir`).
    pub fn with_exports_beside(mut self, files: &BlobStore) -> Curation {
        // In an object store `under` only checks the segment, a valid constant: it cannot fail.
        self.export_store = files
            .is_object_store()
            .then(|| files.under(TRAINING_PREFIX).ok())
            .flatten();
        self
    }

    /// This instance's export store, when exports go to an object store.
    pub(crate) fn export_blobs(&self) -> Result<Option<BlobStore>, BlobError> {
        match &self.export_store {
            None => Ok(None),
            Some(store) if self.instance.is_default() => Ok(Some(store.clone())),
            Some(store) => store.under(self.instance.as_str()).map(Some),
        }
    }

    /// The same service (store, processor wake-up, retries) for the projects of `instance`.
    pub fn with_instance(&self, instance: Instance) -> Curation {
        Curation {
            instance,
            ..self.clone()
        }
    }

    /// The Label Studio instance whose projects it works on.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The store it works on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A project batchlab has heard of, or [`CurationError::UnknownProject`].
    pub async fn project(&self, id: i64) -> Result<ProjectRow, CurationError> {
        self.store
            .get_project(self.instance.as_str(), id)
            .await?
            .ok_or_else(|| CurationError::UnknownProject {
                instance: self.instance.clone(),
                project: id,
            })
    }

    /// The directory of this instance's export files: the training directory for the default
    /// instance (as before instances existed), a sub-directory named after any other, so that
    /// two Label Studios' projects of the same id never share a file.
    pub fn training_dir(&self) -> PathBuf {
        if self.instance.is_default() {
            self.config.training_dir.clone()
        } else {
            self.config.training_dir.join(self.instance.as_str())
        }
    }

    /// A project's parsed labeling config.
    pub async fn label_config(&self, project: &ProjectRow) -> Result<LabelConfig, CurationError> {
        if project.label_config.is_empty() {
            return Err(CurationError::LabelConfig {
                project: project.id,
                reason: "its labeling config is not known yet".into(),
            });
        }
        LabelConfig::parse(&project.label_config).map_err(|e: LabelConfigError| {
            CurationError::LabelConfig {
                project: project.id,
                reason: e.to_string(),
            }
        })
    }

    /// Where the export file `name` is (or goes), as its record says: a path under the
    /// instance's training directory, or `s3://…/training/…` in the object store.
    pub fn export_location(&self, name: &str) -> Result<String, BlobError> {
        Ok(match self.export_blobs()? {
            Some(blobs) => blobs.locate(name),
            None => self.training_dir().join(name).display().to_string(),
        })
    }

    /// Counts, milestones, exports, invalid annotations and accuracy history of a project.
    pub async fn status(&self, id: i64) -> Result<ProjectStatus, CurationError> {
        let project = self.project(id).await?;
        let instance = self.instance.as_str();
        let exports = self.store.exports(instance, id).await?;
        let invalid = self.store.invalid_annotations(instance, id, 100).await?;
        let history = self.store.accuracy_records(instance, id).await?;
        let webhook_events = self
            .store
            .webhook_event_counts(Some((instance, id)))
            .await?;
        let failed_events = self.store.failed_webhook_events(instance, id, 100).await?;
        let conflicts = self.store.conflicts(instance, id, 100).await?;
        Ok(ProjectStatus {
            instance: instance.to_owned(),
            id,
            title: project.title,
            deleted: project.deleted,
            counts: self.store.annotation_counts(instance, id).await?,
            milestones: self.config.milestones.clone(),
            milestones_reached: exports.iter().filter_map(|e| e.milestone).collect(),
            exports,
            invalid_annotations: invalid
                .iter()
                .map(|a| serde_json::json!({"id": a.id, "task_id": a.task_id, "reason": a.invalid_reason}))
                .collect(),
            accuracy_history: history
                .iter()
                .map(|r| {
                    let report: Value = serde_json::from_str(&r.report).unwrap_or(Value::Null);
                    serde_json::json!({"checkpoint": r.checkpoint, "created_at": r.created_at, "model_versions": report})
                })
                .collect(),
            webhook_events,
            failed_events,
            recreated: conflicts
                .by_kind
                .contains_key(crate::store::ConflictKind::ProjectRecreated.as_str())
                .then(|| recreated_advice(&self.instance, id)),
            conflicts,
        })
    }

    /// Ground truth of a project: task id → field → value.
    pub async fn ground_truth_values(
        &self,
        project_id: i64,
        config: &LabelConfig,
    ) -> Result<BTreeMap<i64, BTreeMap<String, FieldValue>>, CurationError> {
        let rows = self
            .store
            .ground_truth(self.instance.as_str(), project_id)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|a| {
                let regions: Vec<Region> = serde_json::from_str(&a.result).ok()?;
                Some((a.task_id, field_values(config, &regions)))
            })
            .collect())
    }

    /// Accuracy of predictions given as `{task_id, prediction: {field: value}}`.
    pub async fn accuracy_of(
        &self,
        project_id: i64,
        predictions: &[(i64, serde_json::Map<String, Value>)],
    ) -> Result<accuracy::AccuracyReport, CurationError> {
        let project = self.project(project_id).await?;
        let config = self.label_config(&project).await?;
        let truth = self.ground_truth_values(project_id, &config).await?;
        let preds = predictions.iter().map(|(task, fields)| {
            (
                *task,
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), accuracy::Answer::from_json(&config, k, v)))
                    .collect(),
            )
        });
        Ok(accuracy::compare(&config, &truth, preds))
    }

    /// Accuracy of the predictions batchlab stored for a project, per model version.
    pub async fn stored_accuracy(
        &self,
        project_id: i64,
    ) -> Result<BTreeMap<String, accuracy::AccuracyReport>, CurationError> {
        let project = self.project(project_id).await?;
        let config = self.label_config(&project).await?;
        let truth = self.ground_truth_values(project_id, &config).await?;
        let mut by_version: BTreeMap<
            String,
            BTreeMap<i64, BTreeMap<String, Option<accuracy::Answer>>>,
        > = BTreeMap::new();
        for p in self
            .store
            .predictions_in_range(self.instance.as_str(), project_id, i64::MIN, i64::MAX)
            .await?
        {
            let Ok(regions) = serde_json::from_str::<Vec<Region>>(&p.result) else {
                continue;
            };
            let answers = field_values(&config, &regions)
                .iter()
                .map(|(k, v)| (k.clone(), Some(accuracy::Answer::of(v))))
                .collect();
            // One prediction per task and version: the first stored wins.
            by_version
                .entry(p.model_version)
                .or_default()
                .entry(p.task_id)
                .or_insert(answers);
        }
        Ok(by_version
            .into_iter()
            .map(|(version, preds)| (version, accuracy::compare(&config, &truth, preds)))
            .collect())
    }

    /// Of the projects whose annotations changed (`touched`), those whose milestones to check
    /// now: each at most once a [`MILESTONE_CHECK_EVERY`] while events keep coming (the others
    /// wait, and are checked on a later pass), and every waiting one when the processor is
    /// `idle` (it found no event), so that milestones are never left unchecked.
    pub(crate) fn milestone_checks(
        &self,
        touched: impl IntoIterator<Item = (Instance, i64)>,
        idle: bool,
    ) -> Vec<(Instance, i64)> {
        let now = std::time::Instant::now();
        let mut checks = self
            .milestone_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let MilestoneChecks { last, waiting } = &mut *checks;
        waiting.extend(touched);
        let due: Vec<(Instance, i64)> = waiting
            .iter()
            .filter(|p| {
                idle || last
                    .get(*p)
                    .is_none_or(|t| now >= *t + MILESTONE_CHECK_EVERY)
            })
            .cloned()
            .collect();
        for p in &due {
            waiting.remove(p);
            last.insert(p.clone(), now);
        }
        // Forget old check times, so that the map does not grow with every project ever seen.
        last.retain(|_, t| now < *t + MILESTONE_CHECK_EVERY);
        due
    }

    /// Projects whose failed milestone export is due for another try (taken off the list; a
    /// new failure puts them back).
    pub(crate) fn due_milestone_retries(&self) -> Vec<(Instance, i64)> {
        let now = std::time::Instant::now();
        let mut retries = self
            .milestone_retries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due: Vec<(Instance, i64)> = retries
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &due {
            retries.remove(p);
        }
        due
    }

    /// After annotations changed: writes each milestone's export once, and keeps an accuracy
    /// record when the count crossed a multiple of `accuracy_every`.
    pub async fn check_milestones(&self, project_id: i64) -> Result<(), CurationError> {
        let instance = self.instance.as_str();
        let counts = self.store.annotation_counts(instance, project_id).await?;
        for &m in self
            .config
            .milestones
            .iter()
            .filter(|&&m| m > 0 && m as i64 <= counts.valid)
        {
            let m = m as i64;
            if !self
                .store
                .claim_milestone(
                    instance,
                    project_id,
                    m,
                    &self.export_location(&snapshot_name(project_id, "milestone", Some(m)))?,
                    STALE_CLAIM_SECONDS,
                )
                .await?
            {
                continue;
            }
            match self
                .write_export_file(project_id, "milestone", Some(m))
                .await
            {
                Ok(rec) => {
                    tracing::info!(project_id, milestone = m, tasks = rec.tasks, annotations = rec.annotations,
                    path = %rec.path, "milestone reached: training data exported")
                }
                Err(e) => {
                    tracing::error!(project_id, milestone = m, error = %e, retry_in_s = MILESTONE_RETRY_SECONDS, "milestone export failed; will retry");
                    self.store
                        .release_milestone(instance, project_id, m)
                        .await?;
                    self.milestone_retries
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            (self.instance.clone(), project_id),
                            std::time::Instant::now()
                                + std::time::Duration::from_secs(MILESTONE_RETRY_SECONDS),
                        );
                }
            }
        }
        let every = self.config.accuracy_every as i64;
        if every > 0 && counts.valid >= every {
            let checkpoint = counts.valid / every * every;
            let known = self
                .store
                .accuracy_records(instance, project_id)
                .await?
                .iter()
                .any(|r| r.checkpoint == checkpoint);
            if !known {
                match self.stored_accuracy(project_id).await {
                    Ok(reports) => {
                        let summary: BTreeMap<&String, Value> = reports
                            .iter()
                            .map(|(v, r)| (v, serde_json::json!({"overall_accuracy": r.overall_accuracy, "field_accuracy": r.field_accuracy, "counts": r.counts})))
                            .collect();
                        let text = serde_json::to_string(&summary).unwrap_or_else(|_| "{}".into());
                        if self
                            .store
                            .insert_accuracy_record(instance, project_id, checkpoint, &text)
                            .await?
                        {
                            tracing::info!(project_id, checkpoint, "accuracy recorded");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(project_id, checkpoint, error = %e, "accuracy record skipped")
                    }
                }
            }
        }
        Ok(())
    }
}
