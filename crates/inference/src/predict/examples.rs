//! Learning from ground truth: a project's ground-truth annotations (starred in Label Studio,
//! arriving by webhook) become few-shot examples. For each task the prompt shows the examples
//! whose text is most similar to the task's, and the set's fingerprint is part of the model
//! version, so Label Studio asks for new predictions exactly when the set changes.
//!
//! Bulk requests show every task the same examples instead ([`ExampleSet::shared`]): the
//! prompts of all tasks then start the same way (system prompt, examples, question) and differ
//! only in the task, so the engine computes that shared part once and reuses it from its prompt
//! cache, and the content-free calibration of every task is the same question, asked once.

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
    /// Indices of `examples` in the order [`ExampleSet::shared`] takes them.
    shared_order: Vec<usize>,
}

/// Examples whose similarity to the others decides how representative each is: more would cost
/// quadratic time for a large project's ground truth without changing the order much.
const REPRESENTATIVE_SAMPLE: usize = 200;

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
        let words: Vec<HashSet<String>> = examples
            .iter()
            .map(|e| words(&task_text(config, &e.data)))
            .collect();
        let shared_order = shared_order(&examples, &words);
        ExampleSet {
            examples,
            words,
            fingerprint: if key.is_empty() {
                0
            } else {
                (h ^ (h >> 32)) as u32
            },
            shared_order,
        }
    }

    /// The `k` examples every task of a bulk request is shown, in the order the prompt shows
    /// them: one example per distinct answer first (so that a handful of examples still shows
    /// the model the range of answers), the most representative answer first, then the rest
    /// by how representative they are (mean similarity to the other examples); ties by task
    /// id. Depends on the set alone, so it is the same for every request while the set (and
    /// so the `model_version`) is.
    ///
    /// A task that is one of these examples itself is shown the next one instead of itself
    /// ([`ExampleSet::shared_for`]).
    pub fn shared(&self, k: usize) -> Vec<&Example> {
        self.shared_order
            .iter()
            .take(k)
            .map(|&i| &self.examples[i])
            .collect()
    }

    /// [`ExampleSet::shared`] for the task `task_id`: the same `k` examples, except that the
    /// task itself, when it is one of them, is replaced by the next one in the order.
    pub fn shared_for(&self, task_id: Option<i64>, k: usize) -> Vec<&Example> {
        self.shared_order
            .iter()
            .map(|&i| &self.examples[i])
            .filter(|e| Some(e.task_id) != task_id)
            .take(k)
            .collect()
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

/// The order of [`ExampleSet::shared`]: by representativeness (mean Jaccard similarity to a
/// sample of the other examples, ties by task id), with the first example of each distinct
/// answer moved to the front.
fn shared_order(examples: &[Example], words: &[HashSet<String>]) -> Vec<usize> {
    let sample: Vec<usize> = (0..examples.len())
        .step_by(examples.len().div_ceil(REPRESENTATIVE_SAMPLE).max(1))
        .collect();
    let centrality: Vec<f64> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let others = sample.iter().filter(|&&j| j != i);
            let (sum, n) = others.fold((0.0, 0usize), |(sum, n), &j| {
                let inter = w.intersection(&words[j]).count() as f64;
                let union = w.union(&words[j]).count().max(1) as f64;
                (sum + inter / union, n + 1)
            });
            sum / n.max(1) as f64
        })
        .collect();
    // Examples are sorted by task id, so the index breaks ties by task id.
    let mut by_centrality: Vec<usize> = (0..examples.len()).collect();
    by_centrality.sort_by(|&a, &b| centrality[b].total_cmp(&centrality[a]).then(a.cmp(&b)));
    let mut seen = HashSet::new();
    let (first, rest): (Vec<usize>, Vec<usize>) = by_centrality
        .into_iter()
        .partition(|&i| seen.insert(examples[i].result.to_string()));
    first.into_iter().chain(rest).collect()
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

    /// A bulk request's tasks are all shown the same examples, one per answer first; a task
    /// that is one of them is shown the next instead of itself.
    #[test]
    fn shared_examples_are_the_same_for_every_task_and_cover_the_answers() {
        let config = LabelConfig::parse(CONFIG).unwrap();
        let set = ExampleSet::new(
            vec![
                example(
                    1,
                    "Who was the first president of the United States ?",
                    "human",
                ),
                example(
                    2,
                    "Who was the second president of the United States ?",
                    "human",
                ),
                example(
                    3,
                    "Who was the third president of the United States ?",
                    "human",
                ),
                example(4, "Where is the Eiffel Tower ?", "location"),
            ],
            &config,
        );
        let shared: Vec<i64> = set.shared(2).iter().map(|e| e.task_id).collect();
        assert_eq!(shared.len(), 2);
        assert!(shared.contains(&4), "both answers are shown: {shared:?}");
        for task in [None, Some(100), Some(200)] {
            let got: Vec<i64> = set.shared_for(task, 2).iter().map(|e| e.task_id).collect();
            assert_eq!(got, shared, "the same examples for every task");
        }
        let own = set.shared_for(Some(shared[0]), 2);
        assert!(own.iter().all(|e| e.task_id != shared[0]) && own.len() == 2);
        assert_eq!(set.shared(10).len(), 4);
        assert!(ExampleSet::default().shared(4).is_empty());
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
