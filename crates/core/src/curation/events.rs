//! Webhook events: stored at once on arrival, applied afterwards in order by one background loop.
//!
//! Label Studio waits one second for a webhook answer and never retries, so ingestion does the
//! least that makes an event safe — parse the envelope, insert it under the hash of its body —
//! and answers. The processor applies each event in its own transaction together with marking it
//! processed; every write is guarded so a duplicate or out-of-order delivery changes nothing.
//! A START_TRAINING stays pending until the export it asks for is written, so that neither a
//! crash nor a failed export loses it.
//!
//! Conflicts are loud, never silent. An object whose ids contradict what batchlab holds (an id
//! held under another project, live or deleted; an annotation held on another task or created at
//! another time; an annotation on another project's task; a deletion of another project's
//! object), as happens when Label Studio is re-created with a fresh database and hands its ids
//! out again, is kept aside whole in `ls_conflicts` with the reason, and the stored row is left
//! exactly as it was (why, in `crate::store`'s curation module). The event is processed, not
//! failed, with the outcome `conflict: <reason>`; each conflict is counted in
//! `batchlab_label_studio_conflicts_total{kind}`, logged at warn level with its ids, and listed
//! under `conflicts` in the status of the project the event claims. The rest of the event is
//! applied as usual.
//!
//! Each event belongs to the Label Studio instance it was delivered for (the webhook URL's
//! `{instance}`, or `label_studio.instance`) and is applied to that instance's rows only. A
//! project known with one creation time and delivered with another (`project_recreated`: Label
//! Studio re-created with a fresh database, delivering to the same instance) makes the whole
//! event a conflict: nothing of it is applied, so a new Label Studio's projects never mix into
//! the old one's counts and exports. The status of that project says so and what to do: give
//! the new Label Studio its own instance name and reconcile it (README, "Label Studio
//! instances").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::{Curation, CurationError, STALE_CLAIM_SECONDS};
use crate::labelstudio::config::LabelConfig;
use crate::labelstudio::event::{self, Action, AnnotationPayload, ProjectPayload, TaskPayload};
use crate::labelstudio::instance::Instance;
use crate::labelstudio::region::Region;
use crate::store::{
    now, AnnotationRow, Conflict, ConflictKind, CurationTx, Delivered, NewWebhookEvent,
    ObjectWrite, TaskRow, WebhookEvent,
};

/// The answer to a delivery.
#[derive(Clone, Debug, Serialize)]
pub struct Ingested {
    /// `accepted`, or `duplicate` for a body received before.
    pub status: &'static str,
    /// The stored event.
    pub event_id: i64,
    /// The action as sent.
    pub action: String,
}

/// Events read per pass of the processor. A pass ends with the milestone and accuracy checks of
/// the projects it touched, which read whole projects, so a burst is taken in large passes.
const PASS: i64 = 1024;

/// Bodies read per pass at most (the event that crosses it included): what bounds a pass's
/// memory, since one delivery may be up to `api.max_webhook_bytes`.
const PASS_BYTES: usize = 32 * 1024 * 1024;

/// Failed exports after which a START_TRAINING is given up and marked failed.
pub(crate) const MAX_EXPORT_ATTEMPTS: i64 = 10;

/// The outcome a START_TRAINING keeps while it waits for its export.
const AWAITING_EXPORT: &str = "awaiting export";

/// Seconds before a START_TRAINING whose export failed `attempts` times is tried again: 1, 2,
/// 4, ... up to 5 minutes, so a fault fixed within minutes (a directory made writable) loses
/// nothing. The ten attempts span about eight and a half minutes.
fn export_retry_delay(attempts: i64) -> i64 {
    1_i64
        .checked_shl(attempts.clamp(1, 20) as u32 - 1)
        .unwrap_or(i64::MAX)
        .min(300)
}

/// Conflicts logged one by one per event; the rest of a large event's are summed up in one line
/// (all of them are recorded and counted).
const CONFLICTS_LOGGED_PER_EVENT: usize = 10;

/// Parsed labeling configs by their XML, so a pass parses each project's config once.
type ConfigCache = HashMap<String, Option<Arc<LabelConfig>>>;

impl Curation {
    /// Stores a delivery from this service's Label Studio instance (a no-op for a body seen
    /// before from it) and wakes the processor.
    pub async fn ingest(&self, body: &[u8]) -> Result<Ingested, CurationError> {
        let (envelope, _) = event::envelope(body)?;
        let text = std::str::from_utf8(body)
            .map_err(|_| CurationError::Invalid("the body is not UTF-8".into()))?;
        let (event_id, new) = self
            .store
            .insert_webhook_event(&NewWebhookEvent {
                instance: self.instance.as_str(),
                delivery_key: &envelope.delivery_key,
                action: &envelope.action,
                project_id: envelope.project_id,
                body: text,
            })
            .await?;
        let status = if new { "accepted" } else { "duplicate" };
        metrics::counter!("batchlab_webhook_events_total", "action" => envelope.action.clone(), "status" => status).increment(1);
        if new {
            self.wake.notify_one();
        }
        Ok(Ingested {
            status,
            event_id,
            action: envelope.action,
        })
    }

