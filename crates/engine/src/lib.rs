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

#[cfg(test)]
mod golden;
mod guidance;
pub mod hub;
mod kernels;
mod metrics;
mod model;
mod scheduler;
mod scoring;
mod template;
mod tokenizer;

use std::collections::HashSet;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use tokio::sync::{mpsc, oneshot};

use crate::guidance::Guidance;
use crate::scheduler::{Job, Scheduler, Work};
use crate::template::{ChatTemplate, CHATML_TEMPLATE, GEMMA_TEMPLATE};
use crate::tokenizer::GgufTokenizer;

pub use crate::guidance::Constraint;
pub use crate::kernels::packed_kernel;
pub use crate::scoring::{ChoiceQuestion, ChoiceScores, TokenQuestion};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Local GGUF file.
    pub model_path: PathBuf,
    /// Name reported in responses, e.g. `"SmolLM2-135M-Instruct"`.
    pub model_id: String,
    /// Requests admitted at once, waiting or running; more fail with
    /// [`EngineError::Overloaded`] (the HTTP layers answer 429). At least 1 is used.
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
    /// operation of the process. [`Engine::load`] therefore sets `CANDLE_NUM_THREADS` and
    /// `RAYON_NUM_THREADS` before it touches any tensor; this only takes effect if no candle
    /// (or global rayon) work ran earlier in the process, and it applies to every engine of
    /// the process.
    pub threads: Option<usize>,
    /// Cap on context tokens (prompt + completion); `None` means the GGUF's context length.
    /// See [`Engine::context_length`] for the other caps.
    pub max_context: Option<usize>,
    /// Requantize Q4_1, Q5_0 and Q5_1 weights, which candle computes without SIMD, to Q8_0 at
    /// load: much faster, slightly more memory, answers close to the original. Weights the
    /// packed kernel runs ([`packed_kernel`]) stay as they are (Q4_K too); other k-quant
    /// matrices (Q6_K, ...) become Q8_0 where it runs, for it to run them.
    pub requantize: bool,
    /// Where the model runs: `"cpu"`, `"cuda"` (the first GPU) or `"cuda:N"`. CUDA needs a build
    /// with the `cuda` feature; the CPU runs batchlab's own kernels and row-wise attention.
    pub device: String,
    /// Bounds on one request's size ([`RequestLimits::default`] unless a deployment needs
    /// other values); larger requests fail with [`EngineError::InvalidRequest`].
    pub limits: RequestLimits,
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

/// The candle device `name` names (see [`EngineConfig::device`]).
fn select_device(name: &str) -> Result<Device, EngineError> {
    let ordinal = match name.trim() {
        "" | "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EngineError::Load(format!(
                    "unknown device {other:?}: use \"cpu\", \"cuda\" or \"cuda:N\""
                ))
            })?,
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Load(format!(
            "device {name:?} needs a build with CUDA support: cargo build --release --features cuda"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| EngineError::Load(format!("CUDA device {ordinal}: {e}")))
}

/// A loaded model, ready to serve requests. Cheap to clone; all clones share one model thread,
/// which ends when the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    model_id: String,
    context_length: usize,
    requantized: usize,
    end_of_turn: Option<u32>,
    tokenizer: Arc<GgufTokenizer>,
    template: ChatTemplate,
    /// Structured output over this vocabulary, built on the first request that asks for it
    /// (15 MB for SmolLM2's vocabulary, 86 MB for Gemma's, measured).
    guidance: tokio::sync::OnceCell<Guidance>,
    /// Tokens that end a generation (what `guidance` is built with).
    eos: HashSet<u32>,
    tx: mpsc::Sender<Job>,
    /// Requests admitted and not yet answered (waiting or running).
    admitted: AtomicUsize,
    capacity: usize,
    /// Most candidates in one scoring request ([`RequestLimits::max_candidates`]).
    max_candidates: usize,
    metrics: Arc<metrics::EngineMetrics>,
}

/// One admitted request; dropping it (answer received, or the caller gone) frees its place.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_id", &self.inner.model_id)
            .field("context_length", &self.inner.context_length)
            .finish_non_exhaustive()
    }
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
    /// ([`Completion::logprobs`]); at most [`MAX_TOP_LOGPROBS`].
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

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token, or the text reached a stop string.
    Stop,
    /// `max_tokens` was reached, or the context is full.
    Length,
}

