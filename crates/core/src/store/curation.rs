//! Rows of the curation tables: Label Studio webhook events as delivered, the projects, tasks,
//! annotations and predictions they describe, the exports written and the accuracy records kept.
//!
//! Writes that come from webhook events go through a [`CurationTx`], so that one event is
//! applied, and marked processed, atomically. Every upsert is guarded so that a replayed or
//! reordered delivery cannot undo a newer state (see [`CurationTx::upsert_annotation`]).
//!
//! Rows are keyed by (instance, Label Studio's id): the instance names the Label Studio the
//! event came from (see [`crate::labelstudio::instance`]); a [`CurationTx`] writes in its event's
//! instance, and every read takes one. Within one instance, a Label Studio re-created with a
//! fresh database but delivering to the same instance hands the same ids out again. So the writes of delivered objects ([`CurationTx::apply_task`],
//! [`CurationTx::apply_annotation`], [`CurationTx::delete_task`],
//! [`CurationTx::delete_annotation`]) first ask whether the object contradicts what is held under
//! its id: an id held under another project (live or as a tombstone), an annotation held on
//! another task, or with another creation time (Label Studio never changes either), an annotation
//! on a task held under another project. Such an object is a [`Conflict`]: the stored row is left
//! exactly as it was, and the object, as delivered, is recorded in `ls_conflicts` with the reason.
//! The stored row wins because it is what batchlab already counted and exported (milestone files
//! are never rewritten): letting the newcomer replace it would change another project's counts
//! and history behind its back, and batchlab cannot tell which of two Label Studios is the current
//! one. The newcomer is kept whole rather than as a reference to its event, since retention
//! deletes old events. A whole project re-created under a known id (its creation time differs:
//! [`ConflictKind::ProjectRecreated`]) makes its event a conflict as a whole, so that nothing of
//! a new Label Studio is mixed into the old one's state. The SQL guards also refuse to move a row to another project or task, so two processors
//! racing on one id cannot move it either: a refused write is explained again and recorded.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{now, Store, StoreError};

/// A webhook delivery to record.
#[derive(Clone, Debug)]
pub struct NewWebhookEvent<'a> {
    /// The Label Studio instance it came from.
    pub instance: &'a str,
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
    /// The Label Studio instance it came from.
    pub instance: String,
    /// Label Studio's `action`.
    pub action: String,
    /// The body as delivered.
    pub body: String,
    /// Failed attempts at the work it asked for (a START_TRAINING's export) so far.
    pub attempts: i64,
    /// When it arrived, unix seconds (what `batchlab_webhook_event_lag_seconds` measures from).
    pub received_at: i64,
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

/// The outcome of a failed event: [`FAILED_OUTCOME`] and the reason (PostgreSQL text cannot
/// hold NUL, and a reason may quote hostile input).
fn failed_outcome(reason: &str) -> String {
    format!("{FAILED_OUTCOME}{}", reason.replace('\0', "\u{FFFD}"))
}

/// SQL condition matching failed events' outcomes, the older spellings included.
const FAILED_CONDITION: &str =
    "(outcome LIKE 'failed: %' OR outcome LIKE 'error: %' OR outcome LIKE 'unreadable body%')";

/// A Label Studio object whose ids contradict what batchlab holds, kept aside with the reason
/// (see [`CurationTx::apply_annotation`]): the stored row was left as it was, and the object as
/// delivered is here, whole, for a later reconcile to replay.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    /// The record.
    pub id: i64,
    /// The Label Studio instance whose event carried the object.
    pub instance: String,
    /// The webhook event that carried the object (retention may since have deleted it).
    pub event_id: i64,
    /// That event's action.
    pub action: String,
    /// The project the event claims for the object.
    pub project_id: i64,
    /// What contradicts: one of [`ConflictKind`]'s names, e.g. `annotation_in_other_project`.
    pub kind: String,
    /// `annotation`, `task` or `project`.
    pub entity: String,
    /// Label Studio's id of the object.
    pub entity_id: i64,
    /// The project batchlab holds that id under.
    pub known_project_id: Option<i64>,
    /// The task batchlab holds that annotation on (for annotations; `None` when unknown).
    pub known_task_id: Option<i64>,
    /// Whether what batchlab holds under that id is deleted (a tombstone).
    pub known_deleted: bool,
    /// Why the object was kept aside, in words, with the ids.
    pub reason: String,
    /// The object as delivered, JSON text (left out of the project status, which lists
    /// reasons).
    #[serde(skip)]
    pub body: String,
    /// When it was recorded (unix seconds).
    pub detected_at: i64,
}

/// What contradicts, in a [`Conflict`]: its `kind`, and the `kind` label of the
/// `batchlab_label_studio_conflicts_total` counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// An annotation id batchlab holds, live, under another project.
    AnnotationInOtherProject,
    /// An annotation id batchlab holds as deleted under another project: its tombstone would
    /// have swallowed the new annotation.
    AnnotationDeletedInOtherProject,
    /// An annotation id batchlab holds on another task of the same project.
    AnnotationOnOtherTask,
    /// An annotation id batchlab holds with another creation time: another annotation.
    AnnotationRecreated,
    /// An annotation on a task id that batchlab holds under another project.
    AnnotationOnTaskOfOtherProject,
    /// A deletion of an annotation id that batchlab holds under another project.
    AnnotationDeletionInOtherProject,
    /// A task id batchlab holds, live, under another project.
    TaskInOtherProject,
    /// A task id batchlab holds as deleted under another project.
    TaskDeletedInOtherProject,
    /// A deletion of a task id that batchlab holds under another project.
    TaskDeletionInOtherProject,
    /// A project id batchlab holds with another creation time: Label Studio was re-created
    /// with a fresh database (or the project deleted and its id handed out again). The whole
    /// event is kept aside.
    ProjectRecreated,
}

impl ConflictKind {
    /// Its name, as stored and as the metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AnnotationInOtherProject => "annotation_in_other_project",
            Self::AnnotationDeletedInOtherProject => "annotation_deleted_in_other_project",
            Self::AnnotationOnOtherTask => "annotation_on_other_task",
            Self::AnnotationRecreated => "annotation_recreated",
            Self::AnnotationOnTaskOfOtherProject => "annotation_on_task_of_other_project",
            Self::AnnotationDeletionInOtherProject => "annotation_deletion_in_other_project",
            Self::TaskInOtherProject => "task_in_other_project",
            Self::TaskDeletedInOtherProject => "task_deleted_in_other_project",
            Self::TaskDeletionInOtherProject => "task_deletion_in_other_project",
            Self::ProjectRecreated => "project_recreated",
        }
    }

    /// `annotation`, `task` or `project`: what the conflicting object is.
    pub fn entity(self) -> &'static str {
        match self {
            Self::ProjectRecreated => "project",
            Self::TaskInOtherProject
            | Self::TaskDeletedInOtherProject
            | Self::TaskDeletionInOtherProject => "task",
            _ => "annotation",
        }
    }
}

/// Where an object being written came from: recorded with it should it contradict what is held.
#[derive(Clone, Copy, Debug)]
pub struct Delivered<'a> {
    /// The event's action, as sent.
    pub action: &'a str,
    /// The object as delivered: a task or an annotation, or the item naming a deleted one.
    pub object: &'a serde_json::Value,
}

/// What writing one delivered object did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectWrite {
    /// Stored (or, for a deletion, marked deleted).
    Written,
    /// Left alone because a newer state of the same object, or its deletion, is stored: an
    /// ordinary replay or reordering.
    LeftAlone,
    /// It contradicts what is held under its id: recorded, the stored row left as it was.
    Conflict(Box<Conflict>),
}

/// A contradiction found, before it is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contradiction {
    kind: ConflictKind,
    entity_id: i64,
    project_id: i64,
    known_project_id: i64,
    known_task_id: Option<i64>,
    known_deleted: bool,
    reason: String,
}

