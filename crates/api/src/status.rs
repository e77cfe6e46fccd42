//! What is going on, at a glance: the status page (`GET /`, static HTML that holds no data),
//! and the JSON routes it and any script read, behind the API key like every `/v1` route —
//! `GET /v1/status` (batches with progress, speed and ETA, the queue, projects, workers),
//! `GET /v1/label-studio/projects` (every project the curation tables know) and `GET
//! /v1/models` (OpenAI's model list: the models loaded by the workers seen lately).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchlab_core::store::{
    now, BatchCounts, BatchRecord, BatchStatus, ProjectOverview, Store, StoreError, WorkerRecord,
};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Instrument;

use crate::error::ApiError;
use crate::AppState;

/// The status page: one HTML file with its script and styles inline, no build step and
/// nothing fetched from elsewhere.
const PAGE: &str = include_str!("status.html");

/// What the page may do: its own inline script and styles, requests to this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Batches the status shows, newest first.
const RECENT_BATCHES: i64 = 20;

/// Most projects listed.
pub(crate) const MAX_PROJECTS: i64 = 500;

/// A worker whose last heartbeat is older than this is taken as gone (its heartbeat comes every
/// five seconds at most).
pub(crate) const WORKER_SEEN_SECONDS: i64 = 30;

/// One batch as the status page shows it: OpenAI's counts, and speed and ETA worked out from
/// them and the batch's timestamps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchProgress {
    /// `batch_...` identifier.
    pub id: String,
    /// Where it is in its lifecycle.
    pub status: &'static str,
    /// The endpoint its lines target.
    pub endpoint: String,
    /// The model that answers, once known.
    pub model: Option<String>,
    /// `{total, completed, failed}`, as the Batches API reports them.
    pub request_counts: Value,
    /// Unix seconds.
    pub created_at: i64,
    /// When its lines started running, unix seconds.
    pub in_progress_at: Option<i64>,
    /// When its lines stopped running (finalizing or an end state), unix seconds.
    pub ended_at: Option<i64>,
    /// Finished lines over all lines, 0..1 (1 for a completed batch of no line).
    pub progress: f64,
    /// Finished lines per second since its lines started; `None` before they did.
    pub lines_per_second: Option<f64>,
    /// Seconds until every line is finished at that speed: 0 once ended, `None` while unknown.
    pub eta_seconds: Option<i64>,
}

/// Works out a batch's progress, speed and ETA at unix second `now`.
pub fn batch_progress(b: &BatchRecord, now: i64) -> BatchProgress {
    let done = b.completed + b.failed;
    let ended_at = [
        b.finalizing_at,
        b.completed_at,
        b.failed_at,
        b.expired_at,
        b.cancelled_at,
    ]
    .into_iter()
    .flatten()
    .min();
    let finished = !b.status.is_active() || b.status == BatchStatus::Finalizing;
    let progress = if b.total > 0 {
        (done as f64 / b.total as f64).clamp(0.0, 1.0)
    } else if b.status == BatchStatus::Completed {
        1.0
    } else {
        0.0
    };
    let lines_per_second = b.in_progress_at.map(|start| {
        // Timestamps are whole seconds: a batch done within one counts as taking one.
        let elapsed = (ended_at.unwrap_or(now) - start).max(1);
        done as f64 / elapsed as f64
    });
    let remaining = (b.total - done).max(0);
    let eta_seconds = if finished || (remaining == 0 && b.in_progress_at.is_some()) {
        Some(0)
    } else {
        lines_per_second
            .filter(|r| *r > 0.0)
            .map(|r| (remaining as f64 / r).ceil() as i64)
    };
    BatchProgress {
        id: b.id.clone(),
        status: b.status.as_str(),
        endpoint: b.endpoint.clone(),
        model: b.model.clone(),
        request_counts: json!({"total": b.total, "completed": b.completed, "failed": b.failed}),
        created_at: b.created_at,
        in_progress_at: b.in_progress_at,
        ended_at,
        progress,
        lines_per_second,
        eta_seconds,
    }
}

/// The batches part of `GET /v1/status`.
#[derive(Clone, Debug, Serialize)]
pub struct BatchesStatus {
    /// Every status → batches in it.
    pub by_status: BTreeMap<&'static str, i64>,
    /// Batches waiting for a worker to claim them.
    pub queue_depth: i64,
    /// The newest batches.
    pub recent: Vec<BatchProgress>,
}

/// A model loaded by at least one worker seen lately.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelStatus {
    /// The model's id, as requests name it.
    pub id: String,
    /// Workers that have it loaded.
    pub workers: usize,
    /// Their tokens per second together, over their last heartbeat intervals.
    pub tokens_per_second: f64,
    /// Tokens they generated since they started.
    pub generated_tokens: i64,
    /// The earliest start among them, unix seconds.
    pub created: i64,
    /// The model file's SHA-256, when a worker knows it.
    pub sha256: Option<String>,
}

/// Groups workers by the model they loaded.
pub fn models_of(workers: &[WorkerRecord]) -> Vec<ModelStatus> {
    let mut models: BTreeMap<&str, ModelStatus> = BTreeMap::new();
    for w in workers {
        let m = models.entry(&w.model).or_insert_with(|| ModelStatus {
            id: w.model.clone(),
            workers: 0,
            tokens_per_second: 0.0,
            generated_tokens: 0,
            created: w.started_at,
            sha256: None,
        });
        m.workers += 1;
        m.tokens_per_second += w.tokens_per_second;
        m.generated_tokens += w.generated_tokens;
        m.created = m.created.min(w.started_at);
        if m.sha256.is_none() {
            m.sha256 = w.model_sha256.clone();
        }
    }
    models.into_values().collect()
}