/// The result of a request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated text (without the EOS token, cut before a stop string).
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt as the model saw it (after templating).
    pub prompt_tokens: usize,
    /// Tokens generated, including the EOS token when there was one and the tokens of a
    /// stop string.
    pub completion_tokens: usize,
    /// The tokens of `text` with their log-probabilities, when [`SamplingParams::logprobs`]
    /// asked for them (the EOS token and tokens after a stop string are not part of the text).
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A generated token, how likely the model found it, and what else it found likely.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token and its log-probability.
    pub token: TopLogprob,
    /// Byte offset of the token's text in [`Completion::text`].
    pub text_offset: usize,
    /// The most likely tokens at this position, best first.
    pub top: Vec<TopLogprob>,
}

/// One token's log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    /// Token id.
    pub id: u32,
    /// The bytes of text it stands for (a token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded (missing file, unsupported architecture or tokenizer...).
    #[error("cannot load model: {0}")]
    Load(String),
    /// The chat template failed to render.
    #[error("chat template error: {0}")]
    Template(String),
    /// The request is not valid (empty messages, prompt too long, bad parameters...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request queue is full.
    #[error("engine overloaded: request queue is full")]
    Overloaded,
    /// The model thread is gone.
    #[error("engine stopped")]
    Stopped,
    /// candle failed during a forward pass.
    #[error("inference error: {0}")]
    Inference(String),
}

pub(crate) fn load_err(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{context}: {e}"))
}

/// Everything [`Engine::load`] builds before it starts the model thread.
pub(crate) struct Loaded {
    pub(crate) tokenizer: Arc<GgufTokenizer>,
    pub(crate) template: ChatTemplate,
    pub(crate) scheduler: Scheduler,
    pub(crate) context_length: usize,
    pub(crate) requantized: usize,
    pub(crate) end_of_turn: Option<u32>,
}

/// Reads the GGUF and builds tokenizer, template and model (no thread).
pub(crate) fn load_parts(config: &EngineConfig) -> Result<Loaded, EngineError> {
    let start = Instant::now();
    let device = select_device(&config.device)?;
    if let Some(n) = config.threads.filter(|&n| n > 0) {
        // candle reads these once, when its thread pools are first used (see EngineConfig).
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let path = &config.model_path;
    let file = std::fs::File::open(path)
        .map_err(|e| load_err(&format!("cannot open {}", path.display()), e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        load_err(
            &format!("{} is not a readable GGUF file", path.display()),
            e,
        )
    })?;

    let tokenizer = Arc::new(load_tokenizer(path, &content)?);

    let template = chat_template(path, &content, &tokenizer, config.limits)?;

    let mut eos = HashSet::new();
    eos.extend(tokenizer.eos_id);
    if let Some(v) = content.metadata.get("tokenizer.ggml.eot_token_id") {
        if let Ok(id) = v.to_u32() {
            eos.insert(id);
        }
    }
    for t in tokenizer::END_OF_GENERATION {
        eos.extend(tokenizer.control_id(t));
    }
    // The token that closes an assistant turn: the chat format's own marker when it has one,
    // else the GGUF's end-of-turn or end-of-sequence token.
    let end_of_turn = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"]
        .iter()
        .find_map(|t| tokenizer.control_id(t))
        .or_else(|| {
            content
                .metadata
                .get("tokenizer.ggml.eot_token_id")
                .and_then(|v| v.to_u32().ok())
        })
        .or(tokenizer.eos_id);

    let max_context = config.max_context.filter(|&m| m > 0);
    let model::LoadedModel {
        model,
        requantized,
        gguf_context: gguf_ctx,
    } = model::load(
        &content,
        &mut reader,
        &device,
        config.requantize,
        max_context,
    )?;
    let context_length = max_context.map_or(gguf_ctx, |m| m.min(gguf_ctx));
    if context_length < 2 {
        return Err(EngineError::Load(format!(
            "context length {context_length} is too small"
        )));
    }
    warm_up(&model, &tokenizer)?;
    tracing::info!(
        model_id = %config.model_id,
        path = %path.display(),
        vocab = tokenizer.vocab_size(),
        control_tokens = tokenizer.control_tokens().len(),
        context_length,
        gguf_context_length = gguf_ctx,
        requantized_to_q8_0 = requantized,
        device = %config.device,
        packed_kernel = device.is_cpu() && packed_kernel(),
        amx_tiles = device.is_cpu() && kernels::cpu_features::amx_int8(),
        load_ms = start.elapsed().as_millis() as u64,
        "model loaded"
    );

    let model_shape = model.cache_shape();
    let scheduler = Scheduler {
        model,
        tokenizer: tokenizer.clone(),
        eos,
        context_length,
        prefill_chunk: scheduler::PREFILL_CHUNK,
        max_batch: config.max_batch.max(1),
        metrics: Arc::new(metrics::EngineMetrics::new(&config.model_id)),
        prefix: model::prefix::PrefixCache::new(&model_shape, config.prefix_cache_bytes),
    };
    Ok(Loaded {
        tokenizer,
        template,
        scheduler,
        context_length,
        requantized,
        end_of_turn,
    })
}

/// The model's chat template: the GGUF's `tokenizer.chat_template`, or Gemma's turn format or
/// ChatML when it has none; `path` only names the file in the warning.
pub(crate) fn chat_template(
    path: &std::path::Path,
    content: &gguf_file::Content,
    tokenizer: &GgufTokenizer,
    limits: RequestLimits,
) -> Result<ChatTemplate, EngineError> {
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_str(i))
            .unwrap_or_default()
            .to_string()
    };
    let bos_token = token_text(tokenizer.bos_id);
    let eos_token = token_text(tokenizer.eos_id);
    let template_src = match content.metadata.get("tokenizer.chat_template") {
        Some(v) => v
            .to_string()
            .map_err(|e| load_err("tokenizer.chat_template", e))?
            .clone(),
        None => {
            // Gemma's vocabulary has its own turn markers; everything else gets ChatML.
            let (name, template) = if tokenizer.control_id("<start_of_turn>").is_some() {
                ("Gemma's turn format", GEMMA_TEMPLATE)
            } else {
                ("ChatML", CHATML_TEMPLATE)
            };
            tracing::warn!(model = %path.display(), "GGUF has no tokenizer.chat_template; using {name}");
            template.to_string()
        }
    };
    ChatTemplate::new(&template_src, bos_token, eos_token, limits)
}

