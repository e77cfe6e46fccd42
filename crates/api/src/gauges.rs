//! batchlab-api's `GET /metrics`: before rendering, the gauges that describe what the store
//! holds (batches by status, the queue, webhook events pending and failed, each Label Studio
//! project's counts, milestones and accuracy) are read afresh, within [`REFRESH_TIMEOUT`]. When the store fails or is slow the
//! gauges keep their last values (and `batchlab_status_refresh_failures_total` counts it), so a
//! scrape never hangs on the database and a short outage does not blank a dashboard.

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use batchlab_core::store::{BatchCounts, ProjectOverview, Store, StoreError, WebhookEventCounts};
use tracing::Instrument;

use crate::status::MAX_PROJECTS;
use crate::AppState;

/// How long a scrape waits for the store before it serves the last values.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// One refresh at a time: scrapes arriving together wait for the one running and then read
/// the database themselves (cheap, and always fresh).
static REFRESHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why the gauges were not refreshed.
#[derive(Debug, thiserror::Error)]
enum RefreshError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store did not answer within [`REFRESH_TIMEOUT`].
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
}

/// `GET /metrics`: refreshes the store's gauges (see the module's doc), then renders every
/// metric of the process.
pub async fn metrics(State(state): State<AppState>) -> Response {
    refresh(&state.store)
        .instrument(tracing::info_span!("metrics_refresh"))
        .await;
    batchlab_core::http::metrics().await.into_response()
}

/// Reads the store and sets the gauges; on failure logs, counts and keeps the last values.
pub async fn refresh(store: &Store) {
    let _one = REFRESHING.lock().await;
    let read = async {
        let batches = store.batch_counts().await?;
        let events = store.webhook_event_counts(None).await?;
        let projects = store.project_overviews(MAX_PROJECTS).await?;
        Ok::<_, StoreError>((batches, events, projects))
    };
    let result = match tokio::time::timeout(REFRESH_TIMEOUT, read).await {
        Ok(Ok(read)) => Ok(read),
        Ok(Err(e)) => Err(RefreshError::Store(e)),
        Err(_) => Err(RefreshError::Timeout(REFRESH_TIMEOUT)),
    };
    match result {
        Ok((batches, events, projects)) => set(&batches, &events, &projects),
        Err(e) => {
            metrics::counter!("batchlab_status_refresh_failures_total").increment(1);
            tracing::warn!(error = %e, "metrics: reading the store failed; serving the last values");
        }
    }
}

/// Sets the gauges from what was read.
fn set(batches: &BatchCounts, events: &WebhookEventCounts, projects: &[ProjectOverview]) {
    for (status, n) in &batches.by_status {
        metrics::gauge!("batchlab_batches", "status" => *status).set(*n as f64);
    }
    metrics::gauge!("batchlab_batch_queue_depth").set(batches.queue_depth as f64);
    // Every instance's events, whichever process stored them (the ML backend stores some).
    metrics::gauge!("batchlab_webhook_events_pending").set(events.pending as f64);
    metrics::gauge!("batchlab_webhook_events_failed").set(events.failed as f64);
    for p in projects {
        let labels = [
            ("instance", p.instance.clone()),
            ("project", p.id.to_string()),
        ];
        metrics::gauge!("batchlab_project_annotations", &labels).set(p.counts.annotations as f64);
        metrics::gauge!("batchlab_project_ground_truth", &labels).set(p.counts.ground_truth as f64);
        metrics::gauge!("batchlab_project_invalid_annotations", &labels)
            .set(p.counts.invalid as f64);
        metrics::gauge!("batchlab_project_milestones_reached", &labels)
            .set(p.milestones.len() as f64);
        for (field, accuracy) in &p.latest_accuracy {
            let labels = [
                ("instance", p.instance.clone()),
                ("project", p.id.to_string()),
                ("field", field.clone()),
            ];
            metrics::gauge!("batchlab_project_accuracy", &labels).set(*accuracy);
        }
    }
}
