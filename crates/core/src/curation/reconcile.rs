//! Reconciliation with Label Studio: the repair for webhooks lost while batchlab was down.
//!
//! Label Studio posts each webhook once and never retries, so an event sent while batchlab-api
//! was stopped (or unreachable) is lost, and batchlab's tasks and annotations drift from Label
//! Studio's. [`Curation::reconcile`] (`batchlab-api reconcile-label-studio --project N`) walks
//! both sides and repairs batchlab from Label Studio's REST API:
//!
//! 1. **Walk.** Label Studio's tasks are read in id order with their annotations, one bounded
//!    page at a time (`GET /api/tasks/?fields=all` with an id filter: keyset paging, see
//!    [`LabelStudioClient::tasks_after`]), and merged with batchlab's tasks and annotations, also
//!    read a page at a time in id order. Each step compares one window of task ids, so memory
//!    stays bounded by the page size whatever the project's size.
//! 2. **Synthesize.** For every difference it builds the webhook body Label Studio would have
//!    sent — the same envelope as the recorded 1.23 deliveries — and stores it with
//!    [`Curation::ingest`], so the one path that applies real webhooks applies these too, with
//!    its validation against the labeling config, its guards against older states, its
//!    idempotence (the delivery key is the hash of the body: a second run synthesizing the same
//!    body stores nothing) and its milestone checks:
//!    - a task batchlab lacks, or holds with other data: `TASKS_CREATED` (one per window);
//!    - an annotation batchlab lacks: `ANNOTATION_CREATED`; one Label Studio holds in a newer
//!      state (`updated_at`), or in another state at the same `updated_at` (the ground-truth
//!      star Label Studio takes from a task's other annotations without touching them):
//!      `ANNOTATION_UPDATED` (one per annotation, as Label Studio sends them);
//!    - a task or annotation batchlab holds and Label Studio no longer has: `TASKS_DELETED` /
//!      `ANNOTATIONS_DELETED`. A deletion leaves a tombstone nothing can undo, so each candidate
//!      is first confirmed gone with its own `GET` (404): one created in Label Studio after its
//!      page was read is left alone ([`Differences::still_in_label_studio`]);
//!    - a project batchlab does not know the labeling config of: `PROJECT_UPDATED`. A config
//!      that differs from a known one is only reported ([`Differences::project_config_differs`]):
//!      Label Studio's REST API does not say when the project changed, and without that time the
//!      change cannot be ordered against the stored one. Saving the project in Label Studio
//!      sends a real `PROJECT_UPDATED`.
//!
//!    Synthesized bodies carry `"batchlab_reconciled": true` (the readers ignore it), so a
//!    stored event tells where it came from; task and annotation events carry the project as
//!    `{"id", "title"}` only, so they never rewrite the project's config.
//! 3. **Apply.** The command runs in its own process, so it applies what it stored itself, with
//!    [`Curation::process_pending`] until nothing is pending (bounded by
//!    [`ReconcileOptions::apply_timeout`]): it needs no running batchlab-api, and one that is
//!    running against the same database is no obstacle, since each event is claimed by exactly
//!    one processor ([`crate::store::Store::begin_event`]).
//! 4. **Verify.** A second, read-only walk compares the two sides again; the report says whether
//!    they agree (counts equal and no difference left).
//!
//! Counts are compared with the same definitions on both sides: live tasks, live annotations
//! (skipped ones included), and ground truth as annotations starred and not skipped — valid or
//! not, since Label Studio does not validate. The project status's own counts (which count only
//! valid ground truth) are in the report beside them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{Curation, CurationError};
use crate::labelstudio::client::{LabelStudioClient, LabelStudioError};
use crate::labelstudio::event::{id_of, timestamp_us};
use crate::store::{AnnotationCounts, AnnotationRow, TaskRow};

/// Tasks read per page on either side unless configured.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Deletion candidates confirmed with Label Studio at once.
const CONFIRM_CONCURRENCY: usize = 8;

/// The fields of a task that Label Studio's webhooks carry (the task listing adds annotations,
/// predictions, drafts and Data Manager columns, which are left out).
const TASK_FIELDS: &[&str] = &[
    "id",
    "data",
    "meta",
    "created_at",
    "updated_at",
    "is_labeled",
    "overlap",
    "inner_id",
    "total_annotations",
    "cancelled_annotations",
    "total_predictions",
    "comment_count",
    "unresolved_comment_count",
    "last_comment_updated_at",
    "project",
    "file_upload",
    "comment_authors",
    "allow_skip",
];

