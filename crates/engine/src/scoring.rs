//! Choice scoring: the probability of each member of a closed set of answers.
//!
//! A candidate's log-probability is the sum of its tokens' log-probabilities as a continuation
//! of the prompt (the end-of-turn token included, so that "Yes" and "Yes, but" differ);
//! probabilities are those log-probabilities normalised over the set (a softmax), which is
//! what makes a `<Choices>` prediction's `score` honest.
//!
//! On the model thread a scoring request is a job ([`ScoreJob`]) that the
//! [`Scheduler`] advances one bounded forward pass per turn of its loop: the prompt prefix
//! common to every question once (or from the prompt cache), the questions' own rests, then the
//! candidates in waves on copies of their question's cache (see [`Scheduler::begin_score`]).

use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::oneshot;

use crate::error::inference;
use crate::model::{Segment, SeqCache, Want};
use crate::scheduler::Scheduler;
use crate::{ChoiceScores, EngineError, TokenQuestion};

/// Memory for the copies of question caches that candidates are scored on, per forward pass.
const CANDIDATE_FORK_BYTES: usize = 64 << 20;

/// Prompt rows that scoring may compute more than once to save a forward pass: a pass of its
/// own costs about as much as 20 rows (dequantizing every weight once, see `Linear`).
const FUSED_REST_ROWS: usize = 20;

/// Checks a token question before it is queued.
pub(crate) fn validate(q: &TokenQuestion, context_length: usize) -> Result<(), EngineError> {
    if q.prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if q.candidates.is_empty() {
        return Err(EngineError::InvalidRequest(
            "a choice question needs at least one candidate".into(),
        ));
    }
    if q.candidates.iter().any(Vec::is_empty) {
        return Err(EngineError::InvalidRequest(
            "a candidate answer is empty".into(),
        ));
    }
    let longest = q.candidates.iter().map(Vec::len).max().unwrap_or(0);
    if q.prompt.len() + longest > context_length {
        return Err(EngineError::InvalidRequest(format!(
            "prompt ({}) plus the longest candidate ({}) exceed the context of {} tokens",
            q.prompt.len(),
            longest,
            context_length
        )));
    }
    Ok(())
}

/// Natural-log softmax of one logits row at `token` (the definition the tests check against).
#[cfg(test)]
pub(crate) fn log_softmax_at(logits: &[f32], token: u32) -> f64 {
    LogSoftmax::of(logits).at(logits, token)
}

/// A logits row's log-softmax normalizer, its maximum and the log of its shifted sum (a pass
/// over the whole vocabulary, in f64), kept apart so that any number of tokens of the row are
/// read off it as `logit − max − ln Σ exp(logit − max)`, with the same bits each time.
#[derive(Clone, Copy)]
struct LogSoftmax {
    max: f64,
    ln_sum: f64,
}

impl LogSoftmax {
    fn of(logits: &[f32]) -> Self {
        // A comparison rather than `f32::max`, whose NaN rule keeps the loop from vectorising;
        // both skip NaNs, so the maximum is the same.
        let max = logits
            .iter()
            .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a }) as f64;
        let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        Self {
            max,
            ln_sum: sum.ln(),
        }
    }

    fn at(&self, logits: &[f32], token: u32) -> f64 {
        logits[token as usize] as f64 - self.max - self.ln_sum
    }
}

/// The log-probabilities of each row's `tokens`: every row normalized once, the rows shared
/// out to candle's CPU threads (on the model thread alone, row by row for every token, these
/// passes took 3-5% of its time in a bulk candidate-evaluation `/predict`, by perf, while the
/// other core waited). Each value is the row's own, whatever the other rows (the tests check
/// it against one row alone).
fn log_probs(rows: &[(&[f32], &[u32])]) -> Vec<Vec<f64>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let out: Vec<Vec<AtomicU64>> = rows
        .iter()
        .map(|(_, tokens)| tokens.iter().map(|_| AtomicU64::new(0)).collect())
        .collect();
    crate::kernels::chunked(rows.len(), |range| {
        for i in range {
            let (logits, tokens) = rows[i];
            let norm = LogSoftmax::of(logits);
            for (slot, &t) in out[i].iter().zip(tokens) {
                slot.store(norm.at(logits, t).to_bits(), Ordering::Relaxed);
            }
        }
    });
    out.into_iter()
        .map(|row| {
            row.into_iter()
                .map(|v| f64::from_bits(v.into_inner()))
                .collect()
        })
        .collect()
}