    /// Runs the processor until `shutdown` is cancelled: a pass whenever an event arrives, and
    /// every second in case another process (the ML backend, another API) stored one. A pass
    /// that fails (the database is away) or panics is logged and counted, and the loop goes on
    /// after a pause that grows while failures continue (1 s doubling to 30 s, jittered) and
    /// falls back to a second after the first pass that works: the processor never stops
    /// silently and never hammers a recovering database. On shutdown the pass in progress
    /// finishes (each event is its own transaction either way) and the task ends; what is still
    /// pending stays stored for the next start.
    pub fn spawn_processor(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff =
                crate::backoff::LoopBackoff::new(Duration::from_secs(1), Duration::from_secs(30));
            while !shutdown.is_cancelled() {
                let pause = match AssertUnwindSafe(this.process_pending())
                    .catch_unwind()
                    .await
                {
                    // Events were there: more may be (a pass is bounded), so look again at once.
                    Ok(Ok(n)) if n > 0 => {
                        backoff.succeeded();
                        continue;
                    }
                    Ok(Ok(_)) => {
                        if backoff.failures() > 0 {
                            tracing::info!(
                                failed_passes = backoff.failures(),
                                "webhook processing works again"
                            );
                        }
                        backoff.succeeded();
                        Duration::from_secs(1)
                    }
                    Ok(Err(e)) => {
                        let pause = backoff.failed();
                        tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64, "webhook processing pass failed; retrying");
                        pause
                    }
                    Err(panic) => {
                        metrics::counter!("batchlab_webhook_processor_panics_total").increment(1);
                        let pause = backoff.failed();
                        tracing::error!(panic = %crate::telemetry::panic_message(&*panic), retry_in_ms = pause.as_millis() as u64, "webhook processing pass panicked; retrying");
                        pause
                    }
                };
                metrics::gauge!("batchlab_webhook_processor_failing_passes")
                    .set(backoff.failures() as f64);
                // A new event wakes a healthy loop at once; a failing one waits its pause.
                let woken = async {
                    if backoff.failures() == 0 {
                        this.wake.notified().await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = woken => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            tracing::info!("webhook event processor stopped");
        })
    }

    /// Applies the waiting events in order of arrival; answers how many were looked at. Events
    /// are applied `curation.events_per_transaction` to a transaction (256 on PostgreSQL, 64 on
    /// SQLite unless set), claimed together ([`crate::store::CurationTx::claim_group`]) and each
    /// under a savepoint of its own: one claim and one commit per group is what keeps the
    /// processor up with a burst, and an event that fails is undone and marked failed alone. Then checks
    /// milestones of the projects whose annotations changed, and runs the exports that
    /// START_TRAINING asked for: such an event is marked processed only once its export is
    /// written, and one whose export fails is tried again on a later pass (after a back-off),
    /// until [`MAX_EXPORT_ATTEMPTS`] failures mark it failed. While events keep coming a
    /// project's milestones are checked at most once a second; a pass that finds no event
    /// checks every project still waiting.
    pub async fn process_pending(&self) -> Result<usize, CurationError> {
        let started = std::time::Instant::now();
        let events = self.store.pending_webhook_events(PASS, PASS_BYTES).await?;
        let read = started.elapsed();
        let mut configs = ConfigCache::new();
        let mut touched: BTreeSet<(Instance, i64)> = BTreeSet::new();
        let mut train: BTreeMap<(Instance, i64), Vec<&WebhookEvent>> = BTreeMap::new();
        let group_size = self
            .config
            .events_per_transaction
            .unwrap_or(match self.store.backend() {
                crate::store::Backend::Postgres => 256,
                crate::store::Backend::Sqlite => 64,
            })
            .max(1);
        for group in events.chunks(group_size) {
            let done = match AssertUnwindSafe(self.apply_group(group, &mut configs))
                .catch_unwind()
                .await
            {
                Ok(done) => done?,
                Err(_) => {
                    // A poison event: nothing of the group committed. The cache may hold a
                    // half-built entry; apply the group's events one by one to fail that one
                    // alone, so that it cannot stop the events behind it.
                    configs.clear();
                    let mut done = Vec::with_capacity(group.len());
                    for event in group {
                        done.extend(self.apply_alone(event, &mut configs).await?);
                    }
                    done
                }
            };
            for d in done {
                report(&d);
                if d.failed.is_some() || d.recreated {
                    // Nothing of it was applied: no milestone, no export.
                    continue;
                }
                match (&d.action, d.project) {
                    (Action::StartTraining, Some(p)) if d.deferred => {
                        train.entry((d.instance, p)).or_default().push(d.event);
                    }
                    (a, Some(p)) if a.touches_annotations() => {
                        touched.insert((d.instance, p));
                    }
                    _ => {}
                }
            }
        }
        let applied = started.elapsed();
        let mut checks = self.milestone_checks(touched, events.is_empty());
        checks.extend(self.due_milestone_retries());
        checks.sort();
        checks.dedup();
        for (instance, project) in checks {
            self.with_instance(instance)
                .check_milestones(project)
                .await?;
        }
        for ((instance, project), requests) in train {
            self.with_instance(instance)
                .export_for_training(project, &requests)
                .await?;
        }
        if !events.is_empty() {
            tracing::debug!(
                events = events.len(),
                read_ms = read.as_secs_f64() * 1e3,
                applied_ms = (applied - read).as_secs_f64() * 1e3,
                milestones_ms = (started.elapsed() - applied).as_secs_f64() * 1e3,
                "webhook processing pass"
            );
        }
        Ok(events.len())
    }

