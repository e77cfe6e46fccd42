//! Choice scoring: the probability of each member of a closed set of answers.
//!
//! A candidate's log-probability is the sum of its tokens' log-probabilities as a continuation
//! of the prompt (the end-of-turn token included, so that "Yes" and "Yes, but" differ);
//! probabilities are those log-probabilities normalised over the set (a softmax), which is
//! what makes a `<Choices>` prediction's `score` honest.

use crate::{ChatMessage, EngineError};

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

/// Checks a token question before it is queued.
pub(crate) fn validate(q: &TokenQuestion, context_length: usize) -> Result<(), EngineError> {
    if q.prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if q.candidates.is_empty() {
        return Err(EngineError::InvalidRequest(
            "a choice question needs at least one candidate".into(),
        ));
    }
    if q.candidates.iter().any(Vec::is_empty) {
        return Err(EngineError::InvalidRequest(
            "a candidate answer is empty".into(),
        ));
    }
    let longest = q.candidates.iter().map(Vec::len).max().unwrap_or(0);
    if q.prompt.len() + longest > context_length {
        return Err(EngineError::InvalidRequest(format!(
            "prompt ({}) plus the longest candidate ({}) exceed the context of {} tokens",
            q.prompt.len(),
            longest,
            context_length
        )));
    }
    Ok(())
}

/// Natural-log softmax of one logits row at `token`.
pub(crate) fn log_softmax_at(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[token as usize] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_a_softmax_of_logprobs() {
        let s = ChoiceScores::from_logprobs(vec![(0.5f64).ln(), (0.25f64).ln(), (0.25f64).ln()], 3);
        assert!((s.probs[0] - 0.5).abs() < 1e-12);
        assert!((s.probs[1] - 0.25).abs() < 1e-12);
        assert_eq!(s.best(), 0);
        // Unnormalised inputs are normalised over the set.
        let s = ChoiceScores::from_logprobs(vec![-10.0, -10.0 + (3f64).ln()], 3);
        assert!((s.probs[1] - 0.75).abs() < 1e-12, "{:?}", s.probs);
        assert_eq!(s.best(), 1);
    }

    #[test]
    fn log_softmax_matches_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for t in 0..3 {
            let want = (logits[t] as f64).exp() / z;
            assert!((log_softmax_at(&logits, t as u32).exp() - want).abs() < 1e-9);
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = TokenQuestion {
            prompt: vec![1, 2],
            candidates: vec![vec![3], vec![4, 5]],
        };
        validate(&ok, 10).unwrap();
        let err = |q: TokenQuestion| validate(&q, 4).unwrap_err().to_string();
        assert!(err(TokenQuestion {
            prompt: vec![],
            ..ok.clone()
        })
        .contains("empty"));
        assert!(err(TokenQuestion {
            candidates: vec![],
            ..ok.clone()
        })
        .contains("at least one"));
        assert!(err(TokenQuestion {
            candidates: vec![vec![]],
            ..ok.clone()
        })
        .contains("empty"));
        assert!(err(TokenQuestion {
            prompt: vec![1, 2, 3],
            ..ok.clone()
        })
        .contains("exceed"));
    }
}
