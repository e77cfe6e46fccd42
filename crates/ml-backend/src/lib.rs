//! batchlab-ml-backend: Label Studio's ML backend protocol. Routes only; one module per
//! capability (`setup`, `predict`, `webhook`, `openai`, `auth`), the loaded model (`model`),
//! per-project prompt context (`project`), one error type (`error`).

pub mod auth;
pub mod error;
pub mod model;
pub mod openai;
pub mod predict;
pub mod project;
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
use batchlab_core::store::Store;
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
    /// The engine, loading in the background or loaded.
    pub model: model::Model,
    /// The shared store, where ground-truth annotations are read from (few-shot); none in
    /// tests of the protocol alone.
    pub store: Option<Store>,
    /// Prompt templates by project, from `/setup`'s `extra_params`.
    pub templates: project::Templates,
    /// Prediction jobs and the prediction cache.
    pub jobs: predict::Jobs,
    versions: Arc<Mutex<BTreeSet<String>>>,
}

impl MlState {
    /// State for `config`.
    pub fn new(config: Config) -> Result<Self, MlError> {
        let basic_auth = auth::expected_header(config.ml_backend.basic_auth_user.as_deref(), config.ml_backend.basic_auth_pass.as_deref())
            .map(Arc::from);
        let http = reqwest::Client::builder().timeout(HANDOFF_TIMEOUT).build().map_err(|e| MlError::Internal(e.to_string()))?;
        let jobs = predict::Jobs::new(config.ml_backend.cache_entries, config.ml_backend.concurrent_tasks);
        Ok(Self {
            config: Arc::new(config),
            basic_auth,
            http,
            model: model::Model::unavailable("no model was loaded into this service"),
            store: None,
            templates: project::Templates::default(),
            jobs,
            versions: Arc::default(),
        })
    }

    /// The same state serving `model`.
    pub fn with_model(mut self, model: model::Model) -> Self {
        self.model = model;
        self
    }

    /// The same state reading ground truth from `store`.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Remembers `version` for `/versions`.
    pub fn remember_version(&self, version: &str) {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if !versions.contains(version) {
            versions.insert(version.to_string());
        }
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
        .route("/predict", post(predict::predict))
        .route("/status", get(predict::status))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/webhook", post(webhook::webhook))
        .route("/versions", get(setup::versions))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_basic_auth))
        .with_state(state);
    batchlab_core::http::observe_layers(app, "batchlab_ml")
}
