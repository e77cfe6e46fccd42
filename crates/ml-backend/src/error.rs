//! The ML backend's one error type: every failure leaves in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`, [`ErrorBody`]), never a stack trace.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchlab_core::curation::CurationError;
use batchlab_core::openai::ErrorBody;
use batchlab_inference::completions::EngineFailure;
use batchlab_inference::engine::EngineError;

/// A failed ML backend request.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// The body is not the JSON expected (400).
    #[error("{0}")]
    BadRequest(String),
    /// Basic auth is required and was missing or wrong (401, with `WWW-Authenticate: Basic`).
    #[error("missing or invalid basic-auth credentials")]
    Unauthorized,
    /// No such route (404).
    #[error("unknown route; the ML backend serves /health, /setup, /predict, /webhook, /versions, /status, /metrics, /v1/models and /v1/chat/completions")]
    NotFound,
    /// The route exists but not for this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request is well-formed but cannot be served, e.g. a labeling config with nothing
    /// the backend can predict (422; the message names the tags).
    #[error("{0}")]
    Unprocessable(String),
    /// The model is not available (503; the message says why).
    #[error("{0}")]
    Unavailable(String),
    /// The engine refused or failed the request: answered as [`EngineFailure`] says (400 for the
    /// request's own fault, 429 for a full queue, 500 otherwise).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A queue is full (503 with `Retry-After`): the message says which; retry later.
    #[error("{0}")]
    Busy(String),
    /// The service cannot start with this configuration (never an HTTP answer in practice).
    #[error(transparent)]
    Config(#[from] batchlab_core::config::ConfigError),
    /// Webhook ingestion failed: a body that cannot be read is 400, a store failure 503.
    #[error(transparent)]
    Curation(#[from] batchlab_core::curation::CurationError),
}

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "5";

impl MlError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "unauthorized",
            ),
            Self::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            Self::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "unsupported",
            ),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_unavailable",
            ),
            Self::Engine(e) => {
                let failure = EngineFailure::of(e);
                let status = StatusCode::from_u16(failure.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, failure.kind, failure.code)
            }
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "busy"),
            Self::Curation(CurationError::Webhook(_) | CurationError::Invalid(_)) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
            ),
            Self::Curation(CurationError::Store(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "store_unavailable",
            ),
            Self::Config(_) | Self::Curation(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }
}

impl IntoResponse for MlError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.parts();
        let message = if status.is_server_error()
            && !matches!(self, Self::Unavailable(_) | Self::Busy(_))
        {
            tracing::error!(error = %self, source = ?std::error::Error::source(&self), "internal error");
            "The ML backend had an error while processing the request.".to_string()
        } else {
            self.to_string()
        };
        let body = Json(ErrorBody::new(message, kind, None, Some(code)));
        let mut response = (status, body).into_response();
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"batchlab-ml-backend\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}
