//! Accuracy of predictions against ground truth, per field: agreement, a confusion matrix and
//! Cohen's kappa for categorical fields (Choices, Rating).
//!
//! Definitions, stated once so that reports are comparable:
//! - a *comparison* is one field of one task that has both a prediction and a ground-truth value;
//! - two values agree when their [`FieldValue::comparison_key`]s are equal (choices as a set,
//!   text trimmed, case-folded and whitespace-collapsed, numbers exactly);
//! - `field_accuracy` is agreement over that field's comparisons; `overall_accuracy` is agreement
//!   over all comparisons of all fields (micro average); both are `null` with nothing compared;
//! - kappa is `(p_o - p_e) / (1 - p_e)` over the field's confusion matrix, `null` when `p_e = 1`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::labelstudio::config::{ControlKind, LabelConfig};
use crate::labelstudio::region::FieldValue;

/// One side of a comparison: the key that decides agreement and the label a person reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Equal keys agree.
    pub key: String,
    /// What the confusion matrix shows.
    pub label: String,
}

impl Answer {
    /// The answer a parsed value gives.
    pub fn of(value: &FieldValue) -> Answer {
        let key = value.comparison_key();
        let label = match value {
            FieldValue::Choices(c) => c.join("|"),
            _ => key.clone(),
        };
        Answer { key, label }
    }

    /// A prediction given as JSON for a control: parsed against the control when it fits, else
    /// kept as its raw text (which then agrees with nothing in the config).
    pub fn from_json(config: &LabelConfig, field: &str, value: &Value) -> Option<Answer> {
        let control = config.control(field)?;
        Some(match control.parse_answer(value) {
            Ok(v) => Answer::of(&v),
            Err(_) => {
                let raw = match value {
                    Value::String(s) => s.trim().to_lowercase(),
                    other => other.to_string(),
                };
                Answer {
                    key: format!("\u{0}invalid:{raw}"),
                    label: raw,
                }
            }
        })
    }
}

/// Accuracy of one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FieldReport {
    /// Comparisons made.
    pub compared: u64,
    /// Comparisons that agreed.
    pub correct: u64,
    /// `correct / compared`.
    pub accuracy: Option<f64>,
    /// Cohen's kappa; `null` for text and number fields, and when undefined (`p_e = 1`).
    pub kappa: Option<f64>,
    /// Ground-truth label → predicted label → count (categorical fields only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<BTreeMap<String, BTreeMap<String, u64>>>,
}

/// Counts behind a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Predictions given.
    pub predictions: u64,
    /// Predictions whose task has ground truth.
    pub tasks_compared: u64,
    /// Predictions skipped because their task has no ground truth.
    pub skipped_no_ground_truth: u64,
    /// Field comparisons made.
    pub comparisons: u64,
    /// Comparisons that agreed.
    pub correct: u64,
}

/// The answer of the accuracy endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AccuracyReport {
    /// Agreement over all comparisons.
    pub overall_accuracy: Option<f64>,
    /// Agreement per field.
    pub field_accuracy: BTreeMap<String, Option<f64>>,
    /// What was compared and skipped.
    pub counts: Counts,
    /// Per field: counts, kappa, confusion.
    pub fields: BTreeMap<String, FieldReport>,
    /// Prediction fields the labeling config does not have (not compared).
    pub unknown_fields: Vec<String>,
    /// Up to 100 task ids skipped for lack of ground truth.
    pub skipped_task_ids: Vec<i64>,
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// Compares predictions (task id → field → answer) with ground truth (task id → field → value).
pub fn compare(
    config: &LabelConfig,
    ground_truth: &BTreeMap<i64, BTreeMap<String, FieldValue>>,
    predictions: impl IntoIterator<Item = (i64, BTreeMap<String, Option<Answer>>)>,
) -> AccuracyReport {
    let mut report = AccuracyReport::default();
    let mut pairs: BTreeMap<String, Vec<(Answer, Answer)>> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    for (task_id, fields) in predictions {
        report.counts.predictions += 1;
        let Some(gold) = ground_truth.get(&task_id) else {
            report.counts.skipped_no_ground_truth += 1;
            if report.skipped_task_ids.len() < 100 {
                report.skipped_task_ids.push(task_id);
            }
            continue;
        };
        report.counts.tasks_compared += 1;
        for (field, predicted) in fields {
            let Some(predicted) = predicted else {
                unknown.insert(field);
                continue;
            };
            if let Some(truth) = gold.get(&field) {
                pairs
                    .entry(field)
                    .or_default()
                    .push((Answer::of(truth), predicted));
            }
        }
    }
    for (field, pairs) in pairs {
        let categorical = matches!(
            config.control(&field).map(|c| &c.kind),
            Some(ControlKind::Choices { .. } | ControlKind::Rating { .. })
        );
        let fr = field_report(&pairs, categorical);
        report.counts.comparisons += fr.compared;
        report.counts.correct += fr.correct;
        report.field_accuracy.insert(field.clone(), fr.accuracy);
        report.fields.insert(field, fr);
    }
    report.overall_accuracy = ratio(report.counts.correct, report.counts.comparisons);
    report.unknown_fields = unknown.into_iter().collect();
    report
}

