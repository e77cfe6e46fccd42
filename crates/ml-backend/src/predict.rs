//! `POST /predict`: Label Studio sends every selected task in one request and waits up to
//! `ML_TIMEOUT_PREDICT` (100 s by default); opening a task without a prediction blocks the
//! annotator on it. So each task becomes a background job, and the request answers by the
//! configured deadline: finished tasks with their prediction, unfinished ones with an entry
//! without `result` (Label Studio skips it and asks again), while their jobs continue into the
//! prediction cache that answers the next request at once.
//!
//! Jobs are keyed by (model version, task data): a task asked for twice runs once. Requests of
//! one task (an annotator opening it) start at once; bigger ones queue for
//! `ml_backend.concurrent_tasks` slots in order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::prediction_key::{cache_key, IMPORTED};
use batchlab_core::store::{CachedPrediction, Store};
use batchlab_inference::predict::task::{predict_task, PredictOptions, Priors};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

use crate::error::MlError;
use crate::project::{project_id, ProjectContext};
use crate::slot::ModelState;
use crate::MlState;

/// The body Label Studio 1.23 sends (fields batchlab reads).
#[derive(Debug, Deserialize)]
pub struct PredictRequest {
    /// The tasks, each with `id` and `data`.
    pub tasks: Vec<Value>,
    /// `"<project id>.<created unix time>"`.
    #[serde(default)]
    pub project: Option<Value>,
    /// The labeling config (XML).
    #[serde(default)]
    pub label_config: Option<String>,
}

/// A job's outcome: the prediction object, or why there is none (logged).
type Outcome = Result<Arc<Value>, Arc<str>>;
type Pending = Shared<BoxFuture<'static, Outcome>>;

/// Cached predictions and running jobs, shared by every request.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<JobsInner>,
}

struct JobsInner {
    cache: Mutex<Cache>,
    running: Mutex<HashMap<String, Pending>>,
    slots: Arc<Semaphore>,
    queued: std::sync::atomic::AtomicUsize,
    priors: Arc<Priors>,
    max_pending: usize,
    /// Every spawned job, so that shutdown can wait for the running ones.
    tracker: tokio_util::task::TaskTracker,
}

