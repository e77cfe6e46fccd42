//! Answers against a labeling config: a model's or a person's answer for one control read into a
//! value ([`ControlTag::parse_answer`]), values turned into result regions, and results checked
//! against the config ([`LabelConfig::validate_result`]). Parsing the config itself is
//! `config`'s job; this module sits above it and `region`, so neither imports the other's answers.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::error::InvalidInput;

use super::config::{ControlKind, ControlTag, LabelConfig};
use super::region::{field_values, offset, string_list, FieldValue, Region, Span};

impl LabelConfig {
    /// Problems of an annotation's result against this config; empty means valid.
    ///
    /// Regions of unsupported controls (e.g. `rectanglelabels`) are not checked.
    pub fn validate_result(&self, result: &[Region]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for region in result {
            let name = region.from_name.as_str();
            let Some(control) = self.control(name) else {
                if !self
                    .unsupported
                    .iter()
                    .any(|u| u.name.as_deref() == Some(name))
                {
                    problems.push(format!("{name}: not a control of this labeling config"));
                }
                continue;
            };
            *seen.entry(&control.name).or_default() += 1;
            if region.kind != control.type_name() {
                problems.push(format!(
                    "{name}: region type {:?} does not match the control (expected {:?})",
                    region.kind,
                    control.type_name()
                ));
                continue;
            }
            control.check_region_value(&region.value, &mut problems);
        }
        for control in &self.controls {
            let count = seen.get(control.name.as_str()).copied().unwrap_or(0);
            if count == 0 && control.required {
                problems.push(format!("{}: required but missing", control.name));
            }
            let single = !matches!(
                control.kind,
                ControlKind::Labels { .. } | ControlKind::TextArea
            );
            if count > 1 && single {
                problems.push(format!("{}: {count} regions, expected one", control.name));
            }
        }
        problems
    }

    /// Every control's value in `result`; shorthand for [`field_values`].
    pub fn field_values(&self, result: &[Region]) -> BTreeMap<String, FieldValue> {
        field_values(self, result)
    }
}

impl ControlTag {
    /// Reads a model's or a user's answer for this control — a JSON string, list of strings,
    /// number, or for Labels a list of {"start","end","text"?,"label"|"labels"} — into a value;
    /// choices matched exactly first, then case-insensitively and ignoring surrounding
    /// whitespace/quotes/trailing period; anything outside the config is Err with a message
    /// saying what and which control.
    ///
    /// Choices come out in config order. A multiple-choice control also takes one string of
    /// comma-separated options. A Labels entry with several labels gives one span per label;
    /// `text` defaults to "".
    pub fn parse_answer(&self, answer: &Value) -> Result<FieldValue, InvalidInput> {
        self.answer_value(answer).map_err(InvalidInput)
    }

    fn answer_value(&self, answer: &Value) -> Result<FieldValue, String> {
        let name = &self.name;
        match &self.kind {
            ControlKind::Choices { options, multiple } => {
                let picked = self.parse_choices(options, *multiple, answer)?;
                match picked.len() {
                    0 => Err(format!("{name}: no choice given")),
                    n if n > 1 && !multiple => {
                        Err(format!("{name}: {n} choices given, only one allowed"))
                    }
                    _ => Ok(FieldValue::Choices(picked)),
                }
            }
            ControlKind::TextArea => match answer {
                Value::String(text) => Ok(FieldValue::Text(text.clone())),
                Value::Number(n) => Ok(FieldValue::Text(n.to_string())),
                Value::Bool(b) => Ok(FieldValue::Text(b.to_string())),
                Value::Array(_) => string_list(answer)
                    .map(|lines| FieldValue::Text(lines.join("\n")))
                    .ok_or_else(|| format!("{name}: expected text, got {}", short(answer))),
                _ => Err(format!("{name}: expected text, got {}", short(answer))),
            },
            ControlKind::Rating { max } => {
                let n = answer_number(answer)
                    .ok_or_else(|| format!("{name}: expected a rating, got {}", short(answer)))?;
                if n.fract() != 0.0 || n < 1.0 || n > f64::from(*max) {
                    return Err(format!(
                        "{name}: rating {n} is not a whole number from 1 to {max}"
                    ));
                }
                Ok(FieldValue::Rating(n as u32))
            }
            ControlKind::Number { min, max } => {
                let n = answer_number(answer)
                    .ok_or_else(|| format!("{name}: expected a number, got {}", short(answer)))?;
                match number_problem(n, *min, *max) {
                    Some(problem) => Err(format!("{name}: {problem}")),
                    None => Ok(FieldValue::Number(n)),
                }
            }
            ControlKind::Labels { labels } => {
                self.parse_spans(labels, answer).map(FieldValue::Spans)
            }
        }
    }

