//! Learning a closed question from annotations: a light classifier over what the engine already
//! computes for a task — its zero-shot answer scores and its pooled hidden states (an
//! embedding) — trained from the project's annotations, kept only while it beats zero-shot on
//! held-out annotations, with scores calibrated so that 0.8 means right four times in five.
//!
//! The model is a softmax regression that **starts at zero-shot**: the logit of option `c` is
//! `α·z_c + b_c + w_c·x`, where `z` is the zero-shot log-probabilities, `x` the standardized
//! embedding, and `α = 1, b = 0, w = 0` before any training. Only `w` is penalized, so with a
//! handful of annotations it learns the model's label bias and how far to trust it (`α`, `b`),
//! and with more it learns from the text itself (`w`). Fitted by full-batch gradient descent
//! (Adam): deterministic, a few thousand rows of a few hundred features in well under a second.
//!
//! [`train`] cross-validates: the penalty is chosen on held-out folds, the out-of-fold
//! predictions give the held-out accuracy of zero-shot and of the learned model (the learned one
//! is used only when it is better), a temperature that calibrates the scores, and the expected
//! calibration error reported to users.

use serde::{Deserialize, Serialize};

/// One annotated task as the learner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The zero-shot log-probability of each option (any constant offset; only differences count).
    pub zero_shot: Vec<f64>,
    /// The task's embedding.
    pub embedding: Vec<f32>,
    /// The annotated option.
    pub label: usize,
    /// How much this annotation counts (ground truth counts more than an ordinary annotation).
    pub weight: f64,
}

/// Weight of a ground-truth annotation relative to an ordinary one.
pub const GROUND_TRUTH_WEIGHT: f64 = 2.0;

/// Fewest annotations a classifier is trained from: below that, held-out accuracy says nothing.
pub const MIN_SAMPLES: usize = 8;

/// Penalties on `w` tried by cross-validation (per unit of total sample weight).
const PENALTIES: [f64; 4] = [0.01, 0.1, 1.0, 10.0];

/// Most folds of the cross-validation.
const FOLDS: usize = 5;

/// Gradient steps of one fit.
const STEPS: usize = 300;

/// Bins of the expected calibration error.
const ECE_BINS: usize = 10;

/// A trained classifier for one closed question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classifier {
    /// Options (classes).
    pub classes: usize,
    /// Embedding dimensions the classifier reads.
    pub dims: usize,
    /// Mean of each embedding dimension over the training rows (standardization).
    pub mean: Vec<f64>,
    /// Inverse standard deviation of each embedding dimension (0 for a constant dimension).
    pub inv_std: Vec<f64>,
    /// Weight on the zero-shot log-probabilities.
    pub alpha: f64,
    /// Per-option bias.
    pub bias: Vec<f64>,
    /// Per-option embedding weights, `classes × dims`, row-major.
    pub weights: Vec<f64>,
    /// Divides the logits before the softmax: fitted on held-out predictions so scores are
    /// calibrated.
    pub temperature: f64,
}

/// What cross-validation found, shown on `/status` and in the quality benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Annotations used.
    pub samples: usize,
    /// Held-out accuracy of the zero-shot answer.
    pub zero_shot_accuracy: f64,
    /// Held-out accuracy of the learned classifier.
    pub learned_accuracy: f64,
    /// Expected calibration error of the learned classifier's held-out scores (after the
    /// temperature).
    pub learned_ece: f64,
    /// Expected calibration error of the zero-shot scores on the same rows.
    pub zero_shot_ece: f64,
    /// The penalty cross-validation chose.
    pub penalty: f64,
}

impl Evaluation {
    /// Whether the learned classifier should answer instead of zero-shot: more accurate on
    /// held-out annotations, or as accurate with better calibrated scores.
    pub fn learned_wins(&self) -> bool {
        self.learned_accuracy > self.zero_shot_accuracy
            || (self.learned_accuracy == self.zero_shot_accuracy
                && self.learned_ece < self.zero_shot_ece)
    }
}

