//! Embeddings on the model thread: a text's vector is the mean, over its tokens, of the model's
//! final (normalized) hidden state, scaled to unit length, as OpenAI's embeddings are (so a dot
//! product is the cosine similarity).
//!
//! Every position's state is needed, so a text runs from an empty cache (no cached prefix can
//! stand in for it), in chunks cut at fixed multiples of the step budget from its start: a
//! text's vector is bit-for-bit the same alone or beside others. Each turn of the model thread
//! runs one bounded forward pass for the embedding jobs, texts of several jobs side by side
//! while the pass's row budget lasts (as scoring jobs share theirs), taking turns with scoring
//! and generation.

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
    /// One forward pass of `job` alone (see [`Scheduler::embed_pass_many`]). Answers whether
    /// the job is done.
    #[cfg(test)]
    pub(crate) fn embed_pass(&mut self, job: &mut EmbedJob) -> Result<bool, EngineError> {
        Ok(self
            .embed_pass_many(&mut [job])?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Plans `job`'s part of a pass within `budget` rows: the next chunk of each text under way,
    /// then new texts while the budget lasts; with `first`, at least one chunk runs whatever
    /// the budget. Answers (index in `active`, tokens) per text taking part.
    fn plan_embed(
        &self,
        job: &mut EmbedJob,
        chunk: usize,
        budget: &mut usize,
        first: bool,
    ) -> Result<Vec<(usize, usize)>, EngineError> {
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let next = |a: &Active, len: usize| (len - a.fed).min(chunk - a.fed % chunk);
        let may_overrun = |plan: &Vec<(usize, usize)>| first && plan.is_empty();
        for (i, a) in job.active.iter().enumerate() {
            let n = next(a, job.inputs[a.input].len());
            if n > *budget && !may_overrun(&plan) {
                return Ok(plan);
            }
            *budget = budget.saturating_sub(n);
            plan.push((i, n));
        }
        while *budget > 0 || may_overrun(&plan) {
            let Some(input) = job.pending.pop_front() else {
                break;
            };
            let len = job.inputs[input].len();
            let n = len.min(chunk);
            if n > *budget && !may_overrun(&plan) {
                // Too long for what is left of this pass: it starts a later one.
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
            *budget = budget.saturating_sub(n);
            plan.push((job.active.len() - 1, n));
        }
        Ok(plan)
    }

    /// One forward pass over `jobs`, in order, while the pass's row budget (`prefill_chunk`)
    /// lasts (the first job's next chunk always runs): many small embedding requests (one per
    /// task of a bulk prediction) share a pass as scoring jobs do. Answers, per job, whether
    /// it is done; a failed forward fails them all (their caches are in an unknown state).
    pub(crate) fn embed_pass_many(
        &mut self,
        jobs: &mut [&mut EmbedJob],
    ) -> Result<Vec<bool>, EngineError> {
        let chunk = self.prefill_chunk.max(1);
        let mut budget = chunk;
        let mut plans: Vec<Vec<(usize, usize)>> = Vec::with_capacity(jobs.len());
        for (k, job) in jobs.iter_mut().enumerate() {
            let plan = if k > 0 && budget == 0 {
                Vec::new()
            } else {
                self.plan_embed(job, chunk, &mut budget, k == 0)?
            };
            plans.push(plan);
        }
        let pooled = {
            let mut segments: Vec<Segment<'_>> = Vec::new();
            for (job, plan) in jobs.iter_mut().zip(&plans) {
                let EmbedJob { inputs, active, .. } = &mut **job;
                for (_, a, n) in crate::scheduler::planned(active, plan) {
                    segments.push(Segment {
                        cache: &mut a.cache,
                        tokens: &inputs[a.input][a.fed..a.fed + n],
                        want: Want::Pooled,
                        prompt: true,
                    });
                }
            }
            self.forward(&mut segments)?
        };
        self.metrics
            .prompt_tokens
            .increment(plans.iter().flatten().map(|&(_, n)| n as u64).sum());
        let mut pooled = pooled.into_iter();
        let mut done = Vec::with_capacity(jobs.len());
        for (job, plan) in jobs.iter_mut().zip(&plans) {
            if !plan.is_empty() {
                job.passes += 1;
            }
            for &(i, n) in plan {
                let sum = pooled
                    .next()
                    .flatten()
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
            let finished = job.is_done();
            if finished {
                let _embed = job.span.enter();
                tracing::debug!(
                    passes = job.passes,
                    total_ms = job.enqueued.elapsed().as_millis() as u64,
                    "embeddings done"
                );
            }
            done.push(finished);
        }
        Ok(done)
    }

    /// The embedding jobs' part of a turn: the jobs that may run (only interactive ones when
    /// `interactive`), in order, share one pass while its row budget lasts; finished or failed
    /// jobs are answered, the others wait for the next turn in their places.
    pub(crate) fn embed_turn(&mut self, jobs: &mut VecDeque<EmbedJob>, interactive: bool) {
        let eligible: Vec<usize> = (0..jobs.len())
            .filter(|&i| !interactive || jobs[i].priority == Priority::Interactive)
            .collect();
        if eligible.is_empty() {
            return;
        }
        let outcome = {
            let mut chosen: Vec<&mut EmbedJob> = jobs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| eligible.contains(i))
                .map(|(_, j)| j)
                .collect();
            crate::scheduler::guarded(|| self.embed_pass_many(&mut chosen))
        };
        match outcome {
            Ok(done) => {
                for (&i, finished) in eligible.iter().zip(done).rev() {
                    if finished {
                        let job = jobs.remove(i).expect("an eligible index");
                        let EmbedJob { reply, done, .. } = job;
                        let _ = reply.send(Ok(done.into_iter().flatten().collect()));
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                for &i in eligible.iter().rev() {
                    let job = jobs.remove(i).expect("an eligible index");
                    let _ = job.reply.send(Err(EngineError::Inference(message.clone())));
                }
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

    /// Many one-text jobs (a bulk prediction embeds each task alone) share one pass: a turn
    /// answers all that fit its row budget, each with the vector it gets alone, bit for bit.
    #[test]
    fn small_jobs_share_a_pass_and_get_their_own_vectors() {
        let Some((mut w, tok)) = scheduler(true) else {
            return;
        };
        w.prefill_chunk = 512;
        let texts = [
            "Is this spam?",
            "Where is Peru?",
            "Who wrote Hamlet, and when?",
        ];
        let job = |text: &str| {
            let (reply, rx) = oneshot::channel();
            let tokens = tok.encode_plain(text).unwrap();
            (
                EmbedJob::new(vec![tokens], Priority::Bulk, Instant::now(), reply),
                rx,
            )
        };
        let alone: Vec<Vec<f32>> = texts
            .iter()
            .map(|t| {
                let (mut j, _rx) = job(t);
                assert!(w.embed_pass(&mut j).unwrap(), "one pass alone");
                j.done[0].take().unwrap().vector
            })
            .collect();
        let mut queue = VecDeque::new();
        let mut answers = Vec::new();
        for t in texts {
            let (j, rx) = job(t);
            queue.push_back(j);
            answers.push(rx);
        }
        w.embed_turn(&mut queue, false);
        assert!(queue.is_empty(), "every job answered after one turn");
        for (mut rx, vector) in answers.into_iter().zip(alone) {
            let got = rx.try_recv().unwrap().unwrap();
            assert_eq!(got[0].vector, vector, "the same vector as alone");
        }
        // With a budget of one text per pass, the next job waits its turn.
        w.prefill_chunk = tok.encode_plain("Is this spam?").unwrap().len();
        let (first, mut first_rx) = job("Is this spam?");
        let (second, mut second_rx) = job("Where is Peru?");
        let mut queue = VecDeque::from([first, second]);
        w.embed_turn(&mut queue, false);
        assert_eq!(queue.len(), 1, "one job per pass of its size");
        assert!(first_rx.try_recv().is_ok(), "the first job finishes first");
        while !queue.is_empty() {
            w.embed_turn(&mut queue, false);
        }
        assert!(second_rx.try_recv().unwrap().is_ok());
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