/// The scoring passes of the model thread: a job starts in [`Scheduler::begin_score`], has one
/// forward pass a turn of the loop planned ([`Scheduler::plan_pass`]) and taken back
/// ([`Scheduler::absorb_pass`]), run together with other jobs' passes, and is answered by
/// [`Scheduler::finish_score`].
impl Scheduler {
    /// Feeds each of `tokens` into its cache in chunks (every sequence's chunks of one step in one
    /// forward, at most `prefill_chunk` prompt tokens a step, at least one chunk) and returns
    /// each one's last-position logits (tests; scoring runs [`Scheduler::prefill_step`] itself).
    #[cfg(test)]
    pub(crate) fn prefill_together(
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
    #[cfg(test)]
    fn prefill_step(
        &self,
        caches: &mut [SeqCache],
        tokens: &[&[u32]],
        state: &mut Prefill,
    ) -> Result<usize, EngineError> {
        let plan = plan_prefill(self.prefill_chunk.max(1), tokens, &state.fed);
        if plan.is_empty() {
            return Ok(0);
        }
        let out = {
            let mut segments = prefill_segments(caches, tokens, &state.fed, &plan);
            self.forward(&mut segments)?
        };
        let rows = state.absorb(&plan, out)?;
        self.metrics.prompt_tokens.increment(rows as u64);
        Ok(rows)
    }

    /// Scores each question's candidates to the end at once (tests; the model thread runs the
    /// same passes one per [`Scheduler::tick`]).
    #[cfg(test)]
    pub(crate) fn score(
        &mut self,
        enqueued: Instant,
        questions: &[TokenQuestion],
    ) -> Result<Vec<ChoiceScores>, EngineError> {
        let mut state = self.begin_score(enqueued, questions.to_vec())?;
        while !self.score_pass(&mut state)? {}
        Ok(self.finish_score(state))
    }

    /// Starts scoring each question's candidates in batched passes, one per turn of the loop
    /// ([`Scheduler::plan_pass`]): the prompt prefix common to every question (once, or from the
    /// prompt cache); then, unless the questions' own rests are short enough to ride along with
    /// every candidate, every question's rest together (each from a copy of the shared cache);
    /// then every candidate, in waves, each on a copy of its question's cache (at most
    /// `prefill_chunk` rows and [`CANDIDATE_FORK_BYTES`] of copies per pass). Each pass reads
    /// the weights once for all its rows, and every row gets the same bits whichever way it is
    /// batched.
    pub(crate) fn begin_score(
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
        self.metrics.prompt_reused(base.len());
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
            starts: Vec::new(),
            plan: Vec::new(),
            wave: Vec::new(),
            reused_rests: 0,
            logprobs,
            pending: Vec::new(),
            stage: Stage::Prefix(Prefill::new(1)),
            prefix_ms: 0,
            questions_ms: 0,
            passes: 0,
            largest_pass: 0,
        })
    }

    /// Runs the next forward pass of a scoring job alone (none when it only moves to its next
    /// stage); true when every candidate is scored and [`Scheduler::finish_score`] may answer.
    /// The model thread runs several jobs' passes together instead ([`Scheduler::plan_pass`],
    /// [`pass_segments`], [`Scheduler::absorb_pass`]).
    #[cfg(test)]
    pub(crate) fn score_pass(&mut self, s: &mut ScoreState) -> Result<bool, EngineError> {
        if self.plan_pass(s)?.is_none() {
            return Ok(true);
        }
        let out = {
            let mut segments = pass_segments(s);
            self.forward(&mut segments)?
        };
        self.absorb_pass(s, out)
    }

    /// Plans a scoring job's next forward pass, moving it through its stages as far as that
    /// takes: the rows of the pass (planned once: asked again before it ran, it is the same
    /// pass), or `None` when every candidate is scored and [`Scheduler::finish_score`] may
    /// answer. [`pass_segments`] gives the pass's segments, [`Scheduler::absorb_pass`] takes
    /// its outputs.
    pub(crate) fn plan_pass(&mut self, s: &mut ScoreState) -> Result<Option<usize>, EngineError> {
        let _enter = s.span.clone().entered();
        let chunk = self.prefill_chunk.max(1);
        loop {
            match &mut s.stage {
                Stage::Prefix(state) => {
                    let first = &s.questions[0].prompt;
                    let prefix: [&[u32]; 1] = [&first[s.reused..s.shared]];
                    if !state.done(&prefix) {
                        if s.plan.is_empty() {
                            s.plan = plan_prefill(chunk, &prefix, &state.fed);
                        }
                        return Ok(Some(planned_rows(&s.plan)));
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
                        // Each question's rest starts from the longest prompt the cache keeps
                        // that it starts with, when that goes past the shared prefix: a
                        // question asked about many tasks (its examples and instructions before
                        // the task) is computed once.
                        s.caches = Vec::with_capacity(s.questions.len());
                        s.starts = Vec::with_capacity(s.questions.len());
                        for q in &s.questions {
                            let cache = match self.prefix.lookup(&q.prompt, 0).map_err(inference)? {
                                Some(cached) if cached.len() > s.shared => cached,
                                _ => s.base.fork(q.prompt.len() - s.shared).map_err(inference)?,
                            };
                            self.metrics.prompt_reused(cache.len() - s.shared);
                            s.reused_rests += cache.len() - s.shared;
                            s.starts.push(cache.len());
                            s.caches.push(cache);
                        }
                        s.stage = Stage::Rests(Prefill::new(s.questions.len()));
                    }
                }
                Stage::Rests(state) => {
                    let rests: Vec<&[u32]> = s
                        .questions
                        .iter()
                        .zip(&s.starts)
                        .map(|(q, &start)| &q.prompt[start..])
                        .collect();
                    if !state.done(&rests) {
                        if s.plan.is_empty() {
                            s.plan = plan_prefill(chunk, &rests, &state.fed);
                        }
                        return Ok(Some(planned_rows(&s.plan)));
                    }
                    let first_logits = std::mem::replace(state, Prefill::new(0)).into_last()?;
                    let firsts: Vec<Vec<u32>> = s
                        .questions
                        .iter()
                        .map(|q| q.candidates.iter().map(|c| c[0]).collect())
                        .collect();
                    let rows: Vec<(&[f32], &[u32])> = first_logits
                        .iter()
                        .map(Vec::as_slice)
                        .zip(firsts.iter().map(Vec::as_slice))
                        .collect();
                    for (lp, got) in s.logprobs.iter_mut().zip(log_probs(&rows)) {
                        lp.copy_from_slice(&got);
                    }
                    s.begin_candidates();
                }
                Stage::Candidates => {
                    if s.wave.is_empty() {
                        if s.pending.is_empty() {
                            return Ok(None);
                        }
                        self.plan_wave(s)?;
                    }
                    return Ok(Some(s.wave.iter().map(|w| w.tokens.len()).sum()));
                }
            }
        }
    }

    /// Takes the outputs of the pass [`Scheduler::plan_pass`] planned (in the order of its
    /// [`pass_segments`]); true when every candidate is scored.
    pub(crate) fn absorb_pass(
        &mut self,
        s: &mut ScoreState,
        out: Vec<Option<Tensor>>,
    ) -> Result<bool, EngineError> {
        let _enter = s.span.clone().entered();
        let rows = match &mut s.stage {
            Stage::Prefix(state) | Stage::Rests(state) => {
                let plan = std::mem::take(&mut s.plan);
                let rows = state.absorb(&plan, out)?;
                self.metrics.prompt_tokens.increment(rows as u64);
                rows
            }
            Stage::Candidates => {
                let wave = std::mem::take(&mut s.wave);
                let rows = wave.iter().map(|w| w.tokens.len()).sum();
                let mut logits = Vec::with_capacity(wave.len());
                for (w, all) in wave.iter().zip(out) {
                    let all = all.ok_or_else(|| EngineError::Inference("no logits".into()))?;
                    let all = all.to_vec2::<f32>().map_err(inference)?;
                    logits.push((w, all));
                }
                // Fused: the rest's last row scores the first token. Else: row k, token k + 1.
                let from = usize::from(!s.fused);
                let mut scored = Vec::new();
                for (w, all) in &logits {
                    let cand = &s.questions[w.question].candidates[w.candidate];
                    let skip = if s.fused {
                        s.questions[w.question].prompt.len() - s.shared - 1
                    } else {
                        0
                    };
                    for k in from..cand.len() {
                        scored.push((all[skip + k - from].as_slice(), &cand[k..=k]));
                    }
                }
                // Each candidate's terms added in order of its tokens, as before.
                let mut terms = log_probs(&scored).into_iter().flatten();
                for (w, _) in &logits {
                    let cand = &s.questions[w.question].candidates[w.candidate];
                    for _ in from..cand.len() {
                        s.logprobs[w.question][w.candidate] += terms.next().unwrap_or_default();
                    }
                }
                rows
            }
        };
        s.record_pass(rows);
        Ok(matches!(s.stage, Stage::Candidates) && s.pending.is_empty())
    }

    /// Plans the next wave of candidates: as many as fit `prefill_chunk` rows and
    /// [`CANDIDATE_FORK_BYTES`] of cache copies (one at least), each on a copy of its
    /// question's cache.
    fn plan_wave(&mut self, s: &mut ScoreState) -> Result<(), EngineError> {
        let per_position = SeqCache::bytes_per_position(&self.model.cache_shape());
        let (mut bytes, mut rows) = (0, 0);
        while let Some(&(qi, ci)) = s.pending.last() {
            let q = &s.questions[qi];
            let cand = &q.candidates[ci];
            let lead: &[u32] = if s.fused { &q.prompt[s.shared..] } else { &[] };
            let tokens = [lead, &cand[..cand.len() - 1]].concat();
            let cost = (q.prompt.len() + cand.len()) * per_position;
            if !s.wave.is_empty()
                && (bytes + cost > CANDIDATE_FORK_BYTES
                    || rows + tokens.len() > self.prefill_chunk.max(1))
            {
                break;
            }
            bytes += cost;
            rows += tokens.len();
            let source = if s.fused { &s.base } else { &s.caches[qi] };
            let cache = source.fork(tokens.len()).map_err(inference)?;
            s.wave.push(WaveItem {
                question: qi,
                candidate: ci,
                tokens,
                cache,
            });
            s.pending.pop();
        }
        Ok(())
    }

    /// The scores of a job whose passes are done; its shared prefix, and each question's
    /// prompt when it was computed on its own, go to the prompt cache.
    pub(crate) fn finish_score(&mut self, mut s: ScoreState) -> Vec<ChoiceScores> {
        let _enter = s.span.clone().entered();
        let shared = s.shared;
        self.prefix
            .insert(s.questions[0].prompt[..shared].to_vec(), s.base);
        for (q, cache) in s.questions.iter().zip(std::mem::take(&mut s.caches)) {
            self.prefix.insert(q.prompt.clone(), cache);
        }
        let out: Vec<ChoiceScores> = s
            .logprobs
            .into_iter()
            .zip(&s.questions)
            .map(|(lp, q)| ChoiceScores::from_logprobs(lp, q.prompt.len()))
            .collect();
        tracing::info!(
            shared_prefix = shared,
            reused = s.reused,
            reused_rests = s.reused_rests,
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

/// The next chunk of each of `tokens` (of which `fed` are in their caches already) while a
/// pass's budget of `chunk` rows lasts, one chunk at least: (index, tokens this pass). A prompt
/// is cut at fixed multiples of `chunk` from where it starts, whatever else runs.
fn plan_prefill(chunk: usize, tokens: &[&[u32]], fed: &[usize]) -> Vec<(usize, usize)> {
    let mut budget = chunk;
    let mut plan = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let n = (t.len() - fed[i]).min(chunk);
        if n == 0 || (n > budget && !plan.is_empty()) {
            continue;
        }
        budget = budget.saturating_sub(n);
        plan.push((i, n));
    }
    plan
}

/// Rows of a planned prefill pass.
fn planned_rows(plan: &[(usize, usize)]) -> usize {
    plan.iter().map(|&(_, n)| n).sum()
}

/// The segments of a planned prefill pass over `caches`.
fn prefill_segments<'a>(
    caches: &'a mut [SeqCache],
    tokens: &[&'a [u32]],
    fed: &[usize],
    plan: &[(usize, usize)],
) -> Vec<Segment<'a>> {
    crate::scheduler::planned(caches, plan)
        .map(|(i, cache, n)| {
            let t: &'a [u32] = tokens[i];
            let ends = fed[i] + n == t.len();
            Segment {
                cache,
                tokens: &t[fed[i]..fed[i] + n],
                want: if ends { Want::Last } else { Want::Nothing },
                prompt: true,
            }
        })
        .collect()
}

