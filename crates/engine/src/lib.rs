//! batchlab's in-process LLM inference engine.
//!
//! [`Engine::load`] reads a local GGUF file, builds its tokenizer and chat template from the
//! file's metadata, and starts one dedicated OS thread that owns the model. Requests
//! ([`Engine::chat`], [`Engine::complete`]) go to that thread through a bounded queue and come
//! back through a oneshot channel; a full queue is [`EngineError::Overloaded`].
//!
//! The engine knows nothing of HTTP or of OpenAI wire formats.
//!
//! The model code is the engine's own (`model`): GGUF architectures `llama` (SmolLM2, Llama,
//! Mistral-style) and `gemma3`, with a KV cache per sequence that the engine owns. The model
//! thread runs requests with continuous batching (`scheduler`) and scores closed sets of answers
//! ([`Engine::score_choices`]) with a shared prompt prefix processed once. A request may carry
//! a [`Constraint`] (structured output: a JSON schema, a regex, a set of strings, a Lark
//! grammar), enforced token by token with llguidance (`guidance`). The tokenizer supports
//! byte-level BPE with `tokenizer.ggml.pre = smollm` and Gemma's SentencePiece (both verified
//! exact against llama.cpp); anything else is refused at load time.
//!
//! # Where things are
//!
//! - The public types: `config` ([`EngineConfig`], [`RequestLimits`]), `request` (what callers
//!   send), `result` (what they get back), `error` ([`EngineError`]).
//! - `engine`: the [`Engine`] handle, on the callers' threads: encodes, checks and queues
//!   requests. `loading`: reading the GGUF and building everything [`Engine::load`] needs.
//! - The model thread: `scheduler` (its loop: admission, continuous batching, answers),
//!   `sequence` (one generation's state), `sampling` (picking tokens, log-probabilities),
//!   `scoring` (choice scoring in bounded passes), `embedding` (embeddings, likewise),
//!   `guidance` (structured output).
//! - `model`: the architectures, the KV cache and the prompt cache; `kernels`: the CPU kernels
//!   (packed matmul, AMX, activations) and the one place CPU features are detected.
//! - `tokenizer`, `template`: text to tokens and chat messages to prompts; `metrics`: the
//!   engine's Prometheus metrics; [`hub`]: model files from Hugging Face.
//!
//! A request's tracing span travels with it to the model thread: what the model thread logs
//! for a request (in its own span, `engine.sequence` or `engine.score`) sits under the span the
//! caller was in when it called the [`Engine`].

mod config;
mod embedding;
mod engine;
mod error;
#[cfg(test)]
mod golden;
mod guidance;
pub mod hub;
mod kernels;
mod loading;
mod metrics;
mod model;
mod request;
mod result;
mod sampling;
mod scheduler;
mod scoring;
mod sequence;
mod template;
#[doc(hidden)]
pub mod testing;
mod tokenizer;

pub use crate::config::{
    EngineConfig, RequestLimits, DEFAULT_MAX_CANDIDATES, DEFAULT_MAX_CHAT_BYTES,
    DEFAULT_MAX_MESSAGES,
};
pub use crate::engine::Engine;
pub use crate::error::EngineError;
pub use crate::guidance::Constraint;
pub use crate::kernels::packed_kernel;
pub use crate::request::{
    ChatMessage, ChatRequest, ChoiceQuestion, CompletionRequest, EmbedInput, Priority,
    SamplingParams, TokenQuestion, MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TOKENS, MAX_TOP_LOGPROBS,
};
pub use crate::result::{
    BatchPeaks, ChoiceScores, Completion, Embedding, FinishReason, ForwardWork, TokenLogprob,
    TopLogprob,
};