/// Why no classifier could be trained.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LearnError {
    /// Too few annotations, or all of one option.
    #[error("{0} annotations of {1} different options: at least {MIN_SAMPLES} of 2 are needed")]
    TooFew(usize, usize),
    /// Rows of different shapes.
    #[error("annotation {0} does not match the others (options or embedding size)")]
    Shape(usize),
}

/// Trains a classifier on `samples` (each with `classes` options), cross-validated: answers the
/// classifier fitted on all samples with its calibrated temperature, and what held-out folds
/// say of it and of zero-shot.
pub fn train(samples: &[Sample], classes: usize) -> Result<(Classifier, Evaluation), LearnError> {
    let dims = samples.first().map_or(0, |s| s.embedding.len());
    for (i, s) in samples.iter().enumerate() {
        if s.zero_shot.len() != classes || s.embedding.len() != dims || s.label >= classes {
            return Err(LearnError::Shape(i));
        }
    }
    let distinct = {
        let mut seen = vec![false; classes];
        samples.iter().for_each(|s| seen[s.label] = true);
        seen.iter().filter(|s| **s).count()
    };
    if samples.len() < MIN_SAMPLES || distinct < 2 {
        return Err(LearnError::TooFew(samples.len(), distinct));
    }
    let folds = fold_of(samples);
    // Out-of-fold logits for each penalty; the penalty with the lowest held-out loss wins.
    let mut best: Option<(f64, f64, Vec<Vec<f64>>)> = None;
    for penalty in PENALTIES {
        let held_out = out_of_fold(samples, classes, &folds, penalty);
        let loss = weighted_nll(samples, &held_out, 1.0);
        if best.as_ref().is_none_or(|(l, _, _)| loss < *l) {
            best = Some((loss, penalty, held_out));
        }
    }
    let (_, penalty, held_out) = best.expect("PENALTIES is not empty");
    let temperature = fit_temperature(samples, &held_out);
    let learned: Vec<Vec<f64>> = held_out.iter().map(|l| softmax_t(l, temperature)).collect();
    let zero: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| softmax_t(&s.zero_shot, 1.0))
        .collect();
    let evaluation = Evaluation {
        samples: samples.len(),
        zero_shot_accuracy: accuracy(samples, &zero),
        learned_accuracy: accuracy(samples, &learned),
        learned_ece: ece(samples, &learned),
        zero_shot_ece: ece(samples, &zero),
        penalty,
    };
    let mut classifier = fit(samples, classes, penalty);
    classifier.temperature = temperature;
    Ok((classifier, evaluation))
}

impl Classifier {
    /// The calibrated probability of each option for one task.
    pub fn predict(&self, zero_shot: &[f64], embedding: &[f32]) -> Vec<f64> {
        softmax_t(&self.logits(zero_shot, embedding), self.temperature)
    }

    /// Whether the classifier reads tasks of this shape.
    pub fn fits(&self, zero_shot: &[f64], embedding: &[f32]) -> bool {
        zero_shot.len() == self.classes && embedding.len() == self.dims
    }

    fn logits(&self, zero_shot: &[f64], embedding: &[f32]) -> Vec<f64> {
        self.logits_std(zero_shot, &self.standardize(embedding))
    }

    fn standardize(&self, embedding: &[f32]) -> Vec<f64> {
        embedding
            .iter()
            .zip(self.mean.iter().zip(&self.inv_std))
            .map(|(v, (m, s))| (f64::from(*v) - m) * s)
            .collect()
    }
}

/// Each sample's fold: a fixed shuffle (so the folds mix the annotations' order) dealt round
/// robin within each option, so every fold holds each option in proportion.
fn fold_of(samples: &[Sample]) -> Vec<usize> {
    let k = FOLDS.min(samples.len());
    let mut order: Vec<usize> = (0..samples.len()).collect();
    seeded_shuffle(&mut order, 0);
    order.sort_by_key(|&i| samples[i].label);
    let mut fold = vec![0; samples.len()];
    for (rank, &i) in order.iter().enumerate() {
        fold[i] = rank % k;
    }
    fold
}

