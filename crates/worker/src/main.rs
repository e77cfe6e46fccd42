//! batchlab-worker: claims batches from the shared queue and runs them through the engine, and
//! serves its `/health` and `/metrics` (`http`) on `worker.port`.

mod http;
mod presence;

use std::time::Duration;

use anyhow::Context;
use batchlab_core::blob::BlobStore;
use batchlab_core::config::ConfigArgs;
use batchlab_core::store::Store;
use batchlab_inference::completions::BodyLimits;
use batchlab_inference::engine::Engine;
use batchlab_inference::runner::{Runner, RunnerSettings};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs queued OpenAI batches with the in-process model; start several to share one queue.
#[derive(Parser)]
#[command(name = "batchlab-worker", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// What to do; run batches when none is given.
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(clap::Subcommand)]
enum Command {
    /// Run batches from the queue (the default).
    Run,
    /// Ask the running worker's `/health` on `worker.host:worker.port`; exit 0 when it answers
    /// 200 (it serves once its model is loaded and answers 503 while the database is down).
    Healthcheck,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config.init()?;
    if let Some(Command::Healthcheck) = args.command {
        let w = &config.worker;
        if let Err(e) = batchlab_core::http::healthcheck(&w.host, w.port, None).await {
            eprintln!("batchlab-worker healthcheck: {e}");
            std::process::exit(1);
        }
        return Ok(());
    }
    // Installed before the engine and the runner count anything.
    let _ = batchlab_core::telemetry::metrics_handle();
    let worker_id = config.worker_id();
    let store = Store::open(&config.database).await.with_context(|| {
        format!(
            "opening database {}",
            batchlab_core::secret::redact_url(&config.database.url)
        )
    })?;
    let blobs = BlobStore::from_config(&config.storage)?;
    tracing::info!(files = %blobs.location(), "file storage");
    let e = &config.worker_engine();
    let mut engine_config = batchlab_inference::engine_config(e);
    let started = std::time::Instant::now();
    engine_config.model_path =
        batchlab_inference::engine::hub::resolve_model(&engine_config.model_path)
            .await
            .with_context(|| format!("finding model {}", e.model_path.display()))?;
    let model_file = engine_config.model_path.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load(engine_config))
        .await?
        .with_context(|| format!("loading model {}", e.model_path.display()))?;
    tracing::info!(worker = %worker_id, model = engine.model_id(), load_seconds = started.elapsed().as_secs_f64(), "batchlab-worker ready");
    let settings = RunnerSettings {
        worker_id,
        lease_seconds: config.worker.lease_seconds as i64,
        concurrency: config.worker_concurrency(),
        body_limits: BodyLimits::from_settings(&config.engine),
        max_lines: config.batch.max_lines,
        max_line_bytes: config.batch.max_line_bytes,
        max_attempts: config.batch.max_attempts,
        shutdown_grace: Duration::from_secs(config.worker.shutdown_grace_seconds),
    };
    let addr = format!("{}:{}", config.worker.host, config.worker.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr} (worker.host, worker.port)"))?;
    tracing::info!(%addr, "serving /health and /metrics");
    let state = http::WorkerState {
        store: store.clone(),
        model: engine.model_id().to_string(),
    };
    let stopping = CancellationToken::new();
    let server = tokio::spawn({
        let stopped = stopping.clone().cancelled_owned();
        async move {
            axum::serve(listener, http::router(state))
                .with_graceful_shutdown(stopped)
                .await
        }
    });
    let beat = presence::interval(config.worker.lease_seconds);
    presence::spawn(
        store.clone(),
        settings.worker_id.clone(),
        engine.clone(),
        &model_file,
        beat,
    );
    let runner = Runner::new(store, blobs, engine, settings);
    runner
        .run_forever(
            Duration::from_millis(config.worker.poll_interval_ms),
            batchlab_core::telemetry::shutdown_signal(),
        )
        .await;
    // The batch in hand is released; /health and /metrics go last.
    stopping.cancel();
    server.await??;
    Ok(())
}
