//! How an engine is configured: the model to load, queue and batch sizes, caches, threads,
//! device ([`EngineConfig`]), and the bounds on one request's size ([`RequestLimits`]).
//!
//! Plain data, read by [`Engine::load`](crate::Engine::load) and checked on every request.

use std::path::PathBuf;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Local GGUF file.
    pub model_path: PathBuf,
    /// Name reported in responses, e.g. `"SmolLM2-135M-Instruct"`.
    pub model_id: String,
    /// Requests admitted at once, waiting or running; more fail with
    /// [`EngineError::Overloaded`](crate::EngineError::Overloaded) (the HTTP layers answer
    /// 429). At least 1 is used.
    pub max_queue: usize,
    /// Sequences generated together in one batch at most (continuous batching); at least 1.
    pub max_batch: usize,
    /// Memory for caches of recent prompts, reused by requests that start the same way
    /// (prompt caching); 0 turns it off.
    pub prefix_cache_bytes: usize,
    /// CPU threads for candle; `None` leaves candle's default (physical cores, or the
    /// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` environment variables).
    ///
    /// candle's CPU thread pools are process-wide and sized once, at the first tensor
    /// operation of the process. [`Engine::load`](crate::Engine::load) therefore sets
    /// `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS` before it touches any tensor; this only
    /// takes effect if no candle (or global rayon) work ran earlier in the process, and it
    /// applies to every engine of the process.
    pub threads: Option<usize>,
    /// Cap on context tokens (prompt + completion); `None` means the GGUF's context length.
    /// See [`Engine::context_length`](crate::Engine::context_length) for the other caps.
    pub max_context: Option<usize>,
    /// Requantize Q4_1, Q5_0 and Q5_1 weights, which candle computes without SIMD, to Q8_0 at
    /// load: much faster, slightly more memory, answers close to the original. Weights the
    /// packed kernel runs ([`packed_kernel`](crate::packed_kernel)) stay as they are (Q4_K
    /// too); other k-quant matrices (Q6_K, ...) become Q8_0 where it runs, for it to run them.
    pub requantize: bool,
    /// Where the model runs: `"cpu"`, `"cuda"` (the first GPU) or `"cuda:N"`. CUDA needs a build
    /// with the `cuda` feature; the CPU runs batchlab's own kernels and row-wise attention.
    pub device: String,
    /// Bounds on one request's size ([`RequestLimits::default`] unless a deployment needs
    /// other values); larger requests fail with
    /// [`EngineError::InvalidRequest`](crate::EngineError::InvalidRequest).
    pub limits: RequestLimits,
}

impl EngineConfig {
    /// Places of the batch ([`EngineConfig::max_batch`]) that [`Priority::Bulk`] requests may
    /// take: all but an eighth (at least one when the batch has two places or more), which are
    /// kept for [`Priority::Interactive`] ones. Callers that feed the engine bulk work size it
    /// from this, so that they keep the batch full without disagreeing with the engine.
    ///
    /// [`Priority::Bulk`]: crate::Priority::Bulk
    /// [`Priority::Interactive`]: crate::Priority::Interactive
    pub fn bulk_batch(&self) -> usize {
        bulk_batch(self.max_batch)
    }
}

/// [`EngineConfig::bulk_batch`] for a batch of `max_batch` places.
pub(crate) fn bulk_batch(max_batch: usize) -> usize {
    let max_batch = max_batch.max(1);
    if max_batch == 1 {
        1
    } else {
        max_batch - (max_batch / 8).max(1)
    }
}

/// Default for [`RequestLimits::max_messages`]: far more turns than any context the engine
/// runs can hold (a message costs a few tokens of markers even when empty), while 20,000
/// messages in a 2 MB body are refused before any template work.
pub const DEFAULT_MAX_MESSAGES: usize = 4096;

/// Default for [`RequestLimits::max_chat_bytes`]: 4 MiB of text, several times what the
/// largest supported context (Gemma 3: 32k tokens) can hold, so no prompt that fits a context
/// is refused for it.
pub const DEFAULT_MAX_CHAT_BYTES: usize = 4 << 20;

/// Default for [`RequestLimits::max_candidates`]: a labeling config has tens of choices, not
/// thousands; each candidate costs the model thread a row of every forward pass it is in.
pub const DEFAULT_MAX_CANDIDATES: usize = 1024;

/// Bounds on what one request may ask of the engine: rendering, encoding and scoring cost
/// grows with each of these, and an unbounded request would occupy the engine's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most messages in one chat (each question of a scoring request is one chat).
    pub max_messages: usize,
    /// Most bytes of roles and contents together in one chat.
    pub max_chat_bytes: usize,
    /// Most candidate answers in one scoring request, over all its questions.
    pub max_candidates: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_messages: DEFAULT_MAX_MESSAGES,
            max_chat_bytes: DEFAULT_MAX_CHAT_BYTES,
            max_candidates: DEFAULT_MAX_CANDIDATES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_work_leaves_places_for_interactive_requests() {
        assert_eq!(bulk_batch(0), 1);
        assert_eq!(bulk_batch(1), 1);
        assert_eq!(bulk_batch(2), 1);
        assert_eq!(bulk_batch(8), 7);
        assert_eq!(bulk_batch(16), 14);
        assert_eq!(bulk_batch(64), 56);
    }
}
