//! Retention: deleting what batchlab no longer needs, in the background.
//!
//! Files past their `expires_at` (batch inputs expire 30 days after upload) lose their row and
//! then their body, so the disk space comes back; a file that an unfinished batch uses is kept
//! (the rule `DELETE /v1/files` answers 409 by, see [`Store::delete_expired_files`]). Webhook
//! events processed (applied or failed) longer ago than `retention.webhook_events_days` are
//! deleted; pending ones never are ([`Store::delete_processed_webhook_events`]).
//!
//! Work goes in pages of bounded statements, so no pass holds a big transaction or a long lock.
//! A body is removed only after its row is gone: a crash in between leaves a body without a row
//! (space not yet freed), never a row without a body. batchlab-api runs the task
//! ([`Retention::spawn`]); several processes running it at once is safe, each row is deleted by
//! one of them.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::blob::BlobStore;
use crate::config::RetentionConfig;
use crate::store::{now, Store, StoreError};

/// Rows one statement deletes at most, unless [`Retention::with_page_size`] says otherwise.
pub const DEFAULT_PAGE_SIZE: i64 = 500;

/// Seconds in a day, the unit of `retention.webhook_events_days`.
const DAY_SECONDS: u64 = 86_400;

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Expired files whose rows were deleted.
    pub files_deleted: u64,
    /// Bytes of their bodies removed from the blob directory (a body already missing frees 0).
    pub bytes_freed: u64,
    /// Bodies that could not be removed (logged with their file id; their rows are gone).
    pub blob_errors: u64,
    /// Processed webhook events deleted.
    pub events_deleted: u64,
}

impl RetentionReport {
    fn add(&mut self, other: RetentionReport) {
        self.files_deleted += other.files_deleted;
        self.bytes_freed += other.bytes_freed;
        self.blob_errors += other.blob_errors;
        self.events_deleted += other.events_deleted;
    }
}

/// How the background task is doing, as [`Retention::subscribe`] shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionStatus {
    /// Passes that completed.
    pub passes: u64,
    /// Passes that failed (the database away, a panic); each is retried on the next tick.
    pub failures: u64,
    /// What the latest completed pass deleted.
    pub last: Option<RetentionReport>,
}

/// The retention task: a store, the blob directory and `[retention]`.
#[derive(Debug)]
pub struct Retention {
    store: Store,
    blobs: BlobStore,
    enabled: bool,
    interval: Duration,
    /// Processed events older than this go; `None` keeps them forever.
    events_max_age: Option<Duration>,
    page_size: i64,
    status: watch::Sender<RetentionStatus>,
}

impl Retention {
    /// Retention over `store` and `blobs` as `config` (the `[retention]` section) says.
    pub fn new(store: Store, blobs: BlobStore, config: &RetentionConfig) -> Retention {
        let days = config.webhook_events_days;
        Retention {
            store,
            blobs,
            enabled: config.enabled,
            interval: Duration::from_secs(config.interval_seconds.max(1)),
            events_max_age: (days > 0)
                .then(|| Duration::from_secs(days.saturating_mul(DAY_SECONDS))),
            page_size: DEFAULT_PAGE_SIZE,
            status: watch::Sender::new(RetentionStatus::default()),
        }
    }

    /// Deletes at most `rows` rows per statement (default [`DEFAULT_PAGE_SIZE`]; at least 1).
    pub fn with_page_size(mut self, rows: i64) -> Retention {
        self.page_size = rows.max(1);
        self
    }

    /// Follows the spawned task's passes (subscribe before [`Retention::spawn`]).
    pub fn subscribe(&self) -> watch::Receiver<RetentionStatus> {
        self.status.subscribe()
    }

    /// One pass now, whatever `enabled` says: expired files, then old processed webhook events,
    /// page after page until none is left. Counted in the metrics
    /// `batchlab_retention_files_deleted_total`, `batchlab_retention_bytes_freed_total`,
    /// `batchlab_retention_events_deleted_total` and `batchlab_retention_blob_errors_total`.
    /// Fails only when the database does; what was deleted before that stays deleted.
    pub async fn run_once(&self) -> Result<RetentionReport, StoreError> {
        self.pass(&CancellationToken::new()).await
    }