    fn parse_choices(
        &self,
        options: &[String],
        multiple: bool,
        answer: &Value,
    ) -> Result<Vec<String>, String> {
        let name = &self.name;
        let items: Vec<String> = match answer {
            Value::String(s) => {
                if multiple && match_option(options, s).is_none() && s.contains(',') {
                    s.split(',')
                        .map(str::to_owned)
                        .filter(|p| !p.trim().is_empty())
                        .collect()
                } else {
                    vec![s.clone()]
                }
            }
            Value::Number(_) | Value::Bool(_) => vec![answer.to_string()],
            Value::Array(list) => list
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(_) | Value::Bool(_) => Ok(item.to_string()),
                    _ => Err(format!("{name}: expected a choice, got {}", short(item))),
                })
                .collect::<Result<_, _>>()?,
            Value::Object(map) if map.contains_key("choices") => {
                return self.parse_choices(options, multiple, &map["choices"]);
            }
            _ => return Err(format!("{name}: expected a choice, got {}", short(answer))),
        };
        let mut picked: Vec<String> = Vec::new();
        for item in &items {
            let option = match_option(options, item)
                .ok_or_else(|| format!("{name}: {item:?} is not one of {}", options.join(", ")))?;
            if !picked.contains(option) {
                picked.push(option.clone());
            }
        }
        // Config order, whatever order the answer listed them in.
        picked.sort_by_key(|p| options.iter().position(|o| o == p));
        Ok(picked)
    }

    fn parse_spans(&self, labels: &[String], answer: &Value) -> Result<Vec<Span>, String> {
        let name = &self.name;
        let entries = match answer {
            Value::Array(entries) => entries,
            Value::Object(map) => match map.get("spans").or_else(|| map.get("labels")) {
                Some(Value::Array(entries)) => entries,
                _ => {
                    return Err(format!(
                        "{name}: expected a list of spans, got {}",
                        short(answer)
                    ))
                }
            },
            _ => {
                return Err(format!(
                    "{name}: expected a list of spans, got {}",
                    short(answer)
                ))
            }
        };
        let mut spans = Vec::new();
        for entry in entries {
            let bad = || {
                format!(
                    "{name}: expected {{\"start\", \"end\", \"label\"}}, got {}",
                    short(entry)
                )
            };
            let start = entry.get("start").and_then(offset).ok_or_else(bad)?;
            let end = entry.get("end").and_then(offset).ok_or_else(bad)?;
            if start >= end {
                return Err(format!("{name}: span {start}-{end} is empty or reversed"));
            }
            let text = entry
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let given: Vec<String> = match entry.get("label").or_else(|| entry.get("labels")) {
                Some(Value::String(label)) => vec![label.clone()],
                Some(list @ Value::Array(_)) => string_list(list).ok_or_else(bad)?,
                _ => return Err(bad()),
            };
            if given.is_empty() {
                return Err(bad());
            }
            for label in &given {
                let label = match_option(labels, label).ok_or_else(|| {
                    format!(
                        "{name}: label {label:?} is not one of {}",
                        labels.join(", ")
                    )
                })?;
                spans.push(Span {
                    start,
                    end,
                    text: text.to_owned(),
                    label: label.clone(),
                });
            }
        }
        Ok(spans)
    }

    /// The Label Studio region for a value (to_name = to_name joined with ','), with an
    /// optional per-region score.
    ///
    /// A Spans value needs one region per span: use [`ControlTag::regions`] for it; this gives
    /// the region of its first span only (or an empty `labels` region when there is none).
    pub fn region(&self, value: &FieldValue, score: Option<f64>) -> Region {
        self.regions(value, score)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                self.make_region(
                    json!({"start": 0, "end": 0, "text": "", "labels": []}),
                    score,
                )
            })
    }

    /// The Label Studio regions for a value: one per span for Spans (none for no spans), a single
    /// region for everything else.
    pub fn regions(&self, value: &FieldValue, score: Option<f64>) -> Vec<Region> {
        match value {
            FieldValue::Choices(choices) => vec![self.make_region(json!({"choices": choices}), score)],
            FieldValue::Text(text) => vec![self.make_region(json!({"text": [text]}), score)],
            FieldValue::Rating(rating) => vec![self.make_region(json!({"rating": rating}), score)],
            FieldValue::Number(number) => {
                vec![self.make_region(json!({"number": super::region::number_json(*number)}), score)]
            }
            FieldValue::Spans(spans) => spans
                .iter()
                .map(|s| {
                    let value = json!({"start": s.start, "end": s.end, "text": s.text, "labels": [s.label]});
                    self.make_region(value, score)
                })
                .collect(),
        }
    }

    fn make_region(&self, value: Value, score: Option<f64>) -> Region {
        Region {
            id: None,
            from_name: self.name.clone(),
            to_name: self.to_name.join(","),
            kind: self.type_name().to_owned(),
            value,
            score,
            extra: serde_json::Map::new(),
        }
    }

    /// Appends what is wrong with a region `value` of this control's type to `problems`.
    fn check_region_value(&self, value: &Value, problems: &mut Vec<String>) {
        let name = &self.name;
        match &self.kind {
            ControlKind::Choices { options, multiple } => {
                let Some(choices) = value.get("choices").and_then(string_list) else {
                    problems.push(format!("{name}: value has no \"choices\" list of strings"));
                    return;
                };
                if choices.is_empty() {
                    problems.push(format!("{name}: no choice selected"));
                }
                if choices.len() > 1 && !multiple {
                    problems.push(format!(
                        "{name}: {} choices on a single-choice control",
                        choices.len()
                    ));
                }
                for choice in choices.iter().filter(|c| !options.contains(c)) {
                    problems.push(format!(
                        "{name}: {choice:?} is not one of {}",
                        options.join(", ")
                    ));
                }
            }
            ControlKind::TextArea => {
                if value.get("text").and_then(string_list).is_none() {
                    problems.push(format!("{name}: value has no \"text\" list of strings"));
                }
            }
            ControlKind::Rating { max } => match value.get("rating").and_then(Value::as_f64) {
                Some(r) if r.fract() == 0.0 && r >= 1.0 && r <= f64::from(*max) => {}
                Some(r) => problems.push(format!("{name}: rating {r} is not from 1 to {max}")),
                None => problems.push(format!("{name}: value has no numeric \"rating\"")),
            },
            ControlKind::Number { min, max } => match value.get("number").and_then(Value::as_f64) {
                Some(n) => {
                    if let Some(problem) = number_problem(n, *min, *max) {
                        problems.push(format!("{name}: {problem}"));
                    }
                }
                None => problems.push(format!("{name}: value has no numeric \"number\"")),
            },
            ControlKind::Labels { labels } => {
                let start = value.get("start").and_then(offset);
                let end = value.get("end").and_then(offset);
                match (start, end) {
                    (Some(start), Some(end)) if start >= end => {
                        problems.push(format!("{name}: span {start}-{end} is empty or reversed"));
                    }
                    (Some(_), Some(_)) => {}
                    _ => problems.push(format!(
                        "{name}: value has no integer \"start\" and \"end\""
                    )),
                }
                match value.get("labels").and_then(string_list) {
                    Some(given) if given.is_empty() => {
                        problems.push(format!("{name}: span has no label"))
                    }
                    Some(given) => {
                        for label in given.iter().filter(|l| !labels.contains(l)) {
                            problems.push(format!(
                                "{name}: label {label:?} is not one of {}",
                                labels.join(", ")
                            ));
                        }
                    }
                    None => {
                        problems.push(format!("{name}: value has no \"labels\" list of strings"))
                    }
                }
            }
        }
    }
}