    /// Applies one event in a transaction of its own; one that panics is marked failed.
    async fn apply_alone<'a>(
        &self,
        event: &'a WebhookEvent,
        configs: &mut ConfigCache,
    ) -> Result<Vec<Applied<'a>>, CurationError> {
        match AssertUnwindSafe(self.apply_group(std::slice::from_ref(event), configs))
            .catch_unwind()
            .await
        {
            Ok(done) => done,
            Err(panic) => {
                let reason = format!(
                    "panicked while applying: {}",
                    crate::telemetry::panic_message(&*panic)
                );
                tracing::error!(id = event.id, action = %event.action, %reason, "webhook event failed");
                metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => "error")
                    .increment(1);
                self.store.fail_event(event.id, &reason).await?;
                configs.clear();
                Ok(Vec::new())
            }
        }
    }

    /// Applies `group` in one transaction and commits it; answers what each event claimed by
    /// this call did, to report once committed. The group is first applied without savepoints
    /// (a round trip less for each event); if an event of it fails, that is rolled back and the
    /// group applied again with a savepoint for each event, so that the failing one is undone
    /// alone.
    async fn apply_group<'a>(
        &self,
        group: &'a [WebhookEvent],
        configs: &mut ConfigCache,
    ) -> Result<Vec<Applied<'a>>, CurationError> {
        let bodies: Vec<Result<Value, String>> = group
            .iter()
            .map(|e| serde_json::from_str(&e.body).map_err(|e| format!("unreadable body: {e}")))
            .collect();
        let tx = self.store.begin_events_unguarded().await?;
        if let Some(done) = self.apply_group_in(tx, group, &bodies, configs).await? {
            metrics::counter!("batchlab_webhook_groups_total", "savepoints" => "no").increment(1);
            return Ok(done);
        }
        let tx = self.store.begin_events().await?;
        let done = self.apply_group_in(tx, group, &bodies, configs).await?;
        metrics::counter!("batchlab_webhook_groups_total", "savepoints" => "yes").increment(1);
        Ok(done.unwrap_or_default())
    }

    /// [`Curation::apply_group`] in `tx`: `None` (rolled back) when an event failed in a
    /// transaction without savepoints. `bodies` are the group's bodies, parsed.
    async fn apply_group_in<'a>(
        &self,
        mut tx: CurationTx,
        group: &'a [WebhookEvent],
        bodies: &[Result<Value, String>],
        configs: &mut ConfigCache,
    ) -> Result<Option<Vec<Applied<'a>>>, CurationError> {
        let ids: Vec<i64> = group.iter().map(|e| e.id).collect();
        // Events another processor handled or holds are left out; the rest, in order.
        let claimed = tx.claim_group(&ids, "applied").await?;
        let by_id: HashMap<i64, usize> = group.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
        let claimed: Vec<(usize, String)> = claimed
            .into_iter()
            .filter_map(|(id, instance)| Some((*by_id.get(&id)?, instance)))
            .collect();
        prefetch(&mut tx, group, &claimed, bodies).await?;
        let mut done = Vec::with_capacity(claimed.len());
        for (i, instance) in claimed {
            let event = &group[i];
            let span = tracing::info_span!("webhook_event", id = event.id, instance = %event.instance, action = %event.action);
            tx.enter(event.id, instance).await?;
            match self
                .apply_one(&mut tx, event, bodies[i].as_ref(), configs)
                .instrument(span)
                .await?
            {
                Some(applied) => done.push(applied),
                None => {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
        }
        tx.commit().await?;
        Ok(Some(done))
    }
}