/// Model files for tests, shared by the unit tests and the integration tests.
#[doc(hidden)]
pub mod testing {
    use std::path::PathBuf;

    /// `file` under the repository's `models/`: `None` (the test skips, saying so) when it is
    /// missing, unless `BATCHLAB_REQUIRE_MODELS` is set, which makes a missing file fail.
    pub fn model_file(file: &str) -> Option<PathBuf> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models")
            .join(file);
        if !path.exists() {
            assert!(
                std::env::var_os("BATCHLAB_REQUIRE_MODELS").is_none(),
                "{} is missing",
                path.display()
            );
            eprintln!("SKIP: model file {} is missing", path.display());
            return None;
        }
        Some(path)
    }
}

/// A model's GGUF metadata and the tokenizer built from it (weights not loaded), read once per
/// test binary; `None` as [`testing::model_file`] says.
#[cfg(test)]
pub(crate) struct TestGguf {
    /// The file.
    pub path: PathBuf,
    /// Its metadata.
    pub content: gguf_file::Content,
    /// The tokenizer its metadata describes.
    pub tokenizer: GgufTokenizer,
}

#[cfg(test)]
pub(crate) fn test_gguf(file: &'static str) -> Option<&'static TestGguf> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LOADED: OnceLock<Mutex<HashMap<&'static str, &'static TestGguf>>> = OnceLock::new();
    let path = testing::model_file(file)?;
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    Some(*loaded.entry(file).or_insert_with(|| {
        let mut f = BufReader::new(std::fs::File::open(&path).unwrap());
        let content = gguf_file::Content::read(&mut f).unwrap();
        let tokenizer = GgufTokenizer::from_gguf(&content).unwrap();
        Box::leak(Box::new(TestGguf {
            path,
            content,
            tokenizer,
        }))
    }))
}

/// The tokenizer: a `tokenizer.json` beside the model file overrides the one the GGUF's
/// metadata describes (for tokenizers the engine cannot build from metadata, or fixes to them).
fn load_tokenizer(
    model_path: &std::path::Path,
    content: &gguf_file::Content,
) -> Result<GgufTokenizer, EngineError> {
    let beside = model_path.with_file_name("tokenizer.json");
    if !beside.is_file() {
        return GgufTokenizer::from_gguf(content);
    }
    let vocab_size = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(usize::MAX, |t| t.len());
    tracing::info!(path = %beside.display(), "tokenizer.json beside the model overrides the GGUF's tokenizer");
    GgufTokenizer::from_tokenizer_json(&beside, content, vocab_size)
}

/// One forward pass before the engine reports itself loaded: it touches every weight, sizes
/// candle's thread pools, and proves the model runs, so that readiness means "answers now".
fn warm_up(model: &model::Model, tokenizer: &GgufTokenizer) -> Result<(), EngineError> {
    let token = tokenizer.bos_id.or(tokenizer.eos_id).unwrap_or(0);
    let mut cache = model::SeqCache::new(model.cache_shape(), 1, model.device())
        .map_err(|e| load_err("warm-up", e))?;
    let mut segment = [model::Segment {
        cache: &mut cache,
        tokens: &[token],
        want: model::Want::Last,
        prompt: false,
    }];
    model
        .forward(&mut segment)
        .map_err(|e| load_err("warm-up forward pass", e))?;
    Ok(())
}

