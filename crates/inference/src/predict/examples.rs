//! Learning from ground truth: a project's ground-truth annotations (starred in Label Studio,
//! arriving by webhook) become few-shot examples. For each task the prompt shows the examples
//! whose text is most similar to the task's, and the set's fingerprint is part of the model
//! version, so Label Studio asks for new predictions exactly when the set changes.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::labelstudio::version::fnv1a64;
use batchlab_core::prompt::task_text;
use batchlab_core::store::{Store, StoreError};

/// One ground-truth example: a task's data and its ground-truth answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Label Studio's task id.
    pub task_id: i64,
    /// Label Studio's annotation id.
    pub annotation_id: i64,
    /// The task's data object.
    pub data: Value,
    /// The annotation's `result` list.
    pub result: Value,
    /// The annotation's last change, unix microseconds.
    pub updated_at_us: i64,
}

/// A project's ground-truth examples with what similarity search needs.
#[derive(Clone, Debug, Default)]
pub struct ExampleSet {
    examples: Vec<Example>,
    words: Vec<HashSet<String>>,
    fingerprint: u32,
}

impl ExampleSet {
    /// Loads the valid ground truth (newest per task) of project `project_id` of Label Studio
    /// `instance`, with its tasks' data.
    pub async fn load(
        store: &Store,
        instance: &str,
        project_id: i64,
        config: &LabelConfig,
    ) -> Result<ExampleSet, StoreError> {
        let annotations = store.ground_truth(instance, project_id).await?;
        let tasks: HashMap<i64, String> = store
            .ground_truth_tasks(instance, project_id)
            .await?
            .into_iter()
            .map(|t| (t.id, t.data))
            .collect();
        let examples = annotations
            .into_iter()
            .filter_map(|a| {
                let data = serde_json::from_str(tasks.get(&a.task_id)?).ok()?;
                let result = serde_json::from_str(&a.result).ok()?;
                Some(Example {
                    task_id: a.task_id,
                    annotation_id: a.id,
                    data,
                    result,
                    updated_at_us: a.updated_at_us,
                })
            })
            .collect();
        Ok(ExampleSet::new(examples, config))
    }

    /// A set from examples in hand.
    pub fn new(mut examples: Vec<Example>, config: &LabelConfig) -> ExampleSet {
        examples.sort_by_key(|e| e.task_id);
        let mut key = String::new();
        for e in &examples {
            key.push_str(&format!(
                "{}:{}:{};",
                e.task_id, e.annotation_id, e.updated_at_us
            ));
        }
        let h = fnv1a64(key.as_bytes());
        let words = examples
            .iter()
            .map(|e| words(&task_text(config, &e.data)))
            .collect();
        ExampleSet {
            examples,
            words,
            fingerprint: if key.is_empty() {
                0
            } else {
                (h ^ (h >> 32)) as u32
            },
        }
    }

    /// No examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// How many examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Changes whenever an example is added, removed or edited; 0 for no examples.
    pub fn fingerprint(&self) -> u32 {
        self.fingerprint
    }

    /// The `k` examples most similar to `data` (Jaccard similarity of the words of the text
    /// the labeling config shows, most similar first; ties by task id), never `data`'s own
    /// task (`task_id`).
    pub fn most_similar(
        &self,
        config: &LabelConfig,
        data: &Value,
        task_id: Option<i64>,
        k: usize,
    ) -> Vec<&Example> {
        let target = words(&task_text(config, data));
        let mut scored: Vec<(f64, usize)> = self
            .words
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(self.examples[*i].task_id) != task_id)
            .map(|(i, w)| {
                let inter = w.intersection(&target).count() as f64;
                let union = w.union(&target).count().max(1) as f64;
                (inter / union, i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(k)
            .map(|(_, i)| &self.examples[i])
            .collect()
    }
}

/// Lower-cased words of three or more letters or digits: what similarity compares.
fn words(text: &str) -> HashSet<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() > 2)
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CONFIG: &str = r#"<View><Text name="text" value="$text"/>
      <Choices name="label" toName="text"><Choice value="human"/><Choice value="location"/></Choices></View>"#;

    fn example(task_id: i64, text: &str, label: &str) -> Example {
        Example {
            task_id,
            annotation_id: task_id * 10,
            data: json!({"text": text}),
            result: json!([{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]),
            updated_at_us: 1,
        }
    }

    #[test]
    fn the_most_similar_examples_come_first() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        let set = ExampleSet::new(
            vec![
                example(
                    1,
                    "Who was the first president of the United States ?",
                    "human",
                ),
                example(2, "Where is the Eiffel Tower ?", "location"),
                example(3, "Who invented the telephone ?", "human"),
            ],
            &config,
        );
        let got = set.most_similar(
            &config,
            &json!({"text": "Where is the Tower of London ?"}),
            None,
            2,
        );
        assert_eq!(got[0].task_id, 2);
        assert_eq!(got.len(), 2);
        // A task is never its own example.
        let got = set.most_similar(
            &config,
            &json!({"text": "Where is the Eiffel Tower ?"}),
            Some(2),
            3,
        );
        assert!(got.iter().all(|e| e.task_id != 2) && got.len() == 2);
    }

    #[test]
    fn the_fingerprint_follows_the_set() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        let a = ExampleSet::new(vec![example(1, "Who ?", "human")], &config);
        assert_eq!(ExampleSet::new(vec![], &config).fingerprint(), 0);
        assert_ne!(a.fingerprint(), 0);
        assert_eq!(
            a.fingerprint(),
            ExampleSet::new(vec![example(1, "Who ?", "human")], &config).fingerprint()
        );
        let mut edited = example(1, "Who ?", "location");
        edited.updated_at_us = 2;
        assert_ne!(
            a.fingerprint(),
            ExampleSet::new(vec![edited], &config).fingerprint()
        );
        let two = ExampleSet::new(
            vec![
                example(1, "Who ?", "human"),
                example(2, "Where ?", "location"),
            ],
            &config,
        );
        assert_ne!(a.fingerprint(), two.fingerprint());
        assert_eq!(two.len(), 2);
    }
}
