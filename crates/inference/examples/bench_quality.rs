//! Prediction quality of the ML backend's closed answers (run by `scripts/bench-quality.sh`):
//! for each dataset, every row's features are computed once through the code `/predict` uses
//! ([`task_features`]: zero-shot scores with the content-free and batch priors removed, and the
//! task's embedding), then for each number of annotations given (the first N of a seeded
//! shuffle of the training pool) a classifier is trained and cross-validated exactly as the
//! backend does ([`learn::train`]), and the evaluation rows (never given) are answered by it
//! where it beats zero-shot, else zero-shot.
//!
//! Usage: bench_quality MODEL DATASETS_DIR OUT_JSON
//!
//! Writes, per dataset and split (three seeded splits of the same rows), the rows used (training
//! pool in the order annotations are given, evaluation rows) and per N the accuracy, macro-F1
//! and expected calibration error, so that `scripts/bench_quality.py` can train its baselines
//! on exactly the same rows and report means over the splits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use batchlab_core::config::Config;
use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_inference::engine::Engine;
use batchlab_inference::predict::learn::{self, Sample};
use batchlab_inference::predict::task::{task_features, PredictOptions, Priors, TaskFeatures};
use futures::StreamExt;
use serde_json::{json, Value};

/// Annotations given, in order.
const GIVEN: [usize; 5] = [0, 20, 50, 100, 200];

/// Seeds of the splits into annotations given and rows evaluated: every figure is the mean
/// over these, since 20 or 50 annotations drawn at random vary a lot.
const SPLITS: [u64; 3] = [11, 12, 13];

/// Rows the features of which are computed at once (the engine batches them).
const IN_FLIGHT: usize = 32;

struct Dataset {
    name: &'static str,
    file: &'static str,
    labels: &'static [&'static str],
    /// Rows per label in the subset (None: every row).
    per_label: Option<usize>,
    pool: usize,
}

const DATASETS: [Dataset; 2] = [
    Dataset {
        name: "sms_spam (balanced)",
        file: "sms_spam.jsonl",
        labels: &["ham", "spam"],
        per_label: Some(200),
        pool: 200,
    },
    Dataset {
        name: "trec",
        file: "trec_test.jsonl",
        labels: &[
            "abbreviation",
            "description",
            "entity",
            "human",
            "location",
            "numeric",
        ],
        per_label: None,
        pool: 200,
    },
];

fn config_xml(labels: &[&str]) -> String {
    let choices: String = labels
        .iter()
        .map(|l| format!(r#"<Choice value="{l}"/>"#))
        .collect();
    format!(
        r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single" showInline="true">{choices}</Choices></View>"#
    )
}

/// Row ids (line numbers) of the subset in a seeded order: for a balanced one, the first
/// `per_label` distinct texts of each label in a seeded order, shuffled again.
fn subset(rows: &[(String, String)], d: &Dataset) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    learn::seeded_shuffle(&mut order, 7);
    let Some(per_label) = d.per_label else {
        return order;
    };
    let mut seen = std::collections::HashSet::new();
    let mut taken = vec![0usize; d.labels.len()];
    let mut out = Vec::new();
    for i in order {
        let (text, label) = &rows[i];
        let Some(l) = d.labels.iter().position(|x| x == label) else {
            continue;
        };
        if taken[l] < per_label && seen.insert(text.clone()) {
            taken[l] += 1;
            out.push(i);
        }
    }
    // Taking each label's quota in one pass leaves the rarer label bunched at the end (SMS Spam
    // is 87 % ham: its first 200 rows held 10 % spam, its last 150 only spam), a project
    // ordered by label. The subset is asked in a seeded order of its own, as a project's
    // imported rows would come.
    learn::seeded_shuffle(&mut out, 8);
    out
}

fn macro_f1(gold: &[usize], predicted: &[usize], classes: usize) -> f64 {
    let mut f1s = Vec::new();
    for c in 0..classes {
        let tp = gold
            .iter()
            .zip(predicted)
            .filter(|(g, p)| **g == c && **p == c)
            .count() as f64;
        let fp = gold
            .iter()
            .zip(predicted)
            .filter(|(g, p)| **g != c && **p == c)
            .count() as f64;
        let fn_ = gold
            .iter()
            .zip(predicted)
            .filter(|(g, p)| **g == c && **p != c)
            .count() as f64;
        if tp + fp + fn_ > 0.0 {
            f1s.push(2.0 * tp / (2.0 * tp + fp + fn_));
        }
    }
    f1s.iter().sum::<f64>() / f1s.len().max(1) as f64
}

fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > p[b] { i } else { b })
}

/// Accuracy, macro-F1 and ECE of `probs` against `gold`.
fn metrics(gold: &[usize], probs: &[Vec<f64>], classes: usize) -> Value {
    let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
    let right = gold.iter().zip(&predicted).filter(|(g, p)| g == p).count();
    let mut counts = vec![0usize; classes];
    predicted.iter().for_each(|p| counts[*p] += 1);
    json!({
        "accuracy": right as f64 / gold.len() as f64,
        "macro_f1": macro_f1(gold, &predicted, classes),
        "ece": learn::expected_calibration_error(gold, probs),
        "predicted_per_class": counts,
    })
}

