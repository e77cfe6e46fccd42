//! Embeddings on the model thread: a text's vector is the mean, over its tokens, of the model's
//! final (normalized) hidden state, scaled to unit length, as OpenAI's embeddings are (so a dot
//! product is the cosine similarity).
//!
//! Every position's state is needed, so a text runs from an empty cache (no cached prefix can
//! stand in for it), in chunks cut at fixed multiples of the step budget from its start: a
//! text's vector is bit-for-bit the same alone or beside others. An embedding job advances one
//! bounded forward pass per turn of the model thread, several of its texts side by side while
//! the pass's row budget lasts, taking turns with scoring and generation like a scoring job.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::inference;
use crate::model::{Segment, SeqCache, Want};
use crate::scheduler::Scheduler;
use crate::{Embedding, EngineError, Priority};

/// An embedding request on the model thread.
pub(crate) struct EmbedJob {
    /// The texts' token ids.
    inputs: Vec<Vec<u32>>,
    /// Texts not started yet, in order.
    pending: VecDeque<usize>,
    /// Texts under way.
    active: Vec<Active>,
    /// Finished vectors, by input.
    done: Vec<Option<Embedding>>,
    /// Admitted at this priority (interactive work runs alone, see `Scheduler::tick`).
    pub(crate) priority: Priority,
    /// `engine.embed`, inside the caller's span.
    pub(crate) span: tracing::Span,
    pub(crate) reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    enqueued: Instant,
    passes: usize,
}

/// One text under way: its cache and the sum of the hidden states computed so far.
struct Active {
    input: usize,
    cache: SeqCache,
    fed: usize,
    sum: Vec<f32>,
}

impl EmbedJob {
    /// A job for `inputs` (each non-empty and within the context: checked by the caller).
    pub(crate) fn new(
        inputs: Vec<Vec<u32>>,
        priority: Priority,
        enqueued: Instant,
        reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    ) -> EmbedJob {
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        let span = tracing::info_span!("engine.embed", inputs = inputs.len(), tokens);
        EmbedJob {
            pending: (0..inputs.len()).collect(),
            done: vec![None; inputs.len()],
            inputs,
            active: Vec::new(),
            priority,
            span,
            reply,
            enqueued,
            passes: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.pending.is_empty() && self.active.is_empty()
    }
}

impl Scheduler {
    /// One forward pass of `job`: the next chunk of each text under way, then new texts while
    /// the pass's row budget (`prefill_chunk`) lasts (the first chunk always runs). Answers
    /// whether the job is done.
    pub(crate) fn embed_pass(&mut self, job: &mut EmbedJob) -> Result<bool, EngineError> {
        let chunk = self.prefill_chunk.max(1);
        let span = job.span.clone();
        let _embed = span.enter();
        let mut budget = chunk;
        // (index in `active`, tokens this pass)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let next = |a: &Active, len: usize| (len - a.fed).min(chunk - a.fed % chunk);
        for (i, a) in job.active.iter().enumerate() {
            let n = next(a, job.inputs[a.input].len());
            if n > budget && !plan.is_empty() {
                break;
            }
            budget = budget.saturating_sub(n);
            plan.push((i, n));
        }
        if plan.len() == job.active.len() {
            while budget > 0 || plan.is_empty() {
                let Some(input) = job.pending.pop_front() else {
                    break;
                };
                let len = job.inputs[input].len();
                let n = len.min(chunk);
                if n > budget && !plan.is_empty() {
                    // Too long for what is left of this pass: it starts the next one.
                    job.pending.push_front(input);
                    break;
                }
                let cache = SeqCache::new(self.model.cache_shape(), len, self.model.device())
                    .map_err(inference)?;
                job.active.push(Active {
                    input,
                    cache,
                    fed: 0,
                    sum: Vec::new(),
                });
                budget = budget.saturating_sub(n);
                plan.push((job.active.len() - 1, n));
            }
        }
        let pooled = {
            let EmbedJob { inputs, active, .. } = &mut *job;
            let mut wanted = plan.iter().peekable();
            let mut segments: Vec<Segment<'_>> = Vec::with_capacity(plan.len());
            for (i, a) in active.iter_mut().enumerate() {
                let Some(&&(pi, n)) = wanted.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                wanted.next();
                segments.push(Segment {
                    cache: &mut a.cache,
                    tokens: &inputs[a.input][a.fed..a.fed + n],
                    want: Want::Pooled,
                    prompt: true,
                });
            }
            self.model.forward(&mut segments).map_err(inference)?
        };
        job.passes += 1;
        self.metrics
            .prompt_tokens
            .increment(plan.iter().map(|&(_, n)| n as u64).sum());
        for (&(i, n), sum) in plan.iter().zip(pooled) {
            let sum = sum
                .ok_or_else(|| EngineError::Inference("a pooled row is missing".into()))?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(inference)?;
            let a = &mut job.active[i];
            if a.sum.is_empty() {
                a.sum = sum;
            } else {
                a.sum.iter_mut().zip(&sum).for_each(|(s, x)| *s += x);
            }
            a.fed += n;
        }
        let mut i = 0;
        while i < job.active.len() {
            let len = job.inputs[job.active[i].input].len();
            if job.active[i].fed == len {
                let a = job.active.swap_remove(i);
                job.done[a.input] = Some(Embedding {
                    vector: unit_mean(a.sum, len),
                    tokens: len,
                });
            } else {
                i += 1;
            }
        }
        // `swap_remove` moved texts around: keep them in input order, so that every pass
        // plans them the same way.
        job.active.sort_by_key(|a| a.input);
        let done = job.is_done();
        if done {
            tracing::debug!(
                passes = job.passes,
                total_ms = job.enqueued.elapsed().as_millis() as u64,
                "embeddings done"
            );
        }
        Ok(done)
    }

