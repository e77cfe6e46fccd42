//! One generation's state on the model thread: its tokens, sampler, detokenizer, stop strings,
//! length limits, log-probabilities and structured-output guide ([`Sequence`]), advanced one
//! sampled token at a time by the [`Scheduler`](crate::scheduler::Scheduler).

use std::collections::HashSet;

use candle_core::Tensor;

use crate::error::inference;
use crate::guidance::Guide;
use crate::sampling;
use crate::tokenizer::{GgufTokenizer, IncrementalDecoder};
use crate::{Completion, EngineError, FinishReason, SamplingParams, TokenLogprob};

/// The state of one generation.
pub(crate) struct Sequence {
    /// The prompt, then every token generated so far.
    pub(crate) tokens: Vec<u32>,
    /// Tokens of the prompt at the start of `tokens`.
    pub(crate) prompt_len: usize,
    sampler: sampling::Sampler,
    decoder: IncrementalDecoder,
    /// The text generated so far (cut before a stop string).
    text: String,
    stop: Vec<String>,
    /// Most tokens to generate.
    pub(crate) max_new: usize,
    context_length: usize,
    /// Why generation ended, once it has.
    pub(crate) finish: Option<FinishReason>,
    /// Alternatives recorded per token, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// The structured-output constraint's state, when the request has one.
    guide: Option<Guide>,
    /// Why this sequence failed on its own (its batch goes on).
    error: Option<EngineError>,
}

impl Sequence {
    /// A generation of `prompt` as `params` ask, within `context_length` tokens in all;
    /// already finished when there is nothing to generate (`max_tokens` 0, a full context).
    pub(crate) fn new(
        prompt: Vec<u32>,
        params: &SamplingParams,
        guide: Option<Guide>,
        context_length: usize,
    ) -> Self {
        let prompt_len = prompt.len();
        let mut seq = Self {
            tokens: prompt,
            prompt_len,
            sampler: sampling::sampler(params),
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
            top_logprobs: params.logprobs,
            logprobs: Vec::new(),
            guide,
            error: None,
        };
        seq.check_length();
        seq
    }

    /// Tokens generated so far.
    pub(crate) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn check_length(&mut self) {
        if self.finish.is_none()
            && (self.generated() >= self.max_new || self.tokens.len() >= self.context_length)
        {
            self.finish = Some(FinishReason::Length);
        }
    }

    /// Samples the next token from `logits` (1-D, vocabulary size) and updates the state. An
    /// error is the batch's (candle failed); the sequence's own failures end it alone.
    pub(crate) fn step(
        &mut self,
        logits: &Tensor,
        tok: &GgufTokenizer,
        eos: &HashSet<u32>,
    ) -> Result<(), EngineError> {
        let next = match &mut self.guide {
            None => self.sampler.sample(logits).map_err(inference)?,
            Some(guide) => {
                let mut row = logits.to_vec1::<f32>().map_err(inference)?;
                if let Err(e) = guide.mask(&mut row) {
                    self.fail(e);
                    return Ok(());
                }
                let n = row.len();
                let masked = Tensor::from_vec(row, n, logits.device()).map_err(inference)?;
                self.sampler.sample(&masked).map_err(inference)?
            }
        };
        self.tokens.push(next);
        if eos.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        let complete = match self.guide.as_mut().map(|g| g.advance(next)) {
            Some(Err(e)) => {
                self.fail(e);
                return Ok(());
            }
            Some(Ok(complete)) => complete,
            None => false,
        };
        if let Some(k) = self.top_logprobs {
            let row = logits.to_vec1::<f32>().map_err(inference)?;
            self.logprobs
                .push(sampling::token_logprob(&row, next, k, self.text.len(), tok));
        }
        let piece = self.decoder.push(tok, next)?;
        if !piece.is_empty() {
            let old_len = self.text.len();
            self.text.push_str(&piece);
            if let Some(cut) = self.find_stop(old_len) {
                self.text.truncate(cut);
                self.finish = Some(FinishReason::Stop);
                return Ok(());
            }
        }
        if complete {
            self.finish = Some(FinishReason::Stop);
        }
        self.check_length();
        Ok(())
    }

    /// Ends this sequence with `e` (answered by the scheduler's `finish`); the batch goes on.
    fn fail(&mut self, e: EngineError) {
        tracing::warn!(error = %e, "sequence failed");
        self.finish = Some(FinishReason::Stop);
        self.error = Some(e);
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

    /// The answer to a finished sequence whose first `cached_tokens` prompt tokens came from
    /// the prompt cache: its [`Completion`] and its tokens (for the prompt cache), or the error
    /// that ended it on its own.
    pub(crate) fn into_answer(
        self,
        cached_tokens: usize,
    ) -> Result<(Completion, Vec<u32>), EngineError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let logprobs = self.top_logprobs.map(|_| {
            let end = self.text.len();
            // Tokens of a stop string are cut from the text, and so from its tokens.
            self.logprobs
                .into_iter()
                .filter(|t| t.text_offset < end)
                .collect()
        });
        let completion = Completion {
            completion_tokens: self.tokens.len() - self.prompt_len,
            prompt_tokens: self.prompt_len,
            cached_tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            text: self.text,
            logprobs,
        };
        Ok((completion, self.tokens))
    }
}
