//! `POST /webhook`: Label Studio's events. Adding an ML backend makes Label Studio send every
//! project event here, and START_TRAINING comes only here. Each event is stored in the shared
//! store exactly as batchlab-api's webhook route stores it (idempotently: the copy Label Studio
//! also sends to the API is a duplicate, a no-op), and batchlab-api's event processor, which
//! polls the store, applies it. Nothing is relayed over HTTP, so no credential leaves this
//! service: the route is exactly as trusted as the ML backend's basic auth makes it. An
//! annotation event or START_TRAINING also starts a training of the project (`learning`).

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::error::MlError;
use crate::MlState;

/// Actions batchlab knows; others are stored (and acknowledged) all the same, counted as `other`.
const KNOWN_ACTIONS: [&str; 8] = [
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "TASKS_CREATED",
    "TASKS_DELETED",
    "PROJECT_UPDATED",
    "START_TRAINING",
];

/// After an annotation event (or START_TRAINING), a training of its project once batchlab-api
/// has had time to apply it: the debounce later, or at once for START_TRAINING (which asks for
/// it) after a short wait for the events before it to be applied.
fn learn_after(state: &MlState, action: &str, body: &[u8]) {
    let start_training = action == "START_TRAINING";
    if !start_training && !action.starts_with("ANNOTATION") {
        return;
    }
    let Some(project) = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("project")?.get("id")?.as_i64())
    else {
        return;
    };
    let wait = if start_training {
        APPLY_WAIT
    } else {
        Duration::try_from_secs_f64(state.config.ml_backend.learn_debounce_seconds)
            .unwrap_or(APPLY_WAIT)
            .max(APPLY_WAIT)
    };
    // One waiting training per project, however many events arrive meanwhile.
    if !state
        .learning
        .schedule(project, state.config.ml_backend.max_projects)
    {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        state.learning.unschedule(project);
        state.maybe_train(project, start_training).await;
    });
}

/// How long batchlab-api takes to apply an event it polls for, with room to spare.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// `POST /webhook` → `{}` once the event is stored (a single insert: well inside the second
/// Label Studio waits). Counted as `batchlab_ml_webhook_events_total{action, status}` with
/// status `accepted` or `duplicate`.
#[tracing::instrument(skip_all, fields(action))]
pub async fn webhook(State(state): State<MlState>, body: Bytes) -> Result<Json<Value>, MlError> {
    let Some(curation) = &state.curation else {
        return Err(MlError::Unavailable(
            "this ML backend has no store to record webhook events in".into(),
        ));
    };
    let ingested = curation.ingest(&body).await?;
    tracing::Span::current().record("action", ingested.action.as_str());
    let label = if KNOWN_ACTIONS.contains(&ingested.action.as_str()) {
        ingested.action.clone()
    } else {
        "other".to_string()
    };
    tracing::info!(action = %ingested.action, event_id = ingested.event_id, status = ingested.status, "webhook event stored");
    if ingested.status == "accepted" {
        learn_after(&state, &ingested.action, &body);
    }
    metrics::counter!("batchlab_ml_webhook_events_total", "action" => label, "status" => ingested.status).increment(1);
    Ok(Json(json!({})))
}
