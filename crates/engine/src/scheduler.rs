//! The model thread's loop: the [`Scheduler`] owns the weights and runs requests with
//! continuous batching.
//!
//! Every step the [`Scheduler`] admits waiting requests (up to `max_batch` running sequences),
//! drops cancelled ones, and runs one batched forward: each decoding sequence contributes its
//! next token and prompts contribute chunks within the step's token budget, so sequences of
//! different lengths join and leave the batch between steps and share every weight read.
//! Per-request state (tokens, sampler, detokenizer, stop conditions) is a [`Sequence`].
//! Choice scoring jobs advance one bounded forward pass per turn of the loop, taking turns with
//! each other and with the generation step ([`Scheduler::tick`]), so that no scoring request,
//! however many candidates it has, stalls the running generations.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokio::sync::{mpsc, oneshot};

use crate::guidance::Guide;
use crate::metrics::EngineMetrics;
use crate::model::prefix::PrefixCache;
use crate::model::{Model, Segment, SeqCache, Want};
use crate::scoring::{log_softmax_at, ChoiceScores, TokenQuestion};
use crate::tokenizer::{GgufTokenizer, IncrementalDecoder};
use crate::{Completion, EngineError, FinishReason, SamplingParams, TokenLogprob, TopLogprob};

/// Prompt tokens one sequence contributes to a step, and the step's token budget: bounds the
/// attention score matrix (heads x chunk x context floats) while keeping matmuls large.
pub(crate) const PREFILL_CHUNK: usize = 512;

/// Memory for the copies of question caches that candidates are scored on, per forward pass.
const CANDIDATE_FORK_BYTES: usize = 64 << 20;

/// Prompt rows that scoring may compute more than once to save a forward pass: a pass of its
/// own costs about as much as 20 rows (dequantizing every weight once, see `Linear`).
const FUSED_REST_ROWS: usize = 20;

/// A request as queued for the model thread.
pub(crate) struct Job {
    pub(crate) kind: &'static str,
    pub(crate) enqueued: Instant,
    pub(crate) work: Work,
}

/// What a job asks for, with the channel its answer goes back on.
// A few hundred bytes moved once through the queue: not worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    /// Generate a continuation of `prompt`.
    Generate {
        prompt: Vec<u32>,
        params: SamplingParams,
        guide: Option<Guide>,
        reply: oneshot::Sender<Result<Completion, EngineError>>,
    },
    /// Score each question's candidates.
    Score {
        questions: Vec<TokenQuestion>,
        reply: oneshot::Sender<Result<Vec<ChoiceScores>, EngineError>>,
    },
}

impl Work {
    fn is_cancelled(&self) -> bool {
        match self {
            Work::Generate { reply, .. } => reply.is_closed(),
            Work::Score { reply, .. } => reply.is_closed(),
        }
    }
}

/// The state of one generation.
struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: LogitsProcessor,
    decoder: IncrementalDecoder,
    text: String,
    stop: Vec<String>,
    max_new: usize,
    context_length: usize,
    finish: Option<FinishReason>,
    /// Alternatives recorded per token, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// The structured-output constraint's state, when the request has one.
    guide: Option<Guide>,
    /// Why this sequence failed on its own (its batch goes on).
    error: Option<EngineError>,
}

impl Sequence {
    fn new(
        prompt: Vec<u32>,
        params: &SamplingParams,
        guide: Option<Guide>,
        context_length: usize,
    ) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match params.top_p {
                Some(p) if p < 1.0 => Sampling::TopP {
                    p,
                    temperature: params.temperature,
                },
                _ => Sampling::All {
                    temperature: params.temperature,
                },
            }
        };
        let prompt_len = prompt.len();
        let mut seq = Self {
            tokens: prompt,
            prompt_len,
            sampler: LogitsProcessor::from_sampling(seed, sampling),
            decoder: IncrementalDecoder::default(),
            text: String::new(),
            stop: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            max_new: params.max_tokens.unwrap_or(usize::MAX),
            context_length,
            finish: None,
            top_logprobs: params.logprobs,
            logprobs: Vec::new(),
            guide,
            error: None,
        };
        seq.check_length();
        seq
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn check_length(&mut self) {
        if self.finish.is_none()
            && (self.generated() >= self.max_new || self.tokens.len() >= self.context_length)
        {
            self.finish = Some(FinishReason::Length);
        }
    }

    /// Samples the next token from `logits` (1-D, vocabulary size) and updates the state. An
    /// error is the batch's (candle failed); the sequence's own failures end it alone.
    fn step(
        &mut self,
        logits: &Tensor,
        tok: &GgufTokenizer,
        eos: &HashSet<u32>,
    ) -> Result<(), EngineError> {
        let next = match &mut self.guide {
            None => self.sampler.sample(logits).map_err(inference)?,
            Some(guide) => {
                let mut row = logits.to_vec1::<f32>().map_err(inference)?;
                if let Err(e) = guide.mask(&mut row) {
                    self.fail(e);
                    return Ok(());
                }
                let n = row.len();
                let masked = Tensor::from_vec(row, n, logits.device()).map_err(inference)?;
                self.sampler.sample(&masked).map_err(inference)?
            }
        };
        self.tokens.push(next);
        if eos.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        let complete = match self.guide.as_mut().map(|g| g.advance(next)) {
            Some(Err(e)) => {
                self.fail(e);
                return Ok(());
            }
            Some(Ok(complete)) => complete,
            None => false,
        };
        if let Some(k) = self.top_logprobs {
            let row = logits.to_vec1::<f32>().map_err(inference)?;
            self.logprobs
                .push(token_logprob(&row, next, k, self.text.len(), tok));
        }
        let piece = self.decoder.push(tok, next)?;
        if !piece.is_empty() {
            let old_len = self.text.len();
            self.text.push_str(&piece);
            if let Some(cut) = self.find_stop(old_len) {
                self.text.truncate(cut);
                self.finish = Some(FinishReason::Stop);
                return Ok(());
            }
        }
        if complete {
            self.finish = Some(FinishReason::Stop);
        }
        self.check_length();
        Ok(())
    }

    /// Ends this sequence with `e` (answered by [`Scheduler::finish`]); the batch goes on.
    fn fail(&mut self, e: EngineError) {
        tracing::warn!(error = %e, "sequence failed");
        self.finish = Some(FinishReason::Stop);
        self.error = Some(e);
    }

    /// Earliest stop string occurrence that ends in the text added after `old_len`.
    fn find_stop(&self, old_len: usize) -> Option<usize> {
        let longest = self.stop.iter().map(String::len).max()?;
        let mut from = old_len.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min()
    }
}

