//! A learned classifier in the real prediction path, on the real default model
//! (`models/SmolLM2-135M-Instruct.Q4_1.gguf`; skipped, saying so, when it is missing, and failing
//! then under `BATCHLAB_REQUIRE_MODELS`): `/predict`'s answer for a control with a classifier is
//! the classifier's reading of exactly the features a classifier is trained on, and batch
//! calibration keeps a project's answers from collapsing onto one option.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_inference::engine::testing::model_file;
use batchlab_inference::engine::Engine;
use batchlab_inference::predict::learn::{self, Classifier, Sample};
use batchlab_inference::predict::task::{
    predict_task, task_features, PredictOptions, Priors, Teaching,
};
use serde_json::json;

const SMS_CONFIG: &str = r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single"><Choice value="ham"/><Choice value="spam"/></Choices></View>"#;

const CONFIG: &str = r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single"><Choice value="abbreviation"/><Choice value="description"/><Choice value="entity"/><Choice value="human"/><Choice value="location"/><Choice value="numeric"/></Choices></View>"#;

/// SMS-like messages, half spam, with their labels (0 ham, 1 spam).
const SMS: [(&str, usize); 12] = [
    ("Are we still on for lunch tomorrow?", 0),
    ("Ok see you at home later", 0),
    ("Can you pick up milk on the way back", 0),
    ("Sorry I missed your call, will ring you tonight", 0),
    ("Happy birthday! Hope you have a great day", 0),
    ("I'm at the station, where are you?", 0),
    (
        "WINNER!! You have won a £1000 cash prize. Call 09061701461 now to claim",
        1,
    ),
    (
        "FREE entry in 2 a weekly competition to win FA Cup final tickets. Text FA to 87121",
        1,
    ),
    (
        "URGENT! Your mobile has been selected for a free upgrade. Reply YES to 80082",
        1,
    ),
    (
        "Congratulations, you have been chosen for a £500 voucher. Claim at www.prize.com",
        1,
    ),
    (
        "You have won a free holiday! Call 0800 123 456 to claim your reward now",
        1,
    ),
    (
        "Txt STOP to end. Get 100 free texts and unlimited minutes for £10 a month",
        1,
    ),
];

fn engine() -> Option<Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = model_file("SmolLM2-135M-Instruct.Q4_1.gguf")?;
            let mut config = batchlab_core::config::Config::default();
            config.engine.model_path = path;
            Some(
                Engine::load(batchlab_inference::engine_config(&config.engine))
                    .expect("the default model loads"),
            )
        })
        .clone()
}

/// A classifier over `dims`-dimensional embeddings that reads the zero-shot scores as they are
/// and adds `bias`.
fn classifier(dims: usize, bias: Vec<f64>) -> Classifier {
    Classifier {
        classes: bias.len(),
        dims,
        mean: vec![0.0; dims],
        inv_std: vec![1.0; dims],
        alpha: 1.0,
        weights: (0..bias.len() * dims)
            .map(|i| ((i % 7) as f64 - 3.0) * 0.5)
            .collect(),
        bias,
        temperature: 1.5,
    }
}

#[tokio::test]
async fn a_control_with_a_classifier_is_answered_from_the_training_features() {
    let Some(engine) = engine() else { return };
    let config = LabelConfig::parse(CONFIG).unwrap();
    let data = json!({"text": "What is the capital of Peru ?"});
    let features = task_features(
        &engine,
        &config,
        &data,
        None,
        &PredictOptions::default(),
        &Priors::default(),
    )
    .await
    .unwrap();
    assert_eq!(features.embedding.len(), engine.embedding_dimensions());
    let z = &features.zero_shot["label"];
    assert_eq!(z.len(), 6);
    let sum: f64 = z.iter().map(|v| v.exp()).sum();
    assert!(
        (sum - 1.0).abs() < 1e-9,
        "normalized log-probabilities: {z:?}"
    );

    let labels = [
        "abbreviation",
        "description",
        "entity",
        "human",
        "location",
        "numeric",
    ];
    for favoured in [0, 3] {
        let mut bias = vec![0.0; 6];
        bias[favoured] = 40.0;
        let model = classifier(engine.embedding_dimensions(), bias);
        let expected = model.predict(z, &features.embedding);
        let classifiers = BTreeMap::from([("label".to_string(), model)]);
        let teaching = Teaching {
            classifiers: Some(&classifiers),
            ..Teaching::default()
        };
        // A fresh `Priors`: the same first-task priors as the features were computed with.
        let prediction = predict_task(
            &engine,
            &config,
            &data,
            &teaching,
            &PredictOptions::default(),
            &Priors::default(),
        )
        .await
        .unwrap();
        let region = &prediction.result[0];
        assert_eq!(
            region.value["choices"],
            json!([labels[favoured]]),
            "{prediction:?}"
        );
        let best = expected.iter().copied().fold(0.0, f64::max);
        assert_eq!(region.score, Some(best), "{prediction:?} vs {expected:?}");
    }
}

