//! The API's one error type: every failure leaves as OpenAI's error shape, never a stack trace.

use axum::extract::multipart::MultipartError;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchlab_core::blob::BlobError;
use batchlab_core::curation::CurationError;
use batchlab_core::labelstudio::client::LabelStudioError;
use batchlab_core::openai::{ErrorBody, SERVER_ERROR_MESSAGE};
use batchlab_core::store::StoreError;

/// A failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names a bad parameter (400).
    #[error("{message}")]
    InvalidRequest {
        /// For people.
        message: String,
        /// The parameter at fault.
        param: Option<&'static str>,
    },
    /// Missing or wrong API key (401).
    #[error("invalid or missing API key")]
    Unauthorized,
    /// Missing or wrong webhook secret header (401).
    #[error("{0}")]
    WebhookUnauthorized(String),
    /// The request is well formed but its target cannot serve it, e.g. a project whose labeling
    /// config is unknown (409).
    #[error("{0}")]
    Conflict(String),
    /// Label Studio, which this request needed, failed or refused (502).
    #[error("{0}")]
    Upstream(String),
    /// The named object does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The method is not allowed on this route (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The upload or body is too large (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too much is in flight already (503 with `Retry-After`): retry later.
    #[error("{0}")]
    Busy(String),
    /// The disk under the file storage is full (507): nothing was kept; retry once space is
    /// freed.
    #[error("{0}")]
    InsufficientStorage(String),
    /// The object storage could not be reached (503 with `Retry-After`; logged): nothing of
    /// this request was kept.
    #[error("object storage unavailable")]
    StorageUnavailable(#[source] BlobError),
    /// The database failed (500; logged, answered without details).
    #[error("database error")]
    Store(#[from] StoreError),
    /// A file body could not be read or written (500; logged, answered without details).
    #[error("file storage error")]
    Blob(#[source] BlobError),
    /// Curation failed inside (its store or its files; 500, logged, answered without details).
    #[error("curation error")]
    Curation(#[source] CurationError),
    /// An answer could not be encoded (500; logged, answered without details).
    #[error("cannot encode the answer")]
    Encode(#[from] serde_json::Error),
}

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "2";

impl ApiError {
    /// A 400 naming the parameter at fault.
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// Whether this is the database being out of reach (a 503 worth retrying), not a bug.
    fn database_unavailable(&self) -> bool {
        match self {
            Self::Store(e) | Self::Curation(CurationError::Store(e)) => e.is_unavailable(),
            _ => false,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::WebhookUnauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy(_) | Self::StorageUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            _ if self.database_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) | Self::Blob(_) | Self::Curation(_) | Self::Encode(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (message, kind, param, code) = match &self {
            Self::InvalidRequest { message, param } => {
                (message.clone(), "invalid_request_error", *param, None)
            }
            Self::Unauthorized => (
                self.to_string(),
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            Self::WebhookUnauthorized(m) => (
                m.clone(),
                "invalid_request_error",
                None,
                Some("invalid_webhook_secret"),
            ),
            Self::Conflict(m) => (m.clone(), "invalid_request_error", None, Some("conflict")),
            Self::Upstream(m) => (
                m.clone(),
                "upstream_error",
                None,
                Some("label_studio_error"),
            ),
            Self::NotFound(m) => (m.clone(), "invalid_request_error", None, Some("not_found")),
            Self::MethodNotAllowed => (
                self.to_string(),
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
            Self::TooLarge(m) => (
                m.clone(),
                "invalid_request_error",
                Some("file"),
                Some("file_too_large"),
            ),
            Self::Busy(m) => (m.clone(), "server_error", None, Some("busy")),
            Self::StorageUnavailable(e) => {
                let source = std::error::Error::source(e).map(ToString::to_string);
                tracing::warn!(error = %e, source = source.as_deref().unwrap_or("-"), "object storage unavailable");
                (
                    "The file storage is unavailable; retry shortly.".to_string(),
                    "server_error",
                    None,
                    Some("storage_unavailable"),
                )
            }
            Self::InsufficientStorage(m) => {
                tracing::error!(error = %m, "file storage full");
                (
                    m.clone(),
                    "server_error",
                    None,
                    Some("insufficient_storage"),
                )
            }
            _ if self.database_unavailable() => {
                tracing::warn!(error = %self, source = ?std::error::Error::source(&self), "database unavailable");
                (
                    "The database is unavailable; retry shortly.".to_string(),
                    "server_error",
                    None,
                    Some("database_unavailable"),
                )
            }
            Self::Store(_) | Self::Blob(_) | Self::Curation(_) | Self::Encode(_) => {
                let source = std::error::Error::source(&self).map(ToString::to_string);
                tracing::error!(error = %self, source = source.as_deref().unwrap_or("-"), "internal error");
                (SERVER_ERROR_MESSAGE.to_string(), "server_error", None, None)
            }
        };
        let body = ErrorBody::new(message, kind, param, code);
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooLarge(_) => Self::TooLarge(e.to_string()),
            BlobError::TooManyLines(_) | BlobError::NotUtf8(_) => {
                Self::invalid(e.to_string(), "file")
            }
            BlobError::Source(_) => Self::invalid(e.to_string(), "file"),
            BlobError::InvalidId(_) | BlobError::NotFound(_) => Self::NotFound(e.to_string()),
            BlobError::Io(_) | BlobError::Store(_) if e.is_storage_full() => {
                Self::InsufficientStorage(
                    "The file storage is full: nothing of this request was kept. Free space \
                     where files are stored (storage.files_dir, or the storage.files_url bucket) \
                     and retry."
                        .into(),
                )
            }
            BlobError::Store(_) if e.is_unavailable() => Self::StorageUnavailable(e),
            BlobError::Io(_) | BlobError::Store(_) | BlobError::InvalidUrl { .. } => Self::Blob(e),
        }
    }
}

impl From<CurationError> for ApiError {
    fn from(e: CurationError) -> Self {
        match e {
            CurationError::UnknownProject { .. } | CurationError::UnknownExport { .. } => {
                Self::NotFound(e.to_string())
            }
            CurationError::ExportStorage(blob) => blob.into(),
            CurationError::LabelConfig { .. } | CurationError::Recreated { .. } => {
                Self::Conflict(e.to_string())
            }
            CurationError::Invalid(_) | CurationError::Webhook(_) => Self::InvalidRequest {
                message: e.to_string(),
                param: None,
            },
            CurationError::Store(_) | CurationError::Io(_) => Self::Curation(e),
            CurationError::LabelStudio(LabelStudioError::Status { status: 404, .. }) => {
                Self::NotFound(format!("Label Studio does not know this project: {e}"))
            }
            CurationError::LabelStudio(_) => Self::Upstream(e.to_string()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::InvalidRequest {
            message: format!("invalid path: {}", e.body_text()),
            param: None,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge(e.body_text()),
            _ => Self::InvalidRequest {
                message: format!("invalid JSON body: {}", e.body_text()),
                param: None,
            },
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::InvalidRequest {
            message: format!("invalid query: {}", e.body_text()),
            param: None,
        }
    }
}

impl From<MultipartError> for ApiError {
    fn from(e: MultipartError) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge(e.body_text()),
            _ => Self::invalid(format!("invalid multipart body: {}", e.body_text()), "file"),
        }
    }
}

impl From<axum::extract::multipart::MultipartRejection> for ApiError {
    fn from(e: axum::extract::multipart::MultipartRejection) -> Self {
        Self::invalid(
            format!("expected a multipart/form-data body: {}", e.body_text()),
            "file",
        )
    }
}