/// The fields of an annotation that Label Studio's webhooks carry; the listing's relative
/// `created_ago` (which changes by the minute) is among those left out, so the same state always
/// gives the same body.
const ANNOTATION_FIELDS: &[&str] = &[
    "id",
    "result",
    "was_cancelled",
    "ground_truth",
    "created_at",
    "updated_at",
    "draft_created_at",
    "lead_time",
    "prediction",
    "result_count",
    "unique_id",
    "import_id",
    "last_action",
    "bulk_created",
    "task",
    "project",
    "completed_by",
    "updated_by",
    "parent_prediction",
    "parent_annotation",
    "last_created_by",
];

/// How a reconciliation runs.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// Compare and report only: synthesize, store and apply nothing.
    pub dry_run: bool,
    /// How long to spend applying the stored events before verifying anyway.
    pub apply_timeout: Duration,
    /// Tasks read per page on either side.
    pub page_size: usize,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            apply_timeout: Duration::from_secs(300),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// Counts of one side, with the same definitions on both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SideCounts {
    /// Tasks (not deleted).
    pub tasks: i64,
    /// Annotations (not deleted), skipped ones included.
    pub annotations: i64,
    /// Annotations starred as ground truth and not skipped.
    pub ground_truth: i64,
}

/// What differs between the two sides, item by item.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Differences {
    /// Batchlab's labeling config of the project is unknown or differs from Label Studio's.
    pub project_config_differs: bool,
    /// Tasks in Label Studio that batchlab lacks.
    pub tasks_missing: u64,
    /// Tasks whose data differs.
    pub tasks_changed: u64,
    /// Tasks batchlab holds that Label Studio deleted.
    pub tasks_deleted: u64,
    /// Annotations in Label Studio that batchlab lacks.
    pub annotations_missing: u64,
    /// Annotations Label Studio holds in a newer (or, at the same time, another) state.
    pub annotations_outdated: u64,
    /// Annotations batchlab holds that Label Studio deleted.
    pub annotations_deleted: u64,
    /// Annotations batchlab holds in another state with a newer `updated_at` than Label
    /// Studio's: nothing synthesized can change them (the store keeps the newer state).
    pub annotations_newer_in_batchlab: u64,
    /// Tasks or annotations missing from Label Studio's listing that a direct look-up still
    /// found (created or moved while the listing was read): left alone.
    pub still_in_label_studio: u64,
}

impl Differences {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        *self == Differences::default()
    }
}

/// One comparison of the two sides.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    /// Label Studio's counts.
    pub label_studio: SideCounts,
    /// batchlab's counts.
    pub batchlab: SideCounts,
    /// What differs, item by item.
    pub differences: Differences,
}

impl Comparison {
    /// Counts equal and nothing differs.
    pub fn agrees(&self) -> bool {
        self.label_studio == self.batchlab && self.differences.is_empty()
    }
}

/// How the stored events were applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Applied {
    /// Processor passes run by this command.
    pub passes: u64,
    /// Events those passes looked at (any project's, since the queue is shared).
    pub events_looked_at: u64,
    /// Events about this project still pending afterwards.
    pub pending: i64,
    /// Events about this project that failed during this run (see the project status's
    /// `failed_events` for why).
    pub failed: i64,
    /// Whether `apply_timeout` ended the wait with events still due.
    pub timed_out: bool,
}

/// What `reconcile-label-studio` did: printed as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileReport {
    /// The Label Studio project.
    pub project_id: i64,
    /// Label Studio's base URL.
    pub label_studio_url: String,
    /// Whether nothing was to be changed.
    pub dry_run: bool,
    /// Before any repair.
    pub before: Comparison,
    /// Events synthesized, by action.
    pub events: BTreeMap<String, u64>,
    /// Of those, stored as new events.
    pub events_stored: u64,
    /// Of those, bodies stored before (by an earlier run): not stored again.
    pub events_duplicate: u64,
    /// How the events were applied; absent in a dry run.
    pub applied: Option<Applied>,
    /// After the repair (a second walk); absent in a dry run.
    pub after: Option<Comparison>,
    /// The project status's counts at the end (ground truth there counts valid annotations
    /// only).
    pub batchlab_status_counts: AnnotationCounts,
    /// Whether the two sides agree at the end.
    pub agree: bool,
}

