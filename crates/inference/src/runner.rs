//! Runs queued batches: claim with a lease, validate the input, run every line through the
//! engine, persist each finished line at once, and write the output and error files.
//!
//! Every finished line is committed to `batch_lines` together with its count, so a worker killed
//! at any point leaves a batch another worker resumes without redoing or losing a `custom_id`.
//!
//! One bad batch never blocks the queue: a batch that cannot run (its input file is gone) ends
//! `failed` at once, and one whose processing keeps failing (database or disk errors, a panic)
//! goes behind the other batches after each failure and ends `failed` after
//! [`RunnerSettings::max_attempts`]. Input lines are read with a bounded buffer: a line longer
//! than [`RunnerSettings::max_line_bytes`] becomes that line's `line_too_long` error.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchlab_engine::{Engine, EngineError};
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::completions::{self, BodyLimits, EngineFailure, LineError};
use batchlab_core::blob::{BlobError, BlobReader, BlobStore};
use batchlab_core::openai::{self, ErrorBody};
use batchlab_core::store::{
    now, BatchLine, BatchRecord, BatchStatus, FileRecord, LineKind, Store, StoreError,
};

/// Why running a batch stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file body could not be read or written.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The batch's input file is gone (deleted, or its body removed): the batch cannot run.
    #[error("the input file {file_id} no longer exists")]
    InputMissing {
        /// The batch's `input_file_id`.
        file_id: String,
        /// What the blob store said.
        #[source]
        source: BlobError,
    },
    /// Reading the input file failed.
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    /// Processing the batch panicked (a bug); the batch is retried like any failure.
    #[error("processing panicked: {0}")]
    Panicked(String),
}

impl RunError {
    /// Whether a dependency is away (the database unreachable, the disk full) rather than the
    /// batch at fault: such a failure is retried without counting an attempt.
    fn is_outage(&self) -> bool {
        match self {
            RunError::Store(e) => e.is_unavailable(),
            RunError::Blob(e) => e.is_storage_full(),
            _ => false,
        }
    }

    /// Whether no retry can help: the batch fails at once instead of being tried again.
    fn is_permanent(&self) -> bool {
        matches!(self, RunError::InputMissing { .. })
    }

    /// A panic's payload as a [`RunError::Panicked`].
    fn from_panic(payload: Box<dyn std::any::Any + Send>) -> RunError {
        RunError::Panicked(batchlab_core::telemetry::panic_message(&*payload).to_string())
    }
}

/// How a worker runs batches.
#[derive(Clone, Debug)]
pub struct RunnerSettings {
    /// This worker's lease owner name.
    pub worker_id: String,
    /// Lease length; renewed every third of it.
    pub lease_seconds: i64,
    /// Lines in flight at once.
    pub concurrency: usize,
    /// Defaults and bounds every line's body is parsed with (`max_tokens`, messages).
    pub body_limits: BodyLimits,
    /// Most lines a batch input may have.
    pub max_lines: u64,
    /// Longest input line in bytes (`batch.max_line_bytes`); longer lines are never buffered
    /// whole and become `line_too_long` error lines.
    pub max_line_bytes: u64,
    /// Failed processing attempts after which a batch ends `failed` (`batch.max_attempts`).
    pub max_attempts: u32,
    /// On shutdown, how long lines already running may take to finish and be recorded before
    /// they are abandoned (`worker.shutdown_grace_seconds`); the lease is released either way.
    pub shutdown_grace: Duration,
}

/// A worker's batch loop.
#[derive(Clone)]
pub struct Runner {
    store: Store,
    blobs: BlobStore,
    engine: Engine,
    settings: RunnerSettings,
    /// Cancelled when the worker shuts down: no batch is claimed and no line started after it.
    draining: CancellationToken,
}

/// How long a batch-level `errors.data` list may grow (the error file holds every line).
const MAX_BATCH_ERRORS: usize = 1000;

enum Stop {
    Done,
    Cancelled,
    Expired,
    LeaseLost,
    /// The worker is shutting down: the lines in flight were given their grace period.
    Draining,
}

impl Runner {
    /// A runner over the shared store, blob directory and loaded engine.
    pub fn new(store: Store, blobs: BlobStore, engine: Engine, settings: RunnerSettings) -> Runner {
        Runner {
            store,
            blobs,
            engine,
            settings,
            draining: CancellationToken::new(),
        }
    }

