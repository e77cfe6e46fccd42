//! Cross-cutting HTTP pieces: health, metrics, the API key check, and the layers every request
//! passes (request ids, tracing spans, metrics, panics answered as JSON).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// `GET /health`: 200 while the process and its database answer, 503 otherwise.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ok", "database": "ok"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "database": "error"}))).into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text, every name prefixed `batchlab_`.
pub async fn metrics() -> impl IntoResponse {
    let body = batchlab_core::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Requires `Authorization: Bearer <key>` when an API key is configured.
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    if let Some(key) = state.config.api.api_key.as_deref().filter(|k| !k.is_empty()) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| batchlab_core::http::constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Unknown route; see the OpenAI Files and Batches API".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Wraps a router in the layers every batchlab HTTP service uses (see
/// [`batchlab_core::http::observe_layers`]), with the API's OpenAI-shaped 404 and 405 answers.
pub fn common_layers(router: Router) -> Router {
    let router = router.fallback(not_found).method_not_allowed_fallback(method_not_allowed);
    batchlab_core::http::observe_layers(router, "batchlab")
}