/// Label Studio's tasks of a project, in id order, read a page at a time.
struct LsTasks<'a> {
    client: &'a LabelStudioClient,
    project: i64,
    page_size: usize,
    after: i64,
    buf: VecDeque<Value>,
    done: bool,
}

/// batchlab's live tasks of a project, in id order, read a page at a time.
struct StoredTasks<'a> {
    curation: &'a Curation,
    project: i64,
    page_size: usize,
    after: i64,
    buf: VecDeque<TaskRow>,
    done: bool,
}

fn task_id(t: &Value) -> Option<i64> {
    t.get("id").and_then(id_of)
}

impl LsTasks<'_> {
    /// Reads the next page when the buffer is empty.
    async fn fill(&mut self) -> Result<(), CurationError> {
        if !self.buf.is_empty() || self.done {
            return Ok(());
        }
        let page = self
            .client
            .tasks_after(self.project, self.after, self.page_size)
            .await?;
        // Only an empty page ends the listing: Label Studio may cap the page size
        // (`TASK_API_PAGE_SIZE_MAX`), so a short page says nothing.
        self.done = page.is_empty();
        let mut tasks: Vec<(i64, Value)> = page
            .into_iter()
            .filter_map(|t| Some((task_id(&t)?, t)))
            .filter(|(id, _)| *id > self.after)
            .collect();
        if !self.done && tasks.is_empty() {
            // Without this, a Label Studio ignoring the filter would be asked forever.
            return Err(LabelStudioError::Decode(format!(
                "/api/tasks/: a page without a task after id {}: the id filter was ignored",
                self.after
            ))
            .into());
        }
        tasks.sort_by_key(|(id, _)| *id);
        if let Some((last, _)) = tasks.last() {
            self.after = *last;
        }
        self.buf.extend(tasks.into_iter().map(|(_, t)| t));
        Ok(())
    }

    /// The highest task id this side can vouch for: the last buffered one, or every id once
    /// the listing is exhausted.
    fn bound(&self) -> i64 {
        match self.buf.back().and_then(task_id) {
            Some(id) if !self.done => id,
            _ => i64::MAX,
        }
    }

    fn take_upto(&mut self, hi: i64) -> Vec<Value> {
        let mut out = Vec::new();
        while self
            .buf
            .front()
            .and_then(task_id)
            .is_some_and(|id| id <= hi)
        {
            out.extend(self.buf.pop_front());
        }
        out
    }
}

impl StoredTasks<'_> {
    async fn fill(&mut self) -> Result<(), CurationError> {
        if !self.buf.is_empty() || self.done {
            return Ok(());
        }
        let page = self
            .curation
            .store
            .tasks_page(
                self.curation.instance.as_str(),
                self.project,
                self.after,
                self.page_size as i64,
            )
            .await?;
        self.done = page.len() < self.page_size;
        if let Some(last) = page.last() {
            self.after = last.id;
        }
        self.buf.extend(page);
        Ok(())
    }

    fn bound(&self) -> i64 {
        match self.buf.back() {
            Some(t) if !self.done => t.id,
            _ => i64::MAX,
        }
    }

    fn take_upto(&mut self, hi: i64) -> Vec<TaskRow> {
        let mut out = Vec::new();
        while self.buf.front().is_some_and(|t| t.id <= hi) {
            out.extend(self.buf.pop_front());
        }
        out
    }
}

/// Where synthesized events go: counted, and stored unless comparing only.
struct Synth<'a> {
    curation: &'a Curation,
    /// `{"id", "title"}` of the project, as every event carries it.
    project: Value,
    events: BTreeMap<String, u64>,
    stored: u64,
    duplicate: u64,
}

impl Synth<'_> {
    /// Stores the webhook body `action` + `fields` through the normal ingestion path.
    async fn emit(
        &mut self,
        action: &str,
        fields: Vec<(&str, Value)>,
    ) -> Result<(), CurationError> {
        let mut body = Map::new();
        body.insert("action".into(), Value::String(action.into()));
        for (k, v) in fields {
            body.insert(k.into(), v);
        }
        body.entry("project")
            .or_insert_with(|| self.project.clone());
        body.insert("batchlab_reconciled".into(), Value::Bool(true));
        let bytes = serde_json::to_vec(&Value::Object(body))
            .map_err(|e| CurationError::Invalid(format!("a synthesized {action}: {e}")))?;
        let ingested = self.curation.ingest(&bytes).await?;
        *self.events.entry(action.to_string()).or_default() += 1;
        if ingested.status == "duplicate" {
            self.duplicate += 1;
        } else {
            self.stored += 1;
        }
        Ok(())
    }
}