/// Reads, for the annotation events among `claimed` (indexes into `group` and its parsed
/// `bodies`, with their instances), the stored rows of the tasks and annotations they deliver,
/// a few statements for all ([`CurationTx::prefetch`]).
async fn prefetch(
    tx: &mut CurationTx,
    group: &[WebhookEvent],
    claimed: &[(usize, String)],
    bodies: &[Result<Value, String>],
) -> Result<(), CurationError> {
    let mut ids: BTreeMap<&str, (Vec<i64>, Vec<i64>)> = BTreeMap::new();
    for (i, instance) in claimed {
        let Ok(body) = &bodies[*i] else { continue };
        if !Action::parse(&group[*i].action).touches_annotations() {
            continue;
        }
        let (tasks, annotations) = ids.entry(instance.as_str()).or_default();
        tasks.extend(
            event::items(body, "task")
                .into_iter()
                .filter_map(event::id_of),
        );
        for object in event::items(body, "annotation") {
            if let Some(a) = AnnotationPayload::read(object) {
                annotations.push(a.id);
                tasks.extend(a.task_id);
            }
        }
    }
    for (instance, (tasks, annotations)) in ids {
        tx.prefetch(instance, &tasks, &annotations).await?;
    }
    Ok(())
}

/// What applying one event of a group did, reported once the group has committed.
struct Applied<'a> {
    event: &'a WebhookEvent,
    instance: Instance,
    action: Action,
    project: Option<i64>,
    /// Objects kept aside (already in `ls_conflicts` once the group commits).
    conflicts: Vec<Conflict>,
    /// The whole event was kept aside: its project was re-created.
    recreated: bool,
    /// A START_TRAINING left pending until its export is written.
    deferred: bool,
    /// Why it could not be applied: its writes undone, the event marked failed.
    failed: Option<String>,
}

/// Records in `batchlab_webhook_event_lag_seconds` how long an event waited between its
/// receipt (stored in whole seconds, so this reads up to a second high) and its application.
fn observe_lag(received_at: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::histogram!("batchlab_webhook_event_lag_seconds")
        .record((now - received_at as f64).max(0.0));
}

/// Logs and counts what an event did, once its group has committed.
fn report(d: &Applied<'_>) {
    let outcome = if let Some(reason) = &d.failed {
        tracing::warn!(id = d.event.id, action = %d.event.action, %reason, "webhook event could not be applied");
        "error"
    } else {
        if let Action::Unknown(name) = &d.action {
            tracing::info!(action = %name, "unknown webhook action acknowledged and ignored");
        }
        report_conflicts(d.event.id, &d.conflicts);
        if d.deferred {
            // Counted once its export is written.
            return;
        }
        observe_lag(d.event.received_at);
        if d.conflicts.is_empty() {
            "ok"
        } else {
            "conflict"
        }
    };
    metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => outcome).increment(1);
}

