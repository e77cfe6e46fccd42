//! The engine's Prometheus metrics (through the `metrics` facade: whichever recorder the
//! service installs exports them; without one they cost nothing).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// Handles to every engine metric, registered once per engine.
pub(crate) struct EngineMetrics {
    /// Requests queued for the model thread, not yet admitted.
    pub(crate) waiting: Gauge,
    /// Sequences in the running batch.
    pub(crate) running: Gauge,
    /// Prompt tokens processed.
    pub(crate) prompt_tokens: Counter,
    /// Prompt tokens whose cache was copied from an earlier prompt instead of computed (the
    /// exported counter).
    reused_prompt_tokens: Counter,
    /// The same, readable in-process ([`crate::Engine::reused_prompt_tokens`]).
    reused_total: AtomicU64,
    /// Tokens generated (the exported counter).
    generated_tokens: Counter,
    /// Tokens generated, readable in-process ([`crate::Engine::generated_tokens`]) without
    /// going through the metrics recorder.
    generated_total: AtomicU64,
    /// Seconds from a request's arrival to its admission into the batch.
    pub(crate) queue_seconds: Histogram,
    /// Seconds from a request's arrival to its first generated token.
    pub(crate) time_to_first_token: Histogram,
    /// Seconds per generated token after the first.
    pub(crate) time_per_output_token: Histogram,
    /// Choice-scoring jobs run.
    pub(crate) scoring_jobs: Counter,
    /// Forward passes run (each reads every weight once), and the rows (tokens) they ran: rows
    /// over passes is how full the batch keeps the model.
    passes: Counter,
    rows: Counter,
    /// Forward passes, readable in-process ([`crate::Engine::forward_work`]).
    passes_total: AtomicU64,
    /// Their rows, and the microseconds they took, readable in-process.
    rows_total: AtomicU64,
    forward_micros: AtomicU64,
    /// The most sequences one generation step has run.
    peak_sequences: AtomicUsize,
    /// The most prompt chunks one generation step has run.
    peak_prompts: AtomicUsize,
}

impl EngineMetrics {
    /// Registers the metrics, labelled with the model id.
    pub(crate) fn new(model: &str) -> Self {
        let model = model.to_string();
        Self {
            waiting: gauge!("batchlab_engine_waiting_requests", "model" => model.clone()),
            running: gauge!("batchlab_engine_running_sequences", "model" => model.clone()),
            prompt_tokens: counter!("batchlab_engine_prompt_tokens_total", "model" => model.clone()),
            reused_prompt_tokens: counter!("batchlab_engine_reused_prompt_tokens_total", "model" => model.clone()),
            generated_tokens: counter!("batchlab_engine_generated_tokens_total", "model" => model.clone()),
            queue_seconds: histogram!("batchlab_engine_queue_seconds", "model" => model.clone()),
            time_to_first_token: histogram!("batchlab_engine_time_to_first_token_seconds", "model" => model.clone()),
            time_per_output_token: histogram!("batchlab_engine_time_per_output_token_seconds", "model" => model.clone()),
            scoring_jobs: counter!("batchlab_engine_scoring_jobs_total", "model" => model.clone()),
            passes: counter!("batchlab_engine_forward_passes_total", "model" => model.clone()),
            rows: counter!("batchlab_engine_forward_rows_total", "model" => model),
            passes_total: AtomicU64::new(0),
            rows_total: AtomicU64::new(0),
            forward_micros: AtomicU64::new(0),
            generated_total: AtomicU64::new(0),
            reused_total: AtomicU64::new(0),
            peak_sequences: AtomicUsize::new(0),
            peak_prompts: AtomicUsize::new(0),
        }
    }

    /// Records one generation step of `sequences` sequences, `prompts` of them prompt chunks.
    pub(crate) fn step_ran(&self, sequences: usize, prompts: usize) {
        self.peak_sequences.fetch_max(sequences, Ordering::Relaxed);
        self.peak_prompts.fetch_max(prompts, Ordering::Relaxed);
    }

    /// The most sequences one step has run since load, and the most prompt chunks.
    pub(crate) fn peak_step(&self) -> crate::BatchPeaks {
        crate::BatchPeaks {
            sequences: self.peak_sequences.load(Ordering::Relaxed),
            prompts: self.peak_prompts.load(Ordering::Relaxed),
        }
    }

    /// Counts one forward pass of `rows` rows that took `took`.
    pub(crate) fn pass_ran(&self, rows: usize, took: std::time::Duration) {
        self.passes.increment(1);
        self.rows.increment(rows as u64);
        self.passes_total.fetch_add(1, Ordering::Relaxed);
        self.rows_total.fetch_add(rows as u64, Ordering::Relaxed);
        self.forward_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Forward passes, their rows and their time since the engine was loaded.
    pub(crate) fn forward_work(&self) -> crate::ForwardWork {
        crate::ForwardWork {
            passes: self.passes_total.load(Ordering::Relaxed),
            rows: self.rows_total.load(Ordering::Relaxed),
            seconds: self.forward_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Counts one generated token.
    pub(crate) fn token_generated(&self) {
        self.generated_tokens.increment(1);
        self.generated_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` prompt tokens served from the prompt cache.
    pub(crate) fn prompt_reused(&self, n: usize) {
        self.reused_prompt_tokens.increment(n as u64);
        self.reused_total.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Prompt tokens served from the prompt cache since the engine was loaded.
    pub(crate) fn reused_total(&self) -> u64 {
        self.reused_total.load(Ordering::Relaxed)
    }

    /// Tokens generated since the engine was loaded.
    pub(crate) fn generated_total(&self) -> u64 {
        self.generated_total.load(Ordering::Relaxed)
    }
}