    /// Runs a pass at once and then every `interval_seconds` until `shutdown` is cancelled
    /// (nothing at all when `enabled` is false: the task ends at once). A failed pass (the
    /// database away) or a panicking one is logged, counted in
    /// `batchlab_retention_passes_total{outcome="error"}` and retried on the next tick; it never
    /// ends the loop. Cancelled while sleeping, the task ends at once; cancelled in a pass, it
    /// ends after the page in hand (one statement and the bodies it freed), so no deleted row
    /// is left with its body on disk.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if !self.enabled {
                tracing::info!("retention is off (retention.enabled = false): nothing is deleted");
                return;
            }
            let mut ticker = tokio::time::interval(self.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let pass = AssertUnwindSafe(self.pass(&shutdown)).catch_unwind().await;
                let outcome = match pass {
                    Ok(Ok(report)) => {
                        self.status.send_modify(|s| {
                            s.passes += 1;
                            s.last = Some(report);
                        });
                        "ok"
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "retention pass failed; retrying on the next tick");
                        self.status.send_modify(|s| s.failures += 1);
                        "error"
                    }
                    Err(panic) => {
                        tracing::error!(
                            panic = %crate::telemetry::panic_message(&*panic),
                            "retention pass panicked; retrying on the next tick"
                        );
                        self.status.send_modify(|s| s.failures += 1);
                        "error"
                    }
                };
                metrics::counter!("batchlab_retention_passes_total", "outcome" => outcome)
                    .increment(1);
            }
            tracing::debug!("retention task stopped");
        })
    }

    /// One pass, stopping between pages once `shutdown` is cancelled.
    async fn pass(&self, shutdown: &CancellationToken) -> Result<RetentionReport, StoreError> {
        let span = tracing::info_span!("retention_pass");
        async {
            let mut report = RetentionReport::default();
            let result = self.pass_into(&mut report, shutdown).await;
            if report != RetentionReport::default() {
                tracing::info!(
                    files_deleted = report.files_deleted,
                    bytes_freed = report.bytes_freed,
                    blob_errors = report.blob_errors,
                    events_deleted = report.events_deleted,
                    "retention pass deleted"
                );
            } else {
                tracing::debug!("retention pass found nothing to delete");
            }
            result.map(|()| report)
        }
        .instrument(span)
        .await
    }

    /// The pass's work, adding what it deletes to `report` as it goes (so a failure half-way
    /// still logs what was done).
    async fn pass_into(
        &self,
        report: &mut RetentionReport,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let t = now();
        while !shutdown.is_cancelled() {
            let page = self.files_page(t).await?;
            report.add(page);
            if page.files_deleted < self.page_size as u64 {
                break;
            }
        }
        let Some(max_age) = self.events_max_age else {
            return Ok(());
        };
        let cutoff = t.saturating_sub(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX));
        while !shutdown.is_cancelled() {
            let deleted = self
                .store
                .delete_processed_webhook_events(cutoff, self.page_size)
                .await?;
            metrics::counter!("batchlab_retention_events_deleted_total").increment(deleted);
            report.events_deleted += deleted;
            if deleted < self.page_size as u64 {
                break;
            }
        }
        Ok(())
    }

    /// Deletes one page of expired files: their rows in one statement, then each body.
    async fn files_page(&self, t: i64) -> Result<RetentionReport, StoreError> {
        let files = self.store.delete_expired_files(t, self.page_size).await?;
        let mut page = RetentionReport {
            files_deleted: files.len() as u64,
            ..RetentionReport::default()
        };
        for file in &files {
            match self.blobs.remove(&file.id).await {
                Ok(Some(bytes)) => page.bytes_freed += bytes,
                Ok(None) => {
                    tracing::debug!(file = %file.id, "expired file had no stored body");
                }
                Err(e) => {
                    page.blob_errors += 1;
                    tracing::warn!(file = %file.id, error = %e, "expired file's row is deleted but its body could not be removed");
                }
            }
            tracing::debug!(file = %file.id, expires_at = ?file.expires_at, "expired file deleted");
        }
        metrics::counter!("batchlab_retention_files_deleted_total").increment(page.files_deleted);
        metrics::counter!("batchlab_retention_bytes_freed_total").increment(page.bytes_freed);
        if page.blob_errors > 0 {
            metrics::counter!("batchlab_retention_blob_errors_total").increment(page.blob_errors);
        }
        Ok(page)
    }
}