    /// Starts a graceful shutdown: no batch is claimed and no line started from now on; the
    /// batch's lease is released so another worker resumes it at once (instead of after the
    /// lease), and the lines running get [`RunnerSettings::shutdown_grace`] to finish and be
    /// recorded.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Claims one batch and drives it as far as it goes; `None` when the queue had nothing.
    ///
    /// A batch that cannot run ends `failed` (answered as `Ok`). Any other failure is counted
    /// against the batch, which goes behind batches with fewer failures, and returned as the
    /// error, until the batch has failed [`RunnerSettings::max_attempts`] times and ends `failed`.
    pub async fn run_once(&self) -> Result<Option<BatchRecord>, RunError> {
        if self.draining.is_cancelled() {
            return Ok(None);
        }
        let Some(batch) = self
            .store
            .claim_batch(&self.settings.worker_id, self.settings.lease_seconds)
            .await?
        else {
            return Ok(None);
        };
        let span = info_span!("batch", id = %batch.id, status = batch.status.as_str());
        let result = AssertUnwindSafe(self.drive(batch.clone()).instrument(span.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(RunError::from_panic(panic)));
        match result {
            Ok(()) => {
                self.store
                    .release_lease(&batch.id, &self.settings.worker_id)
                    .await?
            }
            Err(e) => self.after_failure(&batch, e).instrument(span).await?,
        }
        Ok(self.store.get_batch(&batch.id).await?)
    }

    /// Fails the batch when `error` is permanent or its attempts are used up (answering `Ok`);
    /// otherwise counts the attempt, gives the lease up and answers `error`.
    async fn after_failure(&self, batch: &BatchRecord, error: RunError) -> Result<(), RunError> {
        let worker = &self.settings.worker_id;
        if error.is_outage() {
            // The database (or the disk) is away, not the batch at fault: the attempt is not
            // counted, so an outage cannot use a batch's attempts up. The lease is given back if
            // the database still answers, and runs out otherwise.
            warn!(error = %error, "the store is unavailable; the batch will be resumed");
            if let Err(e) = self.store.release_lease(&batch.id, worker).await {
                warn!(error = %e, "releasing the lease failed; it will run out");
            }
            return Err(error);
        }
        let entry = if error.is_permanent() {
            openai::batch_error(
                "input_file_missing",
                &format!("{error}; the batch cannot run"),
                None,
            )
        } else {
            let attempts = self.store.note_failed_attempt(&batch.id, worker).await;
            match attempts {
                Ok(Some(n)) if n >= i64::from(self.settings.max_attempts.max(1)) => {
                    let message = format!("processing failed {n} times; the last error: {error}");
                    openai::batch_error("processing_failed", &message, None)
                }
                other => {
                    if let Err(e) = &other {
                        warn!(error = %e, "counting the failed attempt failed");
                    }
                    warn!(error = %error, attempts = ?other.ok().flatten(), "batch processing failed; it will be retried");
                    self.store.release_lease(&batch.id, worker).await?;
                    return Err(error);
                }
            }
        };
        warn!(error = %error, "the batch cannot run; failing it");
        self.keep_finished_lines(batch).await;
        let failed = self
            .store
            .fail_batch(&batch.id, worker, &Value::Array(vec![entry]).to_string())
            .await;
        self.store.release_lease(&batch.id, worker).await?;
        if failed? {
            metrics::counter!("batchlab_batches_finished_total", "status" => BatchStatus::Failed.as_str()).increment(1);
        }
        Ok(())
    }

    /// Before a batch that ran some lines fails: writes the lines it finished to its output and
    /// error files, so no answered request is lost. Best effort: a failure is only logged.
    async fn keep_finished_lines(&self, batch: &BatchRecord) {
        let result = async {
            let Some(current) = self.store.get_batch(&batch.id).await? else {
                return Ok(());
            };
            if current.completed + current.failed == 0
                || current.output_file_id.is_some()
                || current.error_file_id.is_some()
            {
                return Ok(());
            }
            let output = self.write_lines_file(&batch.id, LineKind::Output).await?;
            let error = self.write_lines_file(&batch.id, LineKind::Error).await?;
            self.store
                .set_output_files(&batch.id, output.as_deref(), error.as_deref())
                .await?;
            Ok::<(), RunError>(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "could not write the finished lines of a failing batch");
        }
    }

    /// Polls the queue until `shutdown` resolves, sleeping `poll` when it is empty. Then drains
    /// (see [`Runner::drain`]): the batch in hand is released, its lines already running get up
    /// to [`RunnerSettings::shutdown_grace`] to finish and be recorded, and it returns.
    pub async fn run_forever(
        &self,
        poll: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let watcher = async {
            tokio::select! {
                _ = shutdown => {
                    info!("shutting down: claiming nothing more, finishing the lines in flight");
                    self.drain();
                }
                _ = self.draining.cancelled() => {}
            }
        };
        let work = async {
            // While the store fails (a database outage) the pause grows from the poll interval
            // to 30 s, so a fleet of workers does not hammer a recovering database.
            let mut backoff =
                batchlab_core::backoff::LoopBackoff::new(poll, Duration::from_secs(30));
            while !self.draining.is_cancelled() {
                let pause = match self.run_once().await {
                    Ok(found) => {
                        if backoff.failures() > 0 {
                            info!(failed_runs = backoff.failures(), "the queue works again");
                        }
                        backoff.succeeded();
                        if found.is_some() {
                            continue;
                        }
                        poll
                    }
                    Err(e) => {
                        let pause = backoff.failed();
                        warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "batch run failed; retrying after a pause");
                        pause
                    }
                };
                tokio::select! {
                    _ = self.draining.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        };
        tokio::join!(watcher, work);
    }

    async fn drive(&self, batch: BatchRecord) -> Result<(), RunError> {
        let lost = Arc::new(AtomicBool::new(false));
        // Aborted on drop, so that a panic while driving does not leave the lease renewed forever.
        let _heartbeat = AbortOnDrop(self.spawn_heartbeat(&batch.id, lost.clone()));
        self.drive_leased(batch, &lost).await
    }

    fn spawn_heartbeat(&self, id: &str, lost: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let (store, id, worker, lease) = (
            self.store.clone(),
            id.to_string(),
            self.settings.worker_id.clone(),
            self.settings.lease_seconds,
        );
        tokio::spawn(async move {
            let period = Duration::from_millis((lease as u64 * 1000 / 3).max(200));
            loop {
                tokio::time::sleep(period).await;
                match store.renew_lease(&id, &worker, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(batch = %id, "lease lost to another worker");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => warn!(batch = %id, error = %e, "lease renewal failed"),
                }
            }
        })
    }

    async fn drive_leased(
        &self,
        mut batch: BatchRecord,
        lost: &AtomicBool,
    ) -> Result<(), RunError> {
        let worker = self.settings.worker_id.clone();
        loop {
            if lost.load(Ordering::SeqCst) {
                return Ok(());
            }
            match batch.status {
                BatchStatus::Validating => {
                    if !self.validate(&batch).await? {
                        return Ok(());
                    }
                }
                BatchStatus::InProgress => match self.execute(&batch, lost).await? {
                    Stop::Done => {
                        self.store
                            .transition(
                                &batch.id,
                                &worker,
                                &[BatchStatus::InProgress],
                                BatchStatus::Finalizing,
                            )
                            .await?;
                    }
                    Stop::Expired => {
                        self.expire_unfinished(&batch).await?;
                        self.finalize(&batch, BatchStatus::InProgress, BatchStatus::Expired)
                            .await?;
                    }
                    Stop::Cancelled => {}
                    Stop::LeaseLost | Stop::Draining => return Ok(()),
                },
                BatchStatus::Finalizing => {
                    self.finalize(&batch, BatchStatus::Finalizing, BatchStatus::Completed)
                        .await?;
                }
                BatchStatus::Cancelling => {
                    self.finalize(&batch, BatchStatus::Cancelling, BatchStatus::Cancelled)
                        .await?;
                }
                BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled => {
                    return Ok(());
                }
            }
            let Some(next) = self.store.get_batch(&batch.id).await? else {
                return Ok(());
            };
            if next.status == batch.status && next.status != BatchStatus::Cancelling {
                // No progress was possible (another worker or a racing cancel); let the queue decide.
                return Ok(());
            }
            batch = next;
        }
    }

    /// Reads the input once: bad lines become error-file lines; no usable line fails the batch.
    /// Returns whether the batch may go on.
    async fn validate(&self, batch: &BatchRecord) -> Result<bool, RunError> {
        let worker = &self.settings.worker_id;
        let mut seen = HashSet::new();
        let mut valid = 0u64;
        let mut total = 0u64;
        let mut errors: Vec<(i64, LineError)> = Vec::new();
        let mut lines = self.input_lines(batch).await?;
        while let Some((line_no, line)) = lines.next().await? {
            total += 1;
            if total > self.settings.max_lines {
                let msg = format!(
                    "the input file has more than {} requests",
                    self.settings.max_lines
                );
                let errs = json!([openai::batch_error("too_many_requests", &msg, None)]);
                self.store
                    .fail_batch(&batch.id, worker, &errs.to_string())
                    .await?;
                return Ok(false);
            }
            match self.parse(batch, line, &mut seen) {
                Ok(_) => valid += 1,
                Err(e) => errors.push((line_no, e)),
            }
        }
        if valid == 0 {
            let mut data: Vec<Value> = errors
                .iter()
                .take(MAX_BATCH_ERRORS)
                .map(|(n, e)| openai::batch_error(e.code, &e.message, Some(*n)))
                .collect();
            if total == 0 {
                data.push(openai::batch_error(
                    "empty_file",
                    "the input file has no request lines",
                    None,
                ));
            }
            info!(lines = total, "input has no usable line; batch failed");
            self.store
                .fail_batch(&batch.id, worker, &Value::Array(data).to_string())
                .await?;
            return Ok(false);
        }
        for (line_no, e) in &errors {
            self.store
                .record_line(
                    &batch.id,
                    &failed_line(*line_no, e.custom_id.clone(), e.code, &e.message),
                )
                .await?;
        }
        self.store
            .set_total(&batch.id, total as i64, self.engine.model_id())
            .await?;
        info!(valid, invalid = errors.len(), "input validated");
        self.store
            .transition(
                &batch.id,
                worker,
                &[BatchStatus::Validating],
                BatchStatus::InProgress,
            )
            .await?;
        Ok(true)
    }

    /// Line numbers of `batch` already finished (skipped when resuming).
    async fn finished_lines(&self, batch: &BatchRecord) -> Result<HashSet<i64>, RunError> {
        Ok(self
            .store
            .finished_line_numbers(&batch.id)
            .await?
            .into_iter()
            .collect())
    }

    /// Runs every unfinished line, `concurrency` at a time, until done, cancelled or expired.
    async fn execute(&self, batch: &BatchRecord, lost: &AtomicBool) -> Result<Stop, RunError> {
        let done = self.finished_lines(batch).await?;
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
        let mut seen = HashSet::new();
        let mut lines = self.input_lines(batch).await?;
        let mut last_check = std::time::Instant::now();
        let mut stop = Stop::Done;
        while let Some((line_no, line)) = lines.next().await? {
            let parsed = self.parse(batch, line, &mut seen);
            if done.contains(&line_no) {
                continue;
            }
            if self.draining.is_cancelled() {
                stop = Stop::Draining;
                break;
            }
            if last_check.elapsed() > Duration::from_millis(500) {
                last_check = std::time::Instant::now();
                if let Some(s) = self.should_stop(batch, lost).await? {
                    stop = s;
                    break;
                }
            }
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
                _ = self.draining.cancelled() => {
                    stop = Stop::Draining;
                    break;
                }
            };
            let (runner, batch_id) = (self.clone(), batch.id.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let line = runner.run_line(line_no, parsed).await;
                if runner.store.record_line(&batch_id, &line).await? {
                    let outcome = if line.kind == LineKind::Output {
                        "ok"
                    } else {
                        "error"
                    };
                    metrics::counter!("batchlab_batch_lines_total", "outcome" => outcome)
                        .increment(1);
                }
                Ok(())
            });
            // Reap finished tasks eagerly so errors surface quickly.
            while let Some(r) = tasks.try_join_next() {
                joined(r)?;
            }
        }
        if matches!(stop, Stop::Draining) {
            // Hand the batch over before the lines in flight finish (a full batch of them takes
            // seconds on a slow CPU): another worker resumes it at once, and a line both run is
            // recorded once, by whichever records it first (`Store::record_line`).
            if let Err(e) = self
                .store
                .release_lease(&batch.id, &self.settings.worker_id)
                .await
            {
                warn!(error = %e, "releasing the lease failed; it will run out");
            }
            self.finish_in_flight(&mut tasks).await?;
            return Ok(stop);
        }
        if !matches!(stop, Stop::Done) {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Ok(stop);
        }
        while let Some(r) = tasks.join_next().await {
            joined(r)?;
        }
        Ok(self.should_stop(batch, lost).await?.unwrap_or(Stop::Done))
    }

