//! The worker's heartbeat in the shared store: every few seconds it upserts its `workers` row
//! (`crates/core/src/store/overview.rs`) with the model it loaded, the tokens its engine has
//! generated and the rate over the last interval, so batchlab-api's status page, `/v1/models`
//! and `/metrics` can tell which models are up and how fast they go.
//!
//! The engine counts generated tokens only as a metric (`batchlab_engine_generated_tokens_total`,
//! in this process's recorder), so the heartbeat reads that counter from the recorder.

use std::path::Path;
use std::time::{Duration, Instant};

use batchlab_core::store::{now, Store, WorkerHeartbeat};
use tracing::Instrument;

/// Rows of workers not seen for this long are deleted by any worker's heartbeat.
const FORGET_AFTER_SECONDS: i64 = 7 * 24 * 3600;

/// The counter the engine increments for each generated token.
const GENERATED_TOKENS: &str = "batchlab_engine_generated_tokens_total";

/// How often a worker with leases of `lease_seconds` beats: every 5 s, or a third of a lease
/// when that is shorter (as often as the lease heartbeat), never more than once a second.
pub fn interval(lease_seconds: u64) -> Duration {
    Duration::from_millis((lease_seconds.saturating_mul(1000) / 3).clamp(1000, 5000))
}

/// Starts the heartbeat of worker `id`, running `model` loaded from `model_path` (whose
/// SHA-256 is `model_sha256`, when known), every `every`, for as long as the process runs. A
/// failing store is logged (once per outage) and tried again at the next beat.
pub fn spawn(
    store: Store,
    id: String,
    model: String,
    model_path: &Path,
    model_sha256: Option<String>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let model_sha256 = model_sha256.filter(|h| !h.is_empty());
    let model_path = model_path.display().to_string();
    let span = tracing::info_span!("presence", worker = %id, model = %model);
    tokio::spawn(
        async move {
            let started_at = now();
            let mut last: Option<(Instant, f64)> = None;
            let mut failing = false;
            loop {
                let tokens = generated_tokens(&batchlab_core::telemetry::metrics_handle().render());
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

/// The sum of every series of the engine's generated-token counter in Prometheus text (0 when
/// nothing was generated yet, so the counter is not registered).
fn generated_tokens(rendered: &str) -> f64 {
    rendered
        .lines()
        .filter(|line| {
            line.strip_prefix(GENERATED_TOKENS)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_read_from_the_rendered_counter() {
        let text = "# TYPE batchlab_engine_generated_tokens_total counter\n\
            batchlab_engine_generated_tokens_total{model=\"a\"} 40\n\
            batchlab_engine_generated_tokens_total{model=\"b\"} 2\n\
            batchlab_engine_generated_tokens_total_other 99\n\
            batchlab_engine_prompt_tokens_total{model=\"a\"} 7\n";
        assert_eq!(generated_tokens(text), 42.0);
        assert_eq!(generated_tokens(""), 0.0);
    }

    #[test]
    fn intervals_follow_the_lease_within_bounds() {
        assert_eq!(interval(30), Duration::from_secs(5));
        assert_eq!(interval(6), Duration::from_secs(2));
        assert_eq!(interval(1), Duration::from_secs(1));
    }
}