    /// The embedding jobs' part of a turn: the first that may run (only interactive ones when
    /// `interactive`) advances one pass and goes to the back of the line; a finished or failed
    /// job is answered.
    pub(crate) fn embed_turn(&mut self, jobs: &mut VecDeque<EmbedJob>, interactive: bool) {
        let Some(at) = jobs
            .iter()
            .position(|j| !interactive || j.priority == Priority::Interactive)
        else {
            return;
        };
        let mut job = jobs.remove(at).expect("the position was just found");
        match crate::scheduler::guarded(|| self.embed_pass(&mut job)) {
            Ok(true) => {
                let EmbedJob { reply, done, .. } = job;
                let _ = reply.send(Ok(done.into_iter().flatten().collect()));
            }
            Ok(false) => jobs.push_back(job),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
}

/// `sum / len`, scaled to unit length (a zero vector stays zero).
fn unit_mean(mut sum: Vec<f32>, len: usize) -> Vec<f32> {
    let len = len.max(1) as f32;
    sum.iter_mut().for_each(|x| *x /= len);
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        sum.iter_mut().for_each(|x| *x /= norm);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::scheduler;

    /// The vector of `tokens` computed with a step budget of `chunk` tokens.
    fn embed_with_chunk(w: &mut Scheduler, tokens: &[u32], chunk: usize) -> (Vec<f32>, usize) {
        w.prefill_chunk = chunk;
        let (reply, _rx) = oneshot::channel();
        let mut job = EmbedJob::new(
            vec![tokens.to_vec(), tokens[..7].to_vec()],
            Priority::Interactive,
            Instant::now(),
            reply,
        );
        let mut passes = 0;
        while !w.embed_pass(&mut job).unwrap() {
            passes += 1;
        }
        (job.done[0].take().unwrap().vector, passes + 1)
    }

    /// A text cut into many chunks (its hidden states summed across passes) gets the vector it
    /// gets in one pass, up to the last bits of the matmuls' different shapes.
    #[test]
    fn chunks_sum_to_the_one_pass_mean() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        let tokens = tok
            .encode_plain(&"Embeddings average every position's state. ".repeat(8))
            .unwrap();
        assert!(tokens.len() > 64, "{}", tokens.len());
        let (whole, one) = embed_with_chunk(&mut w, &tokens, 512);
        let (cut, many) = embed_with_chunk(&mut w, &tokens, 16);
        assert_eq!(one, 1, "both texts fit one 512-row pass");
        assert!(many > tokens.len() / 16, "{many} passes of 16 rows");
        let diff = whole
            .iter()
            .zip(&cut)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 2e-3, "max difference {diff}");
    }

    #[test]
    fn the_mean_is_scaled_to_unit_length() {
        let v = unit_mean(vec![6.0, 8.0], 2);
        assert!(
            (v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6,
            "{v:?}"
        );
        assert_eq!(unit_mean(vec![0.0, 0.0], 3), vec![0.0, 0.0]);
    }
}
