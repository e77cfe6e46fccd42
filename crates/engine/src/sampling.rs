//! Picking tokens: checking a request's [`SamplingParams`], building the sampler they describe
//! (greedy, temperature, nucleus; seeded), and the log-probabilities reported with each
//! generated token.

use std::hash::{BuildHasher, Hasher};

use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::tokenizer::GgufTokenizer;
use crate::{EngineError, SamplingParams, TokenLogprob, TopLogprob, MAX_TOP_LOGPROBS};

/// Checks a request's sampling parameters before it is queued: a finite, non-negative
/// temperature, at most [`MAX_TOP_LOGPROBS`] alternatives, `top_p` in `(0, 1]`.
pub(crate) fn validate(p: &SamplingParams) -> Result<(), EngineError> {
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

/// The sampler `params` describe: argmax at temperature 0, else sampling at the temperature
/// from all tokens or the nucleus (`top_p` below 1); seeded with `params.seed`, or a random
/// seed when there is none.
pub(crate) fn sampler(params: &SamplingParams) -> LogitsProcessor {
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
    LogitsProcessor::from_sampling(seed, sampling)
}

/// The log-probability of `next` and the `k` most likely tokens under `logits` (raw, before
/// temperature, as vLLM and OpenAI report them).
pub(crate) fn token_logprob(
    logits: &[f32],
    next: u32,
    k: usize,
    text_offset: usize,
    tok: &GgufTokenizer,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let entry = |id: u32| TopLogprob {
        id,
        bytes: tok.token_bytes(id),
        logprob: logits[id as usize] - log_z,
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
    } else {
        order.clear();
    }
    TokenLogprob {
        token: entry(next),
        text_offset,
        top: order.into_iter().map(entry).collect(),
    }
}