/// What batchlab holds under a task id.
#[derive(Clone, Copy, Debug)]
struct KnownTask {
    /// 0 for a tombstone left by a deletion that named no project.
    project_id: i64,
    deleted: bool,
}

/// What batchlab holds under an annotation id.
#[derive(Clone, Debug)]
struct KnownAnnotation {
    /// 0 for a tombstone left by a deletion that named no project.
    project_id: i64,
    /// 0 when unknown (a tombstone left before the creation arrived).
    task_id: i64,
    deleted: bool,
    created_at: Option<String>,
}

impl KnownTask {
    /// From a row with `project_id` and `deleted`.
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(KnownTask {
            project_id: r.try_get("project_id")?,
            deleted: r.try_get::<i64, _>("deleted")? != 0,
        })
    }
}

impl KnownAnnotation {
    /// From a row with `project_id`, `task_id`, `deleted` and `created_at`.
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(KnownAnnotation {
            project_id: r.try_get("project_id")?,
            task_id: r.try_get("task_id")?,
            deleted: r.try_get::<i64, _>("deleted")? != 0,
            created_at: r.try_get("created_at")?,
        })
    }
}

fn as_deleted(deleted: bool) -> &'static str {
    if deleted {
        " as deleted"
    } else {
        ""
    }
}

fn on_task(task: i64) -> String {
    if task == 0 {
        String::new()
    } else {
        format!(" (task {task})")
    }
}

/// Whether task `id`, delivered for `project`, contradicts what is held under its id.
fn task_contradiction(id: i64, project: i64, known: &KnownTask) -> Option<Contradiction> {
    if known.project_id == 0 || known.project_id == project {
        return None;
    }
    Some(Contradiction {
        kind: if known.deleted {
            ConflictKind::TaskDeletedInOtherProject
        } else {
            ConflictKind::TaskInOtherProject
        },
        entity_id: id,
        project_id: project,
        known_project_id: known.project_id,
        known_task_id: None,
        known_deleted: known.deleted,
        reason: format!(
            "task {id} of project {project}: batchlab holds task {id}{} under project {}",
            as_deleted(known.deleted),
            known.project_id
        ),
    })
}