impl Engine {
    /// Loads the GGUF, builds the tokenizer and chat template, runs one warm-up forward pass,
    /// and spawns the model thread: once this returns, requests are answered at full speed.
    ///
    /// Blocking (reads the whole file); call it from `spawn_blocking` in async code.
    pub fn load(config: EngineConfig) -> Result<Engine, EngineError> {
        let Loaded {
            tokenizer,
            template,
            scheduler,
            context_length,
            requantized,
            end_of_turn,
        } = load_parts(&config)?;
        let eos = scheduler.eos.clone();
        let metrics = scheduler.metrics.clone();
        let (tx, rx) = mpsc::channel(config.max_queue.max(1));
        std::thread::Builder::new()
            .name("batchlab-model".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| load_err("cannot spawn the model thread", e))?;

        Ok(Engine {
            inner: Arc::new(Inner {
                model_id: config.model_id,
                context_length,
                requantized,
                end_of_turn,
                tokenizer,
                template,
                guidance: tokio::sync::OnceCell::new(),
                eos,
                tx,
                admitted: AtomicUsize::new(0),
                capacity: config.max_queue.max(1),
                max_candidates: config.limits.max_candidates,
                metrics,
            }),
        })
    }

    /// The model name given in [`EngineConfig::model_id`].
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// Most tokens (prompt + completion) a request can use: the GGUF's context length, capped
    /// by [`EngineConfig::max_context`].
    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    /// How many weight tensors were requantized to Q8_0 at load (see
    /// [`EngineConfig::requantize`]).
    pub fn requantized_tensors(&self) -> usize {
        self.inner.requantized
    }

    /// Chat: renders the messages with the model's chat template (`add_generation_prompt`
    /// true), then generates. Control-token strings inside message contents are encoded as
    /// plain text; only the template's own markers become control tokens.
    pub async fn chat(&self, request: ChatRequest) -> Result<Completion, EngineError> {
        let prompt = self
            .inner
            .template
            .encode(&self.inner.tokenizer, &request.messages)?;
        let prompt = self.with_bos(prompt);
        self.submit("chat", prompt, request.params).await
    }

    /// Plain completion: the prompt text as-is (no template), then generates. Control-token
    /// strings in the prompt are encoded as plain text. A BOS token is prepended only if the
    /// GGUF asks for it (`tokenizer.ggml.add_bos_token`).
    pub async fn complete(&self, request: CompletionRequest) -> Result<Completion, EngineError> {
        let prompt = self.inner.tokenizer.encode_plain(&request.prompt)?;
        let prompt = self.with_bos(prompt);
        self.submit("completion", prompt, request.params).await
    }