impl Curation {
    /// Writes the export that the START_TRAINING events `requests` (all about `project`, left
    /// pending by [`Curation::apply_one`]) asked for, then marks them processed. When the
    /// export fails each is held back for a later try, or marked failed after its last.
    async fn export_for_training(
        &self,
        project: i64,
        requests: &[&WebhookEvent],
    ) -> Result<(), CurationError> {
        match self
            .write_export_file(project, "start_training", None)
            .await
        {
            Ok(rec) => {
                tracing::info!(project_id = project, tasks = rec.tasks, path = %rec.path, "START_TRAINING: training data exported");
                let outcome = format!("exported: {}", rec.path);
                for event in requests {
                    if self.store.complete_event(event.id, &outcome).await? {
                        metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => "ok").increment(1);
                        observe_lag(event.received_at);
                    }
                }
            }
            Err(e) => {
                for event in requests {
                    let attempts = event.attempts + 1;
                    if attempts >= MAX_EXPORT_ATTEMPTS {
                        tracing::error!(project_id = project, id = event.id, attempts, error = %e, "START_TRAINING export failed; giving up");
                        metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => "error").increment(1);
                        self.store
                            .fail_event(
                                event.id,
                                &format!("the export failed {attempts} times, lastly: {e}"),
                            )
                            .await?;
                    } else {
                        let delay = export_retry_delay(attempts);
                        tracing::warn!(project_id = project, id = event.id, attempts, retry_in_s = delay, error = %e, "START_TRAINING export failed; will retry");
                        self.store
                            .retry_event_later(
                                event.id,
                                attempts,
                                &format!("{AWAITING_EXPORT}: attempt {attempts} of {MAX_EXPORT_ATTEMPTS} failed: {e}"),
                                now() + delay,
                            )
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies one event inside `tx`, which has claimed and entered it
    /// ([`CurationTx::enter`]), from its parsed `body`: applies it and records its outcome, or
    /// undoes its writes and marks it failed. `None` when it failed in a transaction without
    /// savepoints, which can only be rolled back whole.
    async fn apply_one<'a>(
        &self,
        tx: &mut CurationTx,
        event: &'a WebhookEvent,
        body: Result<&Value, &String>,
        configs: &mut ConfigCache,
    ) -> Result<Option<Applied<'a>>, CurationError> {
        let mut done = Applied {
            event,
            instance: Instance::default(),
            action: Action::parse(&event.action),
            project: None,
            conflicts: Vec::new(),
            recreated: false,
            deferred: false,
            failed: None,
        };
        let result = match Instance::parse(tx.instance()) {
            // Names are checked before an event is stored; this row was written otherwise.
            Err(e) => Err(e.into_message()),
            Ok(instance) => {
                done.instance = instance;
                match body {
                    Err(e) => Err(e.clone()),
                    Ok(body) => {
                        done.project = event::project_id(body);
                        apply(
                            tx,
                            &done.action,
                            &event.action,
                            body,
                            configs,
                            &mut done.conflicts,
                        )
                        .await
                        .map_err(|e| e.to_string())
                    }
                }
            }
        };
        match result {
            Ok(outcome) => {
                done.recreated = done
                    .conflicts
                    .iter()
                    .any(|c| c.kind == ConflictKind::ProjectRecreated.as_str());
                done.deferred = matches!(done.action, Action::StartTraining)
                    && done.project.is_some()
                    && !done.recreated;
                let outcome = if done.conflicts.is_empty() {
                    outcome
                } else {
                    conflict_outcome(&done.conflicts, &outcome)
                };
                if done.deferred {
                    // Done only once the export is written (`export_for_training`); held
                    // meanwhile, and retried after the hold should this process die first.
                    tx.keep_pending(AWAITING_EXPORT, now() + STALE_CLAIM_SECONDS)
                        .await?;
                } else if outcome != "applied" {
                    tx.set_outcome(&outcome).await?;
                }
            }
            Err(_) if !tx.guarded() => return Ok(None),
            Err(reason) => {
                tx.undo_event(&reason).await?;
                done.conflicts.clear();
                done.failed = Some(reason);
            }
        }
        Ok(Some(done))
    }
}

/// The outcome of an event that met conflicts: `conflict: ` and the first's reason, how many
/// more there were, and what was otherwise done when that was not plainly `applied`.
fn conflict_outcome(conflicts: &[Conflict], otherwise: &str) -> String {
    let mut outcome = format!("conflict: {}", conflicts[0].reason);
    if conflicts.len() > 1 {
        outcome.push_str(&format!(" (and {} more)", conflicts.len() - 1));
    }
    if otherwise != "applied" {
        outcome.push_str(&format!("; {otherwise}"));
    }
    outcome
}

/// Logs and counts the conflicts an event's committed transaction recorded.
fn report_conflicts(event_id: i64, conflicts: &[Conflict]) {
    for (n, c) in conflicts.iter().enumerate() {
        metrics::counter!("batchlab_label_studio_conflicts_total", "kind" => c.kind.clone())
            .increment(1);
        if n < CONFLICTS_LOGGED_PER_EVENT {
            tracing::warn!(
                event_id,
                conflict_id = c.id,
                instance = %c.instance,
                action = %c.action,
                kind = %c.kind,
                entity = %c.entity,
                entity_id = c.entity_id,
                project_id = c.project_id,
                known_project_id = ?c.known_project_id,
                known_task_id = ?c.known_task_id,
                known_deleted = c.known_deleted,
                reason = %c.reason,
                "Label Studio ids contradict what batchlab holds (was Label Studio re-created with \
                 a fresh database?): the object is kept as a conflict, the stored row left as it was"
            );
        }
    }
    if conflicts.len() > CONFLICTS_LOGGED_PER_EVENT {
        tracing::warn!(
            event_id,
            conflicts = conflicts.len(),
            not_logged = conflicts.len() - CONFLICTS_LOGGED_PER_EVENT,
            "more Label Studio conflicts in this event: all recorded, see the project status"
        );
    }
}

/// Collects what a write did: a conflict into `conflicts`; answers whether it was left alone.
fn note(write: ObjectWrite, conflicts: &mut Vec<Conflict>) -> bool {
    match write {
        ObjectWrite::Written => false,
        ObjectWrite::LeftAlone => true,
        ObjectWrite::Conflict(c) => {
            conflicts.push(*c);
            false
        }
    }
}

/// Applies one event inside its transaction; answers the outcome to record. Objects that
/// contradict the stored state are recorded as conflicts and collected in `conflicts`.
async fn apply(
    tx: &mut CurationTx,
    action: &Action,
    action_name: &str,
    body: &Value,
    configs: &mut ConfigCache,
    conflicts: &mut Vec<Conflict>,
) -> Result<String, CurationError> {
    #[cfg(test)]
    if matches!(action, Action::Unknown(name) if name == tests::PANIC_ACTION) {
        panic!("injected by a test");
    }
    let project_id = event::project_id(body);
    let project = ProjectPayload::read(body);
    if let Some(p) = &project {
        if let Some(created_at) = &p.created_at {
            match tx.project_created_at(p.id).await? {
                Some(known) if !event::same_instant(&known, created_at) => {
                    let from = Delivered {
                        action: action_name,
                        object: body,
                    };
                    conflicts.push(
                        tx.record_project_recreated(p.id, created_at, &known, from)
                            .await?,
                    );
                    return Ok("nothing of the event applied".into());
                }
                Some(_) => {}
                None => {
                    tx.record_project_created_at(p.id, &p.title, created_at)
                        .await?
                }
            }
        }
    }
    if let Some(p) = project.filter(|p| !p.label_config.is_empty()) {
        let changed = tx
            .upsert_project(p.id, &p.title, &p.label_config, p.updated_at_us)
            .await?;
        if changed {
            revalidate(tx, p.id, configs).await?;
        }
    }
    match action {
        Action::ProjectDeleted => {
            if let Some(p) = project_id {
                tx.delete_project(p).await?;
            }
        }
        Action::TasksCreated => {
            for object in event::items(body, "tasks") {
                let from = Delivered {
                    action: action_name,
                    object,
                };
                upsert_task(tx, object, project_id, from, conflicts).await?;
            }
        }
        Action::TasksDeleted => {
            for object in event::items(body, "tasks") {
                let Some(id) = event::id_of(object) else {
                    continue;
                };
                let from = Delivered {
                    action: action_name,
                    object,
                };
                note(
                    tx.delete_task(project_id.unwrap_or(0), id, from).await?,
                    conflicts,
                );
            }
        }
        Action::AnnotationCreated | Action::AnnotationsCreated | Action::AnnotationUpdated => {
            for object in event::items(body, "task") {
                let from = Delivered {
                    action: action_name,
                    object,
                };
                upsert_task(tx, object, project_id, from, conflicts).await?;
            }
            let annotations: Vec<(&Value, AnnotationPayload)> = event::items(body, "annotation")
                .into_iter()
                .filter_map(|object| Some((object, AnnotationPayload::read(object)?)))
                .collect();
            if annotations.is_empty() {
                return Ok("ignored: no annotation in the payload".into());
            }
            let mut stale = 0;
            for (object, a) in annotations {
                let Some(project) = a.project_id.or(project_id) else {
                    return Err(CurationError::Invalid(format!(
                        "annotation {} names no project",
                        a.id
                    )));
                };
                let config = config_for(tx, project, configs).await?;
                let row = annotation_row(&a, project, config.as_deref());
                let from = Delivered {
                    action: action_name,
                    object,
                };
                if note(tx.apply_annotation(&row, from).await?, conflicts) {
                    stale += 1;
                }
            }
            if stale > 0 {
                return Ok(format!("applied; {stale} annotation(s) older than or deleted in the stored state left alone"));
            }
        }
        Action::AnnotationsDeleted => {
            let mut objects = event::items(body, "annotations");
            objects.extend(event::items(body, "annotation"));
            for object in objects {
                let Some(id) = event::id_of(object) else {
                    continue;
                };
                let from = Delivered {
                    action: action_name,
                    object,
                };
                note(
                    tx.delete_annotation(project_id.unwrap_or(0), id, from)
                        .await?,
                    conflicts,
                );
            }
        }
        Action::ProjectCreated | Action::ProjectUpdated => {}
        Action::StartTraining => {
            if project_id.is_none() {
                return Ok("ignored: START_TRAINING without a project".into());
            }
            // Left pending by `Curation::apply_one` until `export_for_training` writes the export.
            return Ok("export requested".into());
        }
        Action::Unknown(name) => return Ok(format!("ignored: unknown action {name}")),
    }
    Ok("applied".into())
}

async fn upsert_task(
    tx: &mut CurationTx,
    object: &Value,
    project_id: Option<i64>,
    from: Delivered<'_>,
    conflicts: &mut Vec<Conflict>,
) -> Result<(), CurationError> {
    let Some(t) = TaskPayload::read(object) else {
        return Ok(());
    };
    let (Some(data), Some(project)) = (&t.data, t.project_id.or(project_id)) else {
        return Ok(());
    };
    let row = TaskRow {
        id: t.id,
        project_id: project,
        data: data.to_string(),
    };
    note(tx.apply_task(&row, t.updated_at_us, from).await?, conflicts);
    Ok(())
}

async fn config_for(
    tx: &mut CurationTx,
    project: i64,
    configs: &mut ConfigCache,
) -> Result<Option<Arc<LabelConfig>>, CurationError> {
    let Some(xml) = tx.project_config(project).await? else {
        return Ok(None);
    };
    if let Some(cached) = configs.get(&xml) {
        return Ok(cached.clone());
    }
    let parsed = match LabelConfig::parse(&xml) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(project, error = %e, "labeling config does not parse; annotations are kept unvalidated");
            None
        }
    };
    configs.insert(xml, parsed.clone());
    Ok(parsed)
}

