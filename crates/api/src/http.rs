//! Cross-cutting HTTP pieces: health, metrics, the API key check, and the layers every request
//! passes (request ids, tracing spans, metrics, panics answered as JSON).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;

use batchlab_core::http::refused_before_body;

use crate::error::ApiError;
use crate::AppState;

/// `GET /health`: 200 while the process and its database answer, 503 otherwise.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ok", "database": "ok"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "database": "error"})),
            )
                .into_response()
        }
    }
}

/// Requires `Authorization: Bearer <key>` when an API key is configured. The scheme is matched
/// without regard to case and blanks around the parts are ignored (RFC 9110 §11.1); the key
/// itself is compared exactly, in constant time.
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = state
        .config
        .api
        .api_key
        .as_deref()
        .filter(|k| !k.is_empty())
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if !given
            .is_some_and(|g| batchlab_core::http::constant_time_eq(g.as_bytes(), key.as_bytes()))
        {
            return refused_before_body(request.headers(), ApiError::Unauthorized.into_response());
        }
    }
    next.run(request).await
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Guards the webhook route before its body is read: the shared secret when one is configured
/// (a wrong one costs no body read), then a place among `api.max_concurrent_webhooks`
/// deliveries being read at once (503 with `Retry-After` past it), so that many large bodies
/// cannot exhaust memory together.
pub async fn guard_webhook(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let ls = &state.config.label_studio;
    if let Some(secret) = ls.webhook_secret.as_deref().filter(|s| !s.is_empty()) {
        let given = request
            .headers()
            .get(ls.webhook_secret_header.as_str())
            .map(|v| v.as_bytes());
        if !given.is_some_and(|g| batchlab_core::http::constant_time_eq(g, secret.as_bytes())) {
            let refusal = ApiError::WebhookUnauthorized(format!(
                "missing or wrong webhook secret: send it in the {} header",
                ls.webhook_secret_header
            ));
            return refused_before_body(request.headers(), refusal.into_response());
        }
    }
    let Ok(_permit) = state.webhook_slots.clone().try_acquire_owned() else {
        metrics::counter!("batchlab_webhook_refused_total", "reason" => "busy").increment(1);
        let refusal = ApiError::Busy(format!(
            "{} webhook deliveries are being read already (api.max_concurrent_webhooks); retry shortly",
            state.config.api.max_concurrent_webhooks
        ));
        return refused_before_body(request.headers(), refusal.into_response());
    };
    next.run(request).await
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
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    batchlab_core::http::observe_layers(router, "batchlab")
}
