//! The model thread's loop: the [`Scheduler`] owns the weights and runs requests with
//! continuous batching.
//!
//! Every step the [`Scheduler`] admits waiting requests (up to `max_batch` running sequences;
//! interactive requests before bulk ones, which leave the batch's last places free, see
//! [`Waiting`]; while interactive work runs, bulk work pauses),
//! drops cancelled ones, and runs one batched forward: each decoding sequence contributes its
//! next token and prompts contribute chunks within the step's token budget, so sequences of
//! different lengths join and leave the batch between steps and share every weight read.
//! Per-request state (tokens, sampler, detokenizer, stop conditions) is a [`Sequence`]
//! (`sequence`, sampling in `sampling`). Choice scoring jobs (`scoring`) advance by a bounded
//! number of rows per turn of the loop, in the same forward pass as the generation step and
//! taking turns with each other ([`Scheduler::tick`]), so that no scoring request, however many
//! candidates it has, stalls the running generations.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::config::bulk_batch;
use crate::embedding::EmbedJob;
use crate::error::inference;
use crate::guidance::Guide;
use crate::metrics::EngineMetrics;
use crate::model::prefix::PrefixCache;
use crate::model::{Model, Segment, SeqCache, Want};
use crate::scoring::{pass_segments, ScoreJob};
use crate::sequence::Sequence;
use crate::tokenizer::GgufTokenizer;
use crate::{
    ChoiceScores, Completion, Embedding, EngineError, FinishReason, Priority, SamplingParams,
    TokenQuestion,
};

/// Prompt tokens one sequence contributes to a step, and the step's token budget: bounds the
/// attention score matrix (heads x chunk x context floats) while keeping matmuls large.
pub(crate) const PREFILL_CHUNK: usize = 512;

/// A request as queued for the model thread.
pub(crate) struct Job {
    /// What the request was (`"chat"`, `"completion"`, `"score"`, `"embed"`), for the logs.
    pub(crate) kind: &'static str,
    /// How soon it is admitted among the waiting jobs.
    pub(crate) priority: Priority,
    /// When it was queued.
    pub(crate) enqueued: Instant,
    /// Its place in its priority's line: when the caller's work that it is part of began
    /// ([`crate::Engine::in_line_since`]), else when it was queued. A later step of older
    /// work goes before the first steps of newer work.
    pub(crate) line: Instant,
    /// The caller's tracing span when it submitted the request: the model thread works for the
    /// job inside it, so that its logs for the request carry the caller's context (a request id).
    pub(crate) span: tracing::Span,
    /// What it asks for.
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
    /// Embed each input (token ids, checked by the caller).
    Embed {
        inputs: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    },
}

impl Work {
    /// Whether the caller stopped waiting for the answer.
    fn is_cancelled(&self) -> bool {
        match self {
            Work::Generate { reply, .. } => reply.is_closed(),
            Work::Score { reply, .. } => reply.is_closed(),
            Work::Embed { reply, .. } => reply.is_closed(),
        }
    }
}

/// A generation in the running batch.
struct Running {
    kind: &'static str,
    /// Interactive sequences run alone while there are some (see [`Scheduler::tick`]).
    priority: Priority,
    /// The sequence's span (`engine.sequence`, inside the caller's), entered whenever the model
    /// thread works for it alone: admission, its part of each step, its answer.
    span: tracing::Span,
    seq: Sequence,
    cache: SeqCache,
    /// Tokens of `seq.tokens` already in the cache.
    fed: usize,
    /// Prompt tokens the cache came with from the prompt cache at admission.
    cached: usize,
    reply: oneshot::Sender<Result<Completion, EngineError>>,
    enqueued: Instant,
    started: Instant,
    first_token: Option<Duration>,
}

/// Owns the model on the dedicated thread.
pub(crate) struct Scheduler {
    /// The model.
    pub(crate) model: Model,
    /// Its tokenizer (sequences detokenize with it).
    pub(crate) tokenizer: Arc<GgufTokenizer>,
    /// Tokens that end a generation.
    pub(crate) eos: HashSet<u32>,
    /// Most tokens (prompt + completion) of one sequence.
    pub(crate) context_length: usize,
    /// Prompt tokens per sequence per step, and the step's token budget ([`PREFILL_CHUNK`];
    /// tests vary it).
    pub(crate) prefill_chunk: usize,
    /// Sequences running together at most.
    pub(crate) max_batch: usize,
    /// The engine's metrics.
    pub(crate) metrics: Arc<EngineMetrics>,
    /// Caches of recent prompts, reused by requests that start the same way.
    pub(crate) prefix: PrefixCache,
}

