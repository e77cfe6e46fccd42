//! Label Studio result regions and the per-control values batchlab reads out of them.
//!
//! An annotation or prediction `result` is a list of regions, each naming the control it belongs
//! to (`from_name`), the object it labels (`to_name`), its `type` and a type-specific `value`.
//! [`field_values`] folds such a list into one [`FieldValue`] per control, which is what
//! accuracy comparisons, exports and fine-tuning data work with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::{ControlKind, ControlTag, LabelConfig};

/// One region of a Label Studio `result` list, as LS stores and accepts it.
///
/// Fields batchlab does not interpret (`origin`, `readonly`, `original_width`, ...) are kept in
/// `extra` so a region read from LS can be written back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// Region id; LS generates one when it is missing, per-region classifications reuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Name of the control tag the region belongs to.
    pub from_name: String,
    /// Name of the object tag(s) it labels, comma-joined when there are several.
    pub to_name: String,
    /// The lowercased control tag name: `choices`, `textarea`, `labels`, `rating`, `number`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Type-specific payload, e.g. `{"choices": ["yes"]}`.
    pub value: Value,
    /// Per-region confidence shown in the LS UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Every other field of the region, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// A labelled text span: character offsets into the object's text and one label.
///
/// A region carrying several labels becomes several spans, so that each span has exactly one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// Offset of the first character (Unicode code points, as LS counts them).
    pub start: usize,
    /// Offset one past the last character.
    pub end: usize,
    /// The covered text; may be empty when the answer did not say it.
    pub text: String,
    /// The `Label` value attached to the span.
    pub label: String,
}

/// The answer one control holds in one annotation or prediction.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// Selected `Choice` values (one for a single-choice control).
    Choices(Vec<String>),
    /// Free text from a `TextArea`.
    Text(String),
    /// Stars given on a `Rating`.
    Rating(u32),
    /// Value of a `Number` control.
    Number(f64),
    /// Labelled spans of a `Labels` control.
    Spans(Vec<Span>),
}

impl FieldValue {
    /// A key that is equal exactly when two values count as the same answer for accuracy:
    /// choices sorted and joined with '|', text trimmed+lowercased with whitespace collapsed,
    /// rating/number as their decimal string, spans sorted "start-end:label" joined with '|'.
    pub fn comparison_key(&self) -> String {
        match self {
            FieldValue::Choices(choices) => {
                let mut sorted: Vec<&str> = choices.iter().map(String::as_str).collect();
                sorted.sort_unstable();
                sorted.join("|")
            }
            FieldValue::Text(text) => text
                .split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
                .join(" "),
            FieldValue::Rating(rating) => rating.to_string(),
            FieldValue::Number(number) => number.to_string(),
            FieldValue::Spans(spans) => {
                let mut keys: Vec<(usize, usize, &str)> = spans
                    .iter()
                    .map(|s| (s.start, s.end, s.label.as_str()))
                    .collect();
                keys.sort_unstable();
                keys.iter()
                    .map(|(start, end, label)| format!("{start}-{end}:{label}"))
                    .collect::<Vec<_>>()
                    .join("|")
            }
        }
    }

    /// JSON for exports and fine-tuning answers: single choice -> "yes", multiple -> ["a","b"],
    /// text -> "..", rating/number -> number, spans -> [{"start","end","text","label"}].
    ///
    /// A single-choice control holding zero or several choices (an invalid value) stays a list,
    /// so nothing is lost; integral numbers are written without a fraction.
    pub fn to_json(&self, control: &ControlTag) -> Value {
        match self {
            FieldValue::Choices(choices) => match (&control.kind, choices.as_slice()) {
                (ControlKind::Choices { multiple: false, .. }, [only]) => json!(only),
                _ => json!(choices),
            },
            FieldValue::Text(text) => json!(text),
            FieldValue::Rating(rating) => json!(rating),
            FieldValue::Number(number) => number_json(*number),
            FieldValue::Spans(spans) => Value::Array(
                spans
                    .iter()
                    .map(|s| json!({"start": s.start, "end": s.end, "text": s.text, "label": s.label}))
                    .collect(),
            ),
        }
    }
}

/// A number as JSON, integral values without a fraction (`3`, not `3.0`).
pub fn number_json(number: f64) -> Value {
    // 2^53: every integer up to here is exact in an f64, so the cast is lossless.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() <= EXACT {
        json!(number as i64)
    } else {
        json!(number)
    }
}

