//! The chat messages that ask a model to label one task in one JSON answer: built from the
//! labeling config and the task's data. The `jsonl-chat` export pairs them with the human labels,
//! so a model fine-tuned on the export learns to answer them (in a batch, for instance). The ML
//! backend asks one control at a time instead and scores closed answers (`predict::task`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::labelstudio::config::{ControlKind, ControlTag, LabelConfig, ObjectKind};

/// One chat message, in OpenAI's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The system message: what the model is and how it must answer.
pub const SYSTEM_PROMPT: &str =
    "You are a careful data annotator. Read the task and answer every question with one JSON object, nothing else.";

/// The text of a task's data value: strings as they are, anything else as compact JSON.
pub fn data_text(data: &Value, key: &str) -> Option<String> {
    match data.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// What one control asks for, as a line of the prompt.
pub fn question(control: &ControlTag) -> String {
    let what = match &control.kind {
        ControlKind::Choices {
            options,
            multiple: false,
        } => format!("exactly one of {}", quoted(options)),
        ControlKind::Choices {
            options,
            multiple: true,
        } => format!("a list of any of {}", quoted(options)),
        ControlKind::TextArea => "a short text".to_string(),
        ControlKind::Rating { max } => format!("an integer rating from 1 to {max}"),
        ControlKind::Number { min, max } => match (min, max) {
            (Some(lo), Some(hi)) => format!("a number from {lo} to {hi}"),
            (Some(lo), None) => format!("a number of at least {lo}"),
            (None, Some(hi)) => format!("a number of at most {hi}"),
            (None, None) => "a number".to_string(),
        },
        ControlKind::Labels { labels } => {
            format!(
                "a list of {{\"text\": exact words from the text, \"label\": one of {}}}",
                quoted(labels)
            )
        }
    };
    match control.description.as_deref().filter(|d| !d.is_empty()) {
        Some(d) => format!("- \"{}\" ({d}): {what}", control.name),
        None => format!("- \"{}\": {what}", control.name),
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The task as the model reads it: each object tag's text under its name, headers as headings.
pub fn task_text(config: &LabelConfig, data: &Value) -> String {
    let mut out = String::new();
    for object in &config.objects {
        let text = match &object.variable {
            Some(var) => data_text(data, var),
            None => Some(object.value.clone()).filter(|v| !v.is_empty()),
        };
        let Some(text) = text else { continue };
        match object.kind {
            ObjectKind::Header => out.push_str(&format!("# {text}\n")),
            _ => out.push_str(&format!("{}: {text}\n", object.name)),
        }
    }
    out
}

/// The messages asking a model to label `data` for every predictable control of `config`.
pub fn messages(config: &LabelConfig, data: &Value) -> Vec<Message> {
    let questions: Vec<String> = config.controls.iter().map(question).collect();
    let keys: Vec<String> = config
        .controls
        .iter()
        .map(|c| format!("\"{}\"", c.name))
        .collect();
    let user = format!(
        "Task:\n{}\nQuestions:\n{}\n\nAnswer with a JSON object with the keys {}.",
        task_text(config, data),
        questions.join("\n"),
        keys.join(", ")
    );
    vec![
        Message::new("system", SYSTEM_PROMPT),
        Message::new("user", user),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CANDIDATE: &str = include_str!("../../../config/label-configs/candidate-evaluation.xml");

    #[test]
    fn the_prompt_carries_the_task_and_every_question() {
        let config = LabelConfig::parse(CANDIDATE).unwrap();
        let data = json!({"name": "Ada Lovelace", "title": "Principal Engineer", "company": "Analytical Engines"});
        let m = messages(&config, &data);
        assert_eq!(m[0].role, "system");
        let user = &m[1].content;
        for needle in [
            "# Candidate Evaluation",
            "candidate_name: Ada Lovelace",
            "candidate_company: Analytical Engines",
            "\"recommendation\"",
            "\"strong_yes\"",
            "\"reasoning\"",
            "a short text",
        ] {
            assert!(user.contains(needle), "{needle:?} missing from {user}");
        }
    }

    #[test]
    fn missing_data_fields_are_left_out() {
        let config = LabelConfig::parse(CANDIDATE).unwrap();
        let user = &messages(&config, &json!({"name": 42}))[1].content;
        assert!(user.contains("candidate_name: 42"));
        assert!(!user.contains("candidate_title"));
    }
}