async fn features(
    engine: &Engine,
    config: &LabelConfig,
    texts: Vec<String>,
    priors: &Priors,
) -> Vec<TaskFeatures> {
    futures::stream::iter(texts)
        .map(|text| async move {
            task_features(
                engine,
                config,
                &json!({ "text": text }),
                None,
                &PredictOptions::default(),
                priors,
            )
            .await
            .expect("features")
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await
}

async fn run(engine: &Engine, dir: &Path, d: &Dataset) -> Value {
    let rows: Vec<(String, String)> = std::fs::read_to_string(dir.join(d.file))
        .expect("dataset")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["text"].as_str().unwrap_or_default().to_string(),
                v["label"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let ids = subset(&rows, d);
    let config = LabelConfig::parse(&config_xml(d.labels)).expect("config");
    let priors = Priors::default();
    let started = Instant::now();
    let texts: Vec<String> = ids.iter().map(|i| rows[*i].0.clone()).collect();
    let all = features(engine, &config, texts, &priors).await;
    let seconds = started.elapsed().as_secs_f64();
    let label = |i: usize| {
        d.labels
            .iter()
            .position(|l| *l == rows[i].1)
            .expect("a known label")
    };
    // The features are computed once; each split deals the same rows into annotations given
    // and rows evaluated anew.
    let mut splits = Vec::new();
    for seed in SPLITS {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        learn::seeded_shuffle(&mut order, seed);
        let (pool, eval) = order.split_at(d.pool.min(order.len()));
        let sample = |k: &usize| Sample {
            zero_shot: all[*k].zero_shot["label"].clone(),
            embedding: all[*k].embedding.clone(),
            label: label(ids[*k]),
            weight: 1.0,
        };
        let train_all: Vec<Sample> = pool.iter().map(sample).collect();
        let eval_samples: Vec<Sample> = eval.iter().map(sample).collect();
        let results = evaluate(d, seed, &train_all, &eval_samples);
        let row_ids = |ks: &[usize]| ks.iter().map(|k| ids[*k]).collect::<Vec<_>>();
        splits.push(json!({
            "seed": seed,
            "pool": row_ids(pool),
            "eval": row_ids(eval),
            "results": results,
        }));
    }
    json!({
        "name": d.name,
        "file": d.file,
        "labels": d.labels,
        "feature_seconds": seconds,
        "rows_per_second": ids.len() as f64 / seconds,
        "splits": splits,
    })
}

/// For each number of annotations given (the first of `train_all`): the classifier trained
/// and cross-validated as the backend does, and its answers (or zero-shot's, where it does not
/// beat zero-shot) measured on `eval_samples`.
fn evaluate(d: &Dataset, seed: u64, train_all: &[Sample], eval_samples: &[Sample]) -> Vec<Value> {
    let gold: Vec<usize> = eval_samples.iter().map(|s| s.label).collect();
    let classes = d.labels.len();
    let zero: Vec<Vec<f64>> = eval_samples
        .iter()
        .map(|s| learn::softmax_t(&s.zero_shot, 1.0))
        .collect();
    let mut results = Vec::new();
    for n in GIVEN {
        let given = &train_all[..n.min(train_all.len())];
        let t = Instant::now();
        let trained = (n > 0).then(|| learn::train(given, classes));
        let (probs, used, cv) = match trained {
            Some(Ok((model, evaluation))) if evaluation.learned_wins() => (
                eval_samples
                    .iter()
                    .map(|s| model.predict(&s.zero_shot, &s.embedding))
                    .collect(),
                "learned",
                serde_json::to_value(&evaluation).unwrap_or_default(),
            ),
            Some(Ok((_, evaluation))) => (
                zero.clone(),
                "zero-shot (learned lost on held-out)",
                serde_json::to_value(&evaluation).unwrap_or_default(),
            ),
            Some(Err(e)) => (zero.clone(), "zero-shot", json!(e.to_string())),
            None => (zero.clone(), "zero-shot", Value::Null),
        };
        let train_seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "{}, split {seed}: {n} annotations: {used} ({train_seconds:.1} s)",
            d.name
        );
        let mut m = metrics(&gold, &probs, classes);
        m["annotations"] = json!(n);
        m["used"] = json!(used);
        m["cross_validation"] = cv;
        m["train_seconds"] = json!(train_seconds);
        results.push(m);
    }
    results
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().expect("MODEL"));
    let dir = PathBuf::from(args.next().expect("DATASETS_DIR"));
    let out = PathBuf::from(args.next().expect("OUT_JSON"));
    let mut config = Config::default();
    config.engine.model_path = model;
    let engine = Arc::new(
        Engine::load(batchlab_inference::engine_config(&config.engine)).expect("model loads"),
    );
    let mut report = Vec::new();
    for d in &DATASETS {
        report.push(run(&engine, &dir, d).await);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json")).expect("write");
}
