//! `POST /webhook`: Label Studio's events. Adding an ML backend makes Label Studio send every
//! project event here, and START_TRAINING comes only here; so each event is acknowledged at
//! once (Label Studio waits 1 s and never retries) and handed on, in a background task, to
//! batchlab-api's webhook endpoint with the body unchanged and the shared-secret header.
//! A failed hand-off is logged and counted, never turned into an error for Label Studio.

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::error::MlError;
use crate::MlState;

/// Actions batchlab knows; others are acknowledged and logged.
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

/// The path on batchlab-api that receives handed-on events.
pub const API_WEBHOOK_PATH: &str = "/v1/webhooks/label-studio";

/// `POST /webhook` → `{}` at once; the event goes on to batchlab-api in the background.
#[tracing::instrument(skip_all, fields(action))]
pub async fn webhook(State(state): State<MlState>, body: Bytes) -> Result<Json<Value>, MlError> {
    let doc: Value = serde_json::from_slice(&body).map_err(|e| MlError::BadRequest(format!("invalid webhook body: {e}")))?;
    let action = doc
        .get("action")
        .and_then(Value::as_str)
        .ok_or_else(|| MlError::BadRequest("webhook body has no string `action`".into()))?
        .to_string();
    tracing::Span::current().record("action", action.as_str());
    let label = if KNOWN_ACTIONS.contains(&action.as_str()) {
        tracing::info!(%action, "webhook event");
        action.clone()
    } else {
        tracing::info!(%action, "webhook event with an unknown action; acknowledged");
        "other".to_string()
    };
    metrics::counter!("batchlab_ml_webhook_events_total", "action" => label.clone()).increment(1);
    tokio::spawn(hand_on(state, label, body));
    Ok(Json(json!({})))
}

/// Posts `body` unchanged to batchlab-api; logs and counts the outcome
/// (`batchlab_ml_webhook_handoffs_total{action, outcome="ok"|"rejected"|"failed"}`).
async fn hand_on(state: MlState, action: String, body: Bytes) {
    let url = format!("{}{}", state.config.ml_backend.api_url.trim_end_matches('/'), API_WEBHOOK_PATH);
    let mut request = state.http.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
    let ls = &state.config.label_studio;
    if let Some(secret) = ls.webhook_secret.as_deref().filter(|s| !s.is_empty()) {
        request = request.header(ls.webhook_secret_header.as_str(), secret);
    }
    let outcome = match request.send().await {
        Ok(r) if r.status().is_success() => {
            tracing::info!(%action, %url, status = r.status().as_u16(), "webhook event handed on");
            "ok"
        }
        Ok(r) => {
            tracing::warn!(%action, %url, status = r.status().as_u16(), "webhook hand-off rejected by batchlab-api");
            "rejected"
        }
        Err(e) => {
            tracing::warn!(%action, %url, error = %e, "webhook hand-off failed");
            "failed"
        }
    };
    metrics::counter!("batchlab_ml_webhook_handoffs_total", "action" => action, "outcome" => outcome).increment(1);
}
