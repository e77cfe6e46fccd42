//! The worker's heartbeat in the shared store: every few seconds it upserts its `workers` row
//! (`crates/core/src/store/overview.rs`) with the model it loaded, the tokens its engine has
//! generated and the rate over the last interval, so batchlab-api's status page, `/v1/models`
//! and `/metrics` can tell which models are up and how fast they go.

use std::path::Path;
use std::time::{Duration, Instant};

use batchlab_core::store::{now, Store, WorkerHeartbeat};
use batchlab_inference::engine::Engine;
use tracing::Instrument;

/// Rows of workers not seen for this long are deleted by any worker's heartbeat.
const FORGET_AFTER_SECONDS: i64 = 7 * 24 * 3600;

/// How often a worker with leases of `lease_seconds` beats: every 5 s, or a third of a lease
/// when that is shorter (as often as the lease heartbeat), never more than once a second.
pub fn interval(lease_seconds: u64) -> Duration {
    Duration::from_millis((lease_seconds.saturating_mul(1000) / 3).clamp(1000, 5000))
}

/// Starts the heartbeat of worker `id`, running `engine` loaded from `model_path`, every
/// `every`, for as long as the process runs. A failing store is logged (once per outage) and
/// tried again at the next beat.
pub fn spawn(
    store: Store,
    id: String,
    engine: Engine,
    model_path: &Path,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let model = engine.model_id().to_string();
    let model_sha256 = Some(engine.model_sha256().to_string()).filter(|h| !h.is_empty());
    let model_path = model_path.display().to_string();
    let span = tracing::info_span!("presence", worker = %id, model = %model);
    tokio::spawn(
        async move {
            let started_at = now();
            let mut last: Option<(Instant, f64)> = None;
            let mut failing = false;
            loop {
                let tokens = engine.generated_tokens() as f64;
                let at = Instant::now();
                let rate = match last {
                    Some((then, before)) => {
                        let secs = at.duration_since(then).as_secs_f64();
                        if secs > 0.0 {
                            (tokens - before).max(0.0) / secs
                        } else {
                            0.0
                        }
                    }
                    None => 0.0,
                };
                last = Some((at, tokens));
                let beat = WorkerHeartbeat {
                    id: &id,
                    model: &model,
                    model_path: &model_path,
                    model_sha256: model_sha256.as_deref(),
                    generated_tokens: tokens as i64,
                    tokens_per_second: rate,
                    started_at,
                };
                let result = async {
                    store.upsert_worker(&beat).await?;
                    store.forget_workers_unseen_for(FORGET_AFTER_SECONDS).await
                }
                .await;
                match result {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("worker heartbeat recorded again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "worker heartbeat failed; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(every).await;
            }
        }
        .instrument(span),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_the_lease_within_bounds() {
        assert_eq!(interval(30), Duration::from_secs(5));
        assert_eq!(interval(6), Duration::from_secs(2));
        assert_eq!(interval(1), Duration::from_secs(1));
    }
}
