//! `POST /predict`: Label Studio sends every selected task in one request and waits up to
//! `ML_TIMEOUT_PREDICT` (100 s by default); opening a task without a prediction blocks the
//! annotator on it. So each task becomes a background job, and the request answers by the
//! configured deadline: finished tasks with their prediction, unfinished ones with an entry
//! without `result` (Label Studio skips it and asks again), while their jobs continue into the
//! prediction cache that answers the next request at once.
//!
//! Jobs are keyed by (model version, task data): a task asked for twice runs once. Requests of
//! one task (an annotator opening it) start at once, at the engine's interactive priority (a
//! task of a bulk request still waiting for its turn starts then too); bigger ones are bulk
//! work: they take their turns in order, as many at once as keep the engine's batch full
//! ([`bulk_in_flight`], from `[engine] max_batch` and `max_queue`), at the engine's bulk
//! priority, so an annotator's task goes ahead of them in the engine too. Tasks of a bulk
//! request are all shown the same few-shot examples, so that their prompts share everything
//! but the task and the engine reuses that part from its prompt cache.
//!
//! Each project's jobs are counted (queued, running, done, failed, and the rate over the last
//! minute) for `/status` and the metrics ([`ProjectProgress`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use batchlab_core::config::EngineSettings;
use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::prediction_key::{cache_key, IMPORTED};
use batchlab_core::store::{CachedPrediction, Store};
use batchlab_inference::engine::Priority;
use batchlab_inference::predict::task::{
    engine_requests, predict_task, PredictOptions, Priors, Teaching,
};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify, Semaphore};

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
    running: Mutex<HashMap<String, Running>>,
    /// Engine requests bulk jobs may have in flight ([`bulk_in_flight`]); a job takes as many
    /// as it makes at once ([`engine_requests`]).
    slots: Arc<Semaphore>,
    slot_count: usize,
    queued: std::sync::atomic::AtomicUsize,
    progress: Mutex<Progress>,
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

/// A job started and not finished: its outcome to come, and the signal that starts it at once
/// when it still waits for its turn and an annotator opens its task.
struct Running {
    pending: Pending,
    promote: Arc<Notify>,
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
    /// Engine requests bulk jobs have in flight now.
    pub bulk_requests_in_flight: usize,
    /// Engine requests bulk jobs may have in flight ([`bulk_in_flight`]).
    pub bulk_requests_limit: usize,
}

/// Engine requests that bulk prediction jobs keep in flight: the places of the engine's batch
/// that bulk work may take ([`EngineConfig::bulk_batch`], from `[engine] max_batch`) and as
/// many again waiting in the engine's queue, so that a place freed is taken on the model
/// thread's next turn without waiting for this service (a task's scoring request ends long
/// before its generation, so places free often); at most half the engine's queue (`[engine]
/// max_queue`), so that interactive requests always find room in it.
///
/// [`EngineConfig::bulk_batch`]: batchlab_inference::engine::EngineConfig::bulk_batch
pub fn bulk_in_flight(engine: &EngineSettings) -> usize {
    let config = batchlab_inference::engine_config(engine);
    let places = config.bulk_batch();
    (2 * places).min(config.max_queue.max(2) / 2).max(1)
}