impl Scheduler {
    /// Serves jobs until every sender is dropped and nothing is left to run.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Batch::default();
        let mut waiting = Waiting::default();
        let mut open = true;
        loop {
            // Block only when idle.
            if batch.is_empty() && waiting.is_empty() {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(job) => waiting.push(job),
                    None => break,
                }
            }
            // Everything queued waits here, by priority (the queue is bounded by `max_queue`).
            while open {
                match rx.try_recv() {
                    Ok(job) => waiting.push(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            // Callers that stopped waiting free their place in the queue at once: their jobs
            // must not pile up here behind a full batch.
            if waiting.len() > rx.max_capacity() {
                let dropped = waiting.drop_cancelled();
                self.metrics.waiting.decrement(dropped as f64);
            }
            // Admit. Scoring jobs hold caches too: they count toward `max_batch`.
            while let Some(job) = waiting.next(batch.len(), self.max_batch) {
                self.admit(job, &mut batch);
            }
            self.tick(&mut batch);
        }
        self.metrics.running.set(0.0);
        tracing::debug!("engine queue closed; model thread exits");
    }

    /// One turn of the model thread: drops cancelled work, runs **one** forward pass that
    /// advances the scoring jobs ([`Scheduler::plan_scoring`]: the first in line, and those
    /// behind it while the pass's scoring row budget lasts; they then go to the back of the
    /// line) and every running generation by a step ([`Scheduler::plan_step`]), answers what
    /// finished, then gives embedding jobs their pass. So scoring jobs, however many candidates
    /// they have, delay each generation step by a bounded number of rows at most, and take
    /// turns; and a pass's fixed cost (every weight read, hundreds of kernels started) is paid
    /// once for both kinds of work instead of once each.
    ///
    /// While the batch holds interactive work ([`Priority::Interactive`]), the turn is its
    /// alone: only interactive scoring jobs and generations advance, and bulk ones wait, their
    /// caches kept, until it is done. So an interactive request runs about as fast beside a
    /// full batch of bulk work as alone. When every job has the same priority, all take part.
    fn tick(&mut self, batch: &mut Batch) {
        batch.running.retain(|r| {
            let keep = !r.reply.is_closed();
            if !keep {
                let _sequence = r.span.enter();
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
                let _score = s.state.span.enter();
                tracing::info!(passes = s.state.passes, "scoring request cancelled mid-way");
            }
            keep
        });
        batch.embedding.retain(|j| {
            let keep = !j.reply.is_closed();
            if !keep {
                let _embed = j.span.enter();
                tracing::info!("embedding request cancelled mid-way");
            }
            keep
        });
        self.metrics.running.set(batch.running.len() as f64);
        // While interactive work is in the batch it runs alone: bulk generations and scoring
        // jobs keep their caches and go on when it is done.
        let interactive = batch.has_interactive();
        let mut turn = self.plan_scoring(&mut batch.scoring, interactive);
        let plan = self.plan_step(&batch.running, interactive);
        if !turn.chosen.is_empty() || !plan.is_empty() {
            let started = Instant::now();
            let ran = guarded(|| {
                let mut segments = Vec::new();
                let mut counts = Vec::with_capacity(turn.chosen.len());
                for (i, job) in batch.scoring.iter_mut().enumerate() {
                    if turn.chosen.contains(&i) {
                        let part = pass_segments(&mut job.state);
                        counts.push(part.len());
                        segments.extend(part);
                    }
                }
                step_segments(&mut batch.running, &plan, &mut segments);
                let out = self.forward(&mut segments)?;
                Ok((out, counts))
            });
            tracing::debug!(
                scoring_jobs = turn.chosen.len(),
                scoring_rows = turn.rows,
                seqs = plan.len(),
                rows = turn.rows + plan.iter().map(|&(_, n)| n).sum::<usize>(),
                forward_us = started.elapsed().as_micros() as u64,
                "forward pass"
            );
            match ran {
                Ok((out, counts)) => {
                    let mut out = out.into_iter();
                    for (&i, n) in turn.chosen.iter().zip(counts) {
                        let part: Vec<_> = out.by_ref().take(n).collect();
                        let job = &mut batch.scoring[i];
                        match guarded(|| self.absorb_pass(&mut job.state, part)) {
                            Ok(true) => turn.ended.push((i, Ok(()))),
                            Ok(false) => {}
                            Err(e) => turn.ended.push((i, Err(e))),
                        }
                    }
                    if !plan.is_empty() {
                        let generated = out.collect();
                        if let Err(e) =
                            guarded(|| self.absorb_step(&mut batch.running, plan, generated))
                        {
                            fail_running(&mut batch.running, &e);
                        }
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    turn.ended.extend(
                        turn.chosen
                            .iter()
                            .map(|&i| (i, Err(EngineError::Inference(reason.clone())))),
                    );
                    if !plan.is_empty() {
                        fail_running(&mut batch.running, &e);
                    }
                }
            }
        }
        self.settle_scoring(&mut batch.scoring, turn);
        self.embed_turn(&mut batch.embedding, interactive);
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

    /// Runs one forward pass of the model over `segments` (see `Decoder::forward`), counted in
    /// the metrics.
    pub(crate) fn forward(
        &self,
        segments: &mut [Segment<'_>],
    ) -> Result<Vec<Option<Tensor>>, EngineError> {
        let started = Instant::now();
        let out = self.model.forward(segments).map_err(inference);
        self.metrics.pass_ran(
            segments.iter().map(|s| s.tokens.len()).sum(),
            started.elapsed(),
        );
        out
    }

    /// The scoring jobs' part of a turn's pass: the jobs that may run (only the interactive
    /// ones when `interactive`), in line order, each with its next pass planned, as many as fit
    /// the pass's scoring row budget (`prefill_chunk`; the first always), since a pass costs
    /// about as much for a few rows as for many more. Jobs with nothing left to run, or whose
    /// planning failed, are in `ended`.
    fn plan_scoring(&mut self, scoring: &mut VecDeque<ScoreJob>, interactive: bool) -> ScoreTurn {
        let budget = self.prefill_chunk.max(1);
        let mut turn = ScoreTurn::default();
        for (i, job) in scoring.iter_mut().enumerate() {
            if interactive && job.priority != Priority::Interactive {
                continue;
            }
            match guarded(|| self.plan_pass(&mut job.state)) {
                Ok(None) => turn.ended.push((i, Ok(()))),
                Ok(Some(n)) => {
                    if !turn.chosen.is_empty() && turn.rows + n > budget {
                        break;
                    }
                    turn.rows += n;
                    turn.chosen.push(i);
                }
                Err(e) => turn.ended.push((i, Err(e))),
            }
        }
        turn
    }

    /// After the turn's pass: answers the scoring jobs that ended (with their scores, or the
    /// error that ended them), and sends the jobs that took part to the back of the line.
    fn settle_scoring(&mut self, scoring: &mut VecDeque<ScoreJob>, turn: ScoreTurn) {
        let ScoreTurn {
            chosen, mut ended, ..
        } = turn;
        if chosen.is_empty() && ended.is_empty() {
            return;
        }
        let mut line = VecDeque::with_capacity(scoring.len());
        let mut back = Vec::with_capacity(chosen.len());
        for (i, job) in std::mem::take(scoring).into_iter().enumerate() {
            if let Some(at) = ended.iter().position(|(j, _)| *j == i) {
                match ended.swap_remove(at).1 {
                    Ok(()) => {
                        let scores = self.finish_score(job.state);
                        let _ = job.reply.send(Ok(scores));
                    }
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            } else if chosen.contains(&i) {
                back.push(job);
            } else {
                line.push_back(job);
            }
        }
        line.extend(back);
        *scoring = line;
    }

    /// Starts a generation or a scoring job (both then advance in [`Scheduler::tick`]).
    fn admit(&mut self, job: Job, batch: &mut Batch) {
        self.metrics.waiting.decrement(1.0);
        let Job {
            kind,
            priority,
            enqueued,
            line: _,
            span: caller_span,
            work,
        } = job;
        // Everything done for this request here, and the spans opened for it, are inside the
        // caller's span.
        let _caller = caller_span.enter();
        if work.is_cancelled() {
            tracing::debug!("request cancelled before it started");
            return;
        }
        match work {
            Work::Generate {
                prompt,
                params,
                guide,
                reply,
            } => {
                let span =
                    tracing::info_span!("engine.sequence", kind, prompt_tokens = prompt.len());
                let _sequence = span.enter();
                let seq = Sequence::new(prompt, &params, guide, self.context_length);
                if seq.finish.is_some() {
                    // Nothing to generate (max_tokens 0).
                    let now = Instant::now();
                    self.finish(Running {
                        kind,
                        priority,
                        span: span.clone(),
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
                        cached: 0,
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
                        self.metrics.prompt_reused(fed);
                        let queued = enqueued.elapsed();
                        self.metrics.queue_seconds.record(queued.as_secs_f64());
                        tracing::debug!(
                            reused_prompt_tokens = fed,
                            queue_ms = queued.as_millis() as u64,
                            "sequence admitted"
                        );
                        batch.running.push(Running {
                            kind,
                            priority,
                            span: span.clone(),
                            seq,
                            cache,
                            fed,
                            cached: fed,
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
            Work::Embed { inputs, reply } => {
                batch
                    .embedding
                    .push_back(EmbedJob::new(inputs, priority, enqueued, reply));
            }
            Work::Score { questions, reply } => {
                match guarded(|| self.begin_score(enqueued, questions)) {
                    Ok(state) => batch.scoring.push_back(ScoreJob {
                        state,
                        reply,
                        priority,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// The generations' part of a turn's pass: each decoding sequence's next token, and prompt
    /// chunks while the step's prompt-token budget lasts (one always runs), as
    /// (index in `running`, tokens this step), in `running`'s order.
    ///
    /// A prompt is cut at fixed multiples of `prefill_chunk` from its start, whatever else runs:
    /// every row of the batched matmuls is computed independently and attention runs per
    /// sequence, so a request gets bit-for-bit the same logits alone or in any batch.
    fn plan_step(&self, running: &[Running], only_interactive: bool) -> Vec<(usize, usize)> {
        let chunk = self.prefill_chunk.max(1);
        let mut prompt_budget = chunk;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, r) in running.iter().enumerate() {
            if only_interactive && r.priority != Priority::Interactive {
                continue;
            }
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
        plan
    }

    /// Takes the logits of the step [`Scheduler::plan_step`] planned (one per planned
    /// sequence, in its order): feeds the rows into the sequences' counts and samples where a
    /// prompt or a token is done.
    fn absorb_step(
        &mut self,
        running: &mut [Running],
        plan: Vec<(usize, usize)>,
        logits: Vec<Option<Tensor>>,
    ) -> Result<(), EngineError> {
        let (prompts, prompt_tokens) = plan
            .iter()
            .filter(|&&(i, _)| running[i].fed < running[i].seq.prompt_len)
            .fold((0, 0), |(c, t), &(_, n)| (c + 1, t + n));
        self.metrics.prompt_tokens.increment(prompt_tokens as u64);
        self.metrics.step_ran(plan.len(), prompts);
        for ((i, n), logits) in plan.into_iter().zip(logits) {
            let r = &mut running[i];
            let _sequence = r.span.enter();
            if r.fed < r.seq.prompt_len {
                tracing::debug!(tokens = n, fed = r.fed + n, "prompt chunk fed");
            }
            r.fed += n;
            if let Some(logits) = logits {
                let row = logits.squeeze(0).map_err(inference)?;
                r.seq.step(&row, &self.tokenizer, &self.eos)?;
                self.metrics.token_generated();
                if r.first_token.is_none() {
                    let ttft = r.enqueued.elapsed();
                    r.first_token = Some(ttft);
                    self.metrics.time_to_first_token.record(ttft.as_secs_f64());
                    tracing::debug!(ms = ttft.as_millis() as u64, "first token");
                }
            }
        }
        Ok(())
    }

    /// Replies to a finished generation, logs it, and keeps its cache for later prompts.
    fn finish(&mut self, r: Running) {
        let span = r.span.clone();
        let _sequence = span.enter();
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
        match r.seq.into_answer(r.cached) {
            Ok((completion, tokens)) => {
                let _ = r.reply.send(Ok(completion));
                self.prefix.insert(tokens, r.cache);
            }
            Err(e) => {
                let _ = r.reply.send(Err(e));
            }
        }
    }
}

/// The scoring jobs' share of a turn (see [`Scheduler::plan_scoring`]): by index in the line,
/// the jobs whose next pass runs in it, and those that ended (answered after the pass).
#[derive(Default)]
struct ScoreTurn {
    chosen: Vec<usize>,
    /// Rows of the chosen jobs' passes.
    rows: usize,
    ended: Vec<(usize, Result<(), EngineError>)>,
}

/// The items of `items` that `plan` names, each with its index and its `n`: a pass's plan is
/// `(index, n)` pairs in increasing index order (generations, prefill chunks, embeddings).
pub(crate) fn planned<'a, 'p, T>(
    items: &'a mut [T],
    plan: &'p [(usize, usize)],
) -> impl Iterator<Item = (usize, &'a mut T, usize)> + use<'a, 'p, T> {
    let mut items = items.iter_mut().enumerate();
    plan.iter().filter_map(move |&(want, n)| {
        items
            .by_ref()
            .find(|(i, _)| *i == want)
            .map(|(i, item)| (i, item, n))
    })
}

/// Appends the segments of the step `plan` ([`Scheduler::plan_step`]) over `running`.
fn step_segments<'a>(
    running: &'a mut [Running],
    plan: &[(usize, usize)],
    segments: &mut Vec<Segment<'a>>,
) {
    for (_, r, n) in planned(running, plan) {
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
}

/// Answers every running generation with `error`: after a failed pass their caches are in an
/// unknown state.
fn fail_running(running: &mut Vec<Running>, error: &EngineError) {
    for r in running.drain(..) {
        let _sequence = r.span.enter();
        tracing::debug!(
            generated = r.seq.generated(),
            "sequence failed with its batch"
        );
        let _ = r.reply.send(Err(EngineError::Inference(error.to_string())));
    }
}

/// Jobs received and not yet admitted: interactive ones first, each priority in the order of
/// their places in line ([`Job::line`]; the order they came where those are equal). Bulk jobs
/// take at most [`bulk_batch`] places of the batch, so the last ones are free for interactive
/// jobs when they come.
#[derive(Default)]
pub(crate) struct Waiting {
    interactive: VecDeque<Job>,
    bulk: VecDeque<Job>,
}

impl Waiting {
    /// Queues `job` behind the waiting jobs of its priority that are not behind it in line.
    /// So a bulk prediction's generation, asked once its task's scoring is done, goes before
    /// the scoring of tasks begun after that task, and the tasks begun first finish first.
    pub(crate) fn push(&mut self, job: Job) {
        let line = match job.priority {
            Priority::Interactive => &mut self.interactive,
            Priority::Bulk => &mut self.bulk,
        };
        // Most jobs are the newest in line: look from the back.
        let at = line
            .iter()
            .rposition(|waiting| waiting.line <= job.line)
            .map_or(0, |i| i + 1);
        line.insert(at, job);
    }

    /// Whether no job waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.interactive.is_empty() && self.bulk.is_empty()
    }

    /// How many jobs wait.
    pub(crate) fn len(&self) -> usize {
        self.interactive.len() + self.bulk.len()
    }

    /// Forgets the jobs whose callers stopped waiting; returns how many.
    pub(crate) fn drop_cancelled(&mut self) -> usize {
        let before = self.len();
        self.interactive.retain(|j| !j.work.is_cancelled());
        self.bulk.retain(|j| !j.work.is_cancelled());
        before - self.len()
    }

    /// The job to admit next into a batch holding `admitted` jobs of `max_batch` places, if one
    /// may be.
    pub(crate) fn next(&mut self, admitted: usize, max_batch: usize) -> Option<Job> {
        if admitted < max_batch.max(1) {
            if let Some(job) = self.interactive.pop_front() {
                return Some(job);
            }
        }
        if admitted < bulk_batch(max_batch) {
            return self.bulk.pop_front();
        }
        None
    }
}

/// What the model thread is working on: the running generations, and scoring and embedding
/// jobs, which advance one forward pass per [`Scheduler::tick`] in turn.
#[derive(Default)]
pub(crate) struct Batch {
    running: Vec<Running>,
    scoring: VecDeque<ScoreJob>,
    embedding: VecDeque<EmbedJob>,
}

impl Batch {
    /// Generations, scoring and embedding jobs admitted.
    fn len(&self) -> usize {
        self.running.len() + self.scoring.len() + self.embedding.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an interactive generation or scoring job is in the batch.
    fn has_interactive(&self) -> bool {
        self.running
            .iter()
            .any(|r| r.priority == Priority::Interactive)
            || self
                .scoring
                .iter()
                .any(|j| j.priority == Priority::Interactive)
            || self
                .embedding
                .iter()
                .any(|j| j.priority == Priority::Interactive)
    }
}

/// Runs `f`, turning a panic inside the model code into an [`EngineError::Inference`].
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
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
pub(crate) mod tests {
    use super::*;
    use crate::loading::load_parts;
    use crate::EngineConfig;
    use candle_core::Tensor;

    fn model_path() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    pub(crate) fn scheduler(requantize: bool) -> Option<(Scheduler, Arc<GgufTokenizer>)> {
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

    /// The test prompt: one English sentence `times` over, as plain tokens.
    fn fox_prompt(tok: &GgufTokenizer, times: usize) -> Vec<u32> {
        tok.encode_plain(&"The quick brown fox jumps over the lazy dog. ".repeat(times))
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
        let prompt = fox_prompt(&tok, 8);
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
        // Both round activations to 8 bits, each its own way (candle-transformers to Q8_1
        // blocks, the packed kernel as llama.cpp does; where the engine has no packed kernel
        // it computes prompts with f32 activations): single logits move by up to about one
        // (measured max 0.64, mean 0.17 with f32 activations; max 0.72, mean 0.254 through the
        // AVX2 packed kernel on an AMD EPYC); a wrong layer would move all of them by units.
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
            d < 1.5 && mean < 0.35,
            "max logit difference {d}, mean {mean}"
        );
    }

    /// Interactive jobs are admitted before bulk jobs that came earlier, and bulk jobs leave
    /// the batch's last places to interactive ones: a batch full of bulk work still takes an
    /// interactive job at once.
    #[test]
    fn interactive_jobs_jump_waiting_bulk_ones_and_keep_their_places() {
        const NAMES: [&str; 4] = ["bulk", "first interactive", "second interactive", "third"];
        let job = |priority, kind| waiting_job(priority, kind, Instant::now());
        let max_batch = 16;
        let bulk_places = bulk_batch(max_batch);
        assert!(bulk_places < max_batch);
        let mut waiting = Waiting::default();
        for _ in 0..40 {
            waiting.push(job(Priority::Bulk, NAMES[0]));
        }
        waiting.push(job(Priority::Interactive, NAMES[1]));
        let mut admitted = Vec::new();
        while let Some(j) = waiting.next(admitted.len(), max_batch) {
            admitted.push(j.kind);
        }
        assert_eq!(
            admitted[0], NAMES[1],
            "the interactive job came last and goes first"
        );
        assert_eq!(admitted.len(), bulk_places, "bulk work stops at its places");
        // A full share of bulk work: an interactive job still gets a place at once.
        waiting.push(job(Priority::Interactive, NAMES[2]));
        assert_eq!(
            waiting.next(admitted.len(), max_batch).map(|j| j.kind),
            Some(NAMES[2])
        );
        // A full batch takes nothing more; waiting bulk jobs keep their order.
        waiting.push(job(Priority::Interactive, NAMES[3]));
        assert!(waiting.next(max_batch, max_batch).is_none());
        assert_eq!(waiting.next(0, max_batch).map(|j| j.kind), Some(NAMES[3]));
        assert_eq!(waiting.next(0, max_batch).map(|j| j.kind), Some(NAMES[0]));
        // Every reply channel here is closed (the tests dropped the receivers).
        assert_eq!(waiting.drop_cancelled(), 40 - bulk_places);
        assert!(waiting.is_empty());
    }

    /// An empty scoring job of `priority`, named `kind`, at place `line`, whose caller has
    /// stopped waiting (its receiver is dropped): what [`Waiting`]'s tests queue.
    fn waiting_job(priority: Priority, kind: &'static str, line: Instant) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            kind,
            priority,
            enqueued: Instant::now(),
            line,
            span: tracing::Span::none(),
            work: Work::Score {
                questions: Vec::new(),
                reply,
            },
        }
    }

    /// A job takes its place in line by when the work it belongs to began: a task's
    /// generation, asked after the scoring of tasks begun later, goes before them; jobs with
    /// the same place keep the order they came in.
    #[test]
    fn later_steps_of_older_work_go_before_newer_work() {
        let first = Instant::now();
        let later = first + Duration::from_millis(1);
        for priority in [Priority::Bulk, Priority::Interactive] {
            let mut waiting = Waiting::default();
            waiting.push(waiting_job(priority, "second task's scoring", later));
            waiting.push(waiting_job(priority, "third task's scoring", later));
            waiting.push(waiting_job(priority, "first task's generation", first));
            waiting.push(waiting_job(priority, "second task's generation", later));
            let order: Vec<&str> = std::iter::from_fn(|| waiting.next(0, 16))
                .map(|j| j.kind)
                .collect();
            assert_eq!(
                order,
                [
                    "first task's generation",
                    "second task's scoring",
                    "third task's scoring",
                    "second task's generation"
                ],
                "{priority:?}"
            );
        }
    }

    /// Interactive work admitted beside bulk work runs alone: while it is in the batch the bulk
    /// generation gets no token and the bulk scoring job no pass; then both go on and finish.
    #[test]
    fn interactive_work_runs_alone_beside_bulk_work() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        let job = |priority, work| Job {
            kind: "test",
            priority,
            enqueued: Instant::now(),
            line: Instant::now(),
            span: tracing::Span::none(),
            work,
        };
        let generate = |n| SamplingParams {
            max_tokens: Some(n),
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let mut batch = Batch::default();
        let (reply, mut bulk_rx) = oneshot::channel();
        w.admit(
            job(
                Priority::Bulk,
                Work::Generate {
                    prompt: enc("Once upon a time"),
                    params: generate(12),
                    guide: None,
                    reply,
                },
            ),
            &mut batch,
        );
        let (reply, mut bulk_score_rx) = oneshot::channel();
        w.admit(
            job(
                Priority::Bulk,
                Work::Score {
                    questions: vec![TokenQuestion {
                        prompt: enc("Is water wet? Answer:"),
                        candidates: (1..=30).map(|i| enc(&format!(" answer {i}"))).collect(),
                    }],
                    reply,
                },
            ),
            &mut batch,
        );
        w.prefill_chunk = 16;
        w.tick(&mut batch);
        w.tick(&mut batch);
        let generated = |b: &Batch| b.running[0].seq.generated();
        let passes = |b: &Batch| b.scoring[0].state.passes;
        let (bulk_tokens, bulk_passes) = (generated(&batch), passes(&batch));
        assert!(bulk_tokens > 0 && bulk_passes > 0, "bulk work ran alone");

        let (reply, mut interactive_rx) = oneshot::channel();
        w.admit(
            job(
                Priority::Interactive,
                Work::Generate {
                    prompt: enc("The capital of France is"),
                    params: generate(3),
                    guide: None,
                    reply,
                },
            ),
            &mut batch,
        );
        let mut ticks = 0;
        let interactive = loop {
            w.tick(&mut batch);
            ticks += 1;
            if let Ok(answer) = interactive_rx.try_recv() {
                break answer;
            }
            assert!(ticks < 50, "the interactive generation never finished");
        };
        assert_eq!(interactive.unwrap().completion_tokens, 3);
        assert_eq!(generated(&batch), bulk_tokens, "the bulk generation waited");
        assert_eq!(passes(&batch), bulk_passes, "the bulk scoring job waited");
        while !batch.is_empty() {
            w.tick(&mut batch);
        }
        assert_eq!(bulk_rx.try_recv().unwrap().unwrap().completion_tokens, 12);
        assert_eq!(
            bulk_score_rx.try_recv().unwrap().unwrap()[0].probs.len(),
            30
        );
    }

    /// Scoring jobs side by side share forward passes: one turn advances every one of them
    /// (their passes fit the row budget together), and each gets the scores of scoring it
    /// alone.
    #[test]
    fn scoring_jobs_share_forward_passes() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        let questions: Vec<TokenQuestion> = [
            "Is water wet? Answer:",
            "Is fire cold? Answer:",
            "Is the sky blue on a clear day? Answer:",
            "Is ice hot? Answer:",
        ]
        .iter()
        .map(|p| TokenQuestion {
            prompt: enc(p),
            candidates: vec![enc(" yes"), enc(" no"), enc(" maybe so")],
        })
        .collect();
        let mut batch = Batch::default();
        let mut answers = Vec::new();
        for q in &questions {
            let (reply, rx) = oneshot::channel();
            w.admit(
                Job {
                    kind: "test",
                    priority: Priority::Bulk,
                    enqueued: Instant::now(),
                    line: Instant::now(),
                    span: tracing::Span::none(),
                    work: Work::Score {
                        questions: vec![q.clone()],
                        reply,
                    },
                },
                &mut batch,
            );
            answers.push(rx);
        }
        w.tick(&mut batch);
        let passes: Vec<usize> = batch.scoring.iter().map(|j| j.state.passes).collect();
        assert_eq!(
            passes,
            [1, 1, 1, 1],
            "one turn, one shared pass for every job"
        );
        let mut ticks = 1;
        while !batch.is_empty() {
            w.tick(&mut batch);
            ticks += 1;
            assert!(ticks < 20, "the scoring jobs never finished");
        }
        for (q, mut rx) in questions.iter().zip(answers) {
            let together = rx.try_recv().unwrap().unwrap();
            let alone = w.score(Instant::now(), std::slice::from_ref(q)).unwrap();
            assert_eq!(together[0].logprobs, alone[0].logprobs, "{q:?}");
        }
    }

    /// A turn runs one forward pass for everything it advances: a scoring job's pass and the
    /// running generations' step share it (a pass's fixed cost, every weight read and hundreds
    /// of kernels started, is paid once), and each gets what it gets alone.
    #[test]
    fn scoring_and_generation_share_one_pass_a_turn() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let enc = |s: &str| tok.encode_plain(s).unwrap();
        let question = TokenQuestion {
            prompt: enc("Is water wet? Answer:"),
            candidates: vec![enc(" yes"), enc(" no"), enc(" maybe so")],
        };
        let job = |work| Job {
            kind: "test",
            priority: Priority::Bulk,
            enqueued: Instant::now(),
            line: Instant::now(),
            span: tracing::Span::none(),
            work,
        };
        let generate = |reply| {
            job(Work::Generate {
                prompt: enc("The capital of France is"),
                params: SamplingParams {
                    max_tokens: Some(4),
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                guide: None,
                reply,
            })
        };
        let run = |w: &mut Scheduler, batch: &mut Batch| {
            let mut ticks = 0;
            while !batch.is_empty() {
                w.tick(batch);
                ticks += 1;
                assert!(ticks < 50, "the jobs never finished");
            }
            ticks
        };
        // Alone: the generation, then the scoring job, each its own passes.
        let mut batch = Batch::default();
        let (reply, mut alone_rx) = oneshot::channel();
        w.admit(generate(reply), &mut batch);
        run(&mut w, &mut batch);
        let alone = alone_rx.try_recv().unwrap().unwrap();
        w.prefix = PrefixCache::new(&w.model.cache_shape(), 64 << 20);
        let scores_alone = w
            .score(Instant::now(), std::slice::from_ref(&question))
            .unwrap();
        w.prefix = PrefixCache::new(&w.model.cache_shape(), 64 << 20);

        let (reply, mut generated_rx) = oneshot::channel();
        w.admit(generate(reply), &mut batch);
        let (reply, mut scores_rx) = oneshot::channel();
        w.admit(
            job(Work::Score {
                questions: vec![question.clone()],
                reply,
            }),
            &mut batch,
        );
        let before = w.metrics.forward_work().passes;
        w.tick(&mut batch);
        assert_eq!(
            w.metrics.forward_work().passes - before,
            1,
            "one turn, one forward pass"
        );
        assert_eq!(batch.scoring[0].state.passes, 1, "the scoring job advanced");
        assert!(batch.running[0].fed > 0, "the generation advanced");
        let ticks = run(&mut w, &mut batch) + 1;
        assert_eq!(
            w.metrics.forward_work().passes - before,
            ticks as u64,
            "every turn ran one pass for both"
        );
        let together = generated_rx.try_recv().unwrap().unwrap();
        assert_eq!(together.text, alone.text);
        assert_eq!(together.completion_tokens, alone.completion_tokens);
        let scores = scores_rx.try_recv().unwrap().unwrap();
        assert_eq!(scores[0].logprobs, scores_alone[0].logprobs);
    }

    #[test]
    fn chunked_prefill_matches_one_shot() {
        let Some((w, tok)) = scheduler(true) else {
            return;
        };
        let prompt = fox_prompt(&tok, 12);
        assert!(prompt.len() > 100, "{}", prompt.len());
        let whole = last_logits(&w, &prompt, usize::MAX);
        // Attention runs row by row and matmul rows are independent, so chunks of any size
        // (64 + 57: the cache and the causal limit; 1: the decode path) give the same bits.
        for chunk in [64, 7, 1] {
            assert_eq!(whole, last_logits(&w, &prompt, chunk), "chunks of {chunk}");
        }
    }

    /// The in-process pass counters (what `Engine::forward_work` reads) count every forward
    /// pass, its rows and its time: a prompt prefilled in chunks of 32 is that many passes
    /// over exactly its tokens.
    #[test]
    fn forward_work_counts_passes_rows_and_time() {
        let Some((w, tok)) = scheduler(true) else {
            return;
        };
        let prompt = fox_prompt(&tok, 12);
        let chunk = 32;
        let w = Scheduler {
            prefill_chunk: chunk,
            ..clone_scheduler(&w)
        };
        let mut cache =
            SeqCache::new(w.model.cache_shape(), prompt.len(), w.model.device()).unwrap();
        let before = w.metrics.forward_work();
        w.prefill_together(std::slice::from_mut(&mut cache), &[&prompt])
            .unwrap();
        let work = w.metrics.forward_work() - before;
        assert_eq!(work.passes, prompt.len().div_ceil(chunk) as u64);
        assert_eq!(work.rows, prompt.len() as u64);
        assert!(work.seconds > 0.0, "{work:?}");
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
            priority: Priority::Interactive,
            enqueued: Instant::now(),
            line: Instant::now(),
            span: tracing::Span::none(),
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
}