/// Why an annotation's result does not fit the config, if it does not. Skipped tasks are not
/// checked: their result is empty by design.
fn invalid_reason(
    result: &Value,
    was_cancelled: bool,
    config: Option<&LabelConfig>,
) -> Option<String> {
    if was_cancelled {
        return None;
    }
    let regions: Vec<Region> = match serde_json::from_value(result.clone()) {
        Ok(r) => r,
        Err(e) => return Some(format!("result is not a list of regions: {e}")),
    };
    let problems = config?.validate_result(&regions);
    (!problems.is_empty()).then(|| problems.join("; "))
}

fn annotation_row(
    a: &AnnotationPayload,
    project: i64,
    config: Option<&LabelConfig>,
) -> AnnotationRow {
    let reason = invalid_reason(&a.result, a.was_cancelled, config);
    AnnotationRow {
        id: a.id,
        project_id: project,
        task_id: a.task_id.unwrap_or(0),
        result: a.result.to_string(),
        ground_truth: a.ground_truth,
        was_cancelled: a.was_cancelled,
        lead_time: a.lead_time,
        completed_by: a.completed_by,
        created_at: a.created_at.clone(),
        updated_at: a.updated_at.clone(),
        updated_at_us: a.updated_at_us,
        valid: reason.is_none(),
        invalid_reason: reason,
    }
}

