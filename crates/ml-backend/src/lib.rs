//! batchlab-ml-backend: Label Studio's ML backend protocol. Routes only; one module per
//! capability (`setup`, `webhook`, `auth`), one error type (`error`).

pub mod auth;
pub mod error;
pub mod setup;
pub mod webhook;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use batchlab_core::config::Config;
use serde_json::{json, Value};

pub use error::MlError;

/// How long a hand-off to batchlab-api may take before it is given up.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler shares.
#[derive(Clone)]
pub struct MlState {
    /// The loaded configuration.
    pub config: Arc<Config>,
    /// The `Authorization` value required on every route, when basic auth is configured.
    pub basic_auth: Option<Arc<str>>,
    /// Client for handing webhook events on to batchlab-api.
    pub http: reqwest::Client,
    versions: Arc<Mutex<BTreeSet<String>>>,
}

impl MlState {
    /// State for `config`.
    pub fn new(config: Config) -> Result<Self, MlError> {
        let basic_auth = auth::expected_header(config.ml_backend.basic_auth_user.as_deref(), config.ml_backend.basic_auth_pass.as_deref())
            .map(Arc::from);
        let http = reqwest::Client::builder().timeout(HANDOFF_TIMEOUT).build().map_err(|e| MlError::Internal(e.to_string()))?;
        Ok(Self { config: Arc::new(config), basic_auth, http, versions: Arc::default() })
    }

    /// The model version for labeling config `schema`, remembered for `/versions`.
    pub fn remember_version(&self, schema: &str) -> String {
        let version = batchlab_core::labelstudio::version::model_version(&self.config.engine.model_id, schema);
        self.versions.lock().unwrap_or_else(|e| e.into_inner()).insert(version.clone());
        version
    }

    /// Every model version answered so far, sorted.
    pub fn known_versions(&self) -> Vec<String> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

/// `GET /health` and `GET /`: Label Studio's liveness probe; answers at once, loads nothing.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "UP", "model_class": "batchlab"}))
}

/// `GET /metrics`: Prometheus text; this service's names start with `batchlab_ml_`.
pub async fn metrics() -> impl IntoResponse {
    let body = batchlab_core::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn not_found() -> MlError {
    MlError::NotFound
}

async fn method_not_allowed() -> MlError {
    MlError::MethodNotAllowed
}

/// The ML backend's routes, behind optional basic auth (fallbacks included) and the shared
/// request-id, tracing and metrics layers.
pub fn router(state: MlState) -> Router {
    let _ = batchlab_core::telemetry::metrics_handle();
    let app = Router::new()
        .route("/health", get(health))
        .route("/", get(health))
        .route("/setup", post(setup::setup))
        .route("/webhook", post(webhook::webhook))
        .route("/versions", get(setup::versions))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_basic_auth))
        .with_state(state);
    batchlab_core::http::observe_layers(app, "batchlab_ml")
}
