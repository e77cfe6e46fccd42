//! The model thread: owns the weights and runs requests.
//!
//! First version: one request at a time. The loop is split into a [`Sequence`] (all per-request
//! state: tokens, sampler, detokenizer, stop conditions) and the thread's [`Worker`] that feeds
//! sequences through the model, so that continuous batching later only changes
//! [`Worker::run`] (admit several sequences, step them together), not the per-sequence logic.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokio::sync::{mpsc, oneshot};
use tracing::field::Empty;

use crate::tokenizer::{GgufTokenizer, IncrementalDecoder};
use crate::{Completion, EngineError, FinishReason, SamplingParams};

/// Prompt tokens per forward during prefill: bounds the attention score matrix
/// (heads x chunk x context floats) while keeping matmuls large.
pub(crate) const PREFILL_CHUNK: usize = 512;

/// A request as queued for the model thread.
pub(crate) struct Job {
    pub(crate) kind: &'static str,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) enqueued: Instant,
    pub(crate) reply: oneshot::Sender<Result<Completion, EngineError>>,
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
}

impl Sequence {
    fn new(prompt: Vec<u32>, params: &SamplingParams, context_length: usize) -> Self {
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

    /// Samples the next token from `logits` (1-D, vocabulary size) and updates the state.
    fn step(
        &mut self,
        logits: &Tensor,
        tok: &GgufTokenizer,
        eos: &HashSet<u32>,
    ) -> Result<u32, EngineError> {
        let next = self.sampler.sample(logits).map_err(inference)?;
        self.tokens.push(next);
        if eos.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(next);
        }
        let piece = self.decoder.push(tok, next)?;
        if !piece.is_empty() {
            let old_len = self.text.len();
            self.text.push_str(&piece);
            if let Some(cut) = self.find_stop(old_len) {
                self.text.truncate(cut);
                self.finish = Some(FinishReason::Stop);
                return Ok(next);
            }
        }
        self.check_length();
        Ok(next)
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

fn inference(e: candle_core::Error) -> EngineError {
    EngineError::Inference(e.to_string())
}

/// Owns the model on the dedicated thread.
pub(crate) struct Worker {
    pub(crate) model: ModelWeights,
    pub(crate) tokenizer: Arc<GgufTokenizer>,
    pub(crate) eos: HashSet<u32>,
    pub(crate) context_length: usize,
    pub(crate) device: Device,
    /// Prompt tokens per prefill forward ([`PREFILL_CHUNK`]; tests vary it).
    pub(crate) prefill_chunk: usize,
}

impl Worker {
    /// Serves jobs until every sender is dropped.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            if job.reply.is_closed() {
                tracing::debug!("request cancelled before it started");
                continue;
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate(&job)))
                .unwrap_or_else(|panic| {
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
            let _ = job.reply.send(result);
        }
        tracing::debug!("engine queue closed; model thread exits");
    }

    fn forward(&mut self, tokens: &[u32], index_pos: usize) -> Result<Tensor, EngineError> {
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(inference)?;
        let logits = self.model.forward(&input, index_pos).map_err(inference)?;
        logits
            .squeeze(0)
            .and_then(|l| l.to_dtype(DType::F32))
            .map_err(inference)
    }

