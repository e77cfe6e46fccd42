//! batchlab-api: serves the OpenAI-compatible Batch API on port 4080 (`batchlab-api [serve]`),
//! connects Label Studio to batchlab (`batchlab-api setup-label-studio`) and repairs what lost
//! webhooks left out (`batchlab-api reconcile-label-studio --project N`); `healthcheck` asks a
//! running one's `/health` and `config` prints the configuration reference.

use anyhow::Context;
use batchlab_api::cli::{Args, Command, ReconcileArgs, SetupArgs};
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
    if let Some(Command::Config { json }) = &args.command {
        let settings = batchlab_core::config::reference::settings();
        if *json {
            println!("{}", serde_json::to_string_pretty(&settings)?);
        } else {
            print!(
                "{}",
                batchlab_core::config::reference::markdown_table(&settings)
            );
        }
        return Ok(());
    }
    let config = args.config_args().init()?;
    match &args.command {
        Some(Command::Config { .. }) => Ok(()),
        Some(Command::Healthcheck) => {
            let api = &config.api;
            if let Err(e) = batchlab_core::http::healthcheck(&api.host, api.port, None).await {
                eprintln!("batchlab-api healthcheck: {e}");
                std::process::exit(1);
            }
            Ok(())
        }
        None | Some(Command::Serve) => serve(config).await,
        Some(Command::SetupLabelStudio(setup)) => {
            if let Err(message) = setup_label_studio(&config, setup).await {
                eprintln!("batchlab-api setup-label-studio: {message:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::ReconcileLabelStudio(reconcile)) => {
            match reconcile_label_studio(&config, reconcile).await {
                Ok(true) => Ok(()),
                // The report (printed) says what still differs.
                Ok(false) => std::process::exit(3),
                Err(message) => {
                    eprintln!("batchlab-api reconcile-label-studio: {message:#}");
                    std::process::exit(1);
                }
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.check_security(Service::Api)?;
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening database {}", redact_url(&config.database.url)))?;
    let blobs = BlobStore::from_config(&config.storage)?;
    let addr = format!("{}:{}", config.api.host, config.api.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, database = ?store.backend(), files = %blobs.location(), "batchlab-api listening");
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

/// Prints the report; answers whether the two sides agree.
async fn reconcile_label_studio(config: &Config, args: &ReconcileArgs) -> anyhow::Result<bool> {
    let client = LabelStudioClient::from_config(&config.label_studio)?;
    let store = Store::open(&config.database)
        .await
        .with_context(|| format!("opening database {}", redact_url(&config.database.url)))?;
    let blobs = BlobStore::from_config(&config.storage)?;
    let curation = batchlab_core::curation::Curation::new(
        store,
        config.curation.clone(),
        config.label_studio.instance.clone(),
    )
    .with_exports_beside(&blobs);
    let report = curation
        .reconcile(&client, args.project, &args.options())
        .await
        .with_context(|| {
            format!(
                "project {} with Label Studio at {}",
                args.project,
                client.base_url()
            )
        })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(report.agree)
}
