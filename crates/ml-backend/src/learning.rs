//! Learning from a project's annotations (what Label Studio calls training an ML backend): for
//! each closed control (single `Choices`, small `Rating` and `Number`) a classifier over the
//! task's zero-shot scores and embedding ([`batchlab_inference::predict::learn`]), trained from
//! the annotations batchlab-api records in the shared store (ground truth counted double),
//! cross-validated, and used only while it beats zero-shot on held-out annotations.
//!
//! Training is debounced per project: a `/predict` or `/setup` that finds the project's
//! annotations changed since the last training (and that training at least
//! `ml_backend.learn_debounce_seconds` ago) starts one in the background, as does an annotation
//! or START_TRAINING event arriving at `/webhook`. The classifiers are saved in the store (every
//! process sharing it predicts with the same ones, and they survive restarts), and their
//! fingerprint is part of the `model_version`, so Label Studio asks for new predictions. Each
//! task's features are computed once and kept (bounded) for the next training.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::labelstudio::region::{FieldValue, Region};
use batchlab_core::labelstudio::version::fnv1a64;
use batchlab_core::store::{AnnotationState, LearnedModel, Store};
use batchlab_inference::engine::{Engine, Priority};
use batchlab_inference::predict::learn::{self, Classifier, Evaluation, Sample};
use batchlab_inference::predict::task::{
    answer_option, candidates, task_features, Classifiers, Priors, TaskFeatures, FEATURES_VERSION,
};
use futures::StreamExt;
use serde::Serialize;

use crate::slot::ModelState;
use crate::MlState;

/// Tasks whose features are computed at once during a training (the engine batches them).
const FEATURES_IN_FLIGHT: usize = 16;

/// What one project has learned, shared by its predictions.
#[derive(Clone, Debug, Default)]
pub struct Learned {
    /// The classifiers that beat zero-shot, by control name.
    pub classifiers: Arc<Classifiers>,
    /// Fingerprint of those classifiers (0: none), part of the `model_version`.
    pub fingerprint: u32,
}

/// What `/status` shows of one project's learning.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LearningReport {
    /// Valid annotations the project had at the last training (each control's `samples` says
    /// how many of them answer it).
    pub annotations: usize,
    /// When it finished, unix seconds (0: never).
    pub trained_at: i64,
    /// Whether a training runs now.
    pub training: bool,
    /// The last training's error, if it failed.
    pub error: Option<String>,
    /// Per control: held-out accuracy and calibration of zero-shot and of the learned
    /// classifier, and which of the two answers.
    pub controls: BTreeMap<String, ControlReport>,
}

/// One control's line of a [`LearningReport`].
#[derive(Clone, Debug, Serialize)]
pub struct ControlReport {
    /// `learned` or `zero-shot`.
    pub answered_by: &'static str,
    /// What cross-validation measured.
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

#[derive(Debug, Default)]
struct Project {
    /// Hash of the labeling config the classifiers are for (another config starts over).
    config_hash: String,
    schema: Arc<str>,
    template: Option<String>,
    learned: Learned,
    report: LearningReport,
    trained_for: Option<AnnotationState>,
    last_start: Option<Instant>,
    loaded: bool,
}

/// Every project's learning, and the features of annotated tasks already computed.
#[derive(Clone, Debug, Default)]
pub struct Learning {
    projects: Arc<Mutex<HashMap<i64, Project>>>,
    features: Arc<Mutex<HashMap<u64, TaskFeatures>>>,
    scheduled: Arc<Mutex<HashSet<i64>>>,
}

/// What stored classifiers are keyed by: the labeling config, the prompt template and the
/// version of the zero-shot features they read ([`FEATURES_VERSION`]), so that a classifier is
/// only used with the features it was trained on (the others are retrained).
fn config_hash(schema: &str, template: Option<&str>) -> String {
    config_hash_of(schema, template, FEATURES_VERSION)
}

/// [`config_hash`] for features of `version` (the tests name an earlier one).
fn config_hash_of(schema: &str, template: Option<&str>, version: u32) -> String {
    let template = template.unwrap_or_default();
    format!(
        "{:016x}",
        fnv1a64(format!("{schema}\u{0}{template}\u{0}features {version}").as_bytes())
    )
}

impl Learning {
    /// Marks a training of `project` as scheduled; false when one already is (or `limit`
    /// projects are), so a burst of events schedules one.
    pub fn schedule(&self, project: i64, limit: usize) -> bool {
        let mut s = self.scheduled.lock().unwrap_or_else(|e| e.into_inner());
        s.len() < limit.max(1) && s.insert(project)
    }

