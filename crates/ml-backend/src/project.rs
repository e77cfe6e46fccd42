//! What predictions for one Label Studio project depend on, beside the model: the labeling
//! config, the prompt template (set through the ML backend's `extra_params` in Label Studio,
//! announced by `/setup`) and the ground-truth examples (from the shared store, where
//! batchlab-api records annotations arriving by webhook), and the classifiers learned from its
//! annotations (`learning`). `/setup` and `/predict` both derive the `model_version` here, so
//! the two always agree.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::labelstudio::version::{fnv1a64, prediction_version};
use batchlab_inference::predict::examples::ExampleSet;
use serde_json::Value;

use crate::learning::Learned;
use crate::slot::ModelState;
use crate::MlState;

/// Prompt templates by project id, as the last `/setup` announced them: at most `capacity`
/// projects, the one announced longest ago forgotten first (it is announced again by Label
/// Studio's next `/setup` for it).
#[derive(Clone, Debug)]
pub struct Templates(Arc<Mutex<TemplateMap>>);

#[derive(Debug, Default)]
struct TemplateMap {
    map: HashMap<i64, String>,
    order: VecDeque<i64>,
    capacity: usize,
}

impl Templates {
    /// Room for the templates of `capacity` projects.
    pub fn new(capacity: usize) -> Templates {
        Templates(Arc::new(Mutex::new(TemplateMap {
            capacity: capacity.max(1),
            ..TemplateMap::default()
        })))
    }

    /// Remembers (or with `None` forgets) the template of `project`.
    pub fn set(&self, project: i64, template: Option<String>) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let known = match template {
            Some(template) => t.map.insert(project, template).is_some(),
            None => {
                let known = t.map.remove(&project).is_some();
                if known {
                    t.order.retain(|p| *p != project);
                }
                return;
            }
        };
        if !known {
            t.order.push_back(project);
        }
        while t.map.len() > t.capacity {
            if let Some(oldest) = t.order.pop_front() {
                t.map.remove(&oldest);
            }
        }
    }

    /// The template of `project`, if one was set.
    pub fn get(&self, project: i64) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(&project)
            .cloned()
    }

    /// How many projects have a template remembered.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).map.len()
    }

    /// Whether no project has a template remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The project id in Label Studio's `"<id>.<created unix time>"` (or a bare number).
pub fn project_id(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.split('.').next()?.trim().parse().ok(),
        _ => None,
    }
}

/// The prompt template in `extra_params`: an object's `prompt` (or `template`) string, a string
/// holding such an object as JSON, or a plain non-empty string that is the template itself.
pub fn template_of(extra_params: Option<&Value>) -> Option<String> {
    let from_object = |v: &Value| {
        ["prompt", "template"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    };
    match extra_params? {
        Value::Object(_) => from_object(extra_params?),
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => from_object(&v),
            _ => Some(s.trim().to_string()),
        },
        _ => None,
    }
}

/// Everything one project's predictions depend on, and the version they carry.
#[derive(Clone, Debug)]
pub struct ProjectContext {
    /// The prompt template, if the project set one.
    pub template: Option<String>,
    /// The project's ground-truth examples (empty when few-shot is off or nothing is stored).
    pub examples: ExampleSet,
    /// The classifiers learned from the project's annotations.
    pub learned: Learned,
    /// The `model_version` of predictions made in this context.
    pub version: String,
}

/// One fingerprint of the examples and the learned classifiers (0 when there are neither, so a
/// project that taught nothing keeps the plain model version).
fn teaching_fingerprint(examples: u32, learned: u32) -> u32 {
    if learned == 0 {
        return examples;
    }
    (fnv1a64(format!("{examples:08x}:{learned:08x}").as_bytes()) as u32) | 1
}

impl MlState {
    /// The context of `project` (when known) for `config` (the XML `schema`, parsed when it parses).
    pub async fn project_context(
        &self,
        project: Option<i64>,
        schema: &str,
        config: Option<&LabelConfig>,
    ) -> ProjectContext {
        let template = project.and_then(|p| self.templates.get(p));
        let mut examples = ExampleSet::default();
        if let (Some(store), Some(project), Some(config)) = (&self.store, project, config) {
            if self.config.ml_backend.few_shot_examples > 0 {
                match ExampleSet::load(
                    store,
                    self.config.label_studio.instance.as_str(),
                    project,
                    config,
                )
                .await
                {
                    Ok(set) => examples = set,
                    Err(e) => {
                        tracing::warn!(project, error = %e, "ground-truth examples unavailable; predicting zero-shot")
                    }
                }
            }
        }
        let learned = match project {
            Some(project) => self.learned(project, schema, template.as_deref()).await,
            None => Learned::default(),
        };
        // The model file's identity, once loaded: a new GGUF under the same name makes Label
        // Studio ask again and keeps the old model's answers out of the cache.
        let model_sha256 = match self.engine.now() {
            ModelState::Ready(engine) => Some(engine.model_sha256().to_string()),
            ModelState::Loading | ModelState::Failed(_) => None,
        };
        let version = prediction_version(
            &self.config.engine.model_id,
            model_sha256.as_deref(),
            schema,
            template.as_deref(),
            teaching_fingerprint(examples.fingerprint(), learned.fingerprint),
        );
        self.remember_version(&version);
        ProjectContext {
            template,
            examples,
            learned,
            version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn project_ids_come_from_label_studios_forms() {
        assert_eq!(project_id(&json!("12.1795812516")), Some(12));
        assert_eq!(project_id(&json!(7)), Some(7));
        assert_eq!(project_id(&json!("x")), None);
        assert_eq!(project_id(&Value::Null), None);
    }

    #[test]
    fn templates_are_kept_for_a_bounded_number_of_projects() {
        let t = Templates::new(3);
        for p in 0..10_000 {
            t.set(p, Some(format!("T{p} {{text}}")));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(9_999).as_deref(), Some("T9999 {text}"));
        assert_eq!(t.get(0), None);
        t.set(9_999, None);
        t.set(1, Some("again".into()));
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(1).as_deref(), Some("again"));
    }

    #[test]
    fn templates_come_from_objects_strings_or_nothing() {
        assert_eq!(
            template_of(Some(&json!({"prompt": "Q: {text}"}))).as_deref(),
            Some("Q: {text}")
        );
        assert_eq!(
            template_of(Some(&json!("{\"template\": \"T {text}\"}"))).as_deref(),
            Some("T {text}")
        );
        assert_eq!(
            template_of(Some(&json!("Classify: {text}"))).as_deref(),
            Some("Classify: {text}")
        );
        assert_eq!(template_of(Some(&json!({"other": 1}))), None);
        assert_eq!(template_of(Some(&json!(""))), None);
        assert_eq!(template_of(Some(&Value::Null)), None);
        assert_eq!(template_of(None), None);
    }
}