/// `v` with only `fields` kept.
fn pick(v: &Value, fields: &[&str]) -> Value {
    let Some(o) = v.as_object() else {
        return v.clone();
    };
    Value::Object(
        fields
            .iter()
            .filter_map(|k| Some((k.to_string(), o.get(*k)?.clone())))
            .collect(),
    )
}

/// A task as a webhook carries it: its own fields, and its project.
pub fn webhook_task(task: &Value, project: i64) -> Value {
    let mut t = pick(task, TASK_FIELDS);
    if let Some(o) = t.as_object_mut() {
        o.insert("project".into(), json!(project));
    }
    t
}

/// An annotation as a webhook carries it: ids for its task, project and annotator.
pub fn webhook_annotation(annotation: &Value, task: i64, project: i64) -> Value {
    let mut a = pick(annotation, ANNOTATION_FIELDS);
    if let Some(o) = a.as_object_mut() {
        o.insert("task".into(), json!(task));
        o.insert("project".into(), json!(project));
        for key in ["completed_by", "updated_by"] {
            if let Some(user) = o.get(key).filter(|u| u.is_object()).and_then(id_of) {
                o.insert(key.into(), json!(user));
            }
        }
    }
    a
}

/// How an annotation of Label Studio's listing stands against batchlab's copy.
#[derive(Debug, PartialEq, Eq)]
pub enum AnnotationState {
    /// The same state.
    Same,
    /// Label Studio's is newer, or another state at the same time: to be sent again.
    Outdated,
    /// batchlab's differs and is newer: nothing synthesized can change it.
    NewerInBatchlab,
}

