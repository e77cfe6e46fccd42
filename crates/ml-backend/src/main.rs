//! batchlab-ml-backend: the Label Studio ML backend (port 4082).

use anyhow::Context;
use batchlab_core::config::{ConfigArgs, Service};
use clap::Parser;

/// Label Studio ML backend of batchlab (port 4082 by default): `/health`, `/setup`, `/predict`,
/// `/webhook` (stored for batchlab-api to apply), `/versions`, `/status`, `/metrics`, and OpenAI's
/// `/v1/models` and `/v1/chat/completions`.
#[derive(Parser)]
#[command(name = "batchlab-ml-backend", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// What to do; serve when none is given.
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(clap::Subcommand)]
enum Command {
    /// Serve the ML backend (the default).
    Serve,
    /// Ask the running ML backend's `/health` (with its basic auth) on its configured address;
    /// exit 0 when it answers 200, which it does once its model is loaded.
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.init()?;
    if let Some(Command::Healthcheck) = args.command {
        let ml = &config.ml_backend;
        let checked = match ml.basic_auth() {
            Ok(auth) => batchlab_core::http::healthcheck(&ml.host, ml.port, auth)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = checked {
            eprintln!("batchlab-ml-backend healthcheck: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    config.check_security(Service::MlBackend)?;
    let addr = format!("{}:{}", config.ml_backend.host, config.ml_backend.port);
    let store = batchlab_core::store::Store::open(&config.database)
        .await
        .with_context(|| {
            format!(
                "opening database {}",
                batchlab_core::secret::redact_url(&config.database.url)
            )
        })?;
    let model = batchlab_ml_backend::slot::EngineSlot::load(&config.engine);
    let state = batchlab_ml_backend::MlState::new(config)?
        .with_model(model)
        .with_store(store);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, basic_auth = state.basic_auth.is_some(), "batchlab-ml-backend listening");
    let grace = std::time::Duration::from_secs(state.config.ml_backend.shutdown_grace_seconds);
    let stopping = tokio_util::sync::CancellationToken::new();
    let jobs = state.jobs.clone();
    // Once told to stop: queued prediction jobs are dropped, running ones finish into the cache.
    let drain = {
        let stopping = stopping.clone();
        async move {
            stopping.cancelled().await;
            jobs.stop_queued();
            jobs.finished().await;
        }
    };
    batchlab_core::http::serve_with_drain(
        listener,
        batchlab_ml_backend::router(state),
        stopping,
        grace,
        drain,
    )
    .await?;
    Ok(())
}
