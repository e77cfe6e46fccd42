//! batchlab-api: the OpenAI-compatible Files and Batches API (and, later, Label Studio curation).
//! Routes only; the logic lives in batchlab-core.

pub mod batches;
pub mod cli;
pub mod error;
pub mod extract;
pub mod files;
pub mod http;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use batchlab_core::blob::BlobStore;
use batchlab_core::config::Config;
use batchlab_core::store::Store;

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
}

/// The whole API: `/health`, `/metrics` and the `/v1` routes (behind the optional bearer key).
pub fn router(state: AppState) -> Router {
    // Install the metrics recorder before the first request is counted.
    let _ = batchlab_core::telemetry::metrics_handle();
    let upload_limit = state.config.api.max_upload_bytes.max(state.config.batch.max_input_bytes) as usize + (1 << 20);
    let v1 = Router::new()
        .route("/files", post(files::create).get(files::list).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", post(batches::create).get(batches::list))
        .route("/batches/{id}", get(batches::retrieve))
        .route("/batches/{id}/cancel", post(batches::cancel))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), http::require_api_key));
    let app = Router::new()
        .route("/health", get(http::health))
        .route("/metrics", get(http::metrics))
        .nest("/v1", v1)
        .with_state(state);
    http::common_layers(app)
}