/// The option `answer` stands for: exact match first, then ignoring case, surrounding
/// whitespace and quotes, and a trailing period.
fn match_option<'a>(options: &'a [String], answer: &str) -> Option<&'a String> {
    if let Some(exact) = options.iter().find(|o| o.as_str() == answer) {
        return Some(exact);
    }
    let wanted = loose(answer);
    options.iter().find(|o| loose(o) == wanted)
}

/// `answer` lowercased, without surrounding whitespace, quotes or a trailing period.
fn loose(answer: &str) -> String {
    const QUOTES: &[char] = &['"', '\'', '`', '“', '”', '‘', '’'];
    let mut s = answer.trim();
    loop {
        let next = s.trim_matches(QUOTES).trim().trim_end_matches('.').trim();
        if next == s {
            break;
        }
        s = next;
    }
    s.to_lowercase()
}

/// A number given as a JSON number or a numeric string (surrounding blanks and a trailing period
/// allowed).
fn answer_number(answer: &Value) -> Option<f64> {
    match answer {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('.').trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

/// Why `n` is outside `[min, max]`, if it is.
fn number_problem(n: f64, min: Option<f64>, max: Option<f64>) -> Option<String> {
    if !n.is_finite() {
        return Some(format!("{n} is not a number"));
    }
    match (min, max) {
        (Some(min), _) if n < min => Some(format!("{n} is below the minimum {min}")),
        (_, Some(max)) if n > max => Some(format!("{n} is above the maximum {max}")),
        _ => None,
    }
}

/// A JSON value shortened for an error message.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::labelstudio::config::{LabelConfigError, ObjectKind, ObjectTag, UnsupportedTag};

    /// The repository's copy of Label Studio's requests and configs.
    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn candidate_config() -> LabelConfig {
        let xml =
            std::fs::read_to_string(repo().join("config/label-configs/candidate-evaluation.xml"))
                .expect("fixture");
        LabelConfig::parse(&xml).expect("candidate-evaluation parses")
    }

    fn region(from: &str, kind: &str, value: Value) -> Region {
        Region {
            id: None,
            from_name: from.into(),
            to_name: "candidate_name".into(),
            kind: kind.into(),
            value,
            score: None,
            extra: serde_json::Map::new(),
        }
    }

    fn valid_candidate_result() -> Vec<Region> {
        vec![
            region("recommendation", "choices", json!({"choices": ["yes"]})),
            region("trajectory_rating", "choices", json!({"choices": ["good"]})),
            region("pedigree_rating", "choices", json!({"choices": ["weak"]})),
            region("reasoning", "textarea", json!({"text": ["solid"]})),
        ]
    }

    #[test]
    fn candidate_evaluation_config() {
        let config = candidate_config();
        let choices: Vec<&ControlTag> = config
            .controls
            .iter()
            .filter(|c| matches!(&c.kind, ControlKind::Choices { options, multiple: false } if options.len() == 5))
            .collect();
        assert_eq!(choices.len(), 3);
        assert!(choices
            .iter()
            .all(|c| c.required && c.to_name == ["candidate_name"]));
        assert_eq!(
            config.control("recommendation").unwrap().kind,
            ControlKind::Choices {
                options: ["strong_yes", "yes", "maybe", "no", "strong_no"]
                    .map(String::from)
                    .to_vec(),
                multiple: false
            }
        );
        let reasoning = config.control("reasoning").unwrap();
        assert_eq!(reasoning.kind, ControlKind::TextArea);
        assert!(!reasoning.required);
        assert_eq!(
            reasoning.description.as_deref(),
            Some("Explain your evaluation...")
        );
        assert_eq!(reasoning.type_name(), "textarea");
        assert_eq!(config.controls.len(), 4);

        let texts: Vec<(&str, Option<&str>)> = config
            .objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Text)
            .map(|o| (o.name.as_str(), o.variable.as_deref()))
            .collect();
        assert_eq!(
            texts,
            [
                ("candidate_name", Some("name")),
                ("candidate_title", Some("title")),
                ("candidate_company", Some("company"))
            ]
        );
        let headers: Vec<&ObjectTag> = config
            .objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Header)
            .collect();
        assert_eq!(headers.len(), 1);
        assert_eq!(
            (headers[0].name.as_str(), headers[0].value.as_str()),
            ("", "Candidate Evaluation")
        );
        assert_eq!(headers[0].variable, None);
        assert_eq!(config.data_fields(), ["name", "title", "company"]);
        assert!(config.unsupported.is_empty());
        assert_eq!(config.object("candidate_title").unwrap().value, "$title");
        assert!(config.require_predictable().is_ok());
        assert!(config.validate_result(&valid_candidate_result()).is_empty());
    }

    /// Every labeling config (`label_config`, `schema`) and every `result` list in a JSON value,
    /// with the JSON path of each result.
    fn collect(
        value: &Value,
        path: &str,
        configs: &mut Vec<String>,
        results: &mut Vec<(String, Value)>,
    ) {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    let here = format!("{path}.{key}");
                    match (key.as_str(), item) {
                        ("label_config" | "schema", Value::String(xml)) => {
                            configs.push(xml.clone())
                        }
                        ("result", Value::Array(_)) => results.push((here.clone(), item.clone())),
                        _ => {}
                    }
                    collect(item, &here, configs, results);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    collect(item, &format!("{path}[{i}]"), configs, results);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_fixture_config_and_result_parses_and_validates() {
        let dir = repo().join("tests/fixtures/label-studio-1.23");
        let project: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("project.json")).unwrap())
                .unwrap();
        let project_config = LabelConfig::parse(project["label_config"].as_str().unwrap()).unwrap();

        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(files.len() > 40, "fixtures missing from {}", dir.display());
        let (mut n_configs, mut n_results, mut n_checked) = (0, 0, 0);
        for file in &files {
            let json: Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            let (mut configs, mut results) = (Vec::new(), Vec::new());
            collect(&json, "", &mut configs, &mut results);
            let name = file.file_name().unwrap().to_string_lossy();
            let mut parsed = Vec::new();
            for xml in &configs {
                let config = LabelConfig::parse(xml).unwrap_or_else(|e| panic!("{name}: {e}"));
                config.require_predictable().unwrap();
                assert_eq!(config, project_config, "{name}: a different config");
                parsed.push(config);
            }
            n_configs += configs.len();
            let config = parsed.first().unwrap_or(&project_config);
            for (path, result) in results {
                let regions: Vec<Region> = serde_json::from_value(result.clone())
                    .unwrap_or_else(|e| panic!("{name}{path}: {e}"));
                n_results += 1;
                // An annotation or prediction; interactive `params.context.result` is a partial draft.
                if path.contains("annotation") || path.contains("prediction") {
                    assert_eq!(
                        config.validate_result(&regions),
                        Vec::<String>::new(),
                        "{name}{path}"
                    );
                    let values = field_values(config, &regions);
                    assert_eq!(values.len(), regions.len(), "{name}{path}");
                    // Regions rebuilt from the values read back to the same values.
                    let rebuilt: Vec<Region> = values
                        .iter()
                        .flat_map(|(control, value)| {
                            config.control(control).unwrap().regions(value, None)
                        })
                        .collect();
                    assert_eq!(field_values(config, &rebuilt), values, "{name}{path}");
                    // Serialising a region gives the JSON it came from.
                    assert_eq!(
                        serde_json::to_value(&regions).unwrap(),
                        result,
                        "{name}{path}"
                    );
                    n_checked += 1;
                }
            }
        }
        assert!(n_configs >= 30, "only {n_configs} configs found");
        // 13, 20 (+ its context), 21-32, task-1 (2), export-JSON (3), export-snapshot-JSON (6).
        assert_eq!((n_results, n_checked), (26, 25));
    }

    #[test]
    fn invalid_results_are_reported() {
        let config = candidate_config();
        // The valid result with `region` in place of the one of the same control (or added).
        let with = |region: Region| -> Vec<Region> {
            let mut result = valid_candidate_result();
            match result.iter_mut().find(|r| r.from_name == region.from_name) {
                Some(slot) => *slot = region,
                None => result.push(region),
            }
            result
        };
        let cases: Vec<(Vec<Region>, Vec<&str>)> = vec![
            (
                with(region(
                    "recommendation",
                    "choices",
                    json!({"choices": ["maybe_not"]}),
                )),
                vec![
                    r#"recommendation: "maybe_not" is not one of strong_yes, yes, maybe, no, strong_no"#,
                ],
            ),
            (
                with(region("verdict", "choices", json!({"choices": ["yes"]}))),
                vec!["verdict: not a control of this labeling config"],
            ),
            (
                with(region(
                    "recommendation",
                    "textarea",
                    json!({"text": ["yes"]}),
                )),
                vec![
                    r#"recommendation: region type "textarea" does not match the control (expected "choices")"#,
                ],
            ),
            (
                with(region(
                    "recommendation",
                    "choices",
                    json!({"choices": ["yes", "no"]}),
                )),
                vec!["recommendation: 2 choices on a single-choice control"],
            ),
            (
                with(region("recommendation", "choices", json!({"choices": []}))),
                vec!["recommendation: no choice selected"],
            ),
            (
                with(region(
                    "recommendation",
                    "choices",
                    json!({"choice": "yes"}),
                )),
                vec![r#"recommendation: value has no "choices" list of strings"#],
            ),
            (
                with(region(
                    "reasoning",
                    "textarea",
                    json!({"text": "not a list"}),
                )),
                vec![r#"reasoning: value has no "text" list of strings"#],
            ),
            (
                [
                    valid_candidate_result(),
                    vec![region(
                        "recommendation",
                        "choices",
                        json!({"choices": ["no"]}),
                    )],
                ]
                .concat(),
                vec!["recommendation: 2 regions, expected one"],
            ),
            (
                valid_candidate_result()
                    .into_iter()
                    .filter(|r| r.from_name != "pedigree_rating")
                    .collect(),
                vec!["pedigree_rating: required but missing"],
            ),
            (
                valid_candidate_result()
                    .into_iter()
                    .filter(|r| r.from_name != "reasoning")
                    .collect(),
                vec![],
            ),
            (
                vec![],
                vec![
                    "recommendation: required but missing",
                    "trajectory_rating: required but missing",
                    "pedigree_rating: required but missing",
                ],
            ),
        ];
        for (result, expected) in cases {
            assert_eq!(config.validate_result(&result), expected);
        }
    }

    const MIXED: &str = r#"<view>
      <Style>.x { color: red }</Style>
      <View style="display: flex">
        <Text name="body" value="$body"/>
        <Header value="Which topics apply?"/>
        <choices name="topics" toName="body" choice="multiple" hint="pick all that fit">
          <View><Choice value="Sports"/><Choice value="Politics"/></View>
          <Choice value="Tech"/>
        </choices>
      </View>
      <Rating name="quality" toName="body" maxRating="3" required="true"/>
      <Number name="count" toName="body" min="0" max="10"/>
      <Labels name="ner" toName="body"><Label value="PER"/><Label value="LOC"/></Labels>
      <View visibleWhen="choice-selected" whenTagName="topics">
        <TextArea name="why" toName="body" required="true"/>
      </View>
      <Text name="other" value="$body"/>
    </view>"#;

    #[test]
    fn rating_number_labels_and_multiple_choices_end_to_end() {
        let config = LabelConfig::parse(MIXED).unwrap();
        assert_eq!(config.data_fields(), ["body"]);
        let topics = config.control("topics").unwrap();
        assert_eq!(
            topics.kind,
            ControlKind::Choices {
                options: ["Sports", "Politics", "Tech"].map(String::from).to_vec(),
                multiple: true
            }
        );
        assert_eq!(
            topics.description.as_deref(),
            Some("Which topics apply? — pick all that fit")
        );
        let quality = config.control("quality").unwrap();
        assert_eq!(quality.kind, ControlKind::Rating { max: 3 });
        assert!(quality.required && quality.description.is_none());
        let count = config.control("count").unwrap();
        assert_eq!(
            count.kind,
            ControlKind::Number {
                min: Some(0.0),
                max: Some(10.0)
            }
        );
        let ner = config.control("ner").unwrap();
        assert_eq!(
            ner.kind,
            ControlKind::Labels {
                labels: vec!["PER".into(), "LOC".into()]
            }
        );
        let why = config.control("why").unwrap();
        assert!(
            !why.required,
            "a conditionally shown control cannot be required of every annotation"
        );

        let answers = [
            ("topics", json!(["tech", "Sports."])),
            ("quality", json!(2)),
            ("count", json!("7")),
            (
                "ner",
                json!([{"start": 0, "end": 3, "text": "Bob", "label": "PER"},
                           {"start": 10, "end": 15, "labels": ["LOC"]}]),
            ),
            ("why", json!(["line one", "line two"])),
        ];
        let mut result = Vec::new();
        let mut expected = BTreeMap::new();
        for (name, answer) in answers {
            let control = config.control(name).unwrap();
            let value = control
                .parse_answer(&answer)
                .unwrap_or_else(|e| panic!("{e}"));
            result.extend(control.regions(&value, Some(0.5)));
            expected.insert(name.to_owned(), value);
        }
        assert_eq!(
            expected["topics"],
            FieldValue::Choices(vec!["Sports".into(), "Tech".into()])
        );
        assert_eq!(expected["count"], FieldValue::Number(7.0));
        assert_eq!(
            expected["why"],
            FieldValue::Text("line one\nline two".into())
        );
        assert_eq!(result.len(), 6, "one region per span");
        assert!(result
            .iter()
            .all(|r| r.to_name == "body" && r.score == Some(0.5)));
        assert_eq!(config.validate_result(&result), Vec::<String>::new());
        assert_eq!(field_values(&config, &result), expected);
        let number = result.iter().find(|r| r.kind == "number").unwrap();
        assert_eq!(number.value, json!({"number": 7}));

        // The values' JSON reads back through parse_answer to the same values.
        for (name, value) in &expected {
            let control = config.control(name).unwrap();
            assert_eq!(
                &control.parse_answer(&value.to_json(control)).unwrap(),
                value,
                "{name}"
            );
        }

        // Out-of-range and unknown answers.
        assert!(quality
            .parse_answer(&json!(4))
            .unwrap_err()
            .contains("quality"));
        assert!(quality.parse_answer(&json!(0)).is_err());
        assert!(quality.parse_answer(&json!(2.5)).is_err());
        assert!(count
            .parse_answer(&json!(11))
            .unwrap_err()
            .contains("maximum"));
        assert!(count.parse_answer(&json!("lots")).is_err());
        assert!(ner
            .parse_answer(&json!([{"start": 3, "end": 3, "label": "PER"}]))
            .is_err());
        assert_eq!(
            ner.parse_answer(&json!([{"start": 0, "end": 3, "label": "ORG"}]))
                .unwrap_err(),
            r#"ner: label "ORG" is not one of PER, LOC"#
        );
        assert_eq!(
            ner.parse_answer(&json!([])).unwrap(),
            FieldValue::Spans(vec![])
        );
        assert_eq!(
            topics.parse_answer(&json!("Sports, tech")).unwrap(),
            FieldValue::Choices(vec!["Sports".into(), "Tech".into()])
        );

        // Invalid regions for these controls.
        let bad = |name: &str, kind: &str, value: Value| Region {
            to_name: "body".into(),
            ..region(name, kind, value)
        };
        let invalid = vec![
            bad("quality", "rating", json!({"rating": 4})),
            bad("count", "number", json!({"number": -1})),
            bad("count", "number", json!({"number": "three"})),
            bad(
                "ner",
                "labels",
                json!({"start": 5, "end": 2, "labels": ["MISC"]}),
            ),
            bad(
                "topics",
                "choices",
                json!({"choices": ["Sports", "Cooking"]}),
            ),
        ];
        assert_eq!(
            config.validate_result(&invalid),
            [
                "quality: rating 4 is not from 1 to 3",
                "count: -1 is below the minimum 0",
                r#"count: value has no numeric "number""#,
                "ner: span 5-2 is empty or reversed",
                r#"ner: label "MISC" is not one of PER, LOC"#,
                r#"topics: "Cooking" is not one of Sports, Politics, Tech"#,
                "count: 2 regions, expected one",
            ]
        );
    }

    #[test]
    fn parse_answer_matches_choices_loosely_and_rejects_others() {
        let config = candidate_config();
        let recommendation = config.control("recommendation").unwrap();
        let yes = FieldValue::Choices(vec!["yes".into()]);
        for answer in [
            json!("yes"),
            json!("Yes"),
            json!(" yes. "),
            json!("\"YES\""),
            json!(["yes"]),
            json!({"choices": ["yes"]}),
        ] {
            assert_eq!(
                recommendation.parse_answer(&answer).unwrap(),
                yes,
                "{answer}"
            );
        }
        assert_eq!(
            recommendation
                .parse_answer(&json!("definitely"))
                .unwrap_err(),
            r#"recommendation: "definitely" is not one of strong_yes, yes, maybe, no, strong_no"#
        );
        assert!(recommendation
            .parse_answer(&json!(["yes", "no"]))
            .unwrap_err()
            .contains("only one"));
        assert!(recommendation.parse_answer(&json!([])).is_err());
        assert!(recommendation.parse_answer(&json!(null)).is_err());
        let reasoning = config.control("reasoning").unwrap();
        assert_eq!(
            reasoning.parse_answer(&json!("fine")).unwrap(),
            FieldValue::Text("fine".into())
        );
        assert!(reasoning.parse_answer(&json!({"x": 1})).is_err());
    }

    #[test]
    fn region_round_trips_through_field_values() {
        let config = candidate_config();
        let mut result = Vec::new();
        let mut expected = BTreeMap::new();
        for (name, answer) in [
            ("recommendation", json!("strong_yes")),
            ("trajectory_rating", json!("Good")),
            ("pedigree_rating", json!("weak")),
            ("reasoning", json!("Strong record.")),
        ] {
            let control = config.control(name).unwrap();
            let value = control.parse_answer(&answer).unwrap();
            let region = control.region(&value, Some(0.9));
            assert_eq!(region.from_name, name);
            assert_eq!(region.to_name, "candidate_name");
            assert_eq!(region.kind, control.type_name());
            result.push(region);
            expected.insert(name.to_owned(), value);
        }
        assert_eq!(result[0].value, json!({"choices": ["strong_yes"]}));
        assert_eq!(result[3].value, json!({"text": ["Strong record."]}));
        assert!(config.validate_result(&result).is_empty());
        assert_eq!(field_values(&config, &result), expected);
        let reasoning = config.control("reasoning").unwrap();
        assert_eq!(
            expected["recommendation"].to_json(config.control("recommendation").unwrap()),
            json!("strong_yes")
        );
        assert_eq!(
            expected["reasoning"].to_json(reasoning),
            json!("Strong record.")
        );
    }

    #[test]
    fn unsupported_and_broken_configs() {
        let image_only = LabelConfig::parse(
            r#"<View><Image name="img" value="$image"/>
               <RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels></View>"#,
        )
        .unwrap();
        assert!(image_only.controls.is_empty() && image_only.objects.is_empty());
        assert_eq!(
            image_only.unsupported,
            [UnsupportedTag {
                tag: "RectangleLabels".into(),
                name: Some("box".into())
            }]
        );
        let err = image_only.require_predictable().unwrap_err();
        assert_eq!(
            err,
            LabelConfigError::NothingToPredict {
                unsupported: vec!["RectangleLabels".into()]
            }
        );
        assert!(err.to_string().contains("RectangleLabels"), "{err}");
        // Regions of unsupported controls are not this module's to judge.
        let rect = Region {
            kind: "rectanglelabels".into(),
            ..region("box", "rectanglelabels", json!({}))
        };
        assert!(image_only.validate_result(&[rect]).is_empty());

        let partly = LabelConfig::parse(
            r#"<View>
                 <Image name="img" value="$image"/><Text name="t" value="$text"/><HyperText name="h" value="$html"/>
                 <Choices name="on_image" toName="img"><Choice value="a"/></Choices>
                 <Choices name="per_region" toName="t" perRegion="true"><Choice value="a"/></Choices>
                 <Choices name="dynamic" toName="t" value="$options"/>
                 <Labels name="html_spans" toName="h"><Label value="X"/></Labels>
                 <Taxonomy name="tax" toName="t"><Choice value="a"/></Taxonomy>
                 <TextArea name="summary" toName="t,h"/>
               </View>"#,
        )
        .unwrap();
        assert_eq!(partly.controls.len(), 1);
        assert_eq!(partly.control("summary").unwrap().to_name, ["t", "h"]);
        let summary = partly.control("summary").unwrap();
        assert_eq!(
            summary.region(&FieldValue::Text("s".into()), None).to_name,
            "t,h"
        );
        let mut unsupported: Vec<&str> = partly
            .unsupported
            .iter()
            .filter_map(|u| u.name.as_deref())
            .collect();
        unsupported.sort_unstable();
        assert_eq!(
            unsupported,
            ["dynamic", "html_spans", "on_image", "per_region", "tax"]
        );
        assert!(partly.require_predictable().is_ok());
        assert_eq!(partly.data_fields(), ["text", "html"]);

        assert!(matches!(
            LabelConfig::parse("<View><Text name=\"t\" value=\"$t\"></View>"),
            Err(LabelConfigError::Xml(_))
        ));
        assert!(matches!(
            LabelConfig::parse("not xml at all"),
            Err(LabelConfigError::Xml(_))
        ));
        assert_eq!(
            LabelConfig::parse("<Panel/>"),
            Err(LabelConfigError::NoView)
        );
        assert_eq!(
            LabelConfig::parse(
                r#"<View><Text name="t" value="$a"/><Text name="t" value="$b"/></View>"#
            ),
            Err(LabelConfigError::DuplicateName("t".into()))
        );
        assert_eq!(
            LabelConfig::parse(
                r#"<View><Text name="t" value="$a"/><TextArea name="x" toName="nope"/></View>"#
            ),
            Err(LabelConfigError::UnknownTarget {
                control: "x".into(),
                to_name: "nope".into()
            })
        );
        assert!(matches!(
            LabelConfig::parse(
                r#"<View><Text name="t" value="$a"/><Rating name="r" toName="t" maxRating="ten"/></View>"#
            ),
            Err(LabelConfigError::InvalidAttribute { .. })
        ));
        assert_eq!(
            LabelConfig::parse(
                r#"<View><Text name="t" value="$a"/><Choices name="c" toName="t"/></View>"#
            ),
            Err(LabelConfigError::NoOptions("c".into()))
        );
        assert!(matches!(
            LabelConfig::parse(
                r#"<View><Text name="t" value="$a"/><Choices toName="t"><Choice value="a"/></Choices></View>"#
            ),
            Err(LabelConfigError::MissingAttribute { .. })
        ));
        let empty = LabelConfig::parse("<View><Header value=\"Nothing here\"/></View>").unwrap();
        assert!(empty
            .require_predictable()
            .unwrap_err()
            .to_string()
            .contains("no control tag"));
    }
}
