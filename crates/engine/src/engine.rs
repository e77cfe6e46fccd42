//! The [`Engine`] handle callers hold: it encodes requests (chat template, tokenizer), checks
//! them, admits them against the queue bound, and sends them to the model thread, whose answer
//! comes back on a oneshot channel.
//!
//! Everything here runs on the callers' threads; the model thread's side is the
//! [`Scheduler`](crate::scheduler::Scheduler).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::load_err;
use crate::guidance::Guidance;
use crate::loading::{load_parts, Loaded};
use crate::metrics::EngineMetrics;
use crate::request::{MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TOKENS};
use crate::sampling;
use crate::scheduler::{Job, Work};
use crate::scoring;
use crate::template::ChatTemplate;
use crate::tokenizer::GgufTokenizer;
use crate::{
    ChatMessage, ChatRequest, ChoiceQuestion, ChoiceScores, Completion, CompletionRequest,
    EmbedInput, Embedding, EngineConfig, EngineError, Priority, SamplingParams, TokenQuestion,
};

/// A loaded model, ready to serve requests. Cheap to clone; all clones share one model thread,
/// which ends when the last clone is dropped.
///
/// A request carries the tracing span its caller is in when it calls a method here: what the
/// model thread logs while it works for the request is under that span (in a span of its own,
/// `engine.sequence` for a generation, `engine.score` for a scoring request).
///
/// A handle queues its requests with its [`Priority`] ([`Priority::Interactive`] unless made
/// with [`Engine::with_priority`]).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    priority: Priority,
    /// Where this handle's requests stand in their priority's line ([`Engine::in_line_since`]).
    since: Option<Instant>,
}

/// What every clone of an [`Engine`] shares.
struct Inner {
    model_id: String,
    model_sha256: String,
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
    /// Most candidates in one scoring request
    /// ([`RequestLimits::max_candidates`](crate::RequestLimits::max_candidates)).
    max_candidates: usize,
    /// Length of an embedding (the model's hidden size).
    dimensions: usize,
    metrics: Arc<EngineMetrics>,
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
            model_sha256,
        } = load_parts(&config)?;
        let eos = scheduler.eos.clone();
        let metrics = scheduler.metrics.clone();
        let dimensions = scheduler.model.hidden_size();
        let (tx, rx) = mpsc::channel(config.max_queue.max(1));
        std::thread::Builder::new()
            .name("batchlab-model".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| load_err("cannot spawn the model thread", e))?;

        Ok(Engine {
            inner: Arc::new(Inner {
                model_id: config.model_id,
                model_sha256,
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
                dimensions,
                metrics,
            }),
            priority: Priority::default(),
            since: None,
        })
    }

    /// A handle on the same model thread whose requests are queued with `priority`.
    pub fn with_priority(&self, priority: Priority) -> Engine {
        Engine {
            priority,
            ..self.clone()
        }
    }

    /// A handle whose requests take their place in line as if queued at `since` (when the work
    /// they belong to began): a later request of one task (its generation, after its scoring)
    /// then goes before the requests of tasks begun after it, so that tasks finish in the order
    /// they began instead of all together. Without it, a request's place is when it is queued.
    pub fn in_line_since(&self, since: Instant) -> Engine {
        Engine {
            since: Some(since),
            ..self.clone()
        }
    }

    /// The priority this handle's requests are queued with.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The model name given in [`EngineConfig::model_id`].
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// Tokens this engine has generated since it was loaded (what a worker's heartbeat reports
    /// its speed from).
    pub fn generated_tokens(&self) -> u64 {
        self.inner.metrics.generated_total()
    }

    /// Prompt tokens served from the prompt cache since load instead of computed (what tests
    /// and benchmarks read to see that shared prompt starts are computed once).
    pub fn reused_prompt_tokens(&self) -> u64 {
        self.inner.metrics.reused_total()
    }

    /// The forward passes run since load, their rows and their time: what benchmarks read
    /// (two readings apart) to see how many passes some work took.
    pub fn forward_work(&self) -> crate::ForwardWork {
        self.inner.metrics.forward_work()
    }

    /// The largest generation steps run since load: how many sequences, and how many prompt
    /// chunks, one forward pass has served at most.
    pub fn batch_peaks(&self) -> crate::BatchPeaks {
        self.inner.metrics.peak_step()
    }

    /// Hex SHA-256 of the GGUF file loaded: the model's identity, whatever it is called, so
    /// that a changed file changes the `model_version` Label Studio sees.
    pub fn model_sha256(&self) -> &str {
        &self.inner.model_sha256
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
        sampling::validate(&params)?;
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

    /// Length of the vectors [`Engine::embed`] answers (the model's hidden size).
    pub fn embedding_dimensions(&self) -> usize {
        self.inner.dimensions
    }

    /// One unit-length vector per input: the mean of the model's final hidden states over its
    /// tokens. A text is encoded as plain text (control-token strings stay text) with the BOS
    /// token when the model adds one; token ids are taken as given. At most
    /// [`MAX_EMBEDDING_INPUTS`] inputs and [`MAX_EMBEDDING_TOKENS`] tokens in all (OpenAI's
    /// limits), none empty and each within the context.
    pub async fn embed(&self, inputs: Vec<EmbedInput>) -> Result<Vec<Embedding>, EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        if inputs.is_empty() {
            return invalid("the input is empty".into());
        }
        if inputs.len() > MAX_EMBEDDING_INPUTS {
            return invalid(format!(
                "at most {MAX_EMBEDDING_INPUTS} inputs may be embedded at once, got {}",
                inputs.len()
            ));
        }
        let (ctx, vocab) = (self.inner.context_length, self.inner.tokenizer.vocab_size());
        let mut total = 0usize;
        let mut ids = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let tokens = match input {
                EmbedInput::Text(text) if text.is_empty() => {
                    return invalid(format!("input {i} is an empty string"));
                }
                EmbedInput::Text(text) => self.with_bos(self.inner.tokenizer.encode_plain(&text)?),
                EmbedInput::Tokens(tokens) => {
                    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
                        return invalid(format!(
                            "input {i} holds token {t}, outside the vocabulary of {vocab}"
                        ));
                    }
                    tokens
                }
            };
            if tokens.is_empty() {
                return invalid(format!("input {i} holds no tokens"));
            }
            if tokens.len() > ctx {
                return invalid(format!(
                    "input {i} is {} tokens but the model's context holds {ctx}",
                    tokens.len()
                ));
            }
            total += tokens.len();
            if total > MAX_EMBEDDING_TOKENS {
                return invalid(format!(
                    "the inputs hold more than {MAX_EMBEDDING_TOKENS} tokens in all"
                ));
            }
            ids.push(tokens);
        }
        let (reply, rx) = oneshot::channel();
        let _admission = self.enqueue("embed", Work::Embed { inputs: ids, reply })?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Refuses a scoring request with more candidates, over all its questions, than
    /// [`RequestLimits::max_candidates`](crate::RequestLimits::max_candidates).
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

    /// Admits a job (bounded by [`EngineConfig::max_queue`]) and queues it for the model thread,
    /// with the caller's current tracing span: the model thread works for the job inside it.
    fn enqueue(&self, kind: &'static str, work: Work) -> Result<Admission<'_>, EngineError> {
        let inner = &self.inner;
        if inner.admitted.fetch_add(1, Ordering::AcqRel) >= inner.capacity {
            inner.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded);
        }
        let admission = Admission(&inner.admitted);
        let now = Instant::now();
        let job = Job {
            kind,
            priority: self.priority,
            enqueued: now,
            line: self.since.unwrap_or(now),
            span: tracing::Span::current(),
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