    /// On shutdown: lets the lines in flight finish and be recorded for up to the grace period,
    /// then abandons the rest (unrecorded, so whoever resumes the batch runs them).
    async fn finish_in_flight(
        &self,
        tasks: &mut JoinSet<Result<(), RunError>>,
    ) -> Result<(), RunError> {
        let in_flight = tasks.len();
        let deadline = tokio::time::sleep(self.settings.shutdown_grace);
        tokio::pin!(deadline);
        let mut finished = 0usize;
        loop {
            tokio::select! {
                next = tasks.join_next() => match next {
                    Some(r) => {
                        joined(r)?;
                        finished += 1;
                    }
                    None => break,
                },
                _ = &mut deadline => {
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        info!(
            in_flight,
            finished,
            abandoned = in_flight - finished,
            "draining: lines in flight handled; releasing the batch"
        );
        Ok(())
    }

    async fn should_stop(
        &self,
        batch: &BatchRecord,
        lost: &AtomicBool,
    ) -> Result<Option<Stop>, RunError> {
        if lost.load(Ordering::SeqCst) {
            return Ok(Some(Stop::LeaseLost));
        }
        let current = self.store.get_batch(&batch.id).await?;
        Ok(match current {
            Some(b) if b.status == BatchStatus::Cancelling => Some(Stop::Cancelled),
            Some(b) if b.lease_owner.as_deref() != Some(self.settings.worker_id.as_str()) => {
                Some(Stop::LeaseLost)
            }
            Some(b) if b.expires_at.is_some_and(|e| now() >= e) => Some(Stop::Expired),
            Some(_) => None,
            None => Some(Stop::Cancelled),
        })
    }

    /// Opens the batch's input for reading line by line; a missing input is
    /// [`RunError::InputMissing`].
    async fn input_lines(&self, batch: &BatchRecord) -> Result<InputLines, RunError> {
        let max = usize::try_from(self.settings.max_line_bytes).unwrap_or(usize::MAX);
        InputLines::open(&self.blobs, &batch.input_file_id, max).await
    }

    /// Validates one input line against the batch's endpoint (see [`completions::parse_request_line`]).
    fn parse(
        &self,
        batch: &BatchRecord,
        line: Result<&str, LineError>,
        seen: &mut HashSet<String>,
    ) -> Result<completions::RequestLine, LineError> {
        line.and_then(|l| {
            completions::parse_request_line(l, &batch.endpoint, seen, &self.settings.body_limits)
        })
    }

    /// Runs one validated line and turns the outcome into its output- or error-file line.
    async fn run_line(
        &self,
        line_no: i64,
        parsed: Result<completions::RequestLine, LineError>,
    ) -> BatchLine {
        let request = match parsed {
            Ok(r) => r,
            Err(e) => return failed_line(line_no, e.custom_id, e.code, &e.message),
        };
        let custom_id = request.custom_id.clone();
        let span = info_span!("line", line_no, custom_id = %custom_id);
        let outcome = async {
            loop {
                match request.request.run(&self.engine).await {
                    Err(EngineError::Overloaded) => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    other => return other,
                }
            }
        }
        .instrument(span)
        .await;
        match outcome {
            Ok(answer) => BatchLine {
                line_no,
                custom_id: Some(custom_id.clone()),
                kind: LineKind::Output,
                body: openai::output_line(&custom_id, 200, answer.body),
                input_tokens: answer.input_tokens as i64,
                cached_tokens: answer.cached_tokens as i64,
                output_tokens: answer.output_tokens as i64,
            },
            Err(e) => {
                let failure = EngineFailure::of(&e);
                warn!(line_no, custom_id = %custom_id, error = %e, "request failed");
                let body = ErrorBody::new(e.to_string(), failure.kind, None, Some(failure.code))
                    .to_value();
                BatchLine {
                    line_no,
                    custom_id: Some(custom_id.clone()),
                    kind: LineKind::Error,
                    body: openai::output_line(&custom_id, failure.status, body),
                    input_tokens: 0,
                    cached_tokens: 0,
                    output_tokens: 0,
                }
            }
        }
    }

    /// Writes `batch_expired` error lines for every line that never ran.
    async fn expire_unfinished(&self, batch: &BatchRecord) -> Result<(), RunError> {
        let done = self.finished_lines(batch).await?;
        let mut seen = HashSet::new();
        let mut lines = self.input_lines(batch).await?;
        while let Some((line_no, line)) = lines.next().await? {
            let parsed = self.parse(batch, line, &mut seen);
            if done.contains(&line_no) {
                continue;
            }
            let custom_id = parsed.ok().map(|r| r.custom_id);
            let line = failed_line(
                line_no,
                custom_id,
                "batch_expired",
                "the batch expired before this request ran",
            );
            self.store.record_line(&batch.id, &line).await?;
        }
        Ok(())
    }

    /// Writes the output and error files from the persisted lines and ends the batch in `to`.
    async fn finalize(
        &self,
        batch: &BatchRecord,
        from: BatchStatus,
        to: BatchStatus,
    ) -> Result<(), RunError> {
        let current = self
            .store
            .get_batch(&batch.id)
            .await?
            .unwrap_or_else(|| batch.clone());
        if current.output_file_id.is_none() && current.error_file_id.is_none() {
            let output = self.write_lines_file(&batch.id, LineKind::Output).await?;
            let error = self.write_lines_file(&batch.id, LineKind::Error).await?;
            self.store
                .set_output_files(&batch.id, output.as_deref(), error.as_deref())
                .await?;
        }
        let moved = self
            .store
            .transition(&batch.id, &self.settings.worker_id, &[from], to)
            .await?;
        if moved {
            metrics::counter!("batchlab_batches_finished_total", "status" => to.as_str())
                .increment(1);
            info!(status = to.as_str(), "batch finished");
        }
        Ok(())
    }

    /// Copies one kind of persisted line into a new `batch_output` file; `None` if there are none.
    async fn write_lines_file(
        &self,
        batch_id: &str,
        kind: LineKind,
    ) -> Result<Option<String>, RunError> {
        let id = openai::new_id("file-");
        let mut writer = self.blobs.writer(&id).await?;
        let (mut after, mut count) = (0i64, 0i64);
        loop {
            let page = self.store.batch_lines(batch_id, kind, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.line_no;
            for line in &page {
                writer.write(line.body.as_bytes()).await?;
                writer.write(b"\n").await?;
                count += 1;
            }
        }
        if count == 0 {
            writer.abort().await;
            return Ok(None);
        }
        let bytes = writer.finish().await?;
        let suffix = match kind {
            LineKind::Output => "output",
            LineKind::Error => "error",
        };
        let record = FileRecord {
            id: id.clone(),
            filename: format!("{batch_id}_{suffix}.jsonl"),
            purpose: "batch_output".into(),
            bytes: bytes as i64,
            lines: count,
            created_at: now(),
            expires_at: None,
        };
        self.store.insert_file(&record).await?;
        Ok(Some(id))
    }
}

/// Aborts a spawned task when dropped (on every path out of its owner, unwinding included).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A line task's outcome, its panic turned into [`RunError::Panicked`].
fn joined(r: Result<Result<(), RunError>, tokio::task::JoinError>) -> Result<(), RunError> {
    match r {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(RunError::from_panic(e.into_panic())),
        Err(e) => Err(RunError::Panicked(e.to_string())),
    }
}

/// The error-file line of a request that never ran. A `custom_id` holding U+0000 is kept in
/// the line's JSON (escaped there) but not in the `custom_id` column, which cannot hold it.
fn failed_line(line_no: i64, custom_id: Option<String>, code: &str, message: &str) -> BatchLine {
    let body = openai::error_line(custom_id.as_deref(), code, message);
    let custom_id = custom_id.filter(|c| !c.contains('\0'));
    BatchLine {
        line_no,
        custom_id,
        kind: LineKind::Error,
        body,
        input_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
    }
}

/// Non-blank lines of a stored input file with 1-based line numbers, lent out of one reused
/// buffer. A line that is not UTF-8, or longer than the limit, comes back as a line error
/// instead of ending the read; at most `max_line_bytes + 1` bytes of a line are ever held.
struct InputLines {
    reader: BufReader<BlobReader>,
    line_no: i64,
    buf: Vec<u8>,
    max_line_bytes: usize,
}

impl InputLines {
    async fn open(
        blobs: &BlobStore,
        file_id: &str,
        max_line_bytes: usize,
    ) -> Result<InputLines, RunError> {
        let file = blobs.open_read(file_id).await.map_err(|e| match e {
            BlobError::NotFound(_) | BlobError::InvalidId(_) => RunError::InputMissing {
                file_id: file_id.to_string(),
                source: e,
            },
            other => RunError::Blob(other),
        })?;
        Ok(InputLines {
            reader: BufReader::with_capacity(1 << 16, file),
            line_no: 0,
            buf: Vec::new(),
            max_line_bytes,
        })
    }

    /// Reads the next line into `buf`, keeping at most `max_line_bytes + 1` of its bytes and
    /// skipping the rest; answers the line's length without its newline, `None` at the end.
    async fn read_line(&mut self) -> Result<Option<usize>, std::io::Error> {
        self.buf.clear();
        let (mut total, mut ended) = (0usize, false);
        while !ended {
            let chunk = self.reader.fill_buf().await?;
            if chunk.is_empty() {
                break;
            }
            let take = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    ended = true;
                    i
                }
                None => chunk.len(),
            };
            let room = (self.max_line_bytes.saturating_add(1)).saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            total = total.saturating_add(take);
            self.reader.consume(take + usize::from(ended));
        }
        Ok((total > 0 || ended).then_some(total))
    }

    async fn next(&mut self) -> Result<Option<(i64, Result<&str, LineError>)>, RunError> {
        loop {
            let Some(len) = self.read_line().await? else {
                return Ok(None);
            };
            self.line_no += 1;
            if len > self.max_line_bytes {
                let message = format!(
                    "line is {len} bytes long; request lines may be {} bytes at most",
                    self.max_line_bytes
                );
                let e = LineError {
                    code: "line_too_long",
                    message,
                    custom_id: None,
                };
                return Ok(Some((self.line_no, Err(e))));
            }
            match std::str::from_utf8(&self.buf) {
                Ok(t) if t.trim().is_empty() => continue,
                Ok(_) => {}
                Err(_) => {
                    let e = LineError {
                        code: "invalid_json_line",
                        message: "line is not valid UTF-8".into(),
                        custom_id: None,
                    };
                    return Ok(Some((self.line_no, Err(e))));
                }
            }
            let text = std::str::from_utf8(&self.buf)
                .map(str::trim)
                .unwrap_or_default();
            return Ok(Some((self.line_no, Ok(text))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(
        body: &[u8],
        max: usize,
    ) -> (Vec<(i64, Result<String, &'static str>)>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let mut writer = blobs.writer("file-in").await.unwrap();
        writer.write(body).await.unwrap();
        writer.finish().await.unwrap();
        let mut lines = InputLines::open(&blobs, "file-in", max).await.unwrap();
        let (mut out, mut most_held) = (Vec::new(), 0);
        while let Some((n, line)) = lines.next().await.unwrap() {
            out.push((n, line.map(str::to_string).map_err(|e| e.code)));
            most_held = most_held.max(lines.buf.capacity());
        }
        (out, most_held)
    }

    /// An over-long line is that line's error, read past without holding it: the buffer never
    /// grows much beyond the limit however long the line is.
    #[tokio::test]
    async fn an_over_long_line_is_an_error_and_never_held_whole() {
        let mut body = b"{\"a\":1}\n".to_vec();
        body.extend(std::iter::repeat_n(b'x', 8 << 20));
        body.extend_from_slice(b"\n\n  \n{\"b\":2}\r\n\xff\n12345678\n123456789");
        let (lines, most_held) = lines_of(&body, 8).await;
        let expected: Vec<(i64, Result<String, &str>)> = vec![
            (1, Ok("{\"a\":1}".into())),
            (2, Err("line_too_long")),
            (5, Ok("{\"b\":2}".into())),
            (6, Err("invalid_json_line")),
            (7, Ok("12345678".into())),
            (8, Err("line_too_long")),
        ];
        assert_eq!(lines, expected);
        assert!(
            most_held <= 64,
            "a line buffer of {most_held} bytes for a limit of 8"
        );
    }

    #[tokio::test]
    async fn a_missing_input_is_input_missing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path()).unwrap();
        let err = InputLines::open(&blobs, "file-gone", 10)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, RunError::InputMissing { file_id, .. } if file_id == "file-gone"),
            "{err:?}"
        );
        assert!(err.is_permanent());
    }
}
