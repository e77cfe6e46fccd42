//! batchlab-ml-backend: Label Studio's ML backend protocol. Routes only; one module per
//! capability (`setup`, `predict`, `webhook`, `chat`, `embeddings`, `auth`), the engine slot (`slot`),
//! per-project prompt context (`project`), learning from annotations (`learning`), one error
//! type (`error`).

pub mod auth;
pub mod chat;
pub mod embeddings;
pub mod error;
pub mod learning;
pub mod predict;
pub mod project;
pub mod setup;
pub mod slot;
pub mod webhook;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batchlab_core::config::Config;
use batchlab_core::curation::Curation;
use batchlab_core::store::Store;
use serde_json::json;

pub use error::MlError;

/// What every handler shares.
#[derive(Clone)]
pub struct MlState {
    /// The loaded configuration.
    pub config: Arc<Config>,
    /// The `user:password` basic auth requires on every route, when it is configured.
    pub basic_auth: Option<Arc<auth::Credentials>>,
    /// The engine, loading in the background or loaded.
    pub engine: slot::EngineSlot,
    /// The shared store, where ground-truth annotations are read from (few-shot); none in
    /// tests of the protocol alone.
    pub store: Option<Store>,
    /// Records Label Studio's webhook events in the store (batchlab-api applies them).
    pub curation: Option<Curation>,
    /// Prompt templates by project, from `/setup`'s `extra_params`.
    pub templates: project::Templates,
    /// Prediction jobs and the prediction cache.
    pub jobs: predict::Jobs,
    /// Classifiers learned from each project's annotations.
    pub learning: learning::Learning,
    versions: Arc<Mutex<VecDeque<String>>>,
}

impl MlState {
    /// State for `config`.
    /// Refuses half-configured basic auth (see [`Config::check_security`]); the bind address
    /// is checked by the binary, which knows where it listens.
    pub fn new(config: Config) -> Result<Self, MlError> {
        let ml = &config.ml_backend;
        let basic_auth = auth::Credentials::from_config(ml)
            .map_err(MlError::Config)?
            .map(Arc::new);
        if ml.concurrent_tasks != 0 {
            tracing::warn!(
                concurrent_tasks = ml.concurrent_tasks,
                in_flight = predict::bulk_in_flight(&config.engine),
                "ml_backend.concurrent_tasks is deprecated and ignored: bulk /predict keeps the \
                 engine's batch full ([engine] max_batch and max_queue)"
            );
        }
        let jobs = predict::Jobs::new(
            ml.cache_entries,
            predict::bulk_in_flight(&config.engine),
            ml.max_pending_tasks,
            ml.max_projects,
        );
        let templates = project::Templates::new(ml.max_projects);
        Ok(Self {
            config: Arc::new(config),
            basic_auth,
            engine: slot::EngineSlot::unavailable("no model was loaded into this service"),
            store: None,
            curation: None,
            templates,
            jobs,
            learning: learning::Learning::default(),
            versions: Arc::default(),
        })
    }

    /// The same state serving `model`.
    pub fn with_model(mut self, engine: slot::EngineSlot) -> Self {
        self.engine = engine;
        self
    }

    /// The same state reading ground truth from `store`.
    pub fn with_store(mut self, store: Store) -> Self {
        self.curation = Some(Curation::new(
            store.clone(),
            self.config.curation.clone(),
            self.config.label_studio.instance.clone(),
        ));
        self.store = Some(store);
        self
    }

    /// Remembers `version` for `/versions`: the latest `ml_backend.max_projects` distinct
    /// versions are kept (each ground-truth change makes a new one, so the set is bounded).
    pub fn remember_version(&self, version: &str) {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = versions.iter().position(|v| v == version) {
            if i + 1 == versions.len() {
                return;
            }
            versions.remove(i);
        }
        versions.push_back(version.to_string());
        while versions.len() > self.config.ml_backend.max_projects.max(1) {
            versions.pop_front();
        }
    }

    /// The model versions answered lately (see [`MlState::remember_version`]), sorted.
    pub fn known_versions(&self) -> Vec<String> {
        let mut versions: Vec<String> = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        versions.sort_unstable();
        versions
    }
}

/// `GET /health` and `GET /`: Label Studio's liveness probe. It answers `UP` (200) once the
/// model is loaded, and 503 while it loads (`LOADING`) or after it failed to (`DOWN`, with the
/// reason), as llama.cpp's server does, so Label Studio and a container's health check wait for
/// a backend that can predict. Predictions do not need the database, so `database` only
/// reports it: `ok`, `error` (failing, or not answering within a second; the word batchlab-api
/// and the worker use) or `none` (no store).
pub async fn health(State(state): State<MlState>) -> Response {
    let database = match &state.store {
        None => "none",
        Some(store) => {
            match tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "health check: database unavailable");
                    "error"
                }
                Err(_) => {
                    tracing::warn!("health check: the database did not answer within 1 s");
                    "error"
                }
            }
        }
    };
    let (status, mut body) = match state.engine.now() {
        slot::ModelState::Ready(_) => (StatusCode::OK, json!({"status": "UP"})),
        slot::ModelState::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "LOADING", "error": "the model is loading"}),
        ),
        slot::ModelState::Failed(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "DOWN", "error": format!("the model is not loaded: {reason}")}),
        ),
    };
    body["model_class"] = json!("batchlab");
    body["database"] = json!(database);
    (status, Json(body)).into_response()
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
        .route("/v1/models", get(chat::models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/webhook", post(webhook::webhook))
        .route("/versions", get(setup::versions))
        .route("/metrics", get(batchlab_core::http::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_basic_auth,
        ))
        .with_state(state);
    batchlab_core::http::observe_layers(app, "batchlab_ml")
}