    /// Renders the chat template for `messages` (with `add_generation_prompt` true).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.inner.template.render(messages)
    }

    /// Number of tokens `text` encodes to as plain text (control-token strings count as
    /// ordinary text, as in [`Engine::complete`]; no BOS).
    pub fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.inner.tokenizer.encode_plain(text)?.len())
    }

    /// Token ids of a plain text (as [`Engine::complete`] encodes its prompt, without BOS).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.inner.tokenizer.encode_plain(text)
    }

    /// Token ids of the prompt [`Engine::chat`] would run for `messages`.
    pub fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let ids = self
            .inner
            .template
            .encode(&self.inner.tokenizer, messages)?;
        Ok(self.with_bos(ids))
    }

    /// Text of token ids; control tokens are left out when `skip_special` is true.
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        self.inner.tokenizer.decode(ids, skip_special)
    }

    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        let tok = &self.inner.tokenizer;
        if let (true, Some(bos)) = (tok.add_bos, tok.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        ids
    }

    async fn submit(
        &self,
        kind: &'static str,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Completion, EngineError> {
        validate(&params)?;
        let ctx = self.inner.context_length;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= ctx {
            return Err(EngineError::InvalidRequest(format!(
                "prompt is {} tokens but the context holds {} tokens (at least one must remain \
                 for the completion)",
                prompt.len(),
                ctx
            )));
        }
        let guide = match &params.constraint {
            Some(c) => Some(self.guidance().await?.guide(c)?),
            None => None,
        };
        let (reply, rx) = oneshot::channel();
        let _admission = self.enqueue(
            kind,
            Work::Generate {
                prompt,
                params,
                guide,
                reply,
            },
        )?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Probability of each candidate answer to each question (see [`ChoiceScores`]).
    ///
    /// Each question's messages are rendered with the chat template and its generation prompt;
    /// each candidate is scored as the assistant's whole answer, the end-of-turn token
    /// included. Control-token strings in messages and candidates stay plain text.
    pub async fn score_choices(
        &self,
        questions: Vec<ChoiceQuestion>,
    ) -> Result<Vec<ChoiceScores>, EngineError> {
        // Before any encoding: 50,000 candidates are refused without tokenizing one.
        self.check_candidates(questions.iter().map(|q| q.candidates.len()))?;
        let mut token_questions = Vec::with_capacity(questions.len());
        for q in questions {
            let prompt = self.tokenize_chat(&q.messages)?;
            let candidates = q
                .candidates
                .iter()
                .map(|c| self.answer_tokens(c))
                .collect::<Result<Vec<_>, _>>()?;
            token_questions.push(TokenQuestion { prompt, candidates });
        }
        self.score_tokens(token_questions).await
    }

    /// Token ids of `text` as a whole assistant answer: the plain text followed by the
    /// end-of-turn token (when the model has one), as [`Engine::score_choices`] scores it.
    pub fn answer_tokens(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        if text.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a candidate answer is empty".into(),
            ));
        }
        let mut ids = self.inner.tokenizer.encode_plain(text)?;
        ids.extend(self.inner.end_of_turn);
        Ok(ids)
    }

    /// [`Engine::score_choices`] on token ids: each candidate is scored exactly as given.
    pub async fn score_tokens(
        &self,
        questions: Vec<TokenQuestion>,
    ) -> Result<Vec<ChoiceScores>, EngineError> {
        self.check_candidates(questions.iter().map(|q| q.candidates.len()))?;
        for q in &questions {
            scoring::validate(q, self.inner.context_length)?;
        }
        if questions.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        let _admission = self.enqueue("score", Work::Score { questions, reply })?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Refuses a scoring request with more candidates, over all its questions, than
    /// [`RequestLimits::max_candidates`].
    fn check_candidates(
        &self,
        per_question: impl Iterator<Item = usize>,
    ) -> Result<(), EngineError> {
        let total = per_question.fold(0usize, usize::saturating_add);
        let max = self.inner.max_candidates;
        if total > max {
            return Err(EngineError::InvalidRequest(format!(
                "a scoring request may have at most {max} candidates in all, got {total}"
            )));
        }
        Ok(())
    }

    /// The structured-output compiler, built (off the async threads) on first use.
    async fn guidance(&self) -> Result<&Guidance, EngineError> {
        let inner = &self.inner;
        inner
            .guidance
            .get_or_try_init(|| async {
                let (tokenizer, eos, end_of_turn) = (
                    inner.tokenizer.clone(),
                    inner.eos.clone(),
                    inner.end_of_turn,
                );
                let start = Instant::now();
                let built = tokio::task::spawn_blocking(move || {
                    Guidance::new(tokenizer, &eos, end_of_turn)
                })
                .await
                .map_err(|e| {
                    EngineError::Inference(format!("building structured output failed: {e}"))
                })??;
                tracing::info!(
                    ms = start.elapsed().as_millis() as u64,
                    "structured output ready"
                );
                Ok(built)
            })
            .await
    }

    /// Admits a job (bounded by [`EngineConfig::max_queue`]) and queues it for the model thread.
    fn enqueue(&self, kind: &'static str, work: Work) -> Result<Admission<'_>, EngineError> {
        let inner = &self.inner;
        if inner.admitted.fetch_add(1, Ordering::AcqRel) >= inner.capacity {
            inner.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded);
        }
        let admission = Admission(&inner.admitted);
        let job = Job {
            kind,
            enqueued: Instant::now(),
            work,
        };
        inner.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })?;
        inner.metrics.waiting.increment(1.0);
        Ok(admission)
    }

    /// Requests admitted and not yet answered (waiting or running).
    pub fn in_flight(&self) -> usize {
        self.inner.admitted.load(Ordering::Acquire)
    }
}

fn validate(p: &SamplingParams) -> Result<(), EngineError> {
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return Err(EngineError::InvalidRequest(format!(
            "temperature must be a finite number >= 0, got {}",
            p.temperature
        )));
    }
    if p.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
        return Err(EngineError::InvalidRequest(format!(
            "at most {MAX_TOP_LOGPROBS} top log-probabilities per token"
        )));
    }
    if let Some(top_p) = p.top_p {
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(EngineError::InvalidRequest(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
    }
    Ok(())
}
