//! batchlab-api: serves the OpenAI-compatible Batch API on port 4080.

use anyhow::Context;
use batchlab_core::blob::BlobStore;
use batchlab_core::config::ConfigArgs;
use batchlab_core::store::Store;
use clap::Parser;

/// The OpenAI-compatible Files and Batches API of batchlab (port 4080 by default).
#[derive(Parser)]
#[command(name = "batchlab-api", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Args::parse().config.init()?;
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening database {}", config.database.url))?;
    let blobs = BlobStore::open(&config.storage.files_dir)?;
    let addr = format!("{}:{}", config.api.host, config.api.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, database = ?store.backend(), "batchlab-api listening");
    let state = batchlab_api::AppState::new(store, blobs, config);
    state.start_background();
    let app = batchlab_api::router(state);
    axum::serve(listener, app).with_graceful_shutdown(batchlab_core::telemetry::shutdown_signal()).await?;
    Ok(())
}