/// The log-probability of `next` and the `k` most likely tokens under `logits` (raw, before
/// temperature, as vLLM and OpenAI report them).
fn token_logprob(
    logits: &[f32],
    next: u32,
    k: usize,
    text_offset: usize,
    tok: &GgufTokenizer,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let entry = |id: u32| TopLogprob {
        id,
        bytes: tok.token_bytes(id),
        logprob: logits[id as usize] - log_z,
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
    } else {
        order.clear();
    }
    TokenLogprob {
        token: entry(next),
        text_offset,
        top: order.into_iter().map(entry).collect(),
    }
}

fn inference(e: candle_core::Error) -> EngineError {
    EngineError::Inference(e.to_string())
}

/// A generation in the running batch.
struct Running {
    kind: &'static str,
    seq: Sequence,
    cache: SeqCache,
    /// Tokens of `seq.tokens` already in the cache.
    fed: usize,
    reply: oneshot::Sender<Result<Completion, EngineError>>,
    enqueued: Instant,
    started: Instant,
    first_token: Option<Duration>,
}

/// Owns the model on the dedicated thread.
pub(crate) struct Scheduler {
    pub(crate) model: Model,
    pub(crate) tokenizer: Arc<GgufTokenizer>,
    pub(crate) eos: HashSet<u32>,
    pub(crate) context_length: usize,
    /// Prompt tokens per sequence per step, and the step's token budget ([`PREFILL_CHUNK`];
    /// tests vary it).
    pub(crate) prefill_chunk: usize,
    /// Sequences running together at most.
    pub(crate) max_batch: usize,
    pub(crate) metrics: Arc<EngineMetrics>,
    /// Caches of recent prompts, reused by requests that start the same way.
    pub(crate) prefix: PrefixCache,
}