fn field_report(pairs: &[(Answer, Answer)], categorical: bool) -> FieldReport {
    let compared = pairs.len() as u64;
    let correct = pairs.iter().filter(|(t, p)| t.key == p.key).count() as u64;
    let mut fr = FieldReport {
        compared,
        correct,
        accuracy: ratio(correct, compared),
        ..Default::default()
    };
    if categorical && compared > 0 {
        let mut confusion: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut truth_totals: BTreeMap<&str, u64> = BTreeMap::new();
        let mut pred_totals: BTreeMap<&str, u64> = BTreeMap::new();
        for (t, p) in pairs {
            *confusion
                .entry(t.label.clone())
                .or_default()
                .entry(p.label.clone())
                .or_default() += 1;
            *truth_totals.entry(&t.key).or_default() += 1;
            *pred_totals.entry(&p.key).or_default() += 1;
        }
        let n = compared as f64;
        let p_o = correct as f64 / n;
        let p_e: f64 = truth_totals
            .iter()
            .map(|(k, c)| (*c as f64 / n) * (*pred_totals.get(k).unwrap_or(&0) as f64 / n))
            .sum();
        fr.kappa = (p_e < 1.0 - 1e-12).then(|| (p_o - p_e) / (1.0 - p_e));
        fr.confusion = Some(confusion);
    }
    fr
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CONFIG: &str = r#"<View><Text name="t" value="$text"/>
      <Choices name="label" toName="t"><Choice value="pos"/><Choice value="neg"/></Choices>
      <TextArea name="why" toName="t"/></View>"#;

    fn gold(label: &str, why: &str) -> BTreeMap<String, FieldValue> {
        BTreeMap::from([
            (
                "label".to_string(),
                FieldValue::Choices(vec![label.to_string()]),
            ),
            ("why".to_string(), FieldValue::Text(why.to_string())),
        ])
    }

    fn pred(config: &LabelConfig, v: Value) -> BTreeMap<String, Option<Answer>> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), Answer::from_json(config, k, v)))
            .collect()
    }

    #[test]
    fn a_hand_computed_example() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        // Ground truth: pos, pos, neg, neg. Predictions: pos, neg, neg, neg (+ a task without truth).
        let truth = BTreeMap::from([
            (1, gold("pos", "Good")),
            (2, gold("pos", "x")),
            (3, gold("neg", "y")),
            (4, gold("neg", "z")),
        ]);
        let preds = vec![
            (1, pred(&config, json!({"label": "pos", "why": "  good "}))),
            (2, pred(&config, json!({"label": "neg", "extra": 1}))),
            (3, pred(&config, json!({"label": "Neg"}))),
            (4, pred(&config, json!({"label": "neg"}))),
            (9, pred(&config, json!({"label": "pos"}))),
        ];
        let r = compare(&config, &truth, preds);
        assert_eq!(r.counts.predictions, 5);
        assert_eq!(r.counts.skipped_no_ground_truth, 1);
        assert_eq!(r.skipped_task_ids, vec![9]);
        assert_eq!(r.unknown_fields, vec!["extra".to_string()]);
        let label = &r.fields["label"];
        assert_eq!((label.compared, label.correct), (4, 3));
        // p_o = 3/4; truth pos 2, neg 2; predicted pos 1, neg 3; p_e = .5*.25 + .5*.75 = .5
        assert!((label.kappa.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(label.confusion.as_ref().unwrap()["pos"]["neg"], 1);
        assert_eq!(r.field_accuracy["why"], Some(1.0));
        assert!(r.fields["why"].confusion.is_none());
        assert_eq!(r.overall_accuracy, Some(4.0 / 5.0));
    }

    #[test]
    fn values_outside_the_config_are_wrong_not_skipped() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        let truth = BTreeMap::from([(1, gold("pos", "a"))]);
        let r = compare(
            &config,
            &truth,
            vec![(1, pred(&config, json!({"label": "definitely"})))],
        );
        assert_eq!(r.field_accuracy["label"], Some(0.0));
        assert_eq!(
            r.fields["label"].confusion.as_ref().unwrap()["pos"]["definitely"],
            1
        );
        // p_o = 0, p_e = 1 * 0 = 0: kappa 0, no better than chance.
        assert_eq!(r.fields["label"].kappa, Some(0.0));
    }

    #[test]
    fn nothing_compared_is_null() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        let r = compare(&config, &BTreeMap::new(), vec![]);
        assert_eq!(r.overall_accuracy, None);
    }
}
