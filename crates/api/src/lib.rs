//! batchlab-api: the OpenAI-compatible Files and Batches API, the Label Studio webhook target
//! and the curation routes. Routes only; the logic lives in batchlab-core.

pub mod batches;
pub mod cli;
pub mod curation;
pub mod error;
pub mod extract;
pub mod files;
pub mod gauges;
pub mod http;
pub mod status;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use batchlab_core::blob::BlobStore;
use batchlab_core::config::Config;
use batchlab_core::curation::Curation;
use batchlab_core::retention::Retention;
use batchlab_core::store::Store;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The shared database.
    pub store: Store,
    /// File bodies.
    pub blobs: BlobStore,
    /// The loaded configuration.
    pub config: Arc<Config>,
    /// Webhook events, exports and accuracy.
    pub curation: Curation,
    /// Places for webhook bodies being read at once (`api.max_concurrent_webhooks`).
    pub webhook_slots: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The state over an open store and blob store.
    pub fn new(store: Store, blobs: BlobStore, config: Config) -> AppState {
        let curation = Curation::new(
            store.clone(),
            config.curation.clone(),
            config.label_studio.instance.clone(),
        )
        .with_exports_beside(&blobs);
        let webhook_slots = Arc::new(tokio::sync::Semaphore::new(
            config.api.max_concurrent_webhooks.max(1),
        ));
        AppState {
            store,
            blobs,
            config: Arc::new(config),
            curation,
            webhook_slots,
        }
    }

    /// Starts the background work the API owns — applying stored webhook events, and deleting
    /// expired files and old processed events (`[retention]`) — to run until `stopping` is
    /// cancelled; [`Background::finished`] waits for it to end.
    pub fn start_background(&self, stopping: &CancellationToken) -> Background {
        let retention = Retention::new(
            self.store.clone(),
            self.blobs.clone(),
            &self.config.retention,
        );
        Background {
            tasks: vec![
                (
                    "webhook event processor",
                    self.curation.spawn_processor(stopping.clone()),
                ),
                ("retention", retention.spawn(stopping.clone())),
            ],
        }
    }
}

/// The API's background tasks, which stop at their next safe point once their token is
/// cancelled.
pub struct Background {
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Background {
    /// Waits for every task to end (after its token was cancelled); a task that panicked is
    /// logged.
    pub async fn finished(self) {
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(task = name, error = %e, "background task ended abnormally");
            }
        }
    }
}

/// The whole API: `/health`, `/metrics`, the status page `/` and the `/v1` routes (behind the
/// optional bearer key).
pub fn router(state: AppState) -> Router {
    // Install the metrics recorder before the first request is counted.
    let _ = batchlab_core::telemetry::metrics_handle();
    let upload_limit = state
        .config
        .api
        .max_upload_bytes
        .max(state.config.batch.max_input_bytes) as usize
        + (1 << 20);
    let v1 = Router::new()
        .route(
            "/files",
            post(files::create)
                .get(files::list)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", post(batches::create).get(batches::list))
        .route("/batches/{id}", get(batches::retrieve))
        .route("/batches/{id}/cancel", post(batches::cancel))
        .route("/status", get(status::status))
        .route("/models", get(status::models))
        .route("/label-studio/projects", get(status::projects))
        .route("/label-studio/projects/{id}", get(curation::project))
        .route("/label-studio/export/{id}", get(curation::export))
        .route(
            "/label-studio/exports/{id}/{file}",
            get(curation::export_file),
        )
        .route("/label-studio/import/{id}", post(curation::import))
        .route(
            "/label-studio/accuracy/{id}",
            post(curation::accuracy).get(curation::stored_accuracy),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::require_api_key,
        ));
    // Label Studio authenticates with the webhook's shared-secret header, not the bearer key.
    let webhook_limit = state.config.api.max_webhook_bytes as usize;
    let webhooks = Router::new()
        .route(
            "/webhooks/label-studio",
            post(curation::webhook).layer(DefaultBodyLimit::max(webhook_limit)),
        )
        .route(
            "/webhooks/label-studio/{instance}",
            post(curation::instance_webhook).layer(DefaultBodyLimit::max(webhook_limit)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::guard_webhook,
        ));
    let app = Router::new()
        .route("/health", get(http::health))
        .route("/", get(status::page))
        .route("/metrics", get(gauges::metrics))
        .nest("/v1", v1.merge(webhooks))
        .with_state(state);
    http::common_layers(app)
}