/// The segments of the pass [`Scheduler::plan_pass`] planned for `s` (none when it planned
/// none): the model thread runs several jobs' segments in one forward.
pub(crate) fn pass_segments(s: &mut ScoreState) -> Vec<Segment<'_>> {
    let ScoreState {
        questions,
        stage,
        base,
        caches,
        starts,
        plan,
        wave,
        reused,
        shared,
        ..
    } = s;
    let questions: &Vec<TokenQuestion> = questions;
    match stage {
        Stage::Prefix(state) => {
            let prefix: &[u32] = &questions[0].prompt[*reused..*shared];
            prefill_segments(std::slice::from_mut(base), &[prefix], &state.fed, plan)
        }
        Stage::Rests(state) => {
            let rests: Vec<&[u32]> = questions
                .iter()
                .zip(starts.iter())
                .map(|(q, &start)| &q.prompt[start..])
                .collect();
            prefill_segments(caches, &rests, &state.fed, plan)
        }
        Stage::Candidates => wave
            .iter_mut()
            .map(|w| Segment {
                cache: &mut w.cache,
                tokens: &w.tokens,
                want: Want::All,
                prompt: true,
            })
            .collect(),
    }
}

/// One candidate of a planned wave: the rows it runs (its question's rest when fused, then the
/// candidate but its last token) on its own copy of the cache.
pub(crate) struct WaveItem {
    question: usize,
    candidate: usize,
    tokens: Vec<u32>,
    cache: SeqCache,
}