impl Jobs {
    /// Empty cache holding up to `capacity` predictions; bulk jobs keep `in_flight` engine
    /// requests in flight at most ([`bulk_in_flight`]), at most `max_pending` jobs wait or run
    /// (see [`Jobs::admit`]), and the progress of up to `max_projects` projects is kept.
    pub fn new(capacity: usize, in_flight: usize, max_pending: usize, max_projects: usize) -> Jobs {
        let in_flight = in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Jobs {
            inner: Arc::new(JobsInner {
                cache: Mutex::new(Cache {
                    map: HashMap::new(),
                    order: VecDeque::new(),
                    capacity,
                }),
                running: Mutex::new(HashMap::new()),
                slots: Arc::new(Semaphore::new(in_flight)),
                slot_count: in_flight,
                queued: Default::default(),
                progress: Mutex::new(Progress::new(max_projects)),
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
            bulk_requests_in_flight: self.inner.slot_count - self.inner.slots.available_permits(),
            bulk_requests_limit: self.inner.slot_count,
        }
    }

    /// Each project's prediction jobs (projects Label Studio did not name are under 0).
    pub fn progress(&self) -> BTreeMap<i64, ProjectProgress> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report(Instant::now())
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
    pub(crate) fn priors(&self) -> Arc<Priors> {
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

    /// The job for `key`: the running one, or `work` started now. An `urgent` job (an
    /// annotator waits on it) starts at once, at the engine's interactive priority; so does a
    /// job still waiting for its turn when an urgent request asks for it. Other jobs are bulk
    /// work: each waits until the `weight` engine requests it makes at once fit in the bulk
    /// requests in flight ([`bulk_in_flight`]), then runs at the engine's bulk priority.
    /// Jobs get their turns in the order they were asked for: the first tasks of a bulk request
    /// finish first, so a deadline answers a prefix of them (spawned tasks themselves start in
    /// no fixed order). `work` is given the priority its engine requests are to have.
    fn job(
        &self,
        key: String,
        urgent: bool,
        weight: usize,
        project: Option<i64>,
        work: impl FnOnce(Priority) -> BoxFuture<'static, Outcome> + Send + 'static,
    ) -> Pending {
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get(&key) {
            if urgent {
                r.promote.notify_one();
            }
            return r.pending.clone();
        }
        let (tx, rx) = oneshot::channel::<Outcome>();
        let pending: Pending = rx
            .map(|r| r.unwrap_or_else(|_| Err(Arc::from("the prediction job stopped"))))
            .boxed()
            .shared();
        let promote = Arc::new(Notify::new());
        running.insert(
            key.clone(),
            Running {
                pending: pending.clone(),
                promote: promote.clone(),
            },
        );
        drop(running);
        let project = project.unwrap_or(0);
        let jobs = self.clone();
        let weight = u32::try_from(weight.clamp(1, self.inner.slot_count)).unwrap_or(u32::MAX);
        // Polled once here, the semaphore's waiter queue holds this job's place (it is fair).
        let mut slot =
            (!urgent).then(|| self.inner.slots.clone().acquire_many_owned(weight).boxed());
        let early = slot.as_mut().and_then(|s| s.now_or_never());
        let waits = slot.is_some() && early.is_none();
        if waits {
            self.inner
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.update_progress(project, |p, now| p.add(waits, now));
        self.inner.tracker.spawn(async move {
            // A closed semaphore means the service is shutting down: a queued job is not run.
            let (permit, promoted) = match (early, slot) {
                (Some(permit), _) => (Some(permit), false),
                (None, Some(slot)) => tokio::select! {
                    biased;
                    permit = slot => (Some(permit), false),
                    () = promote.notified() => (None, true),
                },
                (None, None) => (None, false),
            };
            if waits {
                jobs.inner
                    .queued
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            let outcome = match permit {
                Some(Err(_closed)) => Err(Arc::from("the ML backend is shutting down")),
                permit => {
                    if waits {
                        jobs.update_progress(project, |p, _| p.start());
                    }
                    let priority = if urgent || promoted {
                        Priority::Interactive
                    } else {
                        Priority::Bulk
                    };
                    let outcome = work(priority).await;
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
            let ok = outcome.is_ok();
            jobs.update_progress(project, |p, now| p.finish(ok, now));
            metrics::counter!("batchlab_ml_tasks_predicted_total", "outcome" => if ok { "ok" } else { "error" })
                .increment(1);
            metrics::counter!(
                "batchlab_ml_project_tasks_finished_total",
                "project" => project.to_string(),
                "outcome" => if ok { "done" } else { "failed" }
            )
            .increment(1);
            let _ = tx.send(outcome);
        });
        pending
    }

    /// Applies `change` to `project`'s progress and publishes it as metrics.
    fn update_progress(&self, project: i64, change: impl FnOnce(&mut ProjectState, Instant)) {
        let now = Instant::now();
        let mut progress = self
            .inner
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let state = progress.project(project, now);
        change(state, now);
        state.publish(project, now);
        progress.forget_idle();
    }
}

/// How far back the rate of finished jobs looks.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One project's prediction jobs, as `/status` shows them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProjectProgress {
    /// Jobs waiting for their turn.
    pub queued: usize,
    /// Jobs running.
    pub running: usize,
    /// Jobs finished with a prediction since the service started.
    pub done: u64,
    /// Jobs finished without one since the service started (logged).
    pub failed: u64,
    /// Jobs finished per second over the last minute of this run of work (since the project
    /// last had no job); 0 when it has none.
    pub tasks_per_second: f64,
    /// Seconds until the queued and running jobs are done at that rate, when there are some.
    pub eta_seconds: Option<f64>,
}

/// Every project's [`ProjectState`], for a bounded number of projects.
struct Progress {
    projects: HashMap<i64, ProjectState>,
    max_projects: usize,
}

/// One project's counts and the recent finishes its rate is measured over.
#[derive(Debug)]
struct ProjectState {
    queued: usize,
    running: usize,
    done: u64,
    failed: u64,
    /// When each job finished, within [`RATE_WINDOW`].
    finished: VecDeque<Instant>,
    /// When the project last went from no job to some.
    active_since: Instant,
    /// Last change.
    touched: Instant,
}

impl Progress {
    fn new(max_projects: usize) -> Progress {
        Progress {
            projects: HashMap::new(),
            max_projects: max_projects.max(1),
        }
    }

    fn project(&mut self, project: i64, now: Instant) -> &mut ProjectState {
        self.projects
            .entry(project)
            .or_insert_with(|| ProjectState {
                queued: 0,
                running: 0,
                done: 0,
                failed: 0,
                finished: VecDeque::new(),
                active_since: now,
                touched: now,
            })
    }

    /// Forgets the projects without jobs that changed longest ago while more than
    /// `max_projects` are kept.
    fn forget_idle(&mut self) {
        while self.projects.len() > self.max_projects {
            let idle = self
                .projects
                .iter()
                .filter(|(_, p)| p.is_idle())
                .min_by_key(|(_, p)| p.touched)
                .map(|(id, _)| *id);
            match idle {
                Some(id) => {
                    self.projects.remove(&id);
                }
                None => break,
            }
        }
    }

    fn report(&mut self, now: Instant) -> BTreeMap<i64, ProjectProgress> {
        self.projects
            .iter_mut()
            .map(|(id, p)| (*id, p.report(now)))
            .collect()
    }
}

impl ProjectState {
    fn is_idle(&self) -> bool {
        self.queued == 0 && self.running == 0
    }

    /// A job asked for: waiting for its turn, or running at once.
    fn add(&mut self, waits: bool, now: Instant) {
        if self.is_idle() {
            self.active_since = now;
            self.finished.clear();
        }
        if waits {
            self.queued += 1;
        } else {
            self.running += 1;
        }
        self.touched = now;
    }

    /// A waiting job got its turn.
    fn start(&mut self) {
        self.queued = self.queued.saturating_sub(1);
        self.running += 1;
    }

    /// A job ended (a job that never got its turn ends from the queue).
    fn finish(&mut self, ok: bool, now: Instant) {
        if self.running > 0 {
            self.running -= 1;
        } else {
            self.queued = self.queued.saturating_sub(1);
        }
        if ok {
            self.done += 1;
        } else {
            self.failed += 1;
        }
        self.finished.push_back(now);
        self.touched = now;
    }

    fn report(&mut self, now: Instant) -> ProjectProgress {
        while self
            .finished
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            self.finished.pop_front();
        }
        let window = now
            .duration_since(self.active_since)
            .min(RATE_WINDOW)
            .as_secs_f64()
            .max(1.0);
        let tasks_per_second = if self.is_idle() {
            0.0
        } else {
            self.finished.len() as f64 / window
        };
        let left = (self.queued + self.running) as f64;
        ProjectProgress {
            queued: self.queued,
            running: self.running,
            done: self.done,
            failed: self.failed,
            tasks_per_second,
            eta_seconds: (left > 0.0 && tasks_per_second > 0.0).then(|| left / tasks_per_second),
        }
    }

    /// Sets the project's gauges: `batchlab_ml_project_tasks{project, state}` (queued,
    /// running) and `batchlab_ml_project_tasks_per_second{project}` (finished jobs are the
    /// counter `batchlab_ml_project_tasks_finished_total{project, outcome}`).
    fn publish(&mut self, project: i64, now: Instant) {
        let r = self.report(now);
        let id = project.to_string();
        metrics::gauge!("batchlab_ml_project_tasks", "project" => id.clone(), "state" => "queued")
            .set(r.queued as f64);
        metrics::gauge!("batchlab_ml_project_tasks", "project" => id.clone(), "state" => "running")
            .set(r.running as f64);
        metrics::gauge!("batchlab_ml_project_tasks_per_second", "project" => id)
            .set(r.tasks_per_second);
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
    state.engine.refuse_while_loading()?;
    let context = Arc::new(state.project_context(project, schema, Some(&config)).await);

    let fields = config.data_fields();
    let weight = engine_requests(&config);
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
                shared_examples: !urgent,
            };
            let pending = state
                .jobs
                .job(key, urgent, weight, project, move |priority| {
                    async move { run_task(job, priority, data, task_id).await }.boxed()
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
    /// Shown the examples every task of a bulk request is ([`ExampleSet::shared_for`]) rather
    /// than the most similar ones.
    ///
    /// [`ExampleSet::shared_for`]: batchlab_inference::predict::examples::ExampleSet::shared_for
    shared_examples: bool,
}

/// One task's job: the prediction object Label Studio stores, also written to the shared cache.
/// Its engine requests are queued with `priority`.
#[tracing::instrument(skip_all, fields(task = ?task_id, ?priority))]
async fn run_task(job: TaskJob, priority: Priority, data: Value, task_id: Option<i64>) -> Outcome {
    let TaskJob {
        engine,
        config,
        context,
        options,
        priors,
        store,
        key,
        shared_examples,
    } = job;
    let started = Instant::now();
    let examples = if shared_examples {
        context.examples.shared_for(task_id, options.examples)
    } else {
        context
            .examples
            .most_similar(&config, &data, task_id, options.examples)
    };
    let teaching = Teaching {
        examples: &examples,
        template: context.template.as_deref(),
        classifiers: Some(&context.learned.classifiers),
    };
    // The task's requests keep its place in the engine's line: its generation, asked once its
    // scoring is done, goes before the scoring of tasks begun later, so a bulk request's first
    // tasks finish first (and a deadline answers them) instead of every task in flight at once.
    let prediction = predict_task(
        &engine.with_priority(priority).in_line_since(started),
        &config,
        &data,
        &teaching,
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

/// `GET /status`: whether the model is loaded and how far the predictions are: the jobs of all
/// projects together (`predictions`) and each project's (`projects`, by id, 0 when Label
/// Studio named none: [`ProjectProgress`]), and what each project has learned from its
/// annotations (`learning`, by id: [`LearningReport`](crate::learning::LearningReport)).
pub async fn status(State(state): State<MlState>) -> Json<Value> {
    let model = match state.engine.now() {
        ModelState::Loading => json!({"state": "loading"}),
        ModelState::Ready(engine) => {
            json!({"state": "ready", "id": engine.model_id(), "in_flight": engine.in_flight()})
        }
        ModelState::Failed(reason) => json!({"state": "failed", "error": &*reason}),
    };
    let projects: BTreeMap<String, ProjectProgress> = state
        .jobs
        .progress()
        .into_iter()
        .map(|(id, p)| (id.to_string(), p))
        .collect();
    Json(json!({
        "model": model,
        "predictions": state.jobs.counts(),
        "projects": projects,
        "learning": state.learning.reports(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bulk jobs take their slots in the order they were asked for (spawned tasks start in no
    /// fixed order on a multi-threaded runtime: the last spawned often runs first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_start_in_the_order_they_were_asked_for() {
        let jobs = Jobs::new(100, 1, 1_000, 10);
        let started = Arc::new(Mutex::new(Vec::new()));
        // Asked for from a runtime thread, as a request handler does.
        let pending: Vec<Pending> = tokio::spawn({
            let (jobs, started) = (jobs.clone(), started.clone());
            async move {
                (0..40)
                    .map(|i| {
                        let started = started.clone();
                        jobs.job(format!("task {i}"), false, 1, None, move |_| {
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
        let jobs = Jobs::new(100, 1, 3, 10);
        let (release, hold) = tokio::sync::watch::channel(false);
        let pending: Vec<Pending> = (0..3)
            .map(|i| {
                let mut hold = hold.clone();
                jobs.job(format!("held {i}"), false, 1, None, move |_| {
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

    /// Where held jobs say that they started, and at which priority.
    type Ran = tokio::sync::mpsc::UnboundedSender<(String, Priority)>;

    /// A job that waits until `hold` is released, saying when it starts and at which priority.
    fn held(
        jobs: &Jobs,
        key: &str,
        urgent: bool,
        weight: usize,
        hold: &tokio::sync::watch::Receiver<bool>,
        ran: &Ran,
    ) -> Pending {
        let (mut hold, ran, name) = (hold.clone(), ran.clone(), key.to_string());
        jobs.job(key.into(), urgent, weight, Some(7), move |priority| {
            async move {
                let _ = ran.send((name, priority));
                let _ = hold.wait_for(|released| *released).await;
                Ok(Arc::new(json!(priority == Priority::Interactive)))
            }
            .boxed()
        })
    }

    /// Bulk jobs keep the engine's batch full: with the default configuration as many tasks
    /// run at once as fill the places the engine gives bulk work (each task counted in the
    /// engine requests it makes), not a constant of their own; a bigger batch runs more, a
    /// small engine queue fewer.
    #[tokio::test]
    async fn bulk_tasks_in_flight_follow_the_engines_batch_and_queue() {
        let config = batchlab_core::config::Config::default();
        let state = crate::MlState::new(config.clone()).unwrap();
        let engine = batchlab_inference::engine_config(&config.engine);
        // A candidate-evaluation task: one scoring request and one generation.
        let weight = 2;
        let (release, hold) = tokio::sync::watch::channel(false);
        let (ran, _started) = tokio::sync::mpsc::unbounded_channel();
        let pending: Vec<Pending> = (0..60)
            .map(|i| {
                held(
                    &state.jobs,
                    &format!("bulk {i}"),
                    false,
                    weight,
                    &hold,
                    &ran,
                )
            })
            .collect();
        tokio::task::yield_now().await;
        let counts = state.jobs.counts();
        let running = counts.pending - counts.queued;
        assert!(
            running * weight >= engine.bulk_batch(),
            "{running} tasks of {weight} requests do not fill the {} bulk places of a batch of {}: {counts:?}",
            engine.bulk_batch(),
            engine.max_batch
        );
        assert!(
            running * weight <= counts.bulk_requests_limit
                && counts.bulk_requests_limit < engine.max_queue,
            "{counts:?}"
        );
        // The next task in line holds the places already freed (the semaphore hands them out
        // in order), so the count may pass the running tasks' share.
        assert!(
            (running * weight..=counts.bulk_requests_limit)
                .contains(&counts.bulk_requests_in_flight),
            "{counts:?}"
        );
        release.send(true).unwrap();
        for p in pending {
            assert_eq!(
                *p.await.unwrap(),
                json!(false),
                "bulk work runs at bulk priority"
            );
        }
        let mut big = config.engine.clone();
        big.max_batch = 64;
        assert!(bulk_in_flight(&big) > bulk_in_flight(&config.engine));
        let mut small_queue = config.engine.clone();
        small_queue.max_queue = 8;
        assert_eq!(bulk_in_flight(&small_queue), 4);
    }

    /// A single task (an annotator opening it) starts at once at interactive priority while
    /// bulk work fills every turn, and so does a queued bulk task when an annotator opens it.
    #[tokio::test]
    async fn an_annotators_task_jumps_queued_bulk_work() {
        let jobs = Jobs::new(100, 2, 1_000, 10);
        let (release, hold) = tokio::sync::watch::channel(false);
        let (ran, mut started) = tokio::sync::mpsc::unbounded_channel();
        let bulk: Vec<Pending> = (0..6)
            .map(|i| held(&jobs, &format!("bulk {i}"), false, 1, &hold, &ran))
            .collect();
        for _ in 0..2 {
            let (_, priority) = started.recv().await.unwrap();
            assert_eq!(priority, Priority::Bulk);
        }
        assert_eq!(jobs.counts().queued, 4, "{:?}", jobs.counts());
        // Neither waits for the held bulk work (a hang here is the failure; the limit only
        // keeps a broken build from waiting forever).
        let (_, free) = tokio::sync::watch::channel(true);
        let opened = held(&jobs, "opened", true, 2, &free, &ran);
        let again = held(&jobs, "bulk 5", true, 1, &free, &ran);
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), async {
            while seen.len() < 2 {
                seen.push(started.recv().await.unwrap());
            }
        })
        .await
        .expect("the annotator's tasks never started while bulk work was held");
        seen.sort();
        assert_eq!(
            seen,
            [
                ("bulk 5".to_string(), Priority::Interactive),
                ("opened".to_string(), Priority::Interactive)
            ],
            "both at once, at interactive priority"
        );
        assert_eq!(*opened.await.unwrap(), json!(true));
        assert_eq!(jobs.counts().queued, 3, "{:?}", jobs.counts());
        release.send(true).unwrap();
        assert_eq!(*again.await.unwrap(), json!(true));
        for p in bulk {
            p.await.unwrap();
        }
        assert_eq!(jobs.counts().pending, 0);
    }

    /// A project's progress: queued, running, done, failed and a rate while work is pending.
    #[tokio::test]
    async fn project_progress_counts_queued_running_done_and_failed() {
        let jobs = Jobs::new(100, 2, 1_000, 10);
        let (release, hold) = tokio::sync::watch::channel(false);
        let (ran, _started) = tokio::sync::mpsc::unbounded_channel();
        let first: Vec<Pending> = (0..2)
            .map(|i| held(&jobs, &format!("first {i}"), false, 1, &hold, &ran))
            .collect();
        let failing = jobs.job("failing".into(), false, 1, Some(7), |_| {
            async { Err(Arc::from("no")) }.boxed()
        });
        let (_, go) = tokio::sync::watch::channel(true);
        let rest: Vec<Pending> = (0..3)
            .map(|i| held(&jobs, &format!("rest {i}"), false, 1, &go, &ran))
            .collect();
        tokio::task::yield_now().await;
        let p = jobs.progress()[&7];
        assert_eq!(
            (p.queued, p.running, p.done, p.failed),
            (4, 2, 0, 0),
            "{p:?}"
        );
        assert_eq!(p.eta_seconds, None, "no rate yet");
        release.send(true).unwrap();
        for f in first {
            f.await.unwrap();
        }
        failing.await.unwrap_err();
        let p = jobs.progress()[&7];
        assert_eq!(
            p.done + p.failed + (p.queued + p.running) as u64,
            6,
            "{p:?}"
        );
        assert_eq!(p.failed, 1, "{p:?}");
        for r in rest {
            r.await.unwrap();
        }
        let p = jobs.progress()[&7];
        assert_eq!(
            (p.queued, p.running, p.done, p.failed),
            (0, 0, 5, 1),
            "{p:?}"
        );
        assert_eq!(p.tasks_per_second, 0.0, "idle");
    }
}