fn flag(a: &Value, key: &str) -> bool {
    a.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn annotation_result(a: &Value) -> Value {
    a.get("result")
        .filter(|r| r.is_array())
        .cloned()
        .unwrap_or_else(|| Value::Array(Vec::new()))
}

/// Compares an annotation as Label Studio lists it with batchlab's row, the way the store
/// orders states: by `updated_at` (the creation time when there is none).
pub fn annotation_state(ls: &Value, stored: &AnnotationRow) -> AnnotationState {
    let ls_us = match timestamp_us(ls.get("updated_at")) {
        0 => timestamp_us(ls.get("created_at")),
        t => t,
    };
    let same_content = flag(ls, "ground_truth") == stored.ground_truth
        && flag(ls, "was_cancelled") == stored.was_cancelled
        && serde_json::from_str::<Value>(&stored.result).ok() == Some(annotation_result(ls));
    match ls_us.cmp(&stored.updated_at_us) {
        std::cmp::Ordering::Greater => AnnotationState::Outdated,
        std::cmp::Ordering::Equal if !same_content => AnnotationState::Outdated,
        std::cmp::Ordering::Less if !same_content => AnnotationState::NewerInBatchlab,
        _ => AnnotationState::Same,
    }
}

fn counts_annotation(c: &mut SideCounts, ground_truth: bool, cancelled: bool) {
    c.annotations += 1;
    if ground_truth && !cancelled {
        c.ground_truth += 1;
    }
}

impl Curation {
    /// Compares a project with Label Studio and repairs batchlab from it (see the module
    /// documentation); answers the report. Differences left at the end are reported, not an
    /// error.
    pub async fn reconcile(
        &self,
        client: &LabelStudioClient,
        project_id: i64,
        options: &ReconcileOptions,
    ) -> Result<ReconcileReport, CurationError> {
        let page_size = options.page_size.max(1);
        let failed_before = self
            .store
            .webhook_event_counts(Some((self.instance.as_str(), project_id)))
            .await?
            .failed;
        let project = client.project_object(project_id).await?;
        self.check_same_project(project_id, &project).await?;
        let mut synth = Synth {
            curation: self,
            // Its creation time too, so that the project stored from these events is known by it
            // (a project re-created under the same id is then told apart).
            project: pick(&project, &["id", "title", "created_at"]),
            events: BTreeMap::new(),
            stored: 0,
            duplicate: 0,
        };
        let before = self
            .compare(
                client,
                project_id,
                &project,
                page_size,
                (!options.dry_run).then_some(&mut synth),
            )
            .await?;
        let (applied, after) = if options.dry_run {
            (None, None)
        } else {
            let mut applied = self.apply_all(options.apply_timeout).await?;
            let counts = self
                .store
                .webhook_event_counts(Some((self.instance.as_str(), project_id)))
                .await?;
            applied.pending = counts.pending;
            applied.failed = counts.failed - failed_before;
            let after = self
                .compare(client, project_id, &project, page_size, None)
                .await?;
            (Some(applied), Some(after))
        };
        let agree = after.as_ref().unwrap_or(&before).agrees();
        Ok(ReconcileReport {
            project_id,
            label_studio_url: client.base_url().to_string(),
            dry_run: options.dry_run,
            before,
            events: synth.events,
            events_stored: synth.stored,
            events_duplicate: synth.duplicate,
            applied,
            after,
            batchlab_status_counts: self
                .store
                .annotation_counts(self.instance.as_str(), project_id)
                .await?,
            agree,
        })
    }

    /// Refuses to reconcile into a project that Label Studio's `project` (its REST object) is
    /// not: one held with another creation time ([`CurationError::Recreated`]).
    async fn check_same_project(
        &self,
        project_id: i64,
        project: &Value,
    ) -> Result<(), CurationError> {
        let found = project.get("created_at").and_then(Value::as_str);
        let known = self
            .store
            .get_project(self.instance.as_str(), project_id)
            .await?
            .and_then(|p| p.created_at);
        if let (Some(found), Some(known)) = (found, known) {
            if !crate::labelstudio::event::same_instant(found, &known) {
                return Err(CurationError::Recreated {
                    instance: self.instance.clone(),
                    project: project_id,
                    known,
                    found: found.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Runs the processor's passes until nothing is due, or until `timeout`.
    async fn apply_all(&self, timeout: Duration) -> Result<Applied, CurationError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut applied = Applied::default();
        loop {
            let n = self.process_pending().await?;
            applied.passes += 1;
            applied.events_looked_at += n as u64;
            if n == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                applied.timed_out = true;
                break;
            }
        }
        Ok(applied)
    }

    /// One walk over both sides; with `synth`, every difference becomes a stored event.
    async fn compare(
        &self,
        client: &LabelStudioClient,
        project_id: i64,
        project: &Value,
        page_size: usize,
        mut synth: Option<&mut Synth<'_>>,
    ) -> Result<Comparison, CurationError> {
        let mut cmp = Comparison::default();
        let ls_config = project
            .get("label_config")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let stored = self
            .store
            .get_project(self.instance.as_str(), project_id)
            .await?;
        let known_config = stored
            .as_ref()
            .map(|p| p.label_config.as_str())
            .filter(|c| !c.is_empty());
        if known_config != Some(ls_config) {
            cmp.differences.project_config_differs = true;
            if let (None, Some(synth)) = (known_config, synth.as_deref_mut()) {
                let body = pick(
                    project,
                    &["id", "title", "description", "label_config", "created_at"],
                );
                synth
                    .emit("PROJECT_UPDATED", vec![("project", body)])
                    .await?;
            }
        }

        let mut ls = LsTasks {
            client,
            project: project_id,
            page_size,
            after: 0,
            buf: VecDeque::new(),
            done: false,
        };
        let mut ours = StoredTasks {
            curation: self,
            project: project_id,
            page_size,
            after: i64::MIN,
            buf: VecDeque::new(),
            done: false,
        };
        // Task ids in (lo, hi] are compared in one step.
        let mut lo = i64::MIN;
        loop {
            ls.fill().await?;
            ours.fill().await?;
            let hi = ls.bound().min(ours.bound());
            let ls_tasks = ls.take_upto(hi);
            let our_tasks = ours.take_upto(hi);
            let our_annotations = self
                .store
                .annotations_in_range(self.instance.as_str(), project_id, lo.saturating_add(1), hi)
                .await?;
            self.compare_window(
                client,
                project_id,
                &ls_tasks,
                &our_tasks,
                &our_annotations,
                &mut cmp,
                synth.as_deref_mut(),
            )
            .await?;
            if hi == i64::MAX {
                break;
            }
            lo = hi;
        }
        Ok(cmp)
    }

    /// Compares the tasks of one id window and the annotations on them.
    #[allow(clippy::too_many_arguments)]
    async fn compare_window(
        &self,
        client: &LabelStudioClient,
        project_id: i64,
        ls_tasks: &[Value],
        our_tasks: &[TaskRow],
        our_annotations: &[AnnotationRow],
        cmp: &mut Comparison,
        synth: Option<&mut Synth<'_>>,
    ) -> Result<(), CurationError> {
        let ours: HashMap<i64, &TaskRow> = our_tasks.iter().map(|t| (t.id, t)).collect();
        let our_annotation: HashMap<i64, &AnnotationRow> =
            our_annotations.iter().map(|a| (a.id, a)).collect();
        let mut ls_task_ids = HashSet::new();
        let mut ls_annotation_ids = HashSet::new();
        let mut tasks_to_send = Vec::new();
        // (action, annotation, task)
        let mut annotations_to_send: Vec<(&str, &Value, &Value)> = Vec::new();
        for task in ls_tasks {
            let Some(tid) = task_id(task) else { continue };
            ls_task_ids.insert(tid);
            cmp.label_studio.tasks += 1;
            let data = task.get("data").cloned().unwrap_or(Value::Null);
            match ours.get(&tid) {
                None => {
                    cmp.differences.tasks_missing += 1;
                    tasks_to_send.push(task);
                }
                Some(row) if serde_json::from_str::<Value>(&row.data).ok() != Some(data) => {
                    cmp.differences.tasks_changed += 1;
                    tasks_to_send.push(task);
                }
                Some(_) => {}
            }
            let annotations = task
                .get("annotations")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for a in annotations {
                let Some(aid) = a.get("id").and_then(id_of) else {
                    continue;
                };
                ls_annotation_ids.insert(aid);
                counts_annotation(
                    &mut cmp.label_studio,
                    flag(a, "ground_truth"),
                    flag(a, "was_cancelled"),
                );
                match our_annotation.get(&aid) {
                    None => {
                        cmp.differences.annotations_missing += 1;
                        annotations_to_send.push(("ANNOTATION_CREATED", a, task));
                    }
                    Some(row) => match annotation_state(a, row) {
                        AnnotationState::Same => {}
                        AnnotationState::Outdated => {
                            cmp.differences.annotations_outdated += 1;
                            annotations_to_send.push(("ANNOTATION_UPDATED", a, task));
                        }
                        AnnotationState::NewerInBatchlab => {
                            cmp.differences.annotations_newer_in_batchlab += 1;
                        }
                    },
                }
            }
        }
        cmp.batchlab.tasks += our_tasks.len() as i64;
        for a in our_annotations {
            counts_annotation(&mut cmp.batchlab, a.ground_truth, a.was_cancelled);
        }

        // Deletion candidates, each confirmed gone before anything is deleted.
        let task_candidates: Vec<i64> = our_tasks
            .iter()
            .map(|t| t.id)
            .filter(|id| !ls_task_ids.contains(id))
            .collect();
        let annotation_candidates: Vec<i64> = our_annotations
            .iter()
            .filter(|a| !ls_annotation_ids.contains(&a.id))
            // A deleted task's annotations go with it (as in Label Studio, which then sends
            // only TASKS_DELETED); those of a task it still has are unknown to this listing.
            .filter(|a| !task_candidates.contains(&a.task_id))
            .map(|a| a.id)
            .collect();
        let tasks_gone = confirm_gone(client, &task_candidates, Kind::Task).await?;
        let annotations_gone =
            confirm_gone(client, &annotation_candidates, Kind::Annotation).await?;
        cmp.differences.tasks_deleted += tasks_gone.len() as u64;
        cmp.differences.annotations_deleted += annotations_gone.len() as u64;
        cmp.differences.still_in_label_studio += (task_candidates.len() - tasks_gone.len()
            + annotation_candidates.len()
            - annotations_gone.len()) as u64;

        let Some(synth) = synth else {
            return Ok(());
        };
        if !tasks_to_send.is_empty() {
            let tasks: Vec<Value> = tasks_to_send
                .iter()
                .map(|t| webhook_task(t, project_id))
                .collect();
            synth
                .emit("TASKS_CREATED", vec![("tasks", Value::Array(tasks))])
                .await?;
        }
        for (action, a, task) in annotations_to_send {
            let tid = task_id(task).unwrap_or_default();
            synth
                .emit(
                    action,
                    vec![
                        ("annotation", webhook_annotation(a, tid, project_id)),
                        ("task", webhook_task(task, project_id)),
                    ],
                )
                .await?;
        }
        if !tasks_gone.is_empty() {
            let ids: Vec<Value> = tasks_gone.iter().map(|id| json!({"id": id})).collect();
            synth
                .emit("TASKS_DELETED", vec![("tasks", Value::Array(ids))])
                .await?;
        }
        if !annotations_gone.is_empty() {
            let ids: Vec<Value> = annotations_gone
                .iter()
                .map(|id| json!({"id": id}))
                .collect();
            synth
                .emit(
                    "ANNOTATIONS_DELETED",
                    vec![("annotations", Value::Array(ids))],
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Task,
    Annotation,
}

/// The ids among `candidates` that Label Studio answers 404 for, in their order.
async fn confirm_gone(
    client: &LabelStudioClient,
    candidates: &[i64],
    kind: Kind,
) -> Result<Vec<i64>, CurationError> {
    let found: Vec<(i64, bool)> = futures::stream::iter(candidates.iter().copied())
        .map(|id| async move {
            let exists = match kind {
                Kind::Task => client.task_exists(id).await,
                Kind::Annotation => client.annotation_exists(id).await,
            }?;
            Ok::<_, LabelStudioError>((id, exists))
        })
        .buffered(CONFIRM_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found
        .into_iter()
        .filter(|(_, exists)| !exists)
        .map(|(id, _)| id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(result: &str, ground_truth: bool, updated_at_us: i64) -> AnnotationRow {
        AnnotationRow {
            id: 1,
            project_id: 1,
            task_id: 1,
            result: result.into(),
            ground_truth,
            was_cancelled: false,
            lead_time: None,
            completed_by: Some(1),
            created_at: None,
            updated_at: None,
            updated_at_us,
            valid: true,
            invalid_reason: None,
        }
    }

    #[test]
    fn annotation_states_order_by_update_time_then_content() {
        let t =
            crate::labelstudio::event::parse_timestamp_us("2026-11-27T20:48:53.729737Z").unwrap();
        let ls = json!({"id": 1, "result": [{"a": 1}], "ground_truth": true,
            "updated_at": "2026-11-27T20:48:53.729737Z"});
        let same = row(r#"[{"a":1}]"#, true, t);
        assert_eq!(annotation_state(&ls, &same), AnnotationState::Same);
        assert_eq!(
            annotation_state(&ls, &row(r#"[{"a":1}]"#, true, t - 1)),
            AnnotationState::Outdated,
            "Label Studio's is newer"
        );
        assert_eq!(
            annotation_state(&ls, &row(r#"[{"a":1}]"#, false, t)),
            AnnotationState::Outdated,
            "the star differs at the same time"
        );
        assert_eq!(
            annotation_state(&ls, &row(r#"[{"a":2}]"#, true, t + 1)),
            AnnotationState::NewerInBatchlab
        );
        assert_eq!(
            annotation_state(&ls, &row(r#"[{"a":1}]"#, true, t + 1)),
            AnnotationState::Same,
            "a newer time with the same content is no difference"
        );
    }

    #[test]
    fn webhook_objects_keep_what_webhooks_carry() {
        let listed = json!({"id": 4, "data": {"name": "x"}, "annotations": [{"id": 1}],
            "predictions": [], "drafts": [], "annotators": [1], "updated_at": "2026-11-27T20:48:53Z",
            "annotations_results": "..."});
        assert_eq!(
            webhook_task(&listed, 7),
            json!({"id": 4, "data": {"name": "x"}, "updated_at": "2026-11-27T20:48:53Z", "project": 7})
        );
        let a = json!({"id": 1, "result": [], "created_ago": "0 minutes", "created_username": "x",
            "completed_by": {"id": 3, "email": "a@b"}, "ground_truth": true});
        assert_eq!(
            webhook_annotation(&a, 4, 7),
            json!({"id": 1, "result": [], "ground_truth": true, "task": 4, "project": 7, "completed_by": 3})
        );
    }
}