/// A scoring job in progress and the channel its answer goes back on.
pub(crate) struct ScoreJob {
    /// Where it stands.
    pub(crate) state: ScoreState,
    /// Where its scores go.
    pub(crate) reply: oneshot::Sender<Result<Vec<ChoiceScores>, EngineError>>,
    /// While interactive jobs are in the batch, bulk ones wait.
    pub(crate) priority: crate::Priority,
}

/// Where a scoring job stands (see [`Scheduler::begin_score`]).
pub(crate) struct ScoreState {
    questions: Vec<TokenQuestion>,
    /// The job's span (`engine.score`, inside the caller's), entered for its every pass.
    pub(crate) span: tracing::Span,
    start: Instant,
    /// Prompt tokens common to every question.
    shared: usize,
    /// Of those, tokens the prompt cache had.
    reused: usize,
    /// The shared prefix's cache.
    base: SeqCache,
    /// Whether each candidate carries its question's rest (see [`Scheduler::plan_pass`]).
    fused: bool,
    /// Each question's cache after its rest, when not fused.
    caches: Vec<SeqCache>,
    /// Where each question's rest starts (its cache's length before it), when not fused.
    starts: Vec<usize>,
    /// The planned prefill pass of the current stage, (sequence, tokens); empty when none is.
    plan: Vec<(usize, usize)>,
    /// The planned wave of candidates; empty when none is.
    wave: Vec<WaveItem>,
    /// Prompt tokens of the questions' rests the prompt cache had.
    reused_rests: usize,
    /// Summed log-probabilities so far, by question and candidate.
    logprobs: Vec<Vec<f64>>,
    /// (question, candidate) still to score, the next one last.
    pending: Vec<(usize, usize)>,
    stage: Stage,
    prefix_ms: u64,
    questions_ms: u64,
    /// Forward passes run so far.
    pub(crate) passes: usize,
    /// Rows (tokens) of the largest pass so far: `prefill_chunk` at most, or one candidate
    /// longer than that alone.
    pub(crate) largest_pass: usize,
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