/// Checks every live annotation of a project again after its labeling config changed.
async fn revalidate(
    tx: &mut CurationTx,
    project: i64,
    configs: &mut ConfigCache,
) -> Result<(), CurationError> {
    let config = config_for(tx, project, configs).await?;
    for a in tx.project_annotations(project).await? {
        let result: Value = serde_json::from_str(&a.result).unwrap_or(Value::Null);
        let reason = invalid_reason(&result, a.was_cancelled, config.as_deref());
        if reason != a.invalid_reason {
            tx.set_validity(a.id, reason.as_deref()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::config::CurationConfig;
    use crate::curation::Curation;
    use crate::labelstudio::instance::Instance;
    use crate::testing::TestDb;

    /// An action whose application panics (test builds only): a stand-in for any bug that a
    /// hostile or unforeseen event could trigger.
    pub(super) const PANIC_ACTION: &str = "BATCHLAB_TEST_PANIC";

    fn project_event(action: &str, id: i64, config: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"action": action, "project": {"id": id, "title": "p", "label_config": config}}),
        )
        .unwrap()
    }

    const CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>"#;

    /// A poison event is marked failed with its reason, counted, shown in the project status,
    /// and the events behind it are applied; the processor loop keeps running.
    #[tokio::test]
    async fn a_panicking_event_is_failed_and_the_processor_goes_on() {
        let db = TestDb::sqlite().await;
        let dir = tempfile::tempdir().unwrap();
        let curation = Curation::new(
            db.store.clone(),
            CurationConfig {
                training_dir: dir.path().into(),
                milestones: vec![],
                accuracy_every: 0,
                ..Default::default()
            },
            Instance::default(),
        );
        curation
            .ingest(&project_event("PROJECT_CREATED", 7, CONFIG))
            .await
            .unwrap();
        curation
            .ingest(&project_event(PANIC_ACTION, 7, CONFIG))
            .await
            .unwrap();
        let renamed = serde_json::to_vec(&json!({"action": "PROJECT_UPDATED", "project": {"id": 7, "title": "renamed", "label_config": CONFIG}})).unwrap();
        curation.ingest(&renamed).await.unwrap();

        let shutdown = tokio_util::sync::CancellationToken::new();
        let processor = curation.spawn_processor(shutdown.clone());
        let drained = async {
            loop {
                let counts = db
                    .store
                    .webhook_event_counts(Some(("default", 7)))
                    .await
                    .unwrap();
                if counts.pending == 0 {
                    break curation.status(7).await.unwrap();
                }
                assert!(!processor.is_finished(), "the processor stopped");
                curation.wake.notify_one();
                tokio::task::yield_now().await;
            }
        };
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), drained)
            .await
            .expect("the processor applied every event");
        assert!(
            !processor.is_finished(),
            "the processor must survive a poison event"
        );
        // Told to stop, it ends its loop (it does not wait for the process to end).
        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), processor)
            .await
            .expect("the processor stops when told to")
            .expect("the processor ended without a panic");
        assert_eq!(
            status.title, "renamed",
            "the event after the poison one was applied"
        );
        assert_eq!(status.webhook_events.failed, 1);
        assert_eq!(status.failed_events.len(), 1);
        assert_eq!(status.failed_events[0].action, PANIC_ACTION);
        assert!(
            status.failed_events[0]
                .reason
                .contains("panicked while applying: injected by a test"),
            "{:?}",
            status.failed_events
        );
        db.cleanup().await;
    }

    /// A START_TRAINING whose export keeps failing is tried again on later passes, and after
    /// its last attempt marked failed with the reason, counted and shown in the project status.
    #[tokio::test]
    async fn a_start_training_whose_export_keeps_failing_ends_failed() {
        let db = TestDb::sqlite().await;
        let dir = tempfile::tempdir().unwrap();
        // A file where the training directory belongs: no export can be written there.
        let training = dir.path().join("training");
        std::fs::write(&training, b"not a directory").unwrap();
        let curation = Curation::new(
            db.store.clone(),
            CurationConfig {
                training_dir: training,
                milestones: vec![],
                accuracy_every: 0,
                ..Default::default()
            },
            Instance::default(),
        );
        curation
            .ingest(&project_event("START_TRAINING", 7, CONFIG))
            .await
            .unwrap();
        let mut passes = 0;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            assert_eq!(
                curation.process_pending().await.unwrap(),
                1,
                "one try per pass"
            );
            passes += 1;
            let status = curation.status(7).await.unwrap();
            if status.webhook_events.pending == 0 {
                break status;
            }
            assert_eq!(
                curation.process_pending().await.unwrap(),
                0,
                "held back until its retry time"
            );
            assert!(tokio::time::Instant::now() < deadline, "never given up");
            // As if the back-off had passed.
            db.store.make_retries_due().await.unwrap();
        };
        assert_eq!(passes, super::MAX_EXPORT_ATTEMPTS);
        assert_eq!(status.webhook_events.failed, 1);
        assert!(status.exports.is_empty());
        let reason = &status.failed_events[0].reason;
        assert!(
            reason.starts_with("the export failed 10 times, lastly: writing the export failed"),
            "{reason}"
        );
        db.cleanup().await;
    }

    #[test]
    fn export_retries_back_off_up_to_five_minutes() {
        let delays: Vec<i64> = (1..=super::MAX_EXPORT_ATTEMPTS)
            .map(super::export_retry_delay)
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(super::export_retry_delay(i64::MAX), 300);
    }

    /// A labeling config nested 20,000 deep once overflowed the stack of batchlab-api's event
    /// processor, on every restart (the event stayed pending). Now the project is recorded and
    /// its annotations are kept unvalidated, like any config that does not parse.
    #[tokio::test]
    async fn a_deeply_nested_config_in_a_webhook_is_survived() {
        let db = TestDb::sqlite().await;
        let dir = tempfile::tempdir().unwrap();
        let curation = Curation::new(
            db.store.clone(),
            CurationConfig {
                training_dir: dir.path().into(),
                milestones: vec![],
                accuracy_every: 0,
                ..Default::default()
            },
            Instance::default(),
        );
        let deep = format!(
            "{}<Text name=\"t\" value=\"$text\"/>{}",
            "<View>".repeat(20_000),
            "</View>".repeat(20_000)
        );
        curation
            .ingest(&project_event("PROJECT_UPDATED", 3, &deep))
            .await
            .unwrap();
        let annotation = json!({"action": "ANNOTATION_CREATED", "project": {"id": 3},
            "task": {"id": 1, "project": 3, "data": {"text": "x"}},
            "annotation": {"id": 1, "task": 1, "project": 3, "result": [], "was_cancelled": false}});
        curation
            .ingest(&serde_json::to_vec(&annotation).unwrap())
            .await
            .unwrap();
        while curation.process_pending().await.unwrap() > 0 {}
        let status = curation.status(3).await.unwrap();
        assert_eq!(status.counts.annotations, 1);
        assert_eq!(status.webhook_events.pending, 0);
        db.cleanup().await;
    }
}