/// The value of every control present in an annotation or prediction result, keyed by control
/// name (from_name). Regions of unknown controls are ignored; several `labels` regions of one
/// control merge into one Spans value; TextArea texts are joined with "\n".
///
/// Regions whose `type` does not match their control, or whose value is malformed, are skipped
/// too: [`LabelConfig::validate_result`] is the place that reports them. Several `choices`
/// regions of one control merge (first occurrence kept); for rating and number the last wins.
pub fn field_values(config: &LabelConfig, result: &[Region]) -> BTreeMap<String, FieldValue> {
    let mut values: BTreeMap<String, FieldValue> = BTreeMap::new();
    for region in result {
        let Some(control) = config.control(&region.from_name) else {
            continue;
        };
        if region.kind != control.type_name() {
            continue;
        }
        let Some(value) = region_value(&control.kind, &region.value) else {
            continue;
        };
        match (values.get_mut(&control.name), value) {
            (Some(FieldValue::Choices(have)), FieldValue::Choices(more)) => {
                for choice in more {
                    if !have.contains(&choice) {
                        have.push(choice);
                    }
                }
            }
            (Some(FieldValue::Text(have)), FieldValue::Text(more)) => {
                have.push('\n');
                have.push_str(&more);
            }
            (Some(FieldValue::Spans(have)), FieldValue::Spans(more)) => have.extend(more),
            (_, value) => {
                values.insert(control.name.clone(), value);
            }
        }
    }
    values
}

/// Reads one region's `value` for a control of the given kind; `None` when it is malformed.
fn region_value(kind: &ControlKind, value: &Value) -> Option<FieldValue> {
    match kind {
        ControlKind::Choices { .. } => string_list(value.get("choices")?).map(FieldValue::Choices),
        ControlKind::TextArea => {
            string_list(value.get("text")?).map(|t| FieldValue::Text(t.join("\n")))
        }
        ControlKind::Rating { .. } => {
            let rating = value.get("rating")?;
            let rating = rating.as_u64().or_else(|| {
                rating
                    .as_f64()
                    .filter(|r| r.fract() == 0.0 && *r >= 0.0)
                    .map(|r| r as u64)
            })?;
            u32::try_from(rating).ok().map(FieldValue::Rating)
        }
        ControlKind::Number { .. } => value.get("number")?.as_f64().map(FieldValue::Number),
        ControlKind::Labels { .. } => {
            let start = offset(value.get("start")?)?;
            let end = offset(value.get("end")?)?;
            let text = value
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let labels = string_list(value.get("labels")?)?;
            Some(FieldValue::Spans(
                labels
                    .into_iter()
                    .map(|label| Span {
                        start,
                        end,
                        text: text.to_owned(),
                        label,
                    })
                    .collect(),
            ))
        }
    }
}

/// A JSON list made only of strings.
pub(crate) fn string_list(value: &Value) -> Option<Vec<String>> {
    value
        .as_array()?
        .iter()
        .map(|item| item.as_str().map(str::to_owned))
        .collect()
}