    /// Records what a pass of `plan` (sequence, tokens fed) gave back, in the plan's order: the
    /// tokens fed, and the last-position logits of the sequences it asked them of; answers the
    /// rows (tokens) it ran.
    fn absorb(
        &mut self,
        plan: &[(usize, usize)],
        out: Vec<Option<Tensor>>,
    ) -> Result<usize, EngineError> {
        for (&(i, n), logits) in plan.iter().zip(out) {
            self.fed[i] += n;
            if let Some(l) = logits {
                self.last[i] = Some(
                    l.squeeze(0)
                        .and_then(|l| l.to_vec1::<f32>())
                        .map_err(inference)?,
                );
            }
        }
        Ok(planned_rows(plan))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::scheduler;

    #[test]
    fn probabilities_are_a_softmax_of_logprobs() {
        let s = ChoiceScores::from_logprobs(vec![(0.5f64).ln(), (0.25f64).ln(), (0.25f64).ln()], 3);
        assert!((s.probs[0] - 0.5).abs() < 1e-12);
        assert!((s.probs[1] - 0.25).abs() < 1e-12);
        assert_eq!(s.best(), 0);
        // Unnormalised inputs are normalised over the set.
        let s = ChoiceScores::from_logprobs(vec![-10.0, -10.0 + (3f64).ln()], 3);
        assert!((s.probs[1] - 0.75).abs() < 1e-12, "{:?}", s.probs);
        assert_eq!(s.best(), 1);
    }

    #[test]
    fn log_softmax_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for t in 0..3 {
            let want = (logits[t] as f64).exp() / z;
            assert!((log_softmax_at(&logits, t as u32).exp() - want).abs() < 1e-9);
        }
    }