/// Shuffles `items` in an order fixed by `seed` (Fisher-Yates over SplitMix64): reproducible
/// folds and benchmark splits on every machine, without a random-number dependency.
pub fn seeded_shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

/// Each sample's logits from a classifier fitted without its fold.
fn out_of_fold(samples: &[Sample], classes: usize, folds: &[usize], penalty: f64) -> Vec<Vec<f64>> {
    let k = folds.iter().max().map_or(1, |m| m + 1);
    let mut logits = vec![Vec::new(); samples.len()];
    for f in 0..k {
        let train: Vec<Sample> = samples
            .iter()
            .zip(folds)
            .filter(|(_, g)| **g != f)
            .map(|(s, _)| s.clone())
            .collect();
        let model = fit(&train, classes, penalty);
        for (i, s) in samples.iter().enumerate() {
            if folds[i] == f {
                logits[i] = model.logits(&s.zero_shot, &s.embedding);
            }
        }
    }
    logits
}

/// Fits `α`, `b` and `w` on `samples` (temperature 1), minimizing the weighted mean negative
/// log-likelihood plus `penalty / 2 · |w|²`.
fn fit(samples: &[Sample], classes: usize, penalty: f64) -> Classifier {
    let dims = samples.first().map_or(0, |s| s.embedding.len());
    let n = samples.len().max(1) as f64;
    let mut mean = vec![0.0; dims];
    for s in samples {
        for (m, v) in mean.iter_mut().zip(&s.embedding) {
            *m += f64::from(*v) / n;
        }
    }
    let mut var = vec![0.0; dims];
    for s in samples {
        for ((q, v), m) in var.iter_mut().zip(&s.embedding).zip(&mean) {
            *q += (f64::from(*v) - m).powi(2) / n;
        }
    }
    let inv_std = var
        .iter()
        .map(|q| if *q > 1e-12 { 1.0 / q.sqrt() } else { 0.0 })
        .collect();
    let mut model = Classifier {
        classes,
        dims,
        mean,
        inv_std,
        alpha: 1.0,
        bias: vec![0.0; classes],
        weights: vec![0.0; classes * dims],
        temperature: 1.0,
    };
    let xs: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| model.standardize(&s.embedding))
        .collect();
    let total: f64 = samples
        .iter()
        .map(|s| s.weight)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    // Parameters in one vector for Adam: α, b (classes), w (classes × dims).
    let size = 1 + classes + classes * dims;
    let mut adam = Adam::new(size);
    for _ in 0..STEPS {
        let mut grad = vec![0.0; size];
        for (s, x) in samples.iter().zip(&xs) {
            let p = softmax_t(&model.logits_std(&s.zero_shot, x), 1.0);
            for c in 0..classes {
                let g = s.weight / total * (p[c] - f64::from(u8::from(c == s.label)));
                grad[0] += g * s.zero_shot[c];
                grad[1 + c] += g;
                let row = &mut grad[1 + classes + c * dims..1 + classes + (c + 1) * dims];
                for (r, xv) in row.iter_mut().zip(x) {
                    *r += g * xv;
                }
            }
        }
        for (g, w) in grad[1 + classes..].iter_mut().zip(&model.weights) {
            *g += penalty * w;
        }
        let step = adam.step(&grad);
        model.alpha -= step[0];
        for (b, d) in model.bias.iter_mut().zip(&step[1..1 + classes]) {
            *b -= d;
        }
        for (w, d) in model.weights.iter_mut().zip(&step[1 + classes..]) {
            *w -= d;
        }
    }
    model
}

impl Classifier {
    /// The logits for an embedding already standardized (`x`).
    fn logits_std(&self, zero_shot: &[f64], x: &[f64]) -> Vec<f64> {
        (0..self.classes)
            .map(|c| {
                let w = &self.weights[c * self.dims..(c + 1) * self.dims];
                self.alpha * zero_shot[c] + self.bias[c] + dot(w, x)
            })
            .collect()
    }
}