#[tokio::test]
async fn batch_calibration_keeps_a_balanced_binary_set_from_collapsing() {
    let Some(engine) = engine() else { return };
    // The model's zero-shot bias (first option, short word) should not make every answer
    // the same once the project's own tasks are counted.
    let config = LabelConfig::parse(SMS_CONFIG).unwrap();
    let texts = SMS;
    let priors = Priors::default();
    let mut samples = Vec::new();
    for (text, label) in texts.iter().cycle().take(36) {
        let f = task_features(
            &engine,
            &config,
            &json!({ "text": text }),
            None,
            &PredictOptions::default(),
            &priors,
        )
        .await
        .unwrap();
        samples.push(Sample {
            zero_shot: f.zero_shot["label"].clone(),
            embedding: f.embedding,
            label: *label,
            weight: 1.0,
        });
    }
    // The last round of 12, asked after 24 tasks of the project were counted.
    let last = &samples[24..];
    let answers: Vec<usize> = last
        .iter()
        .map(|s| {
            if s.zero_shot[1] > s.zero_shot[0] {
                1
            } else {
                0
            }
        })
        .collect();
    let spam = answers.iter().sum::<usize>();
    assert!(
        (2..=10).contains(&spam),
        "{spam} of 12 answered spam: {answers:?}"
    );
    // Each text is there three times, so held-out folds hold copies of what was trained on:
    // the classifier over the real embeddings must recognize them.
    let (_, evaluation) = learn::train(&samples, 2).unwrap();
    assert!(evaluation.learned_accuracy >= 0.9, "{evaluation:?}");
}

/// 60 messages of the SMS Spam Collection v.1 (Almeida, Gómez Hidalgo & Yamakami, DocEng 2011;
/// see `../shared/datasets/README.md`), 30 ham and 30 spam, distinct, drawn with a seeded shuffle.
const SMS_SAMPLE: &str = include_str!("data/sms_spam_sample.jsonl");

#[tokio::test]
async fn zero_shot_answers_follow_what_the_text_says() {
    let Some(engine) = engine() else { return };
    // Asked "ham or spam?" directly, the default model answers real messages worse than a coin
    // (its scores rank them backwards: 0.30 of `bench-quality.sh`'s 400 right, even calibrated
    // on all 400 at once); asked how likely each kind of message is to read like the text (the
    // channel questions: "Write a spam message."), it tells them apart: 45 of 60 here, where
    // the direct question alone got 21 and channel questions naming the tag ("Write a spam
    // text.") 37.
    let config = LabelConfig::parse(SMS_CONFIG).unwrap();
    let priors = Priors::default();
    let mut answers = Vec::new();
    for line in SMS_SAMPLE.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let prediction = predict_task(
            &engine,
            &config,
            &json!({ "text": row["text"] }),
            &Teaching::default(),
            &PredictOptions::default(),
            &priors,
        )
        .await
        .unwrap();
        let answer = prediction.result[0].value["choices"][0].clone();
        answers.push((answer == row["label"], answer == "spam"));
    }
    let right = answers.iter().filter(|(r, _)| *r).count();
    let spam = answers.iter().filter(|(_, s)| *s).count();
    assert!(
        right >= 41 && (12..=48).contains(&spam),
        "{right} of 60 right, {spam} answered spam"
    );
}