    /// Rows normalized once and shared out to the CPU threads give [`log_softmax_at`]'s bits,
    /// for every token asked of a row, whatever the number of rows.
    #[test]
    fn log_probs_of_many_rows_equal_each_row_alone() {
        let rows: Vec<Vec<f32>> = (0..7)
            .map(|r| {
                (0..3000)
                    .map(|i| ((i * 7919 + r * 104_729) % 2039) as f32 / 97.0 - 10.0)
                    .collect()
            })
            .collect();
        let tokens: Vec<Vec<u32>> = (0..7u32).map(|r| vec![r, 2999 - r, 1500]).collect();
        let asked: Vec<(&[f32], &[u32])> = rows
            .iter()
            .map(Vec::as_slice)
            .zip(tokens.iter().map(Vec::as_slice))
            .collect();
        for n in [1, 2, 7] {
            let got = log_probs(&asked[..n]);
            for ((row, tokens), got) in asked[..n].iter().zip(got) {
                let want: Vec<u64> = tokens
                    .iter()
                    .map(|&t| log_softmax_at(row, t).to_bits())
                    .collect();
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            }
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = TokenQuestion {
            prompt: vec![1, 2],
            candidates: vec![vec![3], vec![4, 5]],
        };
        validate(&ok, 10).unwrap();
        let err = |q: TokenQuestion| validate(&q, 4).unwrap_err().to_string();
        assert!(err(TokenQuestion {
            prompt: vec![],
            ..ok.clone()
        })
        .contains("empty"));
        assert!(err(TokenQuestion {
            candidates: vec![],
            ..ok.clone()
        })
        .contains("at least one"));
        assert!(err(TokenQuestion {
            candidates: vec![vec![]],
            ..ok.clone()
        })
        .contains("empty"));
        assert!(err(TokenQuestion {
            prompt: vec![1, 2, 3],
            ..ok.clone()
        })
        .contains("exceed"));
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
