//! batchlab-ml-backend: Label Studio's ML backend protocol. Routes only.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// `GET /health` and `GET /`: Label Studio's liveness probe; answers at once, loads nothing.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "UP", "model_class": "batchlab"}))
}

/// The ML backend's routes.
pub fn router() -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/", get(health))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}
