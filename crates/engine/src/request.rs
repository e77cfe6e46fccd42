//! What callers send the engine: chat messages, sampling parameters, chat and completion
//! requests, and closed questions to score (as messages, or as token ids).

use crate::guidance::Constraint;

/// How soon the model thread takes a request up, among those waiting for a place in the batch.
///
/// [`Priority::Interactive`] requests (someone is waiting on the answer: an annotator opening a
/// task, a chat) are admitted before every waiting [`Priority::Bulk`] one, and the last places
/// of the batch are kept for them ([`EngineConfig::bulk_batch`](crate::EngineConfig::bulk_batch)),
/// so a full batch of bulk work never makes them wait for a place. Within a priority, requests
/// are admitted in the order they came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Someone waits on the answer (the default).
    #[default]
    Interactive,
    /// Background work (a bulk prediction request): fills the batch behind interactive work.
    Bulk,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, ... as the model's chat template understands it.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How to pick tokens and when to stop.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// Most tokens to generate; `None` means until EOS or the end of the context.
    pub max_tokens: Option<usize>,
    /// Sampling temperature; `0` means greedy (argmax). Must be finite and not negative.
    pub temperature: f64,
    /// Nucleus sampling: sample from the smallest set of tokens whose probability reaches
    /// `top_p`. `None` (or `1.0`) samples from all tokens. Must be in `(0, 1]`.
    pub top_p: Option<f64>,
    /// Seed for sampling; the same seed, prompt and parameters give the same text.
    /// `None` picks a random seed.
    pub seed: Option<u64>,
    /// Stop strings: generation stops when the text contains one, and the text is cut before it.
    pub stop: Vec<String>,
    /// Log-probabilities: `Some(k)` records each generated token's log-probability under the
    /// model (before temperature) and the `k` most likely tokens at its position
    /// ([`Completion::logprobs`](crate::Completion::logprobs)); at most [`MAX_TOP_LOGPROBS`].
    pub logprobs: Option<usize>,
    /// Structured output: the generated text must match this constraint (a JSON schema, a
    /// regular expression, a set of strings...); generation ends when it is complete.
    pub constraint: Option<Constraint>,
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 1.0,
            top_p: None,
            seed: None,
            stop: Vec::new(),
            logprobs: None,
            constraint: None,
        }
    }
}

/// A chat request: messages rendered with the model's chat template.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Sampling parameters.
    pub params: SamplingParams,
}

/// A plain completion request: the prompt is used as-is.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    /// Prompt text (untrusted: control-token strings in it are encoded as ordinary text).
    pub prompt: String,
    /// Sampling parameters.
    pub params: SamplingParams,
}

/// A closed question as chat messages: the model is asked to answer the last message with
/// exactly one of `candidates`.
#[derive(Clone, Debug)]
pub struct ChoiceQuestion {
    /// The conversation; the chat template's generation prompt is added after it.
    pub messages: Vec<ChatMessage>,
    /// The possible answers, as the model would write them (at least one, none empty).
    pub candidates: Vec<String>,
}

/// A closed question as token ids (the low-level form of [`ChoiceQuestion`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenQuestion {
    /// The prompt, ending where the answer starts.
    pub prompt: Vec<u32>,
    /// Each candidate's tokens, exactly as they are scored (at least one, none empty).
    pub candidates: Vec<Vec<u32>>,
}

/// One input of [`Engine::embed`](crate::Engine::embed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmbedInput {
    /// A text, encoded as plain text.
    Text(String),
    /// Token ids, taken as given.
    Tokens(Vec<u32>),
}

/// Most inputs one embedding request may hold (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Most tokens one embedding request may hold over all its inputs (OpenAI's limit).
pub const MAX_EMBEDDING_TOKENS: usize = 300_000;
