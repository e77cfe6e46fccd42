//! The worker's own small HTTP surface, so it is observed like the other services: `/health`
//! (the loaded model and whether the database answers) and `/metrics` (Prometheus: the batch
//! path's counters and the engine's, which live in this process). No route takes input.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use batchlab_core::store::Store;
use serde_json::json;

/// What the routes read.
#[derive(Clone)]
pub struct WorkerState {
    /// The shared database, pinged by `/health`.
    pub store: Store,
    /// The loaded model's id, reported by `/health`.
    pub model: String,
}

/// `/health` and `/metrics`, with the request span, metrics and panic layers every service has
/// (metrics prefixed `batchlab_worker`).
pub fn router(state: WorkerState) -> Router {
    // Install the recorder before the first request is counted.
    let _ = batchlab_core::telemetry::metrics_handle();
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(batchlab_core::http::metrics))
        .with_state(state);
    batchlab_core::http::observe_layers(routes, "batchlab_worker")
}

/// `GET /health`: 200 with the model when the database answers, 503 naming it otherwise.
async fn health(State(state): State<WorkerState>) -> Response {
    match state.store.ping().await {
        Ok(()) => {
            Json(json!({"status": "ok", "database": "ok", "model": state.model})).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            let body = json!({"status": "unavailable", "database": "error", "model": state.model});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}
