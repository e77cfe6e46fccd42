//! Webhook events: stored at once on arrival, applied afterwards in order by one background loop.
//!
//! Label Studio waits one second for a webhook answer and never retries, so ingestion does the
//! least that makes an event safe — parse the envelope, insert it under the hash of its body —
//! and answers. The processor applies each event in its own transaction together with marking it
//! processed; every write is guarded so a duplicate or out-of-order delivery changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracing::Instrument;

use super::{Curation, CurationError};
use crate::labelstudio::config::LabelConfig;
use crate::labelstudio::region::Region;
use crate::labelstudio::webhook::{self, Action, AnnotationPayload, ProjectPayload, TaskPayload};
use crate::store::{AnnotationRow, CurationTx, NewWebhookEvent, TaskRow, WebhookEvent};

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

/// Events applied per pass of the processor.
const PASS: i64 = 256;

/// Parsed labeling configs by their XML, so a pass parses each project's config once.
type ConfigCache = HashMap<String, Option<Arc<LabelConfig>>>;

impl Curation {
    /// Stores a delivery (a no-op for a body seen before) and wakes the processor.
    pub async fn ingest(&self, body: &[u8]) -> Result<Ingested, CurationError> {
        let (envelope, _) = webhook::envelope(body)?;
        let text = std::str::from_utf8(body).map_err(|_| CurationError::Invalid("the body is not UTF-8".into()))?;
        let (event_id, new) = self
            .store
            .insert_webhook_event(&NewWebhookEvent {
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
        Ok(Ingested { status, event_id, action: envelope.action })
    }

    /// Runs the processor until the process ends: a pass whenever an event arrives, and every
    /// second in case another process stored one.
    pub fn spawn_processor(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.process_pending().await {
                    Ok(n) if n as i64 == PASS => continue,
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "webhook processing pass failed; retrying"),
                }
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }

    /// Applies the waiting events in order of arrival; answers how many were looked at. Then
    /// checks milestones of the projects whose annotations changed, and runs the exports that
    /// START_TRAINING asked for.
    pub async fn process_pending(&self) -> Result<usize, CurationError> {
        let events = self.store.pending_webhook_events(PASS).await?;
        let mut configs = ConfigCache::new();
        let mut touched = BTreeSet::new();
        let mut train = BTreeSet::new();
        for event in &events {
            let span = tracing::info_span!("webhook_event", id = event.id, action = %event.action);
            match self.process_one(event, &mut configs).instrument(span).await? {
                Some((Action::StartTraining, Some(p))) => {
                    train.insert(p);
                }
                Some((a, Some(p))) if a.touches_annotations() => {
                    touched.insert(p);
                }
                _ => {}
            }
        }
        for project in touched {
            self.check_milestones(project).await?;
        }
        for project in train {
            match self.write_export_file(project, "start_training", None).await {
                Ok(rec) => tracing::info!(project_id = project, tasks = rec.tasks, path = %rec.path, "START_TRAINING: training data exported"),
                Err(e) => tracing::error!(project_id = project, error = %e, "START_TRAINING export failed"),
            }
        }
        if let Ok(counts) = self.store.webhook_event_counts().await {
            metrics::gauge!("batchlab_webhook_events_pending").set(counts.pending as f64);
        }
        Ok(events.len())
    }
}

impl Curation {
    /// Applies one event; answers its action and project when it was applied by this call.
    async fn process_one(&self, event: &WebhookEvent, configs: &mut ConfigCache) -> Result<Option<(Action, Option<i64>)>, CurationError> {
        let body: Value = match serde_json::from_str(&event.body) {
            Ok(v) => v,
            Err(e) => {
                self.store.fail_event(event.id, &format!("unreadable body: {e}")).await?;
                return Ok(None);
            }
        };
        let action = Action::parse(&event.action);
        let Some(mut tx) = self.store.begin_event(event.id, "applied").await? else { return Ok(None) };
        match apply(&mut tx, &action, &body, configs).await {
            Ok(outcome) => {
                if outcome != "applied" {
                    tx.set_outcome(&outcome).await?;
                }
                tx.commit().await?;
                if let Action::Unknown(name) = &action {
                    tracing::info!(action = %name, "unknown webhook action acknowledged and ignored");
                }
                metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => "ok").increment(1);
                Ok(Some((action, webhook::project_id(&body))))
            }
            Err(e) => {
                drop(tx);
                tracing::warn!(error = %e, "webhook event could not be applied");
                self.store.fail_event(event.id, &format!("error: {e}")).await?;
                metrics::counter!("batchlab_webhook_events_processed_total", "outcome" => "error").increment(1);
                Ok(None)
            }
        }
    }
}