/// What `GET /v1/status` answers.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Always `batchlab.status`.
    pub object: &'static str,
    /// When it was read, unix seconds.
    pub now: i64,
    /// Batches by status, the queue and the newest batches.
    pub batches: BatchesStatus,
    /// Every Label Studio project the curation tables know.
    pub projects: Vec<ProjectOverview>,
    /// Workers seen in the last `WORKER_SEEN_SECONDS`.
    pub workers: Vec<WorkerRecord>,
    /// The models those workers loaded.
    pub models: Vec<ModelStatus>,
}

/// Reads everything `GET /v1/status` shows.
pub async fn read_status(store: &Store) -> Result<StatusReport, StoreError> {
    let t = now();
    let BatchCounts {
        by_status,
        queue_depth,
    } = store.batch_counts().await?;
    let mut recent = store.list_batches(None, RECENT_BATCHES).await?;
    recent.truncate(RECENT_BATCHES as usize);
    let workers = store.workers_seen_within(WORKER_SEEN_SECONDS).await?;
    Ok(StatusReport {
        object: "batchlab.status",
        now: t,
        batches: BatchesStatus {
            by_status,
            queue_depth,
            recent: recent.iter().map(|b| batch_progress(b, t)).collect(),
        },
        projects: store.project_overviews(MAX_PROJECTS).await?,
        models: models_of(&workers),
        workers,
    })
}

/// `GET /`: the status page. It holds no data (it reads the JSON routes with the key the user
/// gives it), so it is served without the API key.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/status`: batches with progress, speed and ETA, the queue, projects, workers and
/// their models.
pub async fn status(State(state): State<AppState>) -> Result<Json<StatusReport>, ApiError> {
    let span = tracing::info_span!("status");
    Ok(Json(read_status(&state.store).instrument(span).await?))
}

/// `GET /v1/label-studio/projects`: every Label Studio project the curation tables know, with
/// counts, milestones reached (and their export files) and accuracy.
pub async fn projects(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let span = tracing::info_span!("projects");
    let data = state
        .store
        .project_overviews(MAX_PROJECTS)
        .instrument(span)
        .await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models`: OpenAI's model list, of the models loaded by the workers seen lately.
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let span = tracing::info_span!("models");
    let workers = state
        .store
        .workers_seen_within(WORKER_SEEN_SECONDS)
        .instrument(span)
        .await?;
    let data: Vec<Value> = models_of(&workers)
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "batchlab"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(status: BatchStatus, total: i64, done: i64) -> BatchRecord {
        BatchRecord {
            id: "batch_1".into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-1".into(),
            completion_window: "24h".into(),
            status,
            metadata: None,
            model: None,
            errors: None,
            output_file_id: None,
            error_file_id: None,
            created_at: 100,
            in_progress_at: Some(110),
            expires_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            total,
            completed: done,
            failed: 0,
            input_tokens: 0,
            cached_tokens: 0,
            output_tokens: 0,
            lease_owner: None,
        }
    }

    #[test]
    fn a_running_batch_has_a_speed_and_an_eta() {
        let p = batch_progress(&batch(BatchStatus::InProgress, 100, 20), 120);
        assert_eq!(p.progress, 0.2);
        assert_eq!(p.lines_per_second, Some(2.0));
        assert_eq!(p.eta_seconds, Some(40));
    }

    #[test]
    fn a_finished_batch_is_timed_until_it_ended() {
        let mut b = batch(BatchStatus::Completed, 10, 10);
        b.finalizing_at = Some(115);
        b.completed_at = Some(116);
        let p = batch_progress(&b, 1_000);
        assert_eq!(
            (p.progress, p.lines_per_second, p.eta_seconds),
            (1.0, Some(2.0), Some(0))
        );
        assert_eq!(p.ended_at, Some(115));
    }

    #[test]
    fn a_queued_batch_has_no_speed_yet() {
        let mut b = batch(BatchStatus::Validating, 0, 0);
        b.in_progress_at = None;
        let p = batch_progress(&b, 200);
        assert_eq!(
            (p.progress, p.lines_per_second, p.eta_seconds),
            (0.0, None, None)
        );
    }

    #[test]
    fn workers_are_grouped_by_model() {
        let w = |id: &str, model: &str, tps: f64, started: i64| WorkerRecord {
            id: id.into(),
            model: model.into(),
            model_path: "m.gguf".into(),
            model_sha256: None,
            generated_tokens: 10,
            tokens_per_second: tps,
            batch_id: None,
            started_at: started,
            last_seen: 0,
        };
        let models = models_of(&[
            w("a", "x", 1.5, 9),
            w("b", "x", 2.0, 5),
            w("c", "y", 0.0, 7),
        ]);
        assert_eq!(models.len(), 2);
        assert_eq!(
            (
                models[0].workers,
                models[0].tokens_per_second,
                models[0].created
            ),
            (2, 3.5, 5)
        );
        assert_eq!(models[1].id, "y");
    }
}