impl Scheduler {
    /// Serves jobs until every sender is dropped and nothing is left to run.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Batch::default();
        let mut open = true;
        loop {
            // Admit: block only when idle. Scoring jobs hold caches too: they count toward
            // `max_batch`.
            if batch.is_empty() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(job) => self.admit(job, &mut batch),
                    None => break,
                }
            }
            while open && batch.len() < self.max_batch.max(1) {
                match rx.try_recv() {
                    Ok(job) => self.admit(job, &mut batch),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            self.tick(&mut batch);
        }
        self.metrics.running.set(0.0);
        tracing::debug!("engine queue closed; model thread exits");
    }

    /// One turn of the model thread: drops cancelled work, advances the first scoring job by
    /// one forward pass (it then goes to the back of the line), runs one generation step, and
    /// answers what finished. So a scoring job, however many candidates it has, delays each
    /// generation step by one bounded pass at most, and scoring jobs take turns.
    fn tick(&mut self, batch: &mut Batch) {
        batch.running.retain(|r| {
            let keep = !r.reply.is_closed();
            if !keep {
                tracing::info!(
                    kind = r.kind,
                    generated = r.seq.generated(),
                    "request cancelled mid-generation"
                );
            }
            keep
        });
        batch.scoring.retain(|s| {
            let keep = !s.reply.is_closed();
            if !keep {
                tracing::info!(passes = s.state.passes, "scoring request cancelled mid-way");
            }
            keep
        });
        self.metrics.running.set(batch.running.len() as f64);
        if let Some(mut job) = batch.scoring.pop_front() {
            match guarded(|| self.score_pass(&mut job.state)) {
                Ok(false) => batch.scoring.push_back(job),
                Ok(true) => {
                    let scores = self.finish_score(job.state);
                    let _ = job.reply.send(Ok(scores));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if batch.running.is_empty() {
            return;
        }
        if let Err(e) = guarded(|| self.step(&mut batch.running)) {
            // A failed forward fails the whole batch: their caches are in an unknown state.
            for r in batch.running.drain(..) {
                let _ = r.reply.send(Err(EngineError::Inference(e.to_string())));
            }
        }
        let mut i = 0;
        while i < batch.running.len() {
            if batch.running[i].seq.finish.is_some() {
                let r = batch.running.swap_remove(i);
                self.finish(r);
            } else {
                i += 1;
            }
        }
    }

    /// Starts a generation or a scoring job (both then advance in [`Scheduler::tick`]).
    fn admit(&mut self, job: Job, batch: &mut Batch) {
        self.metrics.waiting.decrement(1.0);
        if job.work.is_cancelled() {
            tracing::debug!("request cancelled before it started");
            return;
        }
        let Job {
            kind,
            enqueued,
            work,
        } = job;
        match work {
            Work::Generate {
                prompt,
                params,
                guide,
                reply,
            } => {
                let seq = Sequence::new(prompt, &params, guide, self.context_length);
                if seq.finish.is_some() {
                    // Nothing to generate (max_tokens 0).
                    let now = Instant::now();
                    self.finish(Running {
                        kind,
                        seq,
                        cache: match SeqCache::new(self.model.cache_shape(), 1, self.model.device())
                        {
                            Ok(c) => c,
                            Err(e) => {
                                let _ = reply.send(Err(inference(e)));
                                return;
                            }
                        },
                        fed: 0,
                        reply,
                        enqueued,
                        started: now,
                        first_token: None,
                    });
                    return;
                }
                let extra = seq.max_new.min(256);
                let hint = (seq.prompt_len + extra).min(self.context_length);
                let reused = self.prefix.lookup(&seq.tokens, extra);
                let cache = match reused {
                    Ok(Some(cache)) => Ok(cache),
                    Ok(None) => SeqCache::new(self.model.cache_shape(), hint, self.model.device()),
                    Err(e) => Err(e),
                };
                match cache {
                    Ok(cache) => {
                        let fed = cache.len();
                        self.metrics.reused_prompt_tokens.increment(fed as u64);
                        self.metrics
                            .queue_seconds
                            .record(enqueued.elapsed().as_secs_f64());
                        batch.running.push(Running {
                            kind,
                            seq,
                            cache,
                            fed,
                            reply,
                            enqueued,
                            started: Instant::now(),
                            first_token: None,
                        })
                    }
                    Err(e) => {
                        let _ = reply.send(Err(inference(e)));
                    }
                }
            }
            Work::Score { questions, reply } => {
                match guarded(|| self.begin_score(enqueued, questions)) {
                    Ok(state) => batch.scoring.push_back(ScoreJob { state, reply }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// One batched forward over every running sequence: each decoding sequence's next token,
    /// and prompt chunks while the step's prompt-token budget lasts; then samples where a
    /// prompt is done.
    ///
    /// A prompt is cut at fixed multiples of `prefill_chunk` from its start, whatever else runs:
    /// every row of the batched matmuls is computed independently and attention runs per
    /// sequence, so a request gets bit-for-bit the same logits alone or in any batch.
    fn step(&mut self, running: &mut [Running]) -> Result<(), EngineError> {
        let chunk = self.prefill_chunk.max(1);
        let mut prompt_budget = chunk;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens this step)
        for (i, r) in running.iter().enumerate() {
            let pending = r.seq.tokens.len() - r.fed;
            let n = if pending <= 1 {
                pending
            } else {
                pending.min(chunk - r.fed % chunk)
            };
            if n == 0 {
                continue;
            }
            if n > 1 {
                // Prompt chunks wait for a later step when the budget is spent (one always runs).
                if n > prompt_budget && plan.iter().any(|&(_, m)| m > 1) {
                    continue;
                }
                prompt_budget = prompt_budget.saturating_sub(n);
            }
            plan.push((i, n));
        }
        if plan.is_empty() {
            return Ok(());
        }
        let logits = {
            let mut segments: Vec<Segment<'_>> = Vec::with_capacity(plan.len());
            let mut wanted = plan.iter().peekable();
            for (i, r) in running.iter_mut().enumerate() {
                let Some(&&(pi, n)) = wanted.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                wanted.next();
                let Running {
                    seq, cache, fed, ..
                } = r;
                let ends = *fed + n == seq.tokens.len();
                segments.push(Segment {
                    cache,
                    tokens: &seq.tokens[*fed..*fed + n],
                    want: if ends { Want::Last } else { Want::Nothing },
                    prompt: *fed < seq.prompt_len,
                });
            }
            self.model.forward(&mut segments).map_err(inference)?
        };
        let prompt_tokens: usize = plan
            .iter()
            .filter(|&&(i, _)| running[i].fed < running[i].seq.prompt_len)
            .map(|&(_, n)| n)
            .sum();
        self.metrics.prompt_tokens.increment(prompt_tokens as u64);
        for ((i, n), logits) in plan.into_iter().zip(logits) {
            let r = &mut running[i];
            r.fed += n;
            if let Some(logits) = logits {
                let row = logits.squeeze(0).map_err(inference)?;
                r.seq.step(&row, &self.tokenizer, &self.eos)?;
                self.metrics.generated_tokens.increment(1);
                if r.first_token.is_none() {
                    let ttft = r.enqueued.elapsed();
                    r.first_token = Some(ttft);
                    self.metrics.time_to_first_token.record(ttft.as_secs_f64());
                }
            }
        }
        Ok(())
    }

    /// Replies to a finished generation, logs it, and keeps its cache for later prompts.
    fn finish(&mut self, r: Running) {
        let total = r.started.elapsed();
        let finish_reason = r.seq.finish.unwrap_or(FinishReason::Length);
        let generated = r.seq.generated();
        let first = r.first_token.unwrap_or_default();
        if generated > 1 {
            let after_first = r.enqueued.elapsed().saturating_sub(first);
            self.metrics
                .time_per_output_token
                .record(after_first.as_secs_f64() / (generated - 1) as f64);
        }
        tracing::info!(
            kind = r.kind,
            prompt_tokens = r.seq.prompt_len,
            completion_tokens = generated,
            finish_reason = ?finish_reason,
            queue_ms = r.started.duration_since(r.enqueued).as_millis() as u64,
            first_token_ms = first.as_millis() as u64,
            total_ms = total.as_millis() as u64,
            "generation done"
        );
        if let Some(e) = r.seq.error {
            let _ = r.reply.send(Err(e));
            return;
        }
        let logprobs = r.seq.top_logprobs.map(|_| {
            let end = r.seq.text.len();
            // Tokens of a stop string are cut from the text, and so from its tokens.
            r.seq
                .logprobs
                .into_iter()
                .filter(|t| t.text_offset < end)
                .collect()
        });
        let completion = Completion {
            completion_tokens: generated,
            prompt_tokens: r.seq.prompt_len,
            finish_reason,
            text: r.seq.text,
            logprobs,
        };
        let _ = r.reply.send(Ok(completion));
        self.prefix.insert(r.seq.tokens, r.cache);
    }

    /// Feeds each of `tokens` into its cache in chunks (every sequence's chunks of one step in one
    /// forward, at most `prefill_chunk` prompt tokens a step, at least one chunk) and returns
    /// each one's last-position logits (tests; scoring runs [`Scheduler::prefill_step`] itself).
    #[cfg(test)]
    fn prefill_together(
        &self,
        caches: &mut [SeqCache],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut state = Prefill::new(tokens.len());
        while !state.done(tokens) {
            self.prefill_step(caches, tokens, &mut state)?;
        }
        state.into_last()
    }

    /// One forward pass of a chunked prefill: the next chunk of each of `tokens` while the
    /// step's budget lasts (one chunk at least), recorded in `state`; returns the rows (tokens)
    /// it ran.
    fn prefill_step(
        &self,
        caches: &mut [SeqCache],
        tokens: &[&[u32]],
        state: &mut Prefill,
    ) -> Result<usize, EngineError> {
        let chunk = self.prefill_chunk.max(1);
        let Prefill { fed, last } = state;
        let mut budget = chunk;
        let mut plan = Vec::new(); // (index, tokens this step)
        for (i, t) in tokens.iter().enumerate() {
            let n = (t.len() - fed[i]).min(chunk);
            if n == 0 || (n > budget && !plan.is_empty()) {
                continue;
            }
            budget = budget.saturating_sub(n);
            plan.push((i, n));
        }
        if plan.is_empty() {
            return Ok(0);
        }
        let out = {
            let mut planned = plan.iter().peekable();
            let mut segments = Vec::with_capacity(plan.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let Some(&&(pi, n)) = planned.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                planned.next();
                let ends = fed[i] + n == tokens[i].len();
                segments.push(Segment {
                    cache,
                    tokens: &tokens[i][fed[i]..fed[i] + n],
                    want: if ends { Want::Last } else { Want::Nothing },
                    prompt: true,
                });
            }
            self.model.forward(&mut segments).map_err(inference)?
        };
        for (&(i, n), logits) in plan.iter().zip(out) {
            fed[i] += n;
            if let Some(l) = logits {
                last[i] = Some(
                    l.squeeze(0)
                        .and_then(|l| l.to_vec1::<f32>())
                        .map_err(inference)?,
                );
            }
        }
        let rows: usize = plan.iter().map(|&(_, n)| n).sum();
        self.metrics.prompt_tokens.increment(rows as u64);
        Ok(rows)
    }

    /// Scores each question's candidates to the end at once (tests; the model thread runs the
    /// same passes one per [`Scheduler::tick`]).
    #[cfg(test)]
    fn score(
        &mut self,
        enqueued: Instant,
        questions: &[TokenQuestion],
    ) -> Result<Vec<ChoiceScores>, EngineError> {
        let mut state = self.begin_score(enqueued, questions.to_vec())?;
        while !self.score_pass(&mut state)? {}
        Ok(self.finish_score(state))
    }

    /// Starts scoring each question's candidates in batched passes, one per
    /// [`Scheduler::score_pass`]: the prompt prefix common to every question (once, or from the
    /// prompt cache); then, unless the questions' own rests are short enough to ride along with
    /// every candidate, every question's rest together (each from a copy of the shared cache);
    /// then every candidate, in waves, each on a copy of its question's cache (at most
    /// `prefill_chunk` rows and [`CANDIDATE_FORK_BYTES`] of copies per pass). Each pass reads
    /// the weights once for all its rows, and every row gets the same bits whichever way it is
    /// batched.
    fn begin_score(
        &mut self,
        enqueued: Instant,
        questions: Vec<TokenQuestion>,
    ) -> Result<ScoreState, EngineError> {
        let span = tracing::info_span!(
            "engine.score",
            questions = questions.len(),
            queue_ms = enqueued.elapsed().as_millis() as u64,
        );
        let start = Instant::now();
        self.metrics.scoring_jobs.increment(1);
        let shape = self.model.cache_shape();
        let shared = common_prefix(questions.iter().map(|q| q.prompt.as_slice()));
        let first = &questions[0].prompt;
        let base = match self
            .prefix
            .lookup(&first[..=shared], 0)
            .map_err(inference)?
        {
            Some(cache) => cache,
            None => SeqCache::new(shape, shared, self.model.device()).map_err(inference)?,
        };
        self.metrics
            .reused_prompt_tokens
            .increment(base.len() as u64);
        let reused = base.len();
        let logprobs = questions
            .iter()
            .map(|q| vec![0.0; q.candidates.len()])
            .collect();
        Ok(ScoreState {
            questions,
            span,
            start,
            shared,
            reused,
            base,
            fused: false,
            caches: Vec::new(),
            logprobs,
            pending: Vec::new(),
            stage: Stage::Prefix(Prefill::new(1)),
            prefix_ms: 0,
            questions_ms: 0,
            passes: 0,
            largest_pass: 0,
        })
    }

    /// Runs the next forward pass of a scoring job (none when it only moves to its next stage);
    /// true when every candidate is scored and [`Scheduler::finish_score`] may answer.
    fn score_pass(&mut self, s: &mut ScoreState) -> Result<bool, EngineError> {
        let _enter = s.span.clone().entered();
        loop {
            match &mut s.stage {
                Stage::Prefix(state) => {
                    let first = &s.questions[0].prompt;
                    let prefix: [&[u32]; 1] = [&first[s.reused..s.shared]];
                    if !state.done(&prefix) {
                        let rows =
                            self.prefill_step(std::slice::from_mut(&mut s.base), &prefix, state)?;
                        s.record_pass(rows);
                        return Ok(false);
                    }
                    s.prefix_ms = s.start.elapsed().as_millis() as u64;
                    // When the questions' own rests are short, each candidate's segment carries
                    // its question's rest too (on a copy of the shared cache): a few rows
                    // computed again cost less than a pass of their own. Otherwise every
                    // question's rest is one pass, whose last logits score every candidate's
                    // first token, and candidates continue from copies of it.
                    let repeated_rows: usize = s
                        .questions
                        .iter()
                        .map(|q| (q.prompt.len() - s.shared) * (q.candidates.len() - 1))
                        .sum();
                    s.fused = repeated_rows <= FUSED_REST_ROWS;
                    if s.fused {
                        s.begin_candidates();
                    } else {
                        s.caches = s
                            .questions
                            .iter()
                            .map(|q| s.base.fork(q.prompt.len() - s.shared))
                            .collect::<candle_core::Result<Vec<_>>>()
                            .map_err(inference)?;
                        s.stage = Stage::Rests(Prefill::new(s.questions.len()));
                    }
                }
                Stage::Rests(state) => {
                    let rests: Vec<&[u32]> =
                        s.questions.iter().map(|q| &q.prompt[s.shared..]).collect();
                    if !state.done(&rests) {
                        let rows = self.prefill_step(&mut s.caches, &rests, state)?;
                        s.record_pass(rows);
                        return Ok(false);
                    }
                    let first_logits = std::mem::replace(state, Prefill::new(0)).into_last()?;
                    for ((lp, q), logits) in
                        s.logprobs.iter_mut().zip(&s.questions).zip(&first_logits)
                    {
                        for (l, c) in lp.iter_mut().zip(&q.candidates) {
                            *l = log_softmax_at(logits, c[0]);
                        }
                    }
                    s.begin_candidates();
                }
                Stage::Candidates => {
                    if s.pending.is_empty() {
                        return Ok(true);
                    }
                    let rows = self.candidate_wave(s)?;
                    s.record_pass(rows);
                    return Ok(s.pending.is_empty());
                }
            }
        }
    }

    /// One wave of candidates: as many as fit `prefill_chunk` rows and
    /// [`CANDIDATE_FORK_BYTES`] of cache copies (one at least), in one forward pass; returns
    /// the rows it ran.
    fn candidate_wave(&mut self, s: &mut ScoreState) -> Result<usize, EngineError> {
        let per_position = SeqCache::bytes_per_position(&self.model.cache_shape());
        let rest = |qi: usize| -> &[u32] { &s.questions[qi].prompt[s.shared..] };
        let (mut wave, mut bytes, mut rows) = (Vec::new(), 0, 0);
        while let Some(&(qi, ci)) = s.pending.last() {
            let cand = &s.questions[qi].candidates[ci];
            let lead: &[u32] = if s.fused { rest(qi) } else { &[] };
            let tokens = [lead, &cand[..cand.len() - 1]].concat();
            let cost = (s.questions[qi].prompt.len() + cand.len()) * per_position;
            if !wave.is_empty()
                && (bytes + cost > CANDIDATE_FORK_BYTES
                    || rows + tokens.len() > self.prefill_chunk.max(1))
            {
                break;
            }
            bytes += cost;
            rows += tokens.len();
            let source = if s.fused { &s.base } else { &s.caches[qi] };
            let cache = source.fork(tokens.len()).map_err(inference)?;
            wave.push((qi, ci, tokens, cache));
            s.pending.pop();
        }
        let out = {
            let mut segments: Vec<Segment<'_>> = wave
                .iter_mut()
                .map(|(_, _, tokens, cache)| Segment {
                    cache,
                    tokens,
                    want: Want::All,
                    prompt: true,
                })
                .collect();
            self.model.forward(&mut segments).map_err(inference)?
        };
        for ((qi, ci, _, _), logits) in wave.iter().zip(out) {
            let cand = &s.questions[*qi].candidates[*ci];
            let rows = logits.ok_or_else(|| EngineError::Inference("no logits".into()))?;
            let rows = rows.to_vec2::<f32>().map_err(inference)?;
            // Fused: the rest's last row scores the first token. Else: row k, token k + 1.
            let (skip, from) = if s.fused {
                (rest(*qi).len() - 1, 0)
            } else {
                (0, 1)
            };
            for k in from..cand.len() {
                s.logprobs[*qi][*ci] += log_softmax_at(&rows[skip + k - from], cand[k]);
            }
        }
        Ok(rows)
    }

    /// The scores of a job whose passes are done; its shared prefix goes to the prompt cache.
    fn finish_score(&mut self, s: ScoreState) -> Vec<ChoiceScores> {
        let _enter = s.span.enter();
        let shared = s.shared;
        self.prefix
            .insert(s.questions[0].prompt[..shared].to_vec(), s.base);
        let out: Vec<ChoiceScores> = s
            .logprobs
            .into_iter()
            .zip(&s.questions)
            .map(|(lp, q)| ChoiceScores::from_logprobs(lp, q.prompt.len()))
            .collect();
        tracing::info!(
            shared_prefix = shared,
            reused = s.reused,
            prefix_ms = s.prefix_ms,
            questions_ms = s.questions_ms,
            fused = s.fused,
            passes = s.passes,
            largest_pass = s.largest_pass,
            total_ms = s.start.elapsed().as_millis() as u64,
            "scoring done"
        );
        out
    }
}

/// What the model thread is working on: the running generations, and scoring jobs, which
/// advance one forward pass per [`Scheduler::tick`] in turn.
#[derive(Default)]
pub(crate) struct Batch {
    running: Vec<Running>,
    scoring: VecDeque<ScoreJob>,
}

impl Batch {
    /// Generations and scoring jobs admitted.
    fn len(&self) -> usize {
        self.running.len() + self.scoring.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A scoring job in progress and the channel its answer goes back on.
struct ScoreJob {
    state: ScoreState,
    reply: oneshot::Sender<Result<Vec<ChoiceScores>, EngineError>>,
}

/// Where a scoring job stands (see [`Scheduler::begin_score`]).
struct ScoreState {
    questions: Vec<TokenQuestion>,
    span: tracing::Span,
    start: Instant,
    /// Prompt tokens common to every question.
    shared: usize,
    /// Of those, tokens the prompt cache had.
    reused: usize,
    /// The shared prefix's cache.
    base: SeqCache,
    /// Whether each candidate carries its question's rest (see [`Scheduler::score_pass`]).
    fused: bool,
    /// Each question's cache after its rest, when not fused.
    caches: Vec<SeqCache>,
    /// Summed log-probabilities so far, by question and candidate.
    logprobs: Vec<Vec<f64>>,
    /// (question, candidate) still to score, the next one last.
    pending: Vec<(usize, usize)>,
    stage: Stage,
    prefix_ms: u64,
    questions_ms: u64,
    /// Forward passes run so far.
    passes: usize,
    /// Rows (tokens) of the largest pass so far: `prefill_chunk` at most, or one candidate
    /// longer than that alone.
    largest_pass: usize,
}

impl ScoreState {
    fn record_pass(&mut self, rows: usize) {
        self.passes += 1;
        self.largest_pass = self.largest_pass.max(rows);
    }

    /// Queues every candidate with tokens still to score and moves to the candidate stage.
    fn begin_candidates(&mut self) {
        self.questions_ms =
            (self.start.elapsed().as_millis() as u64).saturating_sub(self.prefix_ms);
        let fused = self.fused;
        self.pending = self
            .questions
            .iter()
            .enumerate()
            .flat_map(|(qi, q)| {
                q.candidates
                    .iter()
                    .enumerate()
                    .filter(move |(_, c)| fused || c.len() > 1)
                    .map(move |(ci, _)| (qi, ci))
            })
            .collect();
        self.pending.reverse();
        self.stage = Stage::Candidates;
    }
}

/// A scoring job's stage.
enum Stage {
    /// Feeding the prompt prefix common to every question.
    Prefix(Prefill),
    /// Feeding every question's own rest (not fused).
    Rests(Prefill),
    /// Scoring candidates in waves.
    Candidates,
}

/// Progress of [`Scheduler::prefill_together`]: tokens fed and last logits, per sequence.
struct Prefill {
    fed: Vec<usize>,
    last: Vec<Option<Vec<f32>>>,
}

impl Prefill {
    fn new(n: usize) -> Self {
        Self {
            fed: vec![0; n],
            last: vec![None; n],
        }
    }

    /// Whether every one of `tokens` is fed.
    fn done(&self, tokens: &[&[u32]]) -> bool {
        self.fed.iter().zip(tokens).all(|(f, t)| *f >= t.len())
    }

    /// Each sequence's last-position logits.
    fn into_last(self) -> Result<Vec<Vec<f32>>, EngineError> {
        self.last
            .into_iter()
            .map(|l| l.ok_or_else(|| EngineError::Inference("no logits".into())))
            .collect()
    }
}

/// Length of the longest common prefix of `prompts`, leaving every prompt at least one token
/// of its own (its last position's logits are needed).
fn common_prefix<'a>(mut prompts: impl Iterator<Item = &'a [u32]>) -> usize {
    let Some(first) = prompts.next() else {
        return 0;
    };
    let mut n = first.len();
    let mut shortest = first.len();
    for p in prompts {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
        shortest = shortest.min(p.len());
    }
    n.min(shortest.saturating_sub(1))
}

/// Runs `f`, turning a panic inside the model code into an [`EngineError::Inference`].
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    let result = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(EngineError::Inference(format!("model panicked: {msg}")))
    });
    if let Err(e) = &result {
        tracing::warn!(error = %e, "request failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_parts, EngineConfig};

    fn model_path() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    fn scheduler(requantize: bool) -> Option<(Scheduler, Arc<GgufTokenizer>)> {
        let path = crate::testing::model_file("SmolLM2-135M-Instruct.Q4_1.gguf")?;
        let loaded = load_parts(&EngineConfig {
            model_path: path,
            model_id: "test".into(),
            max_queue: 1,
            max_batch: 16,
            prefix_cache_bytes: 64 << 20,
            threads: Some(2),
            max_context: None,
            requantize,
            device: "cpu".into(),
            limits: Default::default(),
        })
        .unwrap();
        Some((loaded.scheduler, loaded.tokenizer))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    fn argmax(v: &[f32]) -> usize {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    }

    fn last_logits(w: &Scheduler, prompt: &[u32], chunk: usize) -> Vec<f32> {
        let mut cache =
            SeqCache::new(w.model.cache_shape(), prompt.len(), w.model.device()).unwrap();
        let w = Scheduler {
            prefill_chunk: chunk,
            ..clone_scheduler(w)
        };
        w.prefill_together(std::slice::from_mut(&mut cache), &[prompt])
            .unwrap()
            .pop()
            .unwrap()
    }

    /// A scheduler sharing `w`'s model is not needed elsewhere; tests only vary the chunk size.
    fn clone_scheduler(w: &Scheduler) -> Scheduler {
        Scheduler {
            model: w.model.clone(),
            tokenizer: w.tokenizer.clone(),
            eos: w.eos.clone(),
            context_length: w.context_length,
            prefill_chunk: w.prefill_chunk,
            max_batch: w.max_batch,
            metrics: w.metrics.clone(),
            prefix: PrefixCache::new(&w.model.cache_shape(), 0),
        }
    }

    /// The engine's own llama code against candle-transformers' `quantized_llama` on the same
    /// (not requantized) file: same last-position logits up to float noise.
    #[test]
    fn own_model_matches_candle_transformers_quantized_llama() {
        let Some((w, tok)) = scheduler(false) else {
            return;
        };
        let prompt = tok
            .encode_plain(&"The quick brown fox jumps over the lazy dog. ".repeat(8))
            .unwrap();
        let ours = last_logits(&w, &prompt, usize::MAX);

        let mut file = std::fs::File::open(model_path()).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let input = Tensor::new(prompt.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs: Vec<f32> = reference
            .forward(&input, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // candle-transformers rounds activations to 8 bits, the engine computes prompts with
        // f32 activations: single logits move by up to about one (measured max 0.64, mean
        // 0.17); a wrong layer would move all of them.
        assert_eq!(argmax(&ours), argmax(&theirs));
        let d = max_diff(&ours, &theirs);
        let mean = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / ours.len() as f32;
        eprintln!("max logit difference {d}, mean {mean}");
        assert!(
            d < 1.5 && mean < 0.25,
            "max logit difference {d}, mean {mean}"
        );
    }

    #[test]
    fn chunked_prefill_matches_one_shot() {
        let Some((w, tok)) = scheduler(true) else {
            return;
        };
        let prompt = tok
            .encode_plain(&"The quick brown fox jumps over the lazy dog. ".repeat(12))
            .unwrap();
        assert!(prompt.len() > 100, "{}", prompt.len());
        let whole = last_logits(&w, &prompt, usize::MAX);
        // Attention runs row by row and matmul rows are independent, so chunks of any size
        // (64 + 57: the cache and the causal limit; 1: the decode path) give the same bits.
        for chunk in [64, 7, 1] {
            assert_eq!(whole, last_logits(&w, &prompt, chunk), "chunks of {chunk}");
        }
    }

    /// Scoring with the shared prefix and candidate rounds equals running each question's
    /// prompt followed by each candidate from scratch.
    #[test]
    fn scoring_equals_rerunning_the_prompt_for_every_candidate() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        let shared = enc("Review: the food was cold and the waiter was rude. ");
        let ask = |texts: &[&str]| -> Vec<TokenQuestion> {
            texts
                .iter()
                .map(|q| TokenQuestion {
                    prompt: [shared.clone(), enc(q)].concat(),
                    candidates: vec![
                        enc(" positive"),
                        enc(" negative"),
                        enc(" neutral, mostly"),
                        enc(" no"),
                    ],
                })
                .collect()
        };
        // One question: its one-token rest rides with every candidate (fused). Two questions
        // with longer rests: a pass for the rests, then the candidates.
        let single = ask(&["Sentiment:"]);
        let alone = w.score(Instant::now(), &single).unwrap();
        check_scores(&mut w, &single, &alone);
        let questions = ask(&["Sentiment:", "Would you return? Answer:"]);
        let rests: usize = questions
            .iter()
            .map(|q| {
                (q.prompt.len() - common_prefix(questions.iter().map(|q| q.prompt.as_slice()))) * 3
            })
            .sum();
        assert!(rests > FUSED_REST_ROWS, "{rests}");
        let fast = w.score(Instant::now(), &questions).unwrap();
        check_scores(&mut w, &questions, &fast);
        // Fused or not, alone or with another question: the same bits.
        assert_eq!(alone[0].logprobs, fast[0].logprobs);
    }

    /// A scoring job no longer runs to its end when admitted: it advances one bounded
    /// forward pass per turn of the model thread, so a generation and a small scoring job
    /// admitted after a large scoring job are answered while the large one still has passes
    /// to go; and the large one's scores are those of scoring it on its own.
    #[test]
    fn scoring_passes_interleave_with_generation_and_other_scoring() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        // Small waves: the large job needs many passes (at most 16 rows each).
        w.prefill_chunk = 16;
        let large = TokenQuestion {
            prompt: enc("Pick a number between one and forty:"),
            candidates: (1..=40)
                .map(|i| enc(&format!(" number {i} of forty")))
                .collect(),
        };
        let small = TokenQuestion {
            prompt: enc("Is water wet? Answer:"),
            candidates: vec![enc(" yes"), enc(" no")],
        };
        let job = |work| Job {
            kind: "test",
            enqueued: Instant::now(),
            work,
        };
        let mut batch = Batch::default();
        let (reply, mut large_rx) = oneshot::channel();
        w.admit(
            job(Work::Score {
                questions: vec![large.clone()],
                reply,
            }),
            &mut batch,
        );
        assert!(
            matches!(
                large_rx.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "admitting a scoring job runs none of it"
        );
        let (reply, mut generate_rx) = oneshot::channel();
        let params = SamplingParams {
            max_tokens: Some(3),
            temperature: 0.0,
            ..SamplingParams::default()
        };
        w.admit(
            job(Work::Generate {
                prompt: enc("The capital of France is"),
                params,
                guide: None,
                reply,
            }),
            &mut batch,
        );
        let (reply, mut small_rx) = oneshot::channel();
        w.admit(
            job(Work::Score {
                questions: vec![small.clone()],
                reply,
            }),
            &mut batch,
        );

        let (mut generated, mut small_scores, mut ticks) = (None, None, 0);
        while generated.is_none() || small_scores.is_none() {
            w.tick(&mut batch);
            ticks += 1;
            generated = generated.or_else(|| generate_rx.try_recv().ok());
            small_scores = small_scores.or_else(|| small_rx.try_recv().ok());
            assert!(
                ticks < 50,
                "the generation and the small job never finished"
            );
        }
        assert_eq!(generated.unwrap().unwrap().completion_tokens, 3);
        assert!(
            matches!(
                large_rx.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "the large job is still running"
        );
        let large_passes = batch.scoring.front().map(|j| j.state.passes).unwrap();
        assert!(
            large_passes <= ticks,
            "one pass per turn at most: {large_passes} in {ticks}"
        );
        while !batch.is_empty() {
            w.tick(&mut batch);
        }
        let large_scores = large_rx.try_recv().unwrap().unwrap();

        let alone = w.score(Instant::now(), &[large]).unwrap();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(
            close(&large_scores[0].logprobs, &alone[0].logprobs),
            "{large_scores:?} vs {alone:?}"
        );
        let small_alone = w.score(Instant::now(), &[small]).unwrap();
        assert!(close(
            &small_scores.unwrap().unwrap()[0].logprobs,
            &small_alone[0].logprobs
        ));
    }

    /// Every pass of a scoring job is bounded by the step's row budget, so the largest job
    /// admitted costs the running generations one bounded pass per step: 200 candidates take
    /// many passes of at most `prefill_chunk` rows each.
    #[test]
    fn scoring_passes_are_bounded_by_the_step_budget() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        w.prefill_chunk = 64;
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        let question = TokenQuestion {
            prompt: enc("Label:"),
            candidates: (0..200).map(|i| enc(&format!(" label {i}"))).collect(),
        };
        let rows: usize = question.candidates.iter().map(|c| c.len() - 1).sum();
        let mut state = w.begin_score(Instant::now(), vec![question]).unwrap();
        while !w.score_pass(&mut state).unwrap() {}
        assert!(
            state.largest_pass <= 64,
            "a pass of {} rows",
            state.largest_pass
        );
        assert!(
            state.passes >= rows.div_ceil(64),
            "{} passes for {rows} rows",
            state.passes
        );
        let scores = w.finish_score(state);
        assert_eq!(scores[0].probs.len(), 200);
    }

    /// `fast` (from [`Scheduler::score`]) equals scoring every candidate from scratch.
    fn check_scores(w: &mut Scheduler, questions: &[TokenQuestion], fast: &[ChoiceScores]) {
        let shared_len = common_prefix(questions.iter().map(|q| q.prompt.as_slice()));
        let d = |a: f64, b: f64| (a - b).abs();
        for (q, scores) in questions.iter().zip(fast) {
            let mut whole_logprobs = Vec::new();
            for (c, &lp) in q.candidates.iter().zip(&scores.logprobs) {
                let all: Vec<u32> = [q.prompt.clone(), c.clone()].concat();
                let scored = &all[..all.len() - 1];
                let logprob = |rows: &[Vec<f32>], first_row: usize| -> f64 {
                    (0..c.len())
                        .map(|k| log_softmax_at(&rows[first_row + k], c[k]))
                        .sum()
                };
                // From scratch with the same chunk boundaries (shared prefix, question, candidate):
                // the same arithmetic, so the same numbers.
                let mut cache =
                    SeqCache::new(w.model.cache_shape(), all.len(), w.model.device()).unwrap();
                let mut rows = Vec::new();
                for (from, to) in [
                    (0, shared_len),
                    (shared_len, q.prompt.len()),
                    (q.prompt.len(), scored.len()),
                ] {
                    if from == to {
                        continue;
                    }
                    let mut seg = [Segment {
                        cache: &mut cache,
                        tokens: &scored[from..to],
                        want: Want::All,
                        prompt: true,
                    }];
                    rows.extend(
                        w.model
                            .forward(&mut seg)
                            .unwrap()
                            .pop()
                            .flatten()
                            .unwrap()
                            .to_vec2::<f32>()
                            .unwrap(),
                    );
                }
                let same_chunks = logprob(&rows, q.prompt.len() - 1);
                assert!(
                    d(lp, same_chunks) < 1e-4,
                    "candidate {c:?}: {lp} vs {same_chunks}"
                );
                // In one forward: the same numbers too (row-wise attention).
                let mut cache =
                    SeqCache::new(w.model.cache_shape(), all.len(), w.model.device()).unwrap();
                let mut seg = [Segment {
                    cache: &mut cache,
                    tokens: scored,
                    want: Want::All,
                    prompt: true,
                }];
                let rows = w
                    .model
                    .forward(&mut seg)
                    .unwrap()
                    .pop()
                    .flatten()
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let whole = logprob(&rows, q.prompt.len() - 1);
                assert!(d(lp, whole) < 1e-9, "candidate {c:?}: {lp} vs {whole}");
                whole_logprobs.push(whole);
            }
            let whole = ChoiceScores::from_logprobs(whole_logprobs, q.prompt.len());
            assert_eq!(whole.best(), scores.best());
            for (a, b) in whole.probs.iter().zip(&scores.probs) {
                assert!(d(*a, *b) < 0.1, "{:?} vs {:?}", whole.probs, scores.probs);
            }
            let total: f64 = scores.probs.iter().sum();
            assert!((total - 1.0).abs() < 1e-9);
        }
        assert!(
            fast[0].probs[1] > fast[0].probs[0],
            "a cold meal and a rude waiter are negative: {:?}",
            fast[0].probs
        );
    }

    #[test]
    fn common_prefix_leaves_each_prompt_a_token() {
        let p = |v: &[u32]| v.to_vec();
        let a = p(&[1, 2, 3, 4]);
        let b = p(&[1, 2, 3, 5, 6]);
        assert_eq!(common_prefix([a.as_slice(), b.as_slice()].into_iter()), 3);
        assert_eq!(common_prefix([a.as_slice(), a.as_slice()].into_iter()), 3);
        assert_eq!(common_prefix([a.as_slice()].into_iter()), 3);
        assert_eq!(
            common_prefix([p(&[7]).as_slice(), a.as_slice()].into_iter()),
            0
        );
    }
}

#[cfg(test)]
mod tokenizer_json_tests {
    use crate::{load_parts, EngineConfig};

    /// A `tokenizer.json` beside the model replaces the GGUF's tokenizer: the same tokenizer
    /// with a lower-casing normalizer added encodes "HELLO" as "hello".
    #[test]
    fn tokenizer_json_beside_the_model_overrides_the_gguf() {
        let Some(model) = crate::testing::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
            return;
        };
        let config = |path: std::path::PathBuf| EngineConfig {
            model_path: path,
            model_id: "t".into(),
            max_queue: 1,
            max_batch: 1,
            prefix_cache_bytes: 0,
            threads: Some(2),
            max_context: Some(64),
            requantize: true,
            device: "cpu".into(),
            limits: Default::default(),
        };
        let gguf = load_parts(&config(model.clone())).unwrap().tokenizer;
        let dir = tempfile::tempdir().unwrap();
        let linked = dir.path().join("model.gguf");
        std::os::unix::fs::symlink(model.canonicalize().unwrap(), &linked).unwrap();
        let json_path = dir.path().join("tokenizer.json");
        gguf.save_json(&json_path).unwrap();
        // The GGUF's own tokenizer written out and read back: the same ids.
        let same = load_parts(&config(linked.clone())).unwrap().tokenizer;
        assert_eq!(
            same.encode_plain("Year 2024, <|im_start|> ok").unwrap(),
            gguf.encode_plain("Year 2024, <|im_start|> ok").unwrap()
        );
        assert_eq!(same.control_id("<|im_end|>"), gguf.control_id("<|im_end|>"));
        // With a lower-casing normalizer, the override shows.
        let mut doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
        doc["normalizer"] = serde_json::json!({"type": "Lowercase"});
        std::fs::write(&json_path, doc.to_string()).unwrap();
        let changed = load_parts(&config(linked)).unwrap().tokenizer;
        assert_ne!(
            gguf.encode_plain("HELLO").unwrap(),
            gguf.encode_plain("hello").unwrap()
        );
        assert_eq!(
            changed.encode_plain("HELLO").unwrap(),
            gguf.encode_plain("hello").unwrap()
        );
    }
}