/// Applies one event inside its transaction; answers the outcome to record.
async fn apply(tx: &mut CurationTx, action: &Action, body: &Value, configs: &mut ConfigCache) -> Result<String, CurationError> {
    let project_id = webhook::project_id(body);
    if let Some(p) = ProjectPayload::read(body).filter(|p| !p.label_config.is_empty()) {
        let changed = tx.upsert_project(p.id, &p.title, &p.label_config, p.updated_at_us).await?;
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
            for t in webhook::items(body, "tasks").into_iter().filter_map(TaskPayload::read) {
                upsert_task(tx, &t, project_id).await?;
            }
        }
        Action::TasksDeleted => {
            let ids: Vec<i64> = webhook::items(body, "tasks").into_iter().filter_map(webhook::id_of).collect();
            tx.delete_tasks(project_id.unwrap_or(0), &ids).await?;
        }
        Action::AnnotationCreated | Action::AnnotationsCreated | Action::AnnotationUpdated => {
            for t in webhook::items(body, "task").into_iter().filter_map(TaskPayload::read) {
                upsert_task(tx, &t, project_id).await?;
            }
            let annotations: Vec<AnnotationPayload> =
                webhook::items(body, "annotation").into_iter().filter_map(AnnotationPayload::read).collect();
            if annotations.is_empty() {
                return Ok("ignored: no annotation in the payload".into());
            }
            let mut stale = 0;
            for a in annotations {
                let Some(project) = a.project_id.or(project_id) else {
                    return Err(CurationError::Invalid(format!("annotation {} names no project", a.id)));
                };
                let config = config_for(tx, project, configs).await?;
                let row = annotation_row(&a, project, config.as_deref());
                if !tx.upsert_annotation(&row).await? {
                    stale += 1;
                }
            }
            if stale > 0 {
                return Ok(format!("applied; {stale} annotation(s) older than or deleted in the stored state left alone"));
            }
        }
        Action::AnnotationsDeleted => {
            let mut ids: Vec<i64> = webhook::items(body, "annotations").into_iter().filter_map(webhook::id_of).collect();
            ids.extend(webhook::items(body, "annotation").into_iter().filter_map(webhook::id_of));
            tx.delete_annotations(project_id.unwrap_or(0), &ids).await?;
        }
        Action::ProjectCreated | Action::ProjectUpdated => {}
        Action::StartTraining => {
            if project_id.is_none() {
                return Ok("ignored: START_TRAINING without a project".into());
            }
            return Ok("export requested".into());
        }
        Action::Unknown(name) => return Ok(format!("ignored: unknown action {name}")),
    }
    Ok("applied".into())
}

async fn upsert_task(tx: &mut CurationTx, t: &TaskPayload, project_id: Option<i64>) -> Result<(), CurationError> {
    let (Some(data), Some(project)) = (&t.data, t.project_id.or(project_id)) else { return Ok(()) };
    let row = TaskRow { id: t.id, project_id: project, data: data.to_string() };
    tx.upsert_task(&row, t.updated_at_us).await?;
    Ok(())
}

async fn config_for(tx: &mut CurationTx, project: i64, configs: &mut ConfigCache) -> Result<Option<Arc<LabelConfig>>, CurationError> {
    let Some(xml) = tx.project_config(project).await? else { return Ok(None) };
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
fn invalid_reason(result: &Value, was_cancelled: bool, config: Option<&LabelConfig>) -> Option<String> {
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

fn annotation_row(a: &AnnotationPayload, project: i64, config: Option<&LabelConfig>) -> AnnotationRow {
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
async fn revalidate(tx: &mut CurationTx, project: i64, configs: &mut ConfigCache) -> Result<(), CurationError> {
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
