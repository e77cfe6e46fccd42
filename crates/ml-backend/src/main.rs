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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Args::parse().config.init()?;
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
    axum::serve(listener, batchlab_ml_backend::router(state))
        .with_graceful_shutdown(batchlab_core::telemetry::shutdown_signal())
        .await?;
    Ok(())
}