struct Cache {
    map: HashMap<String, Arc<Value>>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Cache {
    fn insert(&mut self, key: String, value: Arc<Value>) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// What `/status` reports of the jobs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct JobCounts {
    /// Predictions in the cache.
    pub cached: usize,
    /// Jobs started and not finished (waiting for a slot or running).
    pub pending: usize,
    /// Jobs waiting for a slot.
    pub queued: usize,
}

impl Jobs {
    /// Empty cache holding up to `capacity` predictions; `concurrent` tasks run at once and at
    /// most `max_pending` wait or run (see [`Jobs::admit`]).
    pub fn new(capacity: usize, concurrent: usize, max_pending: usize) -> Jobs {
        Jobs {
            inner: Arc::new(JobsInner {
                cache: Mutex::new(Cache {
                    map: HashMap::new(),
                    order: VecDeque::new(),
                    capacity,
                }),
                running: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(concurrent.max(1))),
                queued: Default::default(),
                priors: Arc::default(),
                max_pending: max_pending.max(1),
                tracker: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    /// Whether `new` more jobs fit under the limit of pending ones. A request that would pass
    /// it is refused whole (503, Label Studio asks again later) rather than growing the queue
    /// without bound; one task alone (an annotator waiting on it) is always admitted.
    pub fn admit(&self, new: usize) -> Result<(), MlError> {
        let pending = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if new > 1 && pending + new > self.inner.max_pending {
            metrics::counter!("batchlab_ml_predict_refused_total", "reason" => "queue_full")
                .increment(1);
            return Err(MlError::Busy(format!(
                "{pending} tasks are being predicted and this request would add {new}, over the limit of {} \
                 (ml_backend.max_pending_tasks); retry later",
                self.inner.max_pending
            )));
        }
        Ok(())
    }

    /// How many predictions are cached, pending and queued.
    pub fn counts(&self) -> JobCounts {
        JobCounts {
            cached: self
                .inner
                .cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map
                .len(),
            pending: self
                .inner
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            queued: self.inner.queued.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Shutdown, first half: jobs still waiting for a slot end without running (Label Studio
    /// asks for those tasks again after the restart); running jobs go on.
    pub fn stop_queued(&self) {
        self.inner.slots.close();
    }

    /// Shutdown, second half: resolves once every job started has ended and its prediction
    /// reached the cache (the shared store's included). Call [`Jobs::stop_queued`] first.
    pub async fn finished(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// The content-free priors shared by every job.
    fn priors(&self) -> Arc<Priors> {
        self.inner.priors.clone()
    }

    fn cached(&self, key: &str) -> Option<Arc<Value>> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(key)
            .cloned()
    }

    fn remember(&self, key: String, prediction: Arc<Value>) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, prediction);
    }

    /// The job for `key`: the running one, or `work` started now (after a slot unless `urgent`).
    /// Jobs get their slots in the order they were asked for: the first tasks of a bulk request
    /// finish first, so a deadline answers a prefix of them (spawned tasks themselves start in
    /// no fixed order).
    fn job(
        &self,
        key: String,
        urgent: bool,
        work: impl FnOnce() -> BoxFuture<'static, Outcome>,
    ) -> Pending {
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = running.get(&key) {
            return p.clone();
        }
        let (tx, rx) = oneshot::channel::<Outcome>();
        let pending: Pending = rx
            .map(|r| r.unwrap_or_else(|_| Err(Arc::from("the prediction job stopped"))))
            .boxed()
            .shared();
        running.insert(key.clone(), pending.clone());
        drop(running);
        let jobs = self.clone();
        let fut = work();
        // Polled once here, the semaphore's waiter queue holds this job's place (it is fair).
        let mut slot = (!urgent).then(|| self.inner.slots.clone().acquire_owned().boxed());
        let early = slot.as_mut().and_then(|s| s.now_or_never());
        if slot.is_some() {
            self.inner
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.tracker.spawn(async move {
            // A closed semaphore means the service is shutting down: a queued job is not run.
            let permit = match (early, slot) {
                (Some(permit), _) => Some(permit),
                (None, Some(slot)) => Some(slot.await),
                (None, None) => None,
            };
            if !urgent {
                jobs.inner
                    .queued
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            let outcome = match permit {
                Some(Err(_closed)) => Err(Arc::from("the ML backend is shutting down")),
                permit => {
                    let outcome = fut.await;
                    drop(permit);
                    outcome
                }
            };
            if let Ok(prediction) = &outcome {
                jobs.remember(key.clone(), prediction.clone());
            }
            jobs.inner
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            metrics::counter!("batchlab_ml_tasks_predicted_total", "outcome" => if outcome.is_ok() { "ok" } else { "error" })
                .increment(1);
            let _ = tx.send(outcome);
        });
        pending
    }
}

/// `POST /predict` → `{"results": [...]}`, one entry per task in order.
#[tracing::instrument(skip_all, fields(tasks))]
pub async fn predict(State(state): State<MlState>, body: Bytes) -> Result<Json<Value>, MlError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs_f64(state.config.ml_backend.predict_deadline_seconds.max(0.0));
    let request: PredictRequest = serde_json::from_slice(&body)
        .map_err(|e| MlError::BadRequest(format!("invalid /predict body: {e}")))?;
    tracing::Span::current().record("tasks", request.tasks.len());
    let schema = request
        .label_config
        .as_deref()
        .ok_or_else(|| MlError::BadRequest("label_config is missing".into()))?;
    let config = LabelConfig::parse(schema).map_err(config_error)?;
    config.require_predictable().map_err(config_error)?;
    let max_choices = state.config.ml_backend.max_choices;
    if let Some(c) = config
        .controls
        .iter()
        .find(|c| c.options().len() > max_choices)
    {
        return Err(MlError::BadRequest(format!(
            "control {:?} lists {} options; this ML backend scores at most {max_choices} (ml_backend.max_choices)",
            c.name,
            c.options().len()
        )));
    }
    let project = request.project.as_ref().and_then(project_id).or_else(|| {
        request
            .tasks
            .first()
            .and_then(|t| t.get("project"))
            .and_then(Value::as_i64)
    });
    let context = Arc::new(state.project_context(project, schema, Some(&config)).await);

    let fields = config.data_fields();
    let config = Arc::new(config);
    let urgent = request.tasks.len() <= 1;
    let mut answers: Vec<Option<Value>> = vec![None; request.tasks.len()];
    let mut misses: Vec<(usize, String, Value, Option<i64>)> = Vec::new();
    let mut unreadable = 0;
    for (i, task) in request.tasks.iter().enumerate() {
        let data = task.get("data").cloned().unwrap_or(Value::Null);
        let task_id = task.get("id").and_then(Value::as_i64);
        if !fields.is_empty()
            && !fields
                .iter()
                .any(|f| data.get(f).is_some_and(|v| !v.is_null()))
        {
            tracing::warn!(task = ?task_id, fields = ?fields, "task has none of the data fields the labeling config reads");
            unreadable += 1;
            continue;
        }
        let key = cache_key(&context.version, schema, &data);
        match state.jobs.cached(&key) {
            Some(hit) => {
                metrics::counter!("batchlab_ml_cache_hits_total", "cache" => "memory").increment(1);
                answers[i] = Some((*hit).clone());
            }
            None => misses.push((i, key, data, task_id)),
        }
    }
    if let Some(store) = &state.store {
        from_store(
            store,
            &state.jobs,
            schema,
            &context.version,
            &mut misses,
            &mut answers,
        )
        .await;
    }
    let engine = match state.engine.now() {
        ModelState::Failed(reason) if !misses.is_empty() => {
            return Err(MlError::Unavailable(format!(
                "the model is not loaded: {reason}"
            )))
        }
        ModelState::Ready(engine) => Some(engine),
        ModelState::Failed(_) | ModelState::Loading => None,
    };
    let mut entries: Vec<(usize, Pending)> = Vec::with_capacity(misses.len());
    if engine.is_some() {
        state.jobs.admit(misses.len())?;
    }
    if let Some(engine) = engine {
        for (i, key, data, task_id) in misses {
            let job = TaskJob {
                engine: engine.clone(),
                config: config.clone(),
                context: context.clone(),
                options: state.predict_options(),
                priors: state.jobs.priors(),
                store: state.store.clone(),
                key: key.clone(),
            };
            let pending = state.jobs.job(key, urgent, move || {
                async move { run_task(job, data, task_id).await }.boxed()
            });
            entries.push((i, pending));
        }
    }
    if unreadable == request.tasks.len() && unreadable > 0 {
        return Err(MlError::Unprocessable(format!(
            "no task has any of the data fields the labeling config reads: {}",
            fields.join(", ")
        )));
    }
    // Wait until every job is done or the deadline passes; then take whatever is done.
    let _ = tokio::time::timeout_at(
        deadline,
        futures::future::join_all(entries.iter().map(|(_, p)| p.clone())),
    )
    .await;
    for (i, pending) in entries {
        match pending.now_or_never() {
            Some(Ok(prediction)) => answers[i] = Some((*prediction).clone()),
            Some(Err(reason)) => tracing::warn!(task = i, %reason, "task not predicted"),
            None => {}
        }
    }
    let done = answers.iter().filter(|a| a.is_some()).count();
    metrics::histogram!("batchlab_ml_predict_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(tasks = answers.len(), answered = done, version = %context.version, seconds = started.elapsed().as_secs_f64(), "predict");
    let results: Vec<Value> = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| json!({"model_version": context.version})))
        .collect();
    Ok(Json(json!({"results": results})))
}

/// A labeling config refused for its size is the request's fault (400, naming the limit); one
/// that cannot be predicted is 422.
pub fn config_error(e: batchlab_core::labelstudio::config::LabelConfigError) -> MlError {
    if e.is_limit() {
        MlError::BadRequest(e.to_string())
    } else {
        MlError::Unprocessable(e.to_string())
    }
}

/// What a task's job needs beside the task.
struct TaskJob {
    engine: batchlab_inference::engine::Engine,
    config: Arc<LabelConfig>,
    context: Arc<ProjectContext>,
    options: PredictOptions,
    priors: Arc<Priors>,
    store: Option<Store>,
    key: String,
}

/// One task's job: the prediction object Label Studio stores, also written to the shared cache.
#[tracing::instrument(skip_all, fields(task = ?task_id))]
async fn run_task(job: TaskJob, data: Value, task_id: Option<i64>) -> Outcome {
    let TaskJob {
        engine,
        config,
        context,
        options,
        priors,
        store,
        key,
    } = job;
    let started = Instant::now();
    let examples = context
        .examples
        .most_similar(&config, &data, task_id, options.examples);
    let prediction = predict_task(
        &engine,
        &config,
        &data,
        &examples,
        context.template.as_deref(),
        &options,
        &priors,
    )
    .await
    .map_err(|e| Arc::<str>::from(e.to_string()))?;
    metrics::histogram!("batchlab_ml_task_seconds").record(started.elapsed().as_secs_f64());
    let stored = json!({"result": prediction.result, "score": prediction.score});
    if let Some(store) = store {
        let row = CachedPrediction {
            key,
            model_version: context.version.clone(),
            prediction: stored.to_string(),
        };
        if let Err(e) = store.cache_predictions(&[row]).await {
            tracing::warn!(error = %e, "prediction not written to the shared cache");
        }
    }
    Ok(Arc::new(answer(&stored, &context.version)))
}

/// The prediction object Label Studio stores: a cached `{"result", "score"}` with `version`.
fn answer(stored: &Value, version: &str) -> Value {
    json!({"result": stored["result"], "score": stored["score"], "model_version": version})
}

/// Answers the `misses` found in the shared store (made by this or another ML backend process
/// under the same version, or imported from batch results for the same config and data) and
/// leaves the rest in `misses`. A store that cannot be read is logged and skipped.
async fn from_store(
    store: &Store,
    jobs: &Jobs,
    schema: &str,
    version: &str,
    misses: &mut Vec<(usize, String, Value, Option<i64>)>,
    answers: &mut [Option<Value>],
) {
    if misses.is_empty() {
        return;
    }
    let imported: Vec<String> = misses
        .iter()
        .map(|(_, _, data, _)| cache_key(IMPORTED, schema, data))
        .collect();
    let keys: Vec<String> = misses
        .iter()
        .map(|m| m.1.clone())
        .chain(imported.iter().cloned())
        .collect();
    let found = match store.cached_predictions(&keys).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "shared prediction cache unavailable");
            return;
        }
    };
    let mut rest = Vec::with_capacity(misses.len());
    for (miss, imported_key) in misses.drain(..).zip(imported) {
        let hit = found
            .get(&miss.1)
            .map(|p| ("store", p))
            .or_else(|| found.get(&imported_key).map(|p| ("imported", p)));
        match hit
            .and_then(|(kind, p)| Some((kind, serde_json::from_str::<Value>(&p.prediction).ok()?)))
        {
            Some((kind, stored)) => {
                metrics::counter!("batchlab_ml_cache_hits_total", "cache" => kind).increment(1);
                let prediction = answer(&stored, version);
                jobs.remember(miss.1.clone(), Arc::new(prediction.clone()));
                answers[miss.0] = Some(prediction);
            }
            None => rest.push(miss),
        }
    }
    *misses = rest;
}

impl MlState {
    /// How tasks are predicted, from the configuration.
    pub fn predict_options(&self) -> PredictOptions {
        let ml = &self.config.ml_backend;
        PredictOptions {
            text_max_tokens: ml.text_max_tokens,
            examples: ml.few_shot_examples,
        }
    }
}

/// `GET /status`: whether the model is loaded and how far the predictions are.
pub async fn status(State(state): State<MlState>) -> Json<Value> {
    let model = match state.engine.now() {
        ModelState::Loading => json!({"state": "loading"}),
        ModelState::Ready(engine) => {
            json!({"state": "ready", "id": engine.model_id(), "in_flight": engine.in_flight()})
        }
        ModelState::Failed(reason) => json!({"state": "failed", "error": &*reason}),
    };
    Json(json!({"model": model, "predictions": state.jobs.counts()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bulk jobs take their slots in the order they were asked for (spawned tasks start in no
    /// fixed order on a multi-threaded runtime: the last spawned often runs first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_start_in_the_order_they_were_asked_for() {
        let jobs = Jobs::new(100, 1, 1_000);
        let started = Arc::new(Mutex::new(Vec::new()));
        // Asked for from a runtime thread, as a request handler does.
        let pending: Vec<Pending> = tokio::spawn({
            let (jobs, started) = (jobs.clone(), started.clone());
            async move {
                (0..40)
                    .map(|i| {
                        let started = started.clone();
                        jobs.job(format!("task {i}"), false, move || {
                            async move {
                                started.lock().unwrap().push(i);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                Ok(Arc::new(json!(i)))
                            }
                            .boxed()
                        })
                    })
                    .collect()
            }
        })
        .await
        .unwrap();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(*p.await.unwrap(), json!(i));
        }
        assert_eq!(*started.lock().unwrap(), (0..40).collect::<Vec<_>>());
        assert_eq!(jobs.counts().queued, 0);
        assert_eq!(jobs.counts().cached, 40);
    }

    /// The pending jobs are bounded: a bulk request that would pass `max_pending` is refused
    /// whole with 503 (Label Studio asks again), a single task always goes in, and places come
    /// back as jobs finish.
    #[tokio::test]
    async fn pending_jobs_are_bounded() {
        let jobs = Jobs::new(100, 1, 3);
        let (release, hold) = tokio::sync::watch::channel(false);
        let pending: Vec<Pending> = (0..3)
            .map(|i| {
                let mut hold = hold.clone();
                jobs.job(format!("held {i}"), false, move || {
                    async move {
                        let _ = hold.wait_for(|released| *released).await;
                        Ok(Arc::new(json!(i)))
                    }
                    .boxed()
                })
            })
            .collect();
        assert_eq!(jobs.counts().pending, 3);
        let refused = jobs.admit(2).unwrap_err();
        assert!(matches!(refused, MlError::Busy(_)), "{refused:?}");
        assert!(
            refused.to_string().contains("ml_backend.max_pending_tasks"),
            "{refused}"
        );
        jobs.admit(1).expect("one task alone is always admitted");
        release.send(true).unwrap();
        for p in pending {
            p.await.unwrap();
        }
        jobs.admit(3).expect("places came back");
    }
}