/// Whether annotation `a` contradicts what is held under its id, or its task is held under
/// another project (`task`: what is held under its task's id).
fn annotation_contradiction(
    a: &AnnotationRow,
    known: Option<&KnownAnnotation>,
    task: Option<&KnownTask>,
) -> Option<Contradiction> {
    let (id, project) = (a.id, a.project_id);
    if let Some(k) = known {
        let found = |kind, reason| Contradiction {
            kind,
            entity_id: id,
            project_id: project,
            known_project_id: k.project_id,
            known_task_id: (k.task_id != 0).then_some(k.task_id),
            known_deleted: k.deleted,
            reason,
        };
        if k.project_id != 0 && k.project_id != project {
            let kind = if k.deleted {
                ConflictKind::AnnotationDeletedInOtherProject
            } else {
                ConflictKind::AnnotationInOtherProject
            };
            return Some(found(
                kind,
                format!(
                    "annotation {id} of project {project}{}: batchlab holds annotation {id}{} under project {}{}",
                    on_task(a.task_id),
                    as_deleted(k.deleted),
                    k.project_id,
                    on_task(k.task_id)
                ),
            ));
        }
        if k.task_id != 0 && a.task_id != 0 && k.task_id != a.task_id {
            return Some(found(
                ConflictKind::AnnotationOnOtherTask,
                format!(
                    "annotation {id} of project {project} names task {}: batchlab holds annotation {id}{} on task {}",
                    a.task_id,
                    as_deleted(k.deleted),
                    k.task_id
                ),
            ));
        }
        let created = |t: &Option<String>| {
            t.as_deref()
                .and_then(crate::labelstudio::event::parse_timestamp_us)
        };
        if let (Some(new), Some(old)) = (created(&a.created_at), created(&k.created_at)) {
            if new != old {
                return Some(found(
                    ConflictKind::AnnotationRecreated,
                    format!(
                        "annotation {id} of project {project}{} was created at {}: batchlab holds annotation {id}{} created at {}, another annotation under the same id",
                        on_task(a.task_id),
                        a.created_at.as_deref().unwrap_or_default(),
                        as_deleted(k.deleted),
                        k.created_at.as_deref().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    let t = task?;
    if t.project_id == 0 || t.project_id == project {
        return None;
    }
    Some(Contradiction {
        kind: ConflictKind::AnnotationOnTaskOfOtherProject,
        entity_id: id,
        project_id: project,
        known_project_id: t.project_id,
        known_task_id: None,
        known_deleted: false,
        reason: format!(
            "annotation {id} of project {project} is on task {}: batchlab holds task {}{} under project {}",
            a.task_id,
            a.task_id,
            as_deleted(t.deleted),
            t.project_id
        ),
    })
}

/// Whether `project` deleting an object held as `known_project` (and `known_task`) contradicts.
fn deletion_contradiction(
    kind: ConflictKind,
    id: i64,
    project: i64,
    known_project: i64,
    known_task: i64,
    known_deleted: bool,
) -> Option<Contradiction> {
    if project == 0 || known_project == 0 || known_project == project {
        return None;
    }
    let entity = kind.entity();
    Some(Contradiction {
        kind,
        entity_id: id,
        project_id: project,
        known_project_id: known_project,
        known_task_id: (known_task != 0).then_some(known_task),
        known_deleted,
        reason: format!(
            "project {project} deletes {entity} {id}: batchlab holds {entity} {id}{} under project {known_project}{}",
            as_deleted(known_deleted),
            on_task(known_task)
        ),
    })
}

/// A project's conflicts, as its status shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConflictSummary {
    /// Every conflict recorded for the project.
    pub count: i64,
    /// How many of each kind.
    pub by_kind: std::collections::BTreeMap<String, i64>,
    /// The latest (up to the limit asked for), newest first.
    pub latest: Vec<Conflict>,
}

const CONFLICT_COLUMNS: &str =
    "id, instance, event_id, action, project_id, kind, entity, entity_id, \
     known_project_id, known_task_id, known_deleted, reason, body, detected_at";

fn conflict_from_row(row: &AnyRow) -> Result<Conflict, sqlx::Error> {
    Ok(Conflict {
        id: row.try_get("id")?,
        instance: row.try_get("instance")?,
        event_id: row.try_get("event_id")?,
        action: row.try_get("action")?,
        project_id: row.try_get("project_id")?,
        kind: row.try_get("kind")?,
        entity: row.try_get("entity")?,
        entity_id: row.try_get("entity_id")?,
        known_project_id: row.try_get("known_project_id")?,
        known_task_id: row.try_get("known_task_id")?,
        known_deleted: row.try_get::<i64, _>("known_deleted")? != 0,
        reason: row.try_get("reason")?,
        body: row.try_get("body")?,
        detected_at: row.try_get("detected_at")?,
    })
}

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
    /// Label Studio's ISO timestamp of its creation, once an event carried it: a project
    /// delivered under the same id with another one is another project.
    pub created_at: Option<String>,
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
        created_at: row.try_get("created_at")?,
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
            "INSERT INTO webhook_events (instance, delivery_key, action, project_id, body, received_at) \
             VALUES ($6, $1, $2, $3, $4, $5) ON CONFLICT (instance, delivery_key) DO NOTHING RETURNING id",
        )
        .bind(e.delivery_key)
        .bind(e.action)
        .bind(e.project_id)
        .bind(e.body)
        .bind(now())
        .bind(e.instance)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = inserted {
            return Ok((id, true));
        }
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM webhook_events WHERE instance = $1 AND delivery_key = $2",
        )
        .bind(e.instance)
        .bind(e.delivery_key)
        .fetch_one(&self.pool)
        .await?;
        Ok((id, false))
    }

    /// The oldest deliveries not processed yet, in order of arrival, at most `limit` of them and
    /// no more than it takes to reach `max_bytes` of bodies (at least one, however large), so
    /// that a pass holds a bounded amount of memory whatever the bodies' sizes. Those held back
    /// until a later time (see [`CurationTx::keep_pending`]) are left out until then.
    pub async fn pending_webhook_events(
        &self,
        limit: i64,
        max_bytes: usize,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        use futures::TryStreamExt;
        let mut rows = sqlx::query(
            "SELECT id, instance, action, body, attempts, received_at FROM webhook_events \
             WHERE processed_at IS NULL AND (retry_at IS NULL OR retry_at <= $1) ORDER BY id LIMIT $2",
        )
        .bind(now())
        .bind(limit)
        .fetch(&self.pool);
        let (mut events, mut bytes) = (Vec::new(), 0usize);
        while bytes < max_bytes {
            let Some(r) = rows.try_next().await? else {
                break;
            };
            let event = WebhookEvent {
                id: r.try_get("id")?,
                instance: r.try_get("instance")?,
                action: r.try_get("action")?,
                body: r.try_get("body")?,
                attempts: r.try_get("attempts")?,
                received_at: r.try_get("received_at")?,
            };
            bytes += event.body.len();
            events.push(event);
        }
        Ok(events)
    }

    /// Deliveries recorded, still pending and failed: of one project of one instance when
    /// `project` is given, of every instance otherwise.
    pub async fn webhook_event_counts(
        &self,
        project: Option<(&str, i64)>,
    ) -> Result<WebhookEventCounts, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) AS received, COALESCE(SUM(CASE WHEN processed_at IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
             COALESCE(SUM(CASE WHEN {FAILED_CONDITION} THEN 1 ELSE 0 END), 0) AS failed \
             FROM webhook_events WHERE ($1 IS NULL OR (instance = $1 AND project_id = $2))"
        );
        let row = sqlx::query(&sql)
            .bind(project.map(|(instance, _)| instance))
            .bind(project.map(|(_, id)| id))
            .fetch_one(&self.pool)
            .await?;
        Ok(WebhookEventCounts {
            received: row.try_get("received")?,
            pending: row.try_get("pending")?,
            failed: row.try_get("failed")?,
        })
    }

    /// The latest `limit` deliveries about `project` of `instance` that could not be applied,
    /// newest first.
    pub async fn failed_webhook_events(
        &self,
        instance: &str,
        project: i64,
        limit: i64,
    ) -> Result<Vec<FailedWebhookEvent>, StoreError> {
        let sql = format!(
            "SELECT id, action, outcome, received_at FROM webhook_events WHERE instance = $3 AND project_id = $1 \
             AND {FAILED_CONDITION} ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(project)
            .bind(limit)
            .bind(instance)
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

    /// What processing recorded for an event (`None` while it is pending, or when there is no
    /// such event): `applied`, `conflict: ...`, `failed: ...` and so on.
    pub async fn webhook_event_outcome(&self, id: i64) -> Result<Option<String>, StoreError> {
        let outcome: Option<Option<String>> = sqlx::query_scalar(
            "SELECT outcome FROM webhook_events WHERE id = $1 AND processed_at IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(outcome.flatten())
    }

    /// How many conflicts were recorded for `project` of `instance` (the project their events
    /// claim), and the latest `limit` of them, newest first.
    pub async fn conflicts(
        &self,
        instance: &str,
        project: i64,
        limit: i64,
    ) -> Result<ConflictSummary, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ls_conflicts WHERE instance = $1 AND project_id = $2",
        )
        .bind(instance)
        .bind(project)
        .fetch_one(&self.pool)
        .await?;
        let by_kind = sqlx::query(
            "SELECT kind, COUNT(*) AS n FROM ls_conflicts WHERE instance = $1 AND project_id = $2 GROUP BY kind",
        )
        .bind(instance)
        .bind(project)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("kind")?, r.try_get("n")?)))
        .collect::<Result<_, sqlx::Error>>()?;
        let rows = sqlx::query(&format!(
            "SELECT {CONFLICT_COLUMNS} FROM ls_conflicts WHERE instance = $3 AND project_id = $1 \
             ORDER BY id DESC LIMIT $2"
        ))
        .bind(project)
        .bind(limit)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        Ok(ConflictSummary {
            count,
            by_kind,
            latest: rows
                .iter()
                .map(conflict_from_row)
                .collect::<Result<_, _>>()?,
        })
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
        let mut tx = self.begin_events().await?;
        if !tx.claim(event_id, outcome).await? {
            tx.tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(tx))
    }

    /// Starts applying a group of events in one transaction: the group is claimed at once
    /// ([`CurationTx::claim_group`]), then each event is applied under a savepoint of its own
    /// ([`CurationTx::enter`]), so that one that fails is undone alone
    /// ([`CurationTx::undo_event`]) and the group commits once. Committing once per group
    /// instead of once per event is what lets the processor keep up with a burst.
    pub async fn begin_events(&self) -> Result<CurationTx, StoreError> {
        self.begin_events_with(true).await
    }

    /// [`Store::begin_events`] without a savepoint per event: a round trip less for each, for
    /// a group expected to apply cleanly. An event that fails cannot be undone alone there
    /// ([`CurationTx::undo_event`] refuses): roll the group back ([`CurationTx::rollback`])
    /// and apply it again with savepoints.
    pub async fn begin_events_unguarded(&self) -> Result<CurationTx, StoreError> {
        self.begin_events_with(false).await
    }

    async fn begin_events_with(&self, guarded: bool) -> Result<CurationTx, StoreError> {
        Ok(CurationTx {
            tx: self.pool.begin().await?,
            event_id: 0,
            instance: String::new(),
            savepoint: false,
            guarded,
            projects: HashMap::new(),
            known: KnownRows::default(),
        })
    }

    /// Marks an event processed after applying it failed, so that one bad ("poison") event
    /// cannot stall the ones behind it; the reason stays in `outcome`, after [`FAILED_OUTCOME`].
    pub async fn fail_event(&self, event_id: i64, reason: &str) -> Result<(), StoreError> {
        let outcome = failed_outcome(reason);
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

    /// A project of `instance`, when batchlab has heard of it.
    pub async fn get_project(
        &self,
        instance: &str,
        id: i64,
    ) -> Result<Option<ProjectRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, title, label_config, deleted, created_at FROM ls_projects \
             WHERE instance = $1 AND id = $2",
        )
        .bind(instance)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(project_from_row).transpose()?)
    }

    /// Records a project (from the import or setup path) without touching a newer webhook state.
    pub async fn ensure_project(
        &self,
        instance: &str,
        id: i64,
        title: &str,
        label_config: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_projects (instance, id, title, label_config) VALUES ($4, $1, $2, $3) \
             ON CONFLICT (instance, id) DO UPDATE SET title = excluded.title, label_config = excluded.label_config \
             WHERE ls_projects.updated_at_us = 0",
        )
        .bind(id)
        .bind(title)
        .bind(label_config)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Counts of a project's tasks and annotations.
    pub async fn annotation_counts(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<AnnotationCounts, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS annotations, \
               COALESCE(SUM(CASE WHEN valid = 1 AND was_cancelled = 0 THEN 1 ELSE 0 END), 0) AS valid, \
               COALESCE(SUM(CASE WHEN valid = 0 THEN 1 ELSE 0 END), 0) AS invalid, \
               COALESCE(SUM(CASE WHEN was_cancelled = 1 THEN 1 ELSE 0 END), 0) AS cancelled, \
               COALESCE(SUM(CASE WHEN valid = 1 AND was_cancelled = 0 AND ground_truth = 1 THEN 1 ELSE 0 END), 0) AS ground_truth \
             FROM ls_annotations WHERE instance = $2 AND project_id = $1 AND deleted = 0",
        )
        .bind(project_id)
        .bind(instance)
        .fetch_one(&self.pool)
        .await?;
        let tasks: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ls_tasks WHERE instance = $2 AND project_id = $1 AND deleted = 0",
        )
        .bind(project_id)
        .bind(instance)
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
        instance: &str,
        project_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, project_id, data FROM ls_tasks WHERE instance = $4 AND project_id = $1 AND deleted = 0 \
             AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(project_id)
        .bind(after)
        .bind(limit)
        .bind(instance)
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
        instance: &str,
        project_id: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations \
             WHERE instance = $4 AND project_id = $1 AND deleted = 0 AND task_id >= $2 AND task_id <= $3 \
             ORDER BY task_id, id"
        ))
        .bind(project_id)
        .bind(first)
        .bind(last)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(annotation_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// A project's valid ground-truth annotations (the newest per task when several).
    pub async fn ground_truth(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE instance = $2 AND project_id = $1 AND deleted = 0 \
             AND ground_truth = 1 AND valid = 1 AND was_cancelled = 0 ORDER BY task_id, updated_at_us DESC"
        ))
        // Planned for each call, so that it takes the ground-truth index (migration 0013) once
        // the project has grown, not the whole-table scan planned while it was small.
        .persistent(false)
        .bind(project_id)
        .bind(instance)
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
    pub async fn ground_truth_tasks(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, project_id, data FROM ls_tasks WHERE instance = $2 AND project_id = $1 AND deleted = 0 \
             AND id IN (SELECT task_id FROM ls_annotations WHERE instance = $2 AND project_id = $1 AND deleted = 0 \
              AND ground_truth = 1 AND valid = 1 AND was_cancelled = 0) ORDER BY id",
        )
        .bind(project_id)
        .bind(instance)
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
        instance: &str,
        project_id: i64,
        limit: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE instance = $3 AND project_id = $1 AND deleted = 0 \
             AND valid = 0 ORDER BY id LIMIT $2"
        ))
        .bind(project_id)
        .bind(limit)
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(annotation_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Records predictions for tasks of `instance` (replacing one of the same task, model
    /// version and source).
    pub async fn upsert_predictions(
        &self,
        instance: &str,
        rows: &[PredictionRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for p in rows {
            sqlx::query(
                "INSERT INTO ls_predictions (instance, project_id, task_id, model_version, source, score, result, created_at) \
                 VALUES ($8, $1, $2, $3, $4, $5, $6, $7) ON CONFLICT (instance, task_id, model_version, source) \
                 DO UPDATE SET score = excluded.score, result = excluded.result, created_at = excluded.created_at",
            )
            .bind(p.project_id)
            .bind(p.task_id)
            .bind(&p.model_version)
            .bind(&p.source)
            .bind(p.score)
            .bind(&p.result)
            .bind(now())
            .bind(instance)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A project's stored predictions on tasks `first..=last` (all tasks with `i64::MIN..=i64::MAX`).
    pub async fn predictions_in_range(
        &self,
        instance: &str,
        project_id: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<PredictionRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, task_id, model_version, source, score, result FROM ls_predictions \
             WHERE instance = $4 AND project_id = $1 AND task_id >= $2 AND task_id <= $3 ORDER BY task_id, id",
        )
        .bind(project_id)
        .bind(first)
        .bind(last)
        .bind(instance)
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
        instance: &str,
        project_id: i64,
        milestone: i64,
        path: &str,
        stale_after: i64,
    ) -> Result<bool, StoreError> {
        let t = now();
        let inserted = sqlx::query(
            "INSERT INTO curation_exports (instance, project_id, reason, milestone, path, tasks, annotations, created_at, written) \
             VALUES ($5, $1, 'milestone', $2, $3, 0, 0, $4, 0) ON CONFLICT (instance, project_id, milestone) DO NOTHING",
        )
        .bind(project_id)
        .bind(milestone)
        .bind(path)
        .bind(t)
        .bind(instance)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(true);
        }
        let taken_over = sqlx::query(
            "UPDATE curation_exports SET created_at = $1 \
             WHERE instance = $5 AND project_id = $2 AND milestone = $3 AND written = 0 AND created_at < $4",
        )
        .bind(t)
        .bind(project_id)
        .bind(milestone)
        .bind(t - stale_after)
        .bind(instance)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken_over == 1)
    }

    /// Gives a claimed milestone back after its export failed, so that it is tried again.
    pub async fn release_milestone(
        &self,
        instance: &str,
        project_id: i64,
        milestone: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM curation_exports WHERE instance = $3 AND project_id = $1 AND milestone = $2 AND written = 0",
        )
        .bind(project_id)
        .bind(milestone)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records what an export of a project of `instance` wrote: fills in a claimed milestone, or
    /// adds an on-demand export.
    pub async fn record_export(&self, instance: &str, e: &ExportRecord) -> Result<(), StoreError> {
        let updated = match e.milestone {
            Some(m) => sqlx::query(
                "UPDATE curation_exports SET path = $1, tasks = $2, annotations = $3, created_at = $4, written = 1, \
                 sha256 = $7 WHERE instance = $8 AND project_id = $5 AND milestone = $6",
            )
                .bind(&e.path)
                .bind(e.tasks)
                .bind(e.annotations)
                .bind(e.created_at)
                .bind(e.project_id)
                .bind(m)
                .bind(&e.sha256)
                .bind(instance)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            None => 0,
        };
        if updated == 0 {
            sqlx::query(
                "INSERT INTO curation_exports (project_id, reason, milestone, path, tasks, annotations, created_at, sha256, instance) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(e.project_id)
            .bind(&e.reason)
            .bind(e.milestone)
            .bind(&e.path)
            .bind(e.tasks)
            .bind(e.annotations)
            .bind(e.created_at)
            .bind(&e.sha256)
            .bind(instance)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// A project's written exports, oldest first.
    pub async fn exports(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<Vec<ExportRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, reason, milestone, path, sha256, tasks, annotations, created_at FROM curation_exports \
             WHERE instance = $2 AND project_id = $1 AND written = 1 ORDER BY id",
        )
        .bind(project_id)
        .bind(instance)
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
        instance: &str,
        project_id: i64,
        checkpoint: i64,
        report: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO accuracy_records (instance, project_id, checkpoint, report, created_at) \
             VALUES ($5, $1, $2, $3, $4) ON CONFLICT (instance, project_id, checkpoint) DO NOTHING",
        )
        .bind(project_id)
        .bind(checkpoint)
        .bind(report)
        .bind(now())
        .bind(instance)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// A project's accuracy records, oldest checkpoint first.
    pub async fn accuracy_records(
        &self,
        instance: &str,
        project_id: i64,
    ) -> Result<Vec<AccuracyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT checkpoint, report, created_at FROM accuracy_records WHERE instance = $1 AND project_id = $2 \
             ORDER BY checkpoint",
        )
        .bind(instance)
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

/// Event ids one claiming statement names at most (both databases bind far more; this keeps
/// the statement text small).
const CLAIM_CHUNK: usize = 500;

/// The distinct values of `ids`, sorted.
fn unique<'a>(ids: impl Iterator<Item = &'a i64>) -> Vec<i64> {
    let mut ids: Vec<i64> = ids.copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `$first, $first+1, ...`: `n` numbered placeholders for an `IN (...)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One or more webhook events being applied: every write commits together with the events'
/// claims.
pub struct CurationTx {
    tx: Transaction<'static, Any>,
    event_id: i64,
    /// The event's instance: every row this transaction reads or writes is of it.
    instance: String,
    /// A savepoint is open: the entered event's writes are undone by rolling back to it.
    savepoint: bool,
    /// Events get savepoints ([`Store::begin_events`]); without them
    /// ([`Store::begin_events_unguarded`]) one that fails can only be undone with the group.
    guarded: bool,
    /// Task and annotation rows as this transaction knows them now (`None`: no row), read for
    /// a whole group at once ([`CurationTx::prefetch`]) and kept up to date by its own writes,
    /// so that checking each delivered annotation against what is held costs no round trip.
    /// Rows not in here are read when needed.
    known: KnownRows,
    /// What this transaction read or wrote of each (instance, project), so that the events of
    /// one group about the same project (nearly all of a burst) do not each read and write it
    /// again. Forgotten when an event is undone, since its writes are.
    projects: HashMap<(String, i64), ProjectSeen>,
}

/// Rows of `ls_tasks` and `ls_annotations` a [`CurationTx`] knows, by (instance, id).
#[derive(Debug, Default)]
struct KnownRows {
    tasks: HashMap<(String, i64), Option<KnownTask>>,
    annotations: HashMap<(String, i64), Option<KnownAnnotation>>,
}

/// What a [`CurationTx`] knows of one project row: each field is `None` until read or written.
#[derive(Clone, Debug, Default)]
struct ProjectSeen {
    /// The stored creation time (`Some(None)`: no row, or none stored).
    created_at: Option<Option<String>>,
    /// The stored labeling config (`Some(None)`: no row, or an empty config).
    config: Option<Option<String>>,
    /// The (title, config, updated_at_us) last given to [`CurationTx::upsert_project`]: the same
    /// again cannot change the row.
    upserted: Option<(String, String, i64)>,
}

impl CurationTx {
    /// The event this transaction applies.
    pub fn event_id(&self) -> i64 {
        self.event_id
    }

    /// The Label Studio instance the event came from, whose rows this transaction writes.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether each event is applied under a savepoint of its own ([`Store::begin_events`]).
    pub fn guarded(&self) -> bool {
        self.guarded
    }

    /// Undoes everything this transaction did, claims included.
    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.tx.rollback().await?)
    }

    /// `columns` of the rows of `table` (keyed by (instance, id)) of `instance` with the ids
    /// `ids`, a statement for each [`CLAIM_CHUNK`] of them. Planned for each call, not once for
    /// a cached statement: a plan made while the table was nearly empty scans it whole, which
    /// costs more with every row added.
    async fn rows_by_id(
        &mut self,
        columns: &str,
        table: &str,
        instance: &str,
        ids: &[i64],
    ) -> Result<Vec<sqlx::any::AnyRow>, StoreError> {
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CLAIM_CHUNK) {
            let sql = format!(
                "SELECT {columns} FROM {table} WHERE instance = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let mut query = sqlx::query(&sql).persistent(false).bind(instance);
            for id in chunk {
                query = query.bind(*id);
            }
            rows.extend(query.fetch_all(&mut *self.tx).await?);
        }
        Ok(rows)
    }

    /// Reads the stored task rows `tasks` and annotation rows `annotations` of `instance` in a
    /// few statements, so that the checks of a group's deliveries against them
    /// ([`CurationTx::apply_annotation`]) need no round trip of their own.
    pub async fn prefetch(
        &mut self,
        instance: &str,
        tasks: &[i64],
        annotations: &[i64],
    ) -> Result<(), StoreError> {
        let key = |id: i64| (instance.to_owned(), id);
        let tasks = unique(tasks.iter().filter(|&&id| id != 0));
        for &id in &tasks {
            self.known.tasks.insert(key(id), None);
        }
        for r in self
            .rows_by_id("id, project_id, deleted", "ls_tasks", instance, &tasks)
            .await?
        {
            let known = KnownTask::from_row(&r)?;
            self.known.tasks.insert(key(r.try_get("id")?), Some(known));
        }
        let annotations = unique(annotations.iter());
        for &id in &annotations {
            self.known.annotations.insert(key(id), None);
        }
        let columns = "id, project_id, task_id, deleted, created_at";
        for r in self
            .rows_by_id(columns, "ls_annotations", instance, &annotations)
            .await?
        {
            let known = KnownAnnotation::from_row(&r)?;
            self.known
                .annotations
                .insert(key(r.try_get("id")?), Some(known));
        }
        Ok(())
    }

    /// Claims event `event_id` for this transaction under a savepoint: marks it processed with
    /// `outcome` (its first statement is a write, so SQLite takes its write lock at once instead
    /// of failing to upgrade later) and makes it the event the writes that follow belong to.
    /// False, with nothing changed, when another processor already handled it or holds it
    /// (see [`CurationTx::keep_pending`]). Its writes are kept (they commit with the
    /// transaction) unless [`CurationTx::undo_event`] undoes them; a savepoint is released by the
    /// next [`CurationTx::enter`] or the commit.
    pub async fn claim(&mut self, event_id: i64, outcome: &str) -> Result<bool, StoreError> {
        let Some((id, instance)) = self.claim_group(&[event_id], outcome).await?.pop() else {
            return Ok(false);
        };
        self.enter(id, instance).await?;
        Ok(true)
    }

    /// Claims the events `ids` for this transaction in as few statements as it takes, marking
    /// each processed with `outcome` (see [`CurationTx::claim`]); answers those claimed, in
    /// order, with their instances, the others being handled or held by another processor.
    /// Apply each claimed one after [`CurationTx::enter`]: a claim is not undone with its event,
    /// whose failure [`CurationTx::undo_event`] records instead.
    pub async fn claim_group(
        &mut self,
        ids: &[i64],
        outcome: &str,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let mut claimed = Vec::with_capacity(ids.len());
        let at = now();
        for chunk in ids.chunks(CLAIM_CHUNK) {
            let list = placeholders(3, chunk.len());
            let sql = format!(
                "UPDATE webhook_events SET processed_at = $1, outcome = $2 \
                 WHERE id IN ({list}) AND processed_at IS NULL AND (retry_at IS NULL OR retry_at <= $1) \
                 RETURNING id, instance"
            );
            let mut query = sqlx::query(&sql).bind(at).bind(outcome);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&mut *self.tx).await? {
                claimed.push((row.try_get("id")?, row.try_get("instance")?));
            }
        }
        claimed.sort_unstable();
        Ok(claimed)
    }

    /// Makes event `event_id` of `instance`, claimed by [`CurationTx::claim_group`], the one
    /// the writes that follow belong to, under a savepoint of its own. The previous event's
    /// savepoint is released in the same round trip.
    pub async fn enter(&mut self, event_id: i64, instance: String) -> Result<(), StoreError> {
        if !self.guarded {
            // No savepoint: see `Store::begin_events_unguarded`.
        } else if self.savepoint {
            let conn: &mut sqlx::AnyConnection = &mut self.tx;
            sqlx::Executor::execute(
                conn,
                sqlx::raw_sql("RELEASE SAVEPOINT batchlab_event; SAVEPOINT batchlab_event"),
            )
            .await?;
        } else {
            sqlx::query("SAVEPOINT batchlab_event")
                .execute(&mut *self.tx)
                .await?;
            self.savepoint = true;
        }
        self.event_id = event_id;
        self.instance = instance;
        Ok(())
    }

    /// Undoes every write of the entered event and marks it failed with `reason` instead (after
    /// [`FAILED_OUTCOME`]), so that one bad event cannot stall the ones behind it.
    pub async fn undo_event(&mut self, reason: &str) -> Result<(), StoreError> {
        if !self.guarded {
            return Err(StoreError::Corrupt(
                "an event of a group applied without savepoints cannot be undone alone".into(),
            ));
        }
        sqlx::query("ROLLBACK TO SAVEPOINT batchlab_event")
            .execute(&mut *self.tx)
            .await?;
        // What this transaction knew of rows may have come from the undone writes.
        self.projects.clear();
        self.known = KnownRows::default();
        let outcome = failed_outcome(reason);
        sqlx::query("UPDATE webhook_events SET processed_at = $1, outcome = $2 WHERE id = $3")
            .bind(now())
            .bind(outcome)
            .bind(self.event_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// What this transaction knows of project `id` of the current instance.
    fn project_seen(&mut self, id: i64) -> &mut ProjectSeen {
        self.projects
            .entry((self.instance.clone(), id))
            .or_default()
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
    /// stored labeling config changed. The same state given again within this transaction
    /// changes nothing and costs no statement.
    pub async fn upsert_project(
        &mut self,
        id: i64,
        title: &str,
        label_config: &str,
        updated_at_us: i64,
    ) -> Result<bool, StoreError> {
        if let Some((t, c, u)) = &self.project_seen(id).upserted {
            if (t.as_str(), c.as_str(), *u) == (title, label_config, updated_at_us) {
                return Ok(false);
            }
        }
        let before = self.project_config(id).await?;
        sqlx::query(
            "INSERT INTO ls_projects (instance, id, title, label_config, updated_at_us) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (instance, id) DO UPDATE SET title = excluded.title, label_config = excluded.label_config, \
             updated_at_us = excluded.updated_at_us WHERE excluded.updated_at_us >= ls_projects.updated_at_us",
        )
        .bind(&self.instance)
        .bind(id)
        .bind(title)
        .bind(label_config)
        .bind(updated_at_us)
        .execute(&mut *self.tx)
        .await?;
        self.project_seen(id).config = None;
        let after = self.project_config(id).await?;
        self.project_seen(id).upserted =
            Some((title.to_owned(), label_config.to_owned(), updated_at_us));
        Ok(before != after)
    }

    /// The creation time stored for a project (Label Studio's ISO string), when known.
    pub async fn project_created_at(&mut self, id: i64) -> Result<Option<String>, StoreError> {
        if let Some(known) = &self.project_seen(id).created_at {
            return Ok(known.clone());
        }
        let created: Option<Option<String>> = sqlx::query_scalar(
            "SELECT created_at FROM ls_projects WHERE instance = $1 AND id = $2",
        )
        .bind(&self.instance)
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        let created = created.flatten();
        self.project_seen(id).created_at = Some(created.clone());
        Ok(created)
    }

    /// Records a project's creation time (Label Studio's ISO string) unless one is stored; a
    /// project not known yet is recorded with only its id and title.
    pub async fn record_project_created_at(
        &mut self,
        id: i64,
        title: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_projects (instance, id, title, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (instance, id) DO UPDATE SET created_at = excluded.created_at \
             WHERE ls_projects.created_at IS NULL",
        )
        .bind(&self.instance)
        .bind(id)
        .bind(title)
        .bind(created_at)
        .execute(&mut *self.tx)
        .await?;
        // Read again when next asked: the row may have had a creation time after all.
        self.project_seen(id).created_at = None;
        Ok(())
    }

    /// Marks a project deleted.
    pub async fn delete_project(&mut self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ls_projects (instance, id, deleted) VALUES ($1, $2, 1) \
             ON CONFLICT (instance, id) DO UPDATE SET deleted = 1",
        )
        .bind(&self.instance)
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        let key = (self.instance.clone(), id);
        self.projects.remove(&key);
        Ok(())
    }

    /// The stored labeling config of a project, if any (read once per transaction unless this
    /// transaction writes it).
    pub async fn project_config(&mut self, id: i64) -> Result<Option<String>, StoreError> {
        if let Some(known) = &self.project_seen(id).config {
            return Ok(known.clone());
        }
        let config: Option<String> = sqlx::query_scalar(
            "SELECT label_config FROM ls_projects WHERE instance = $1 AND id = $2",
        )
        .bind(&self.instance)
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        let config = config.filter(|c| !c.is_empty());
        self.project_seen(id).config = Some(config.clone());
        Ok(config)
    }

    /// Keeps a whole event aside as a [`ConflictKind::ProjectRecreated`] conflict: project `id`
    /// arrives created at `created_at` while batchlab holds it created at `known_created_at`.
    /// Nothing of the event is applied (`body` is the event as delivered).
    pub async fn record_project_recreated(
        &mut self,
        id: i64,
        created_at: &str,
        known_created_at: &str,
        from: Delivered<'_>,
    ) -> Result<Conflict, StoreError> {
        let c = Contradiction {
            kind: ConflictKind::ProjectRecreated,
            entity_id: id,
            project_id: id,
            known_project_id: id,
            known_task_id: None,
            known_deleted: false,
            reason: format!(
                "project {id} was created at {created_at}: batchlab holds project {id} of \
                 Label Studio instance '{}' created at {known_created_at}, another project \
                 (was Label Studio re-created with a fresh database? Give it a new instance name)",
                self.instance
            ),
        };
        self.record_conflict(c, from).await
    }

    /// Records a task's data unless a newer state (or its deletion) is stored, or the task is
    /// held under another project (it is never moved: see [`CurationTx::apply_task`]). True when
    /// the row was written.
    pub async fn upsert_task(
        &mut self,
        task: &TaskRow,
        updated_at_us: i64,
    ) -> Result<bool, StoreError> {
        let written = sqlx::query(
            "INSERT INTO ls_tasks (instance, id, project_id, data, updated_at_us) VALUES ($5, $1, $2, $3, $4) \
             ON CONFLICT (instance, id) DO UPDATE SET data = excluded.data, updated_at_us = excluded.updated_at_us \
             WHERE ls_tasks.deleted = 0 AND ls_tasks.project_id = excluded.project_id \
             AND excluded.updated_at_us >= ls_tasks.updated_at_us",
        )
        .bind(task.id)
        .bind(task.project_id)
        .bind(&task.data)
        .bind(updated_at_us)
        .bind(&self.instance)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        if written == 1 {
            let known = KnownTask {
                project_id: task.project_id,
                deleted: false,
            };
            self.known
                .tasks
                .insert((self.instance.clone(), task.id), Some(known));
        }
        Ok(written == 1)
    }

    /// Records a delivered task ([`CurationTx::upsert_task`]), or, when its id is held under
    /// another project, leaves that row alone and records the task as a [`Conflict`].
    pub async fn apply_task(
        &mut self,
        task: &TaskRow,
        updated_at_us: i64,
        from: Delivered<'_>,
    ) -> Result<ObjectWrite, StoreError> {
        if self.upsert_task(task, updated_at_us).await? {
            return Ok(ObjectWrite::Written);
        }
        // Refused: a newer state or a deletion (an ordinary replay), or another project's task.
        let known = self.known_task(task.id).await?;
        match known.and_then(|k| task_contradiction(task.id, task.project_id, &k)) {
            Some(c) => Ok(ObjectWrite::Conflict(Box::new(
                self.record_conflict(c, from).await?,
            ))),
            None => Ok(ObjectWrite::LeftAlone),
        }
    }

    /// Marks task `id` of `project_id` deleted (a tombstone when unknown), with its annotations;
    /// a task held under another project is left alone and the deletion recorded as a
    /// [`Conflict`]. A `project_id` of 0 (the event named none) deletes whatever is held.
    pub async fn delete_task(
        &mut self,
        project_id: i64,
        id: i64,
        from: Delivered<'_>,
    ) -> Result<ObjectWrite, StoreError> {
        let deleted = sqlx::query(
            "INSERT INTO ls_tasks (instance, id, project_id, data, deleted) VALUES ($3, $1, $2, '{}', 1) \
             ON CONFLICT (instance, id) DO UPDATE SET deleted = 1 \
             WHERE excluded.project_id = 0 OR ls_tasks.project_id = 0 OR ls_tasks.project_id = excluded.project_id",
        )
        .bind(id)
        .bind(project_id)
        .bind(&self.instance)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        // The task's row and its annotations' rows change (or may have): read them again.
        self.known.tasks.remove(&(self.instance.clone(), id));
        if deleted == 1 {
            self.known.annotations.clear();
            sqlx::query(
                "UPDATE ls_annotations SET deleted = 1 WHERE instance = $1 AND task_id = $2",
            )
            .bind(&self.instance)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
            return Ok(ObjectWrite::Written);
        }
        let known = self.known_task(id).await?;
        let found = known.and_then(|k| {
            deletion_contradiction(
                ConflictKind::TaskDeletionInOtherProject,
                id,
                project_id,
                k.project_id,
                0,
                k.deleted,
            )
        });
        match found {
            Some(c) => Ok(ObjectWrite::Conflict(Box::new(
                self.record_conflict(c, from).await?,
            ))),
            None => Ok(ObjectWrite::LeftAlone),
        }
    }

    /// Records an annotation unless a newer state or its deletion is stored: an older update
    /// arriving after a newer one, or a creation replayed after a deletion, changes nothing.
    /// Nor is a stored annotation ever moved to another project or task (see
    /// [`CurationTx::apply_annotation`]); a delivery naming no task keeps the stored one.
    /// A ground-truth annotation takes the star from the task's other annotations, as Label
    /// Studio does without sending events for them. True when the row was written.
    pub async fn upsert_annotation(&mut self, a: &AnnotationRow) -> Result<bool, StoreError> {
        let written = sqlx::query(&format!(
            "INSERT INTO ls_annotations ({ANNOTATION_COLUMNS}, instance) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (instance, id) DO UPDATE SET \
             task_id = CASE WHEN excluded.task_id = 0 THEN ls_annotations.task_id ELSE excluded.task_id END, \
             result = excluded.result, ground_truth = excluded.ground_truth, was_cancelled = excluded.was_cancelled, \
             lead_time = excluded.lead_time, completed_by = excluded.completed_by, created_at = excluded.created_at, \
             updated_at = excluded.updated_at, updated_at_us = excluded.updated_at_us, valid = excluded.valid, \
             invalid_reason = excluded.invalid_reason \
             WHERE ls_annotations.deleted = 0 AND excluded.updated_at_us >= ls_annotations.updated_at_us \
             AND ls_annotations.project_id = excluded.project_id \
             AND (ls_annotations.task_id = excluded.task_id OR ls_annotations.task_id = 0 OR excluded.task_id = 0)"
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
        .bind(&self.instance)
        .execute(&mut *self.tx)
        .await?
        .rows_affected()
            == 1;
        if written {
            // As the statement wrote it: a delivery naming no task keeps the stored one.
            let key = (self.instance.clone(), a.id);
            let task_id = match self.known.annotations.get(&key) {
                _ if a.task_id != 0 => Some(a.task_id),
                Some(Some(k)) => Some(k.task_id),
                Some(None) => Some(0),
                None => None,
            };
            match task_id {
                Some(task_id) => {
                    let known = KnownAnnotation {
                        project_id: a.project_id,
                        task_id,
                        deleted: false,
                        created_at: a.created_at.clone(),
                    };
                    self.known.annotations.insert(key, Some(known));
                }
                None => {
                    self.known.annotations.remove(&key);
                }
            }
        }
        if written && a.ground_truth {
            sqlx::query(
                "UPDATE ls_annotations SET ground_truth = 0 \
                 WHERE instance = $4 AND task_id = $1 AND id <> $2 AND ground_truth = 1 AND updated_at_us <= $3",
            )
            .bind(a.task_id)
            .bind(a.id)
            .bind(a.updated_at_us)
            .bind(&self.instance)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(written)
    }

    /// Records a delivered annotation ([`CurationTx::upsert_annotation`]), unless it contradicts
    /// what is held: its id under another project (live or deleted), on another task, or with
    /// another creation time, or its task under another project. Then the stored rows are left
    /// alone and the annotation is recorded as a [`Conflict`].
    pub async fn apply_annotation(
        &mut self,
        a: &AnnotationRow,
        from: Delivered<'_>,
    ) -> Result<ObjectWrite, StoreError> {
        if let Some(c) = self.annotation_contradiction(a).await? {
            return Ok(ObjectWrite::Conflict(Box::new(
                self.record_conflict(c, from).await?,
            )));
        }
        if self.upsert_annotation(a).await? {
            return Ok(ObjectWrite::Written);
        }
        // Refused: a newer state or a deletion (an ordinary replay), or a row another processor
        // stored since the check above (so read as stored now).
        match self.read_annotation_contradiction(a).await? {
            Some(c) => Ok(ObjectWrite::Conflict(Box::new(
                self.record_conflict(c, from).await?,
            ))),
            None => Ok(ObjectWrite::LeftAlone),
        }
    }

    /// Marks annotation `id` of `project_id` deleted; an id not seen yet leaves a tombstone that a
    /// late creation cannot overwrite. One held under another project is left alone and the
    /// deletion recorded as a [`Conflict`]. A `project_id` of 0 (the event named none) deletes
    /// whatever is held.
    pub async fn delete_annotation(
        &mut self,
        project_id: i64,
        id: i64,
        from: Delivered<'_>,
    ) -> Result<ObjectWrite, StoreError> {
        let deleted = sqlx::query(
            "INSERT INTO ls_annotations (instance, id, project_id, task_id, result, deleted, valid) \
             VALUES ($3, $1, $2, 0, '[]', 1, 0) ON CONFLICT (instance, id) DO UPDATE SET deleted = 1 \
             WHERE excluded.project_id = 0 OR ls_annotations.project_id = 0 \
             OR ls_annotations.project_id = excluded.project_id",
        )
        .bind(id)
        .bind(project_id)
        .bind(&self.instance)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        self.known.annotations.remove(&(self.instance.clone(), id));
        if deleted == 1 {
            return Ok(ObjectWrite::Written);
        }
        let found = self.known_annotation(id).await?.and_then(|k| {
            deletion_contradiction(
                ConflictKind::AnnotationDeletionInOtherProject,
                id,
                project_id,
                k.project_id,
                k.task_id,
                k.deleted,
            )
        });
        match found {
            Some(c) => Ok(ObjectWrite::Conflict(Box::new(
                self.record_conflict(c, from).await?,
            ))),
            None => Ok(ObjectWrite::LeftAlone),
        }
    }

    async fn known_task(&mut self, id: i64) -> Result<Option<KnownTask>, StoreError> {
        let row =
            sqlx::query("SELECT project_id, deleted FROM ls_tasks WHERE instance = $1 AND id = $2")
                .bind(&self.instance)
                .bind(id)
                .fetch_optional(&mut *self.tx)
                .await?;
        Ok(row.as_ref().map(KnownTask::from_row).transpose()?)
    }

    async fn known_annotation(&mut self, id: i64) -> Result<Option<KnownAnnotation>, StoreError> {
        let row = sqlx::query(
            "SELECT project_id, task_id, deleted, created_at FROM ls_annotations WHERE instance = $1 AND id = $2",
        )
        .bind(&self.instance)
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row.as_ref().map(KnownAnnotation::from_row).transpose()?)
    }

    async fn annotation_contradiction(
        &mut self,
        a: &AnnotationRow,
    ) -> Result<Option<Contradiction>, StoreError> {
        let known = self
            .known
            .annotations
            .get(&(self.instance.clone(), a.id))
            .cloned();
        let task = if a.task_id == 0 {
            Some(None)
        } else {
            self.known
                .tasks
                .get(&(self.instance.clone(), a.task_id))
                .cloned()
        };
        if let (Some(known), Some(task)) = (known, task) {
            return Ok(annotation_contradiction(a, known.as_ref(), task.as_ref()));
        }
        self.read_annotation_contradiction(a).await
    }

    /// [`CurationTx::annotation_contradiction`] against the rows as stored now.
    async fn read_annotation_contradiction(
        &mut self,
        a: &AnnotationRow,
    ) -> Result<Option<Contradiction>, StoreError> {
        // One round trip for both rows.
        let row = sqlx::query(
            "SELECT a.project_id AS a_project, a.task_id AS a_task, a.deleted AS a_deleted, \
             a.created_at AS a_created, t.project_id AS t_project, t.deleted AS t_deleted \
             FROM (SELECT 1 AS one) one \
             LEFT JOIN ls_annotations a ON a.instance = $1 AND a.id = $2 \
             LEFT JOIN ls_tasks t ON t.instance = $1 AND t.id = $3 AND $3 <> 0",
        )
        .bind(&self.instance)
        .bind(a.id)
        .bind(a.task_id)
        .fetch_one(&mut *self.tx)
        .await?;
        let known = match row.try_get::<Option<i64>, _>("a_project")? {
            None => None,
            Some(project_id) => Some(KnownAnnotation {
                project_id,
                task_id: row.try_get("a_task")?,
                deleted: row.try_get::<i64, _>("a_deleted")? != 0,
                created_at: row.try_get("a_created")?,
            }),
        };
        let task = match row.try_get::<Option<i64>, _>("t_project")? {
            None => None,
            Some(project_id) => Some(KnownTask {
                project_id,
                deleted: row.try_get::<i64, _>("t_deleted")? != 0,
            }),
        };
        Ok(annotation_contradiction(a, known.as_ref(), task.as_ref()))
    }

    /// Keeps a contradicting object in `ls_conflicts`.
    async fn record_conflict(
        &mut self,
        c: Contradiction,
        from: Delivered<'_>,
    ) -> Result<Conflict, StoreError> {
        // PostgreSQL text cannot hold NUL; a reason may quote hostile input (a creation time).
        // The body is JSON text, which escapes it.
        let reason = c.reason.replace('\0', "\u{FFFD}");
        let action = from.action.replace('\0', "\u{FFFD}");
        let body = from.object.to_string();
        let detected_at = now();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO ls_conflicts (event_id, action, project_id, kind, entity, entity_id, known_project_id, \
             known_task_id, known_deleted, reason, body, detected_at, instance) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
        )
        .bind(self.event_id)
        .bind(&action)
        .bind(c.project_id)
        .bind(c.kind.as_str())
        .bind(c.kind.entity())
        .bind(c.entity_id)
        .bind(c.known_project_id)
        .bind(c.known_task_id)
        .bind(flag(c.known_deleted))
        .bind(&reason)
        .bind(&body)
        .bind(detected_at)
        .bind(&self.instance)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(Conflict {
            id,
            instance: self.instance.clone(),
            event_id: self.event_id,
            action,
            project_id: c.project_id,
            kind: c.kind.as_str().to_owned(),
            entity: c.kind.entity().to_owned(),
            entity_id: c.entity_id,
            known_project_id: Some(c.known_project_id),
            known_task_id: c.known_task_id,
            known_deleted: c.known_deleted,
            reason,
            body,
            detected_at,
        })
    }

    /// A project's live annotations, for re-validation after its config changed.
    pub async fn project_annotations(
        &mut self,
        project_id: i64,
    ) -> Result<Vec<AnnotationRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {ANNOTATION_COLUMNS} FROM ls_annotations WHERE instance = $2 AND project_id = $1 AND deleted = 0"
        ))
        .bind(project_id)
        .bind(&self.instance)
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
        sqlx::query(
            "UPDATE ls_annotations SET valid = $1, invalid_reason = $2 WHERE instance = $4 AND id = $3",
        )
        .bind(flag(invalid_reason.is_none()))
        .bind(invalid_reason)
        .bind(id)
        .bind(&self.instance)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn annotation(project: i64, task: i64, created_at: Option<&str>) -> AnnotationRow {
        AnnotationRow {
            id: 9,
            project_id: project,
            task_id: task,
            result: "[]".into(),
            ground_truth: false,
            was_cancelled: false,
            lead_time: None,
            completed_by: None,
            created_at: created_at.map(Into::into),
            updated_at: None,
            updated_at_us: 0,
            valid: true,
            invalid_reason: None,
        }
    }

    fn known(project: i64, task: i64, deleted: bool, created_at: Option<&str>) -> KnownAnnotation {
        KnownAnnotation {
            project_id: project,
            task_id: task,
            deleted,
            created_at: created_at.map(Into::into),
        }
    }

    fn kind(c: Option<Contradiction>) -> Option<&'static str> {
        c.map(|c| c.kind.as_str())
    }

    /// What ordinary replays and reorderings leave behind contradicts nothing: a tombstone
    /// left before the creation arrived (no task, perhaps no project), an unknown task, a
    /// creation time written otherwise or missing.
    #[test]
    fn what_replays_leave_is_no_contradiction() {
        let a = annotation(1, 3, Some("2026-11-27T20:48:49.480354Z"));
        for k in [
            known(1, 0, true, None),
            known(0, 0, true, None),
            known(1, 3, false, Some("2026-11-27T20:48:49.480354+00:00")),
            known(1, 3, true, Some("not a time")),
        ] {
            assert_eq!(
                kind(annotation_contradiction(&a, Some(&k), None)),
                None,
                "{k:?}"
            );
        }
        let same = KnownTask {
            project_id: 1,
            deleted: true,
        };
        let unknown = KnownTask {
            project_id: 0,
            deleted: true,
        };
        assert_eq!(kind(annotation_contradiction(&a, None, Some(&same))), None);
        assert_eq!(
            kind(annotation_contradiction(&a, None, Some(&unknown))),
            None
        );
        assert_eq!(kind(task_contradiction(3, 1, &same)), None);
        assert_eq!(kind(task_contradiction(3, 1, &unknown)), None);
        assert_eq!(
            kind(deletion_contradiction(
                ConflictKind::TaskDeletionInOtherProject,
                3,
                0,
                1,
                0,
                false
            )),
            None,
            "a deletion naming no project"
        );
    }

    #[test]
    fn contradictions_are_told_apart() {
        let a = annotation(5, 3, Some("2026-01-01T00:00:00Z"));
        let other = KnownTask {
            project_id: 1,
            deleted: false,
        };
        let cases = [
            (known(1, 7, false, None), "annotation_in_other_project"),
            (
                known(1, 7, true, None),
                "annotation_deleted_in_other_project",
            ),
            (known(5, 4, false, None), "annotation_on_other_task"),
            (
                known(5, 3, false, Some("2025-01-01T00:00:00Z")),
                "annotation_recreated",
            ),
        ];
        for (k, expected) in cases {
            assert_eq!(
                kind(annotation_contradiction(&a, Some(&k), Some(&other))),
                Some(expected)
            );
        }
        let c = annotation_contradiction(&a, None, Some(&other)).unwrap();
        assert_eq!(c.kind, ConflictKind::AnnotationOnTaskOfOtherProject);
        assert_eq!(
            c.reason,
            "annotation 9 of project 5 is on task 3: batchlab holds task 3 under project 1"
        );
        let c = annotation_contradiction(&a, Some(&known(1, 7, true, None)), None).unwrap();
        assert_eq!(
            c.reason,
            "annotation 9 of project 5 (task 3): batchlab holds annotation 9 as deleted under project 1 (task 7)"
        );
        assert_eq!(
            (c.known_project_id, c.known_task_id, c.known_deleted),
            (1, Some(7), true)
        );
        let deleted = KnownTask {
            project_id: 1,
            deleted: true,
        };
        assert_eq!(
            kind(task_contradiction(3, 5, &deleted)),
            Some("task_deleted_in_other_project")
        );
        let c = deletion_contradiction(
            ConflictKind::AnnotationDeletionInOtherProject,
            9,
            5,
            1,
            7,
            false,
        )
        .unwrap();
        assert_eq!(
            c.reason,
            "project 5 deletes annotation 9: batchlab holds annotation 9 under project 1 (task 7)"
        );
    }
}
