//! Picking tokens: checking a request's [`SamplingParams`], building the sampler they describe
//! (greedy, temperature, nucleus; seeded), and the log-probabilities reported with each
//! generated token.

use std::hash::{BuildHasher, Hasher};

use candle_core::{DType, Tensor};
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

/// Picks each next token as a request's sampling parameters say.
pub(crate) struct Sampler {
    /// Greedy (temperature 0): the first highest logit, read in place.
    greedy: bool,
    /// Temperature and nucleus sampling (candle's), seeded.
    random: LogitsProcessor,
}

impl Sampler {
    /// The next token from `logits` (1-D, vocabulary size).
    ///
    /// Greedy picks read the logits where they lie: candle's `argmax` went through its generic
    /// reduction one value at a time, about 2% of a 16-sequence decode step on SmolLM2, on the
    /// model thread while the other cores waited.
    pub(crate) fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        if !self.greedy {
            return self.random.sample(logits);
        }
        if logits.dtype() == DType::F32 {
            let (storage, layout) = logits.storage_and_layout();
            if let Ok(v) = crate::kernels::cpu_slice::<f32>(&storage, layout) {
                return Ok(first_max(v));
            }
        }
        // Elsewhere (another device, a strided view): candle's own argmax.
        self.random.sample(logits)
    }
}

/// The index of the first highest value, as candle's `argmax` answers: each value is compared
/// with the best so far, starting from the first, so a NaN wins only in the first place
/// (answered 0). The maximum is taken in 16 lanes (a NaN never replaces a lane's value), which
/// the compiler vectorises, then found again from the start.
fn first_max(v: &[f32]) -> u32 {
    const LANES: usize = 16;
    let Some(&first) = v.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let chunks = v.chunks_exact(LANES);
    let mut lanes = [first; LANES];
    for x in chunks.remainder() {
        if *x > lanes[0] {
            lanes[0] = *x;
        }
    }
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes.iter().fold(first, |m, &x| if x > m { x } else { m });
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The sampler `params` describe: argmax at temperature 0, else sampling at the temperature
/// from all tokens or the nucleus (`top_p` below 1); seeded with `params.seed`, or a random
/// seed when there is none.
pub(crate) fn sampler(params: &SamplingParams) -> Sampler {
    let seed = params.seed.unwrap_or_else(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    let greedy = params.temperature <= 0.0;
    let sampling = if greedy {
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
    Sampler {
        greedy,
        random: LogitsProcessor::from_sampling(seed, sampling),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Greedy picks match candle's `argmax`, ties (first wins) and NaNs included, read from a
    /// row of a larger tensor as the scheduler hands them over.
    #[test]
    fn greedy_picks_what_candles_argmax_picks() {
        let rows: [&[f32]; 5] = [
            &[0.5, 2.0, -1.0, 2.0],
            &[f32::NAN, 1.0, 3.0, 0.0],
            &[-3.0, -2.0, -2.0, -5.0],
            &[f32::NEG_INFINITY, f32::NEG_INFINITY, -1e30, f32::NAN],
            &[7.0, 7.0, 7.0, 7.0],
        ];
        let mut all: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let t = Tensor::from_vec(all.clone(), (rows.len(), 4), &Device::Cpu).unwrap();
        let mut greedy = sampler(&SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        });
        for (i, r) in rows.iter().enumerate() {
            let row = t.narrow(0, i, 1).unwrap().squeeze(0).unwrap();
            let want = row.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(greedy.sample(&row).unwrap(), want, "row {r:?}");
        }
        // Rows longer than the 16 lanes, the maximum in the tail, in a lane, twice, after NaNs.
        for (len, at) in [(53, 50), (53, 3), (64, 17), (100, 99)] {
            all = (0..len).map(|i| ((i * 37) % 23) as f32 - 40.0).collect();
            all[at] = 5.0;
            all[(at + 16) % len] = 5.0;
            all[(at + 5) % len] = f32::NAN;
            let row = Tensor::from_vec(all.clone(), len, &Device::Cpu).unwrap();
            let want = row.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(
                greedy.sample(&row).unwrap(),
                want,
                "length {len}, max at {at}"
            );
        }
    }
}
