//! batchlab-api: serves the OpenAI-compatible Batch API on port 4080 (`batchlab-api [serve]`),
//! and connects Label Studio to batchlab (`batchlab-api setup-label-studio`).

use anyhow::Context;
use batchlab_api::cli::{Args, Command, SetupArgs};
use batchlab_core::blob::BlobStore;
use batchlab_core::config::{Config, Service};
use batchlab_core::labelstudio::client::LabelStudioClient;
use batchlab_core::secret::redact_url;
use batchlab_core::store::Store;
use clap::Parser;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config_args().init()?;
    match &args.command {
        None | Some(Command::Serve) => serve(config).await,
        Some(Command::SetupLabelStudio(setup)) => {
            if let Err(message) = setup_label_studio(&config, setup).await {
                eprintln!("batchlab-api setup-label-studio: {message:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.check_security(Service::Api)?;
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening database {}", redact_url(&config.database.url)))?;
    let blobs = BlobStore::open(&config.storage.files_dir)?;
    let addr = format!("{}:{}", config.api.host, config.api.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, database = ?store.backend(), "batchlab-api listening");
    let grace = Duration::from_secs(config.api.shutdown_grace_seconds);
    let state = batchlab_api::AppState::new(store, blobs, config);
    let stopping = CancellationToken::new();
    let background = state.start_background(&stopping);
    let app = batchlab_api::router(state);
    batchlab_core::http::serve_with_drain(listener, app, stopping, grace, background.finished())
        .await?;
    Ok(())
}

async fn setup_label_studio(config: &Config, args: &SetupArgs) -> anyhow::Result<()> {
    let options = args.options(config)?;
    let client = LabelStudioClient::from_config(&config.label_studio)?;
    let report = batchlab_core::labelstudio::setup::setup(&client, &options)
        .await
        .with_context(|| format!("Label Studio at {}", client.base_url()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