/// The Adam optimizer's state (Kingma & Ba): per-parameter steps scaled by running moments.
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    const RATE: f64 = 0.05;
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;

    fn new(size: usize) -> Adam {
        Adam {
            m: vec![0.0; size],
            v: vec![0.0; size],
            t: 0,
        }
    }

    /// The amount to subtract from each parameter for gradient `grad`.
    fn step(&mut self, grad: &[f64]) -> Vec<f64> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        grad.iter()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .map(|(g, (m, v))| {
                *m = Self::B1 * *m + (1.0 - Self::B1) * g;
                *v = Self::B2 * *v + (1.0 - Self::B2) * g * g;
                Self::RATE * (*m / c1) / ((*v / c2).sqrt() + 1e-8)
            })
            .collect()
    }
}

/// The temperature (on a log grid from 1/4 to 8) with the lowest weighted negative
/// log-likelihood of the held-out logits.
fn fit_temperature(samples: &[Sample], logits: &[Vec<f64>]) -> f64 {
    (0..=60)
        .map(|i| 0.25 * 2f64.powf(f64::from(i) / 12.0))
        .map(|t| (weighted_nll(samples, logits, t), t))
        .fold((f64::INFINITY, 1.0), |a, b| if b.0 < a.0 { b } else { a })
        .1
}

fn weighted_nll(samples: &[Sample], logits: &[Vec<f64>], temperature: f64) -> f64 {
    let total: f64 = samples.iter().map(|s| s.weight).sum();
    samples
        .iter()
        .zip(logits)
        .map(|(s, l)| -s.weight * softmax_t(l, temperature)[s.label].max(1e-300).ln())
        .sum::<f64>()
        / total
}

/// Softmax of `logits / temperature`.
pub fn softmax_t(logits: &[f64], temperature: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > p[b] { i } else { b })
}

/// Share of `samples` (unweighted) whose most probable option is the annotated one.
pub fn accuracy(samples: &[Sample], probs: &[Vec<f64>]) -> f64 {
    let right = samples
        .iter()
        .zip(probs)
        .filter(|(s, p)| argmax(p) == s.label)
        .count();
    right as f64 / samples.len().max(1) as f64
}

/// Expected calibration error: the answers binned by their probability (10 equal bins), the
/// mean gap between each bin's confidence and its accuracy, weighted by the bin's share.
pub fn ece(samples: &[Sample], probs: &[Vec<f64>]) -> f64 {
    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    expected_calibration_error(&labels, probs)
}