/// A character offset: a non-negative integer, possibly written as an integral float.
pub(crate) fn offset(value: &Value) -> Option<usize> {
    let n = value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    })?;
    usize::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LabelConfig {
        LabelConfig::parse(
            r#"<View>
              <Text name="text" value="$text"/>
              <Choices name="tags" toName="text" choice="multiple">
                <Choice value="a"/><Choice value="b"/><Choice value="c"/>
              </Choices>
              <Choices name="sentiment" toName="text"><Choice value="pos"/><Choice value="neg"/></Choices>
              <TextArea name="notes" toName="text"/>
              <Rating name="stars" toName="text" maxRating="10"/>
              <Number name="count" toName="text" min="0" max="100"/>
              <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels>
            </View>"#,
        )
        .expect("config parses")
    }

    fn region(from: &str, kind: &str, value: Value) -> Region {
        Region {
            id: None,
            from_name: from.into(),
            to_name: "text".into(),
            kind: kind.into(),
            value,
            score: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn region_serde_keeps_unknown_fields_and_skips_absent_options() {
        let raw = json!({"id": "r1", "from_name": "sentiment", "to_name": "text", "type": "choices",
                         "value": {"choices": ["pos"]}, "origin": "manual", "readonly": false});
        let read: Region = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(read.id.as_deref(), Some("r1"));
        assert_eq!(read.kind, "choices");
        assert_eq!(read.extra.get("origin"), Some(&json!("manual")));
        assert_eq!(serde_json::to_value(&read).unwrap(), raw);

        let bare = region("sentiment", "choices", json!({"choices": ["pos"]}));
        let written = serde_json::to_value(&bare).unwrap();
        assert!(written.get("id").is_none() && written.get("score").is_none());
    }

    #[test]
    fn comparison_keys() {
        assert_eq!(
            FieldValue::Choices(vec!["b".into(), "a".into()]).comparison_key(),
            "a|b"
        );
        assert_eq!(
            FieldValue::Text("  Hello \n  World ".into()).comparison_key(),
            "hello world"
        );
        assert_eq!(FieldValue::Rating(4).comparison_key(), "4");
        assert_eq!(FieldValue::Number(3.0).comparison_key(), "3");
        assert_eq!(FieldValue::Number(2.5).comparison_key(), "2.5");
        let span = |start, end, label: &str| Span {
            start,
            end,
            text: String::new(),
            label: label.into(),
        };
        let a = FieldValue::Spans(vec![span(5, 9, "LOC"), span(0, 4, "PER")]);
        let b = FieldValue::Spans(vec![span(0, 4, "PER"), span(5, 9, "LOC")]);
        assert_eq!(a.comparison_key(), "0-4:PER|5-9:LOC");
        assert_eq!(a.comparison_key(), b.comparison_key());
    }

    #[test]
    fn to_json_shapes() {
        let config = config();
        let single = config.control("sentiment").unwrap();
        let multiple = config.control("tags").unwrap();
        assert_eq!(
            FieldValue::Choices(vec!["pos".into()]).to_json(single),
            json!("pos")
        );
        assert_eq!(
            FieldValue::Choices(vec!["a".into()]).to_json(multiple),
            json!(["a"])
        );
        assert_eq!(
            FieldValue::Text("hi".into()).to_json(config.control("notes").unwrap()),
            json!("hi")
        );
        assert_eq!(
            FieldValue::Rating(3).to_json(config.control("stars").unwrap()),
            json!(3)
        );
        let count = config.control("count").unwrap();
        assert_eq!(FieldValue::Number(7.0).to_json(count), json!(7));
        assert_eq!(FieldValue::Number(7.5).to_json(count), json!(7.5));
        let spans = FieldValue::Spans(vec![Span {
            start: 0,
            end: 3,
            text: "Bob".into(),
            label: "PER".into(),
        }]);
        assert_eq!(
            spans.to_json(config.control("ner").unwrap()),
            json!([{"start": 0, "end": 3, "text": "Bob", "label": "PER"}])
        );
    }

    #[test]
    fn field_values_merge_and_skip() {
        let config = config();
        let result = vec![
            region("tags", "choices", json!({"choices": ["a"]})),
            region("tags", "choices", json!({"choices": ["c", "a"]})),
            region("notes", "textarea", json!({"text": ["one", "two"]})),
            region("notes", "textarea", json!({"text": ["three"]})),
            region(
                "ner",
                "labels",
                json!({"start": 0, "end": 3, "text": "Bob", "labels": ["PER"]}),
            ),
            region(
                "ner",
                "labels",
                json!({"start": 7, "end": 12, "text": "Paris", "labels": ["LOC", "PER"]}),
            ),
            region("stars", "rating", json!({"rating": 4})),
            region("count", "number", json!({"number": 2.5})),
            region("unknown", "choices", json!({"choices": ["x"]})),
            region("sentiment", "textarea", json!({"text": ["wrong type"]})),
            region("rect", "rectanglelabels", json!({"x": 1})),
        ];
        let values = field_values(&config, &result);
        assert_eq!(values.len(), 5, "{values:?}");
        assert_eq!(
            values["tags"],
            FieldValue::Choices(vec!["a".into(), "c".into()])
        );
        assert_eq!(values["notes"], FieldValue::Text("one\ntwo\nthree".into()));
        assert_eq!(values["stars"], FieldValue::Rating(4));
        assert_eq!(values["count"], FieldValue::Number(2.5));
        let FieldValue::Spans(spans) = &values["ner"] else {
            panic!("spans expected")
        };
        assert_eq!(spans.len(), 3);
        assert_eq!(values["ner"].comparison_key(), "0-3:PER|7-12:LOC|7-12:PER");
        assert_eq!(spans[1].text, "Paris");
    }
}