    /// Runs the prompt through the model in chunks; returns the last position's logits.
    /// index_pos 0 on the first chunk resets quantized_llama's KV cache.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Tensor, EngineError> {
        let mut logits = None;
        let mut pos = 0;
        while pos < prompt.len() {
            let end = (pos + self.prefill_chunk.max(1)).min(prompt.len());
            logits = Some(self.forward(&prompt[pos..end], pos)?);
            pos = end;
        }
        logits.ok_or_else(|| EngineError::InvalidRequest("empty prompt".into()))
    }

    fn generate(&mut self, job: &Job) -> Result<Completion, EngineError> {
        let span = tracing::info_span!(
            "engine.generate",
            kind = job.kind,
            prompt_tokens = job.prompt.len(),
            completion_tokens = Empty,
            finish_reason = Empty,
            queue_ms = job.enqueued.elapsed().as_millis() as u64,
            prefill_ms = Empty,
            decode_ms = Empty,
        );
        let _enter = span.enter();
        let start = Instant::now();
        let mut seq = Sequence::new(job.prompt.clone(), &job.params, self.context_length);
        if seq.prompt_len == 0 {
            return Err(EngineError::InvalidRequest("empty prompt".into()));
        }
        if seq.prompt_len >= self.context_length {
            return Err(EngineError::InvalidRequest(format!(
                "prompt is {} tokens but the context holds {} (at least one must remain for the completion)",
                seq.prompt_len, self.context_length
            )));
        }

        let mut prefill_time = std::time::Duration::ZERO;
        if seq.finish.is_none() {
            let mut logits = self.prefill(&seq.tokens)?;
            prefill_time = start.elapsed();
            loop {
                let next = seq.step(&logits, &self.tokenizer, &self.eos)?;
                if seq.finish.is_some() {
                    break;
                }
                if job.reply.is_closed() {
                    return Err(EngineError::Stopped);
                }
                let pos = seq.tokens.len() - 1;
                logits = self.forward(&[next], pos)?;
            }
        }

        let total = start.elapsed();
        let finish_reason = seq.finish.unwrap_or(FinishReason::Length);
        let completion = Completion {
            completion_tokens: seq.generated(),
            prompt_tokens: seq.prompt_len,
            finish_reason,
            text: seq.text,
        };
        let decode_time = total.saturating_sub(prefill_time);
        span.record("completion_tokens", completion.completion_tokens);
        span.record("finish_reason", tracing::field::debug(finish_reason));
        span.record("prefill_ms", prefill_time.as_millis() as u64);
        span.record("decode_ms", decode_time.as_millis() as u64);
        tracing::info!(
            prompt_tokens = completion.prompt_tokens,
            completion_tokens = completion.completion_tokens,
            prompt_tok_s = completion.prompt_tokens as f64 / prefill_time.as_secs_f64().max(1e-9),
            decode_tok_s = completion.completion_tokens.saturating_sub(1) as f64
                / decode_time.as_secs_f64().max(1e-9),
            total_ms = total.as_millis() as u64,
            "generation done"
        );
        Ok(completion)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_parts, EngineConfig};

    #[test]
    fn chunked_prefill_matches_one_shot() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("SKIP: model file {} is missing", path.display());
            return;
        }
        let loaded = load_parts(&EngineConfig {
            model_path: path,
            model_id: "test".into(),
            max_queue: 1,
            threads: Some(2),
            max_context: None,
            requantize: true,
        })
        .unwrap();
        let mut worker = loaded.worker;
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(12);
        let prompt = loaded.tokenizer.encode_plain(&text).unwrap();
        assert!(prompt.len() > 100, "{}", prompt.len());
        let last = |w: &mut Worker, chunk: usize| {
            w.prefill_chunk = chunk;
            w.prefill(&prompt).unwrap().to_vec1::<f32>().unwrap()
        };
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
        };
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let whole = last(&mut worker, usize::MAX);
        // Two chunks (64 + 57), both large enough for the same batched matmul kernel as the
        // whole prompt: exercises the KV cache + rectangular mask and must agree bit for bit
        // (measured: 0.0).
        let chunked = last(&mut worker, 64);
        assert!(
            max_diff(&whole, &chunked) < 1e-3,
            "{}",
            max_diff(&whole, &chunked)
        );
        // Token by token (the decode path): candle uses another quantized matmul kernel for
        // small batches, so logits differ by quantization noise (measured max 0.6) but the
        // choice must not.
        let single = last(&mut worker, 1);
        assert_eq!(argmax(&whole), argmax(&single));
        assert!(
            max_diff(&whole, &single) < 2.0,
            "{}",
            max_diff(&whole, &single)
        );
    }
}