/// [`ece`] for bare labels: `probs[i]` is the probability of each option for row `i`, whose
/// right option is `labels[i]`.
pub fn expected_calibration_error(labels: &[usize], probs: &[Vec<f64>]) -> f64 {
    // Per bin: summed confidence, answers right, rows.
    let mut bins = [(0.0f64, 0.0f64, 0usize); ECE_BINS];
    for (label, p) in labels.iter().zip(probs) {
        let best = argmax(p);
        let confidence = p[best];
        let bin = ((confidence * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        bins[bin].0 += confidence;
        bins[bin].1 += f64::from(u8::from(best == *label));
        bins[bin].2 += 1;
    }
    let n = labels.len().max(1) as f64;
    bins.iter()
        .filter(|b| b.2 > 0)
        .map(|(conf, right, _)| (conf - right).abs() / n)
        .sum()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of numbers in [-1, 1).
    fn noise(seed: u64) -> impl FnMut() -> f64 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// `n` rows of 3 options whose label is written in embedding dimension `label` (plus
    /// noise), with zero-shot scores that always prefer option 0 (a biased model).
    fn separable(n: usize, seed: u64) -> Vec<Sample> {
        let mut r = noise(seed);
        (0..n)
            .map(|i| {
                let label = i % 3;
                let mut embedding: Vec<f32> = (0..8).map(|_| (0.3 * r()) as f32).collect();
                embedding[label] += 1.0;
                Sample {
                    zero_shot: vec![0.0, -2.0, -2.0],
                    embedding,
                    label,
                    weight: 1.0,
                }
            })
            .collect()
    }

    #[test]
    fn learns_what_the_embedding_says_and_beats_a_biased_zero_shot() {
        let rows = separable(60, 1);
        let (model, eval) = train(&rows, 3).unwrap();
        assert!(eval.learned_wins(), "{eval:?}");
        assert!(eval.learned_accuracy > 0.9, "{eval:?}");
        assert!(
            (eval.zero_shot_accuracy - 1.0 / 3.0).abs() < 1e-9,
            "{eval:?}"
        );
        let fresh = separable(30, 2);
        let right = fresh
            .iter()
            .filter(|s| argmax(&model.predict(&s.zero_shot, &s.embedding)) == s.label)
            .count();
        assert!(right >= 27, "{right}/30 unseen rows right");
    }

    #[test]
    fn keeps_zero_shot_when_the_embedding_is_noise() {
        // Zero-shot is right 80 % of the time; the embedding carries nothing.
        let mut r = noise(3);
        let rows: Vec<Sample> = (0..50)
            .map(|i| {
                let label = i % 2;
                let said = if i % 5 == 0 { 1 - label } else { label };
                let mut zero_shot = vec![-1.5, -1.5];
                zero_shot[said] = -0.3;
                Sample {
                    zero_shot,
                    embedding: (0..16).map(|_| r() as f32).collect(),
                    label,
                    weight: 1.0,
                }
            })
            .collect();
        let (_, eval) = train(&rows, 2).unwrap();
        assert!((eval.zero_shot_accuracy - 0.8).abs() < 1e-9, "{eval:?}");
        assert!(eval.learned_accuracy <= 0.8 + 1e-9, "{eval:?}");
        // A strong penalty keeps the noise out.
        assert!(eval.penalty >= 1.0, "{eval:?}");
    }

    #[test]
    fn the_temperature_calibrates_overconfident_scores() {
        // Zero-shot says its answer with probability ~0.999, and is right 70 % of the time.
        let rows: Vec<Sample> = (0..100)
            .map(|i| {
                let label = i % 2;
                let said = if i % 10 < 3 { 1 - label } else { label };
                let mut zero_shot = vec![-8.0, -8.0];
                zero_shot[said] = 0.0;
                Sample {
                    zero_shot,
                    embedding: vec![0.0; 4],
                    label,
                    weight: 1.0,
                }
            })
            .collect();
        let (model, eval) = train(&rows, 2).unwrap();
        assert!(eval.zero_shot_ece > 0.25, "{eval:?}");
        assert!(eval.learned_ece < 0.1, "{eval:?}");
        let p = model.predict(&[0.0, -8.0], &[0.0; 4]);
        assert!((0.55..0.85).contains(&p[0]), "{p:?}");
    }

    #[test]
    fn refuses_too_few_or_one_sided_annotations() {
        assert_eq!(
            train(&separable(7, 1), 3).unwrap_err(),
            LearnError::TooFew(7, 3)
        );
        let mut one = separable(12, 1);
        one.iter_mut().for_each(|s| s.label = 0);
        assert_eq!(train(&one, 3).unwrap_err(), LearnError::TooFew(12, 1));
        let mut bad = separable(12, 1);
        bad[4].embedding.pop();
        assert_eq!(train(&bad, 3).unwrap_err(), LearnError::Shape(4));
    }

    #[test]
    fn training_is_deterministic() {
        let rows = separable(40, 5);
        assert_eq!(train(&rows, 3).unwrap(), train(&rows, 3).unwrap());
    }

    #[test]
    fn ece_of_known_bins() {
        // Two rows at 0.9 (one right), two at 0.6 (both right): |0.9 − 0.5|·½ + |0.6 − 1|·½.
        let probs = vec![
            vec![0.9, 0.1],
            vec![0.9, 0.1],
            vec![0.6, 0.4],
            vec![0.4, 0.6],
        ];
        let e = expected_calibration_error(&[0, 1, 0, 1], &probs);
        assert!((e - 0.4).abs() < 1e-12, "{e}");
    }
}