    /// Clears the mark [`Learning::schedule`] set.
    pub fn unschedule(&self, project: i64) {
        self.scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&project);
    }

    /// The report of every project that has learned or is learning, by project id.
    pub fn reports(&self) -> BTreeMap<String, LearningReport> {
        let projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        projects
            .iter()
            .filter(|(_, p)| {
                p.report.training || p.report.trained_at > 0 || p.report.error.is_some()
            })
            .map(|(id, p)| (id.to_string(), p.report.clone()))
            .collect()
    }
}

impl MlState {
    /// What `project` has learned for `schema` and `template`; starts a training in the
    /// background when its annotations changed since the last one (see the module's header).
    pub async fn learned(&self, project: i64, schema: &str, template: Option<&str>) -> Learned {
        let Some(store) = self.store.clone().filter(|_| self.config.ml_backend.learn) else {
            return Learned::default();
        };
        let hash = config_hash(schema, template);
        let needs_load = {
            let mut projects = self
                .learning
                .projects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Bounded: past `max_projects`, idle projects are forgotten (and read again from
            // the store when asked for).
            if !projects.contains_key(&project)
                && projects.len() >= self.config.ml_backend.max_projects.max(1)
            {
                projects.retain(|_, p| p.report.training);
            }
            let entry = projects.entry(project).or_default();
            if entry.config_hash != hash {
                *entry = Project {
                    config_hash: hash.clone(),
                    schema: schema.into(),
                    template: template.map(str::to_string),
                    ..Project::default()
                };
            }
            !entry.loaded
        };
        if needs_load {
            let instance = self.config.label_studio.instance.as_str();
            match store.learned_models(instance, project).await {
                Ok(rows) => self.adopt(project, &hash, &rows),
                Err(e) => {
                    tracing::warn!(project, error = %e, "learned classifiers unavailable; predicting zero-shot")
                }
            }
        }
        self.maybe_train(project, false).await;
        let projects = self
            .learning
            .projects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        projects
            .get(&project)
            .filter(|p| p.config_hash == hash)
            .map(|p| p.learned.clone())
            .unwrap_or_default()
    }

    /// Takes the stored classifiers of `project` that are for config `hash` and beat zero-shot.
    fn adopt(&self, project: i64, hash: &str, rows: &[LearnedModel]) {
        let mut classifiers = Classifiers::new();
        let mut report = LearningReport::default();
        for row in rows.iter().filter(|r| r.config_hash == hash) {
            let (Ok(c), Ok(evaluation)) = (
                serde_json::from_str::<Classifier>(&row.classifier),
                serde_json::from_str::<Evaluation>(&row.evaluation),
            ) else {
                tracing::warn!(project, control = %row.control, "stored classifier unreadable; ignored");
                continue;
            };
            report.trained_at = report.trained_at.max(row.trained_at);
            report.annotations = report.annotations.max(evaluation.samples);
            let wins = evaluation.learned_wins();
            report.controls.insert(
                row.control.clone(),
                ControlReport {
                    answered_by: if wins { "learned" } else { "zero-shot" },
                    evaluation,
                },
            );
            if wins {
                classifiers.insert(row.control.clone(), c);
            }
        }
        let fingerprint = rows
            .iter()
            .filter(|r| r.config_hash == hash && classifiers.contains_key(&r.control))
            .fold(0u32, |f, r| {
                f ^ (fnv1a64(format!("{}\u{0}{}", r.control, r.fingerprint).as_bytes()) as u32)
            });
        let mut projects = self
            .learning
            .projects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = projects.get_mut(&project).filter(|p| p.config_hash == hash) {
            p.loaded = true;
            p.learned = Learned {
                classifiers: Arc::new(classifiers),
                fingerprint,
            };
            report.training = p.report.training;
            p.report = report;
        }
    }

    /// Starts a training of `project` in the background unless one runs, the last started
    /// less than the debounce ago (`now`: START_TRAINING, which skips the wait), or the model
    /// is not loaded. Whether the annotations changed is checked by the training itself.
    pub async fn maybe_train(&self, project: i64, now: bool) {
        let Some(store) = self.store.clone().filter(|_| self.config.ml_backend.learn) else {
            return;
        };
        let ModelState::Ready(engine) = self.engine.now() else {
            return;
        };
        let debounce = Duration::try_from_secs_f64(self.config.ml_backend.learn_debounce_seconds)
            .unwrap_or(Duration::from_secs(10));
        let (schema, template) = {
            let mut projects = self
                .learning
                .projects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(p) = projects.get_mut(&project) else {
                return;
            };
            if p.schema.is_empty()
                || p.report.training
                || (!now && p.last_start.is_some_and(|t| t.elapsed() < debounce))
            {
                return;
            }
            p.report.training = true;
            p.last_start = Some(Instant::now());
            (p.schema.clone(), p.template.clone())
        };
        let state = self.clone();
        let span = tracing::info_span!("learn", project);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let outcome = state
                    .train(&store, &engine, project, &schema, template.as_deref())
                    .await;
                let mut projects = state
                    .learning
                    .projects
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(p) = projects.get_mut(&project) {
                    p.report.training = false;
                    p.report.error = outcome.err();
                }
            },
            span,
        ));
    }

    /// One training of `project`: reads its annotations, computes what is not known of their
    /// tasks, trains and cross-validates each closed control, saves and adopts the result.
    async fn train(
        &self,
        store: &Store,
        engine: &Engine,
        project: i64,
        schema: &str,
        template: Option<&str>,
    ) -> Result<(), String> {
        let instance = self.config.label_studio.instance.as_str();
        let annotation_state = store
            .annotation_state(instance, project)
            .await
            .map_err(|e| e.to_string())?;
        let hash = config_hash(schema, template);
        {
            let projects = self
                .learning
                .projects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if projects
                .get(&project)
                .is_some_and(|p| p.trained_for == Some(annotation_state))
            {
                return Ok(());
            }
        }
        let fingerprint = format!(
            "{}:{}",
            annotation_state.annotations, annotation_state.newest_us
        );
        // Another process (or this one before a restart) may have trained on exactly these.
        let stored = store
            .learned_models(instance, project)
            .await
            .map_err(|e| e.to_string())?;
        if !stored.is_empty()
            && stored
                .iter()
                .all(|r| r.config_hash == hash && r.fingerprint == fingerprint)
        {
            self.adopt(project, &hash, &stored);
            self.trained(project, annotation_state);
            return Ok(());
        }
        let config = LabelConfig::parse(schema).map_err(|e| e.to_string())?;
        let learnable: Vec<_> = config
            .controls
            .iter()
            .filter(|c| candidates(c).is_some())
            .collect();
        let started = Instant::now();
        let mut models = Vec::new();
        if !learnable.is_empty() {
            let limit =
                i64::try_from(self.config.ml_backend.learn_max_annotations).unwrap_or(i64::MAX);
            let annotations = store
                .training_annotations(instance, project, limit)
                .await
                .map_err(|e| e.to_string())?;
            let priors = self.jobs.priors();
            let engine = engine.with_priority(Priority::Bulk);
            let rows: Vec<(serde_json::Value, Vec<Region>, bool)> = annotations
                .into_iter()
                .filter_map(|a| {
                    Some((
                        serde_json::from_str(&a.data).ok()?,
                        serde_json::from_str(&a.result).ok()?,
                        a.ground_truth,
                    ))
                })
                .collect();
            let asked: Vec<_> = rows
                .iter()
                .map(|(data, _, _)| {
                    self.features_of(&engine, &config, data, &hash, template, &priors)
                })
                .collect();
            let features: Vec<Result<TaskFeatures, String>> = futures::stream::iter(asked)
                .buffered(FEATURES_IN_FLIGHT)
                .collect()
                .await;
            for control in learnable {
                let mut samples = Vec::new();
                for ((_, regions, ground_truth), f) in rows.iter().zip(&features) {
                    let Ok(f) = f else { continue };
                    let values: BTreeMap<String, FieldValue> = config.field_values(regions);
                    let (Some(value), Some(zero_shot)) =
                        (values.get(&control.name), f.zero_shot.get(&control.name))
                    else {
                        continue;
                    };
                    let Some(label) = answer_option(control, value) else {
                        continue;
                    };
                    samples.push(Sample {
                        zero_shot: zero_shot.clone(),
                        embedding: f.embedding.clone(),
                        label,
                        weight: if *ground_truth {
                            learn::GROUND_TRUTH_WEIGHT
                        } else {
                            1.0
                        },
                    });
                }
                let classes = candidates(control).map_or(0, |o| o.len());
                let trained = tokio::task::spawn_blocking(move || learn::train(&samples, classes))
                    .await
                    .map_err(|e| e.to_string())?;
                match trained {
                    Ok((classifier, evaluation)) => {
                        tracing::info!(control = %control.name, ?evaluation, wins = evaluation.learned_wins(), "trained");
                        models.push(LearnedModel {
                            control: control.name.clone(),
                            config_hash: hash.clone(),
                            fingerprint: fingerprint.clone(),
                            classifier: serde_json::to_string(&classifier)
                                .map_err(|e| e.to_string())?,
                            evaluation: serde_json::to_string(&evaluation)
                                .map_err(|e| e.to_string())?,
                            trained_at: 0,
                        });
                    }
                    Err(e) => tracing::info!(control = %control.name, reason = %e, "not trained"),
                }
            }
        }
        store
            .save_learned_models(instance, project, &models)
            .await
            .map_err(|e| e.to_string())?;
        metrics::counter!("batchlab_ml_trainings_total").increment(1);
        metrics::histogram!("batchlab_ml_training_seconds").record(started.elapsed().as_secs_f64());
        let rows = store
            .learned_models(instance, project)
            .await
            .map_err(|e| e.to_string())?;
        self.adopt(project, &hash, &rows);
        self.trained(project, annotation_state);
        Ok(())
    }

    /// Records that `project`'s learning is up to date with `annotations` (the report says so
    /// even when no control had enough annotations to train).
    fn trained(&self, project: i64, annotations: AnnotationState) {
        let mut projects = self
            .learning
            .projects
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = projects.get_mut(&project) {
            p.trained_for = Some(annotations);
            p.report.annotations = usize::try_from(annotations.annotations).unwrap_or(0);
            if p.report.trained_at == 0 {
                p.report.trained_at = batchlab_core::store::now();
            }
        }
    }

    /// The features of one annotated task, computed once per config, template and data.
    async fn features_of(
        &self,
        engine: &Engine,
        config: &LabelConfig,
        data: &serde_json::Value,
        hash: &str,
        template: Option<&str>,
        priors: &Priors,
    ) -> Result<TaskFeatures, String> {
        let key = fnv1a64(format!("{hash}\u{0}{data}").as_bytes());
        if let Some(f) = self
            .learning
            .features
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let f = task_features(
            engine,
            config,
            data,
            template,
            &self.predict_options(),
            priors,
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut cache = self
            .learning
            .features
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Bounded: twice what one training reads.
        if cache.len()
            >= self
                .config
                .ml_backend
                .learn_max_annotations
                .saturating_mul(2)
                .max(1)
        {
            cache.clear();
        }
        cache.insert(key, f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchlab_core::config::Config;

    /// Every project id a `/predict` names gets an entry: past `ml_backend.max_projects` the
    /// idle ones are forgotten, so made-up project ids cannot grow memory without bound.
    #[tokio::test]
    async fn projects_remembered_are_bounded() {
        let db = batchlab_core::testing::TestDb::sqlite().await;
        let mut config = Config::default();
        config.ml_backend.max_projects = 3;
        let state = MlState::new(config).unwrap().with_store(db.store.clone());
        for project in 0..50 {
            let learned = state.learned(project, "<View/>", None).await;
            assert_eq!(learned.fingerprint, 0);
            let len = state.learning.projects.lock().unwrap().len();
            assert!(len <= 3, "{len} projects remembered");
        }
        assert!(state.learning.schedule(1, 2));
        assert!(
            !state.learning.schedule(1, 2),
            "one waiting training per project"
        );
        assert!(state.learning.schedule(2, 2));
        assert!(!state.learning.schedule(3, 2), "at most the limit waiting");
        state.learning.unschedule(1);
        assert!(state.learning.schedule(3, 2));
        db.cleanup().await;
    }

    /// A classifier reads the zero-shot features of the code that trained it: one stored
    /// before those features changed ([`FEATURES_VERSION`]) is not used (the project trains
    /// anew), one of the current features is.
    #[tokio::test]
    async fn classifiers_of_older_features_are_not_adopted() {
        let db = batchlab_core::testing::TestDb::sqlite().await;
        let state = MlState::new(Config::default())
            .unwrap()
            .with_store(db.store.clone());
        let schema = r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text"><Choice value="a"/><Choice value="b"/></Choices></View>"#;
        let classifier = Classifier {
            classes: 2,
            dims: 1,
            mean: vec![0.0],
            inv_std: vec![1.0],
            alpha: 1.0,
            bias: vec![0.0, 0.0],
            weights: vec![0.0, 0.0],
            temperature: 1.0,
        };
        let evaluation = Evaluation {
            samples: 20,
            zero_shot_accuracy: 0.5,
            learned_accuracy: 0.9,
            learned_ece: 0.05,
            zero_shot_ece: 0.2,
            penalty: 1.0,
        };
        let model = |config_hash: String| LearnedModel {
            control: "label".into(),
            config_hash,
            fingerprint: "20:1".into(),
            classifier: serde_json::to_string(&classifier).unwrap(),
            evaluation: serde_json::to_string(&evaluation).unwrap(),
            trained_at: 0,
        };
        // The hash as it was written before the features had a version.
        let unversioned = format!("{:016x}", fnv1a64(format!("{schema}\u{0}").as_bytes()));
        let instance = state.config.label_studio.instance.as_str().to_string();
        db.store
            .save_learned_models(&instance, 1, &[model(unversioned)])
            .await
            .unwrap();
        assert_eq!(state.learned(1, schema, None).await.fingerprint, 0);
        // Nor is one of the features' previous version.
        let previous = config_hash_of(schema, None, FEATURES_VERSION - 1);
        db.store
            .save_learned_models(&instance, 3, &[model(previous)])
            .await
            .unwrap();
        assert_eq!(state.learned(3, schema, None).await.fingerprint, 0);
        db.store
            .save_learned_models(&instance, 2, &[model(config_hash(schema, None))])
            .await
            .unwrap();
        assert_ne!(state.learned(2, schema, None).await.fingerprint, 0);
        db.cleanup().await;
    }
}
