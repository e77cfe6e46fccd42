//! What the engine answers: a [`Completion`] (text, why it ended, token counts, optional
//! log-probabilities) for a generation, [`ChoiceScores`] for a scoring question.

/// The largest generation steps an engine has run since load ([`crate::Engine::batch_peaks`]):
/// how much continuous batching really batched (diagnostics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchPeaks {
    /// The most sequences one forward pass served.
    pub sequences: usize,
    /// The most of them that were prompt chunks (prefilled together).
    pub prompts: usize,
}

/// The forward passes an engine has run since load ([`crate::Engine::forward_work`]): a
/// difference of two readings says how many passes some work took, over how many rows (tokens),
/// in how much of the model thread's time; what bulk batching saves is passes, since a pass
/// reads every weight however few rows it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardWork {
    /// Forward passes run.
    pub passes: u64,
    /// Rows (tokens) those passes ran.
    pub rows: u64,
    /// Seconds the model thread spent in them.
    pub seconds: f64,
}

impl std::ops::Add for ForwardWork {
    type Output = ForwardWork;

    /// The work of two stretches together.
    fn add(self, other: ForwardWork) -> ForwardWork {
        ForwardWork {
            passes: self.passes + other.passes,
            rows: self.rows + other.rows,
            seconds: self.seconds + other.seconds,
        }
    }
}

impl std::ops::Sub for ForwardWork {
    type Output = ForwardWork;

    /// The work done between two readings (`later - earlier`).
    fn sub(self, earlier: ForwardWork) -> ForwardWork {
        ForwardWork {
            passes: self.passes - earlier.passes,
            rows: self.rows - earlier.rows,
            seconds: self.seconds - earlier.seconds,
        }
    }
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
    /// Of those, the tokens whose keys and values were copied from the prompt cache instead of
    /// computed (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    /// Tokens generated, including the EOS token when there was one and the tokens of a
    /// stop string.
    pub completion_tokens: usize,
    /// The tokens of `text` with their log-probabilities, when
    /// [`SamplingParams::logprobs`](crate::SamplingParams::logprobs) asked for them (the EOS
    /// token and tokens after a stop string are not part of the text).
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

/// The scores of one question's candidates, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceScores {
    /// Summed token log-probability of each candidate (natural log, unnormalised).
    pub logprobs: Vec<f64>,
    /// Probability of each candidate among the set: softmax of `logprobs`, sums to 1.
    pub probs: Vec<f64>,
    /// Prompt tokens of the question (the shared prefix included).
    pub prompt_tokens: usize,
}

impl ChoiceScores {
    /// Builds the scores from summed log-probabilities.
    pub(crate) fn from_logprobs(logprobs: Vec<f64>, prompt_tokens: usize) -> Self {
        let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logprobs.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        let probs = exp.iter().map(|e| e / sum).collect();
        Self {
            logprobs,
            probs,
            prompt_tokens,
        }
    }

    /// Index of the most probable candidate (the first one on ties).
    pub fn best(&self) -> usize {
        let mut best = 0;
        for (i, p) in self.probs.iter().enumerate() {
            if *p > self.probs[best] {
                best = i;
            }
        }
        best
    }
}

/// One text's embedding ([`Engine::embed`](crate::Engine::embed)).
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// The mean of the model's final hidden states over the text's tokens, of unit length.
    pub vector: Vec<f32>,
    /// Tokens the text encoded to (the BOS token included when the model adds one).
    pub tokens: usize,
}
