//! One typed configuration for every batchlab binary.
//!
//! Values are layered, later layers winning: the built-in defaults below, `config/default.toml`
//! (when present in the working directory), the file given with `--config`, then environment
//! variables `BATCHLAB_<SECTION>__<FIELD>` (for example `BATCHLAB_API__PORT=5080`,
//! `BATCHLAB_DATABASE__URL=postgres://...`). Secrets (the API key) belong in the environment.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::secret::Secret;

pub mod reference;

/// Where the default configuration file lives, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";

/// Everything a batchlab binary can be configured with.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The OpenAI-compatible Batch API service.
    pub api: ApiConfig,
    /// The Label Studio ML backend service.
    pub ml_backend: MlBackendConfig,
    /// The batch worker.
    pub worker: WorkerConfig,
    /// The shared database.
    pub database: DatabaseConfig,
    /// Where file bodies and other data live.
    pub storage: StorageConfig,
    /// The in-process inference engine.
    pub engine: EngineSettings,
    /// Limits on batch input.
    pub batch: BatchLimits,
    /// How batchlab reaches Label Studio and how Label Studio reaches batchlab.
    pub label_studio: LabelStudioConfig,
    /// Milestone exports and accuracy records.
    pub curation: CurationConfig,
    /// Deleting expired files and old webhook events in the background.
    pub retention: RetentionConfig,
}

/// Settings of `batchlab-api`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (4080 by default).
    pub port: u16,
    /// Optional bearer key; when set every `/v1` route requires `Authorization: Bearer <key>`.
    /// Set it through `BATCHLAB_API__API_KEY`, not in a file.
    pub api_key: Option<Secret>,
    /// Largest accepted upload in bytes (OpenAI's batch input limit is 200 MB).
    pub max_upload_bytes: u64,
    /// Largest accepted Label Studio webhook body in bytes: a TASKS_CREATED of a big import
    /// carries every task, so this is generous; larger bodies get 413.
    pub max_webhook_bytes: u64,
    /// Webhook bodies read at once; more concurrent deliveries get 503 with `Retry-After`, so
    /// that many large bodies cannot exhaust memory together.
    pub max_concurrent_webhooks: usize,
    /// Serve on a non-loopback address without an API key or webhook secret. Off by default:
    /// such a start is refused, naming the missing setting.
    pub allow_unauthenticated: bool,
    /// On SIGTERM/SIGINT, how long requests in progress and the event processor's pass in
    /// progress may take to finish before the process exits (inside Docker's 10 s).
    pub shutdown_grace_seconds: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 4080,
            api_key: None,
            max_upload_bytes: 200 * 1024 * 1024,
            max_webhook_bytes: 64 * 1024 * 1024,
            max_concurrent_webhooks: 64,
            allow_unauthenticated: false,
            shutdown_grace_seconds: 8,
        }
    }
}

/// Settings of `batchlab-ml-backend`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MlBackendConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (4082 by default).
    pub port: u16,
    /// HTTP basic-auth user required on every route when set together with `basic_auth_pass`
    /// (Label Studio's `BASIC_AUTH` method; environment `BASIC_AUTH_USER`). Setting only one of
    /// the two is refused at start rather than leaving the service open.
    pub basic_auth_user: Option<String>,
    /// HTTP basic-auth password (environment `BASIC_AUTH_PASS`).
    pub basic_auth_pass: Option<Secret>,
    /// Serve on a non-loopback address without basic auth. Off by default: such a start is
    /// refused, naming the missing settings.
    pub allow_unauthenticated: bool,
    /// Seconds a `/predict` answers within: tasks finished by then get predictions, the rest an
    /// entry without `result` (Label Studio asks again) while they finish into the cache.
    /// Keep it below Label Studio's `ML_TIMEOUT_PREDICT` (100 s by default).
    pub predict_deadline_seconds: f64,
    /// Deprecated and ignored (0): the tasks of a bulk `/predict` in flight follow the engine's
    /// `max_batch` and `max_queue` (batchlab-ml-backend's `bulk_in_flight`), so that they keep
    /// its batch full. Still accepted so that existing configuration files load; a value other
    /// than 0 is logged as ignored.
    pub concurrent_tasks: usize,
    /// Most tokens generated for a `TextArea` answer.
    pub text_max_tokens: usize,
    /// Ground-truth examples (the most similar) shown before each task; 0 turns few-shot off.
    pub few_shot_examples: usize,
    /// Learn a classifier for each closed control (single `Choices`, small `Rating` and
    /// `Number`) from the project's annotations in the shared store, used while it beats
    /// zero-shot on held-out annotations.
    pub learn: bool,
    /// Seconds between trainings of one project: annotations arriving meanwhile are learned
    /// in the next one (and START_TRAINING or a new `/predict` after that starts it).
    pub learn_debounce_seconds: f64,
    /// Annotations one training reads at most (the newest tasks'), bounding its time and memory.
    pub learn_max_annotations: usize,
    /// Predictions kept in memory for the next request (least recently made dropped first).
    pub cache_entries: usize,
    /// Tasks waiting for or running a prediction at most; a `/predict` that would queue more
    /// gets 503 with `Retry-After` (Label Studio asks again), so no request grows the queue
    /// without bound.
    pub max_pending_tasks: usize,
    /// Options (`<Choice>`, `<Label>`) one control may list for `/predict`: each option is
    /// scored by the model, so this bounds one task's work. More is answered 400.
    pub max_choices: usize,
    /// Projects whose prompt template and model versions are remembered (least recently
    /// announced dropped first).
    pub max_projects: usize,
    /// On SIGTERM/SIGINT, how long requests in progress and the prediction jobs already running
    /// may take to finish (their predictions reach the shared cache) before the process exits;
    /// jobs still waiting for a slot are not started.
    pub shutdown_grace_seconds: u64,
}

impl Default for MlBackendConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 4082,
            basic_auth_user: None,
            basic_auth_pass: None,
            allow_unauthenticated: false,
            predict_deadline_seconds: 20.0,
            concurrent_tasks: 0,
            text_max_tokens: 48,
            few_shot_examples: 4,
            learn: true,
            learn_debounce_seconds: 10.0,
            learn_max_annotations: 5_000,
            cache_entries: 100_000,
            max_pending_tasks: 10_000,
            max_choices: 1_000,
            max_projects: 10_000,
            shutdown_grace_seconds: 8,
        }
    }
}

impl MlBackendConfig {
    /// The basic-auth user and password when both are set, `None` when neither is, and an
    /// error naming the missing one when only one is: auth never fails open.
    pub fn basic_auth(&self) -> Result<Option<(&str, &str)>, ConfigError> {
        let missing = |set: &str, unset: &str| {
            Err(ConfigError::Insecure(format!(
                "{set} is set but {unset} is not: basic auth needs both, and the ML backend will not \
                 start open when half of it is configured"
            )))
        };
        match (
            non_blank(self.basic_auth_user.as_deref()),
            non_blank(self.basic_auth_pass.as_deref()),
        ) {
            (Some(u), Some(p)) => Ok(Some((u, p))),
            (None, None) => Ok(None),
            (Some(_), None) => missing("BASIC_AUTH_USER", "BASIC_AUTH_PASS"),
            (None, Some(_)) => missing("BASIC_AUTH_PASS", "BASIC_AUTH_USER"),
        }
    }
}

/// Settings of `batchlab-worker`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Identifies this worker in leases; empty means `<hostname>-<pid>-<random>`.
    pub id: String,
    /// Address its `/health` and `/metrics` listen on (they take no input and hold no secret).
    pub host: String,
    /// Port of `/health` and `/metrics`.
    pub port: u16,
    /// How long to sleep when the queue is empty, in milliseconds.
    pub poll_interval_ms: u64,
    /// Lease length in seconds: a worker that stops renewing loses its batch after this long.
    pub lease_seconds: u64,
    /// Request lines in flight at once per worker (the engine queues them). 0, the default,
    /// derives it from the engine ([`Config::worker_concurrency`]) so that the engine's batch
    /// stays full; set it only to hold a worker below that.
    pub concurrency: usize,
    /// On SIGTERM/SIGINT, how long the lines in flight may take to finish and be recorded
    /// before the worker releases its batch and exits (fits Docker's default 10 s stop timeout).
    pub shutdown_grace_seconds: u64,
    /// MiB of prompt cache in this worker's engine, in place of `engine.prefix_cache_mb`: batch
    /// lines seldom share more than a system prompt, so a small cache keeps that while the
    /// worker's memory stays bounded over a 50,000-line batch; 0 turns it off.
    pub prefix_cache_mb: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            host: "127.0.0.1".into(),
            port: 4083,
            poll_interval_ms: 500,
            lease_seconds: 30,
            concurrency: 0,
            shutdown_grace_seconds: 8,
            prefix_cache_mb: 32,
        }
    }
}

/// The database every binary shares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path` (embedded default) or `postgres://user@host/db` (production, several workers).
    pub url: String,
    /// Connections kept in the pool.
    pub max_connections: u32,
    /// How long a request waits for a database connection, in milliseconds; past it the
    /// database counts as unavailable (the services answer 503 with `Retry-After`).
    pub acquire_timeout_ms: u64,
}

/// `database.acquire_timeout_ms` unless configured.
pub const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 5_000;

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/batchlab.db".into(),
            max_connections: 8,
            acquire_timeout_ms: DEFAULT_ACQUIRE_TIMEOUT_MS,
        }
    }
}

/// Where file bodies (batch inputs, outputs, error files) live.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory that holds uploaded and generated file bodies (the embedded default; one
    /// machine).
    pub files_dir: PathBuf,
    /// `s3://bucket/prefix`: keep the bodies in S3 or an S3-compatible store instead of
    /// `files_dir`, so workers on several machines share them (credentials, region and
    /// endpoint from the standard `AWS_*` variables). Unset or empty: `files_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_url: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            files_dir: PathBuf::from("data/files"),
            files_url: None,
        }
    }
}

/// The inference engine's model and limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// The model to serve: a local GGUF file, or `hf:<owner>/<repo>/<file>[@<revision>]`
    /// fetched from `HF_ENDPOINT` into the cache under `HF_HOME` at start.
    pub model_path: PathBuf,
    /// Model name reported in responses; requests may name any model, this one answers.
    pub model_id: String,
    /// Requests admitted at once (waiting or running); more are refused as overloaded.
    pub max_queue: usize,
    /// Sequences generated together in one batch at most (continuous batching).
    pub max_batch: usize,
    /// MiB of memory for caches of recent prompts, reused by requests that start the same way
    /// (the ML backend's questions about one task share its text); 0 turns prompt caching off.
    /// The worker has its own, smaller budget: `worker.prefix_cache_mb`.
    pub prefix_cache_mb: usize,
    /// CPU threads for inference; 0 lets candle choose (physical cores).
    pub threads: usize,
    /// Cap on context tokens; 0 uses the model's own.
    pub max_context: usize,
    /// Completion tokens when a request sets no `max_tokens`.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for; more is refused
    /// as a bad request, so no request holds a generation slot for an unbounded time.
    pub max_tokens_limit: usize,
    /// Most chat `messages` in one request (batch line or ML-backend body); more is refused.
    pub max_messages: usize,
    /// Most bytes of roles and contents in one chat the engine renders; more is refused.
    pub max_chat_bytes: usize,
    /// Most candidate answers in one scoring request (options of the controls of one task);
    /// more is refused, since each is a row of every forward pass it is in.
    pub max_candidates: usize,
    /// Requantize weights candle has no fast kernel for (Q4_1, Q5_0, Q5_1) to Q8_0 at load
    /// (they stay as they are where batchlab's packed kernel runs them, as Q4_K does; other
    /// k-quants become Q8_0 there, for it to run them).
    pub requantize: bool,
    /// Where the model runs: `"cpu"`, or `"cuda"` / `"cuda:N"` in a build with the `cuda`
    /// feature.
    pub device: String,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_id: "SmolLM2-135M-Instruct".into(),
            max_queue: 256,
            max_batch: 16,
            prefix_cache_mb: 128,
            threads: 0,
            max_context: 0,
            default_max_tokens: 256,
            max_tokens_limit: 4096,
            max_messages: 4096,
            max_chat_bytes: 4 << 20,
            max_candidates: 1024,
            requantize: true,
            device: "cpu".into(),
        }
    }
}

/// Limits on batch input files (OpenAI's: 200 MB and 50,000 requests).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BatchLimits {
    /// Largest batch input file in bytes.
    pub max_input_bytes: u64,
    /// Most request lines in one batch input file.
    pub max_lines: u64,
    /// Longest request line in bytes (newline excluded): longer lines are refused at upload, and
    /// a worker reads at most this much of one (the line becomes a `line_too_long` error line).
    pub max_line_bytes: u64,
    /// Times a worker may fail to process a batch (database or disk errors) before the batch
    /// ends `failed`, so one batch that cannot run never holds up the queue.
    pub max_attempts: u32,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_input_bytes: 200 * 1024 * 1024,
            max_lines: 50_000,
            max_line_bytes: 2 * 1024 * 1024,
            max_attempts: 3,
        }
    }
}

/// Label Studio's address and credentials, and the shared secret of its webhook.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LabelStudioConfig {
    /// Label Studio's base URL (environment `LABEL_STUDIO_URL`).
    pub url: String,
    /// The name of the Label Studio at `url` (see [`crate::labelstudio::instance`]): what
    /// batchlab holds is keyed by (instance, id), since a second or re-created Label Studio
    /// hands the same ids out again. Webhooks to `/v1/webhooks/label-studio` and curation
    /// routes without `?instance=` use it. Give a re-created Label Studio a new name.
    #[schemars(with = "String")]
    pub instance: crate::labelstudio::instance::Instance,
    /// A legacy token or a personal access token (environment `LABEL_STUDIO_API_KEY`).
    pub api_key: Option<Secret>,
    /// Header Label Studio must send with every webhook delivery when `webhook_secret` is set.
    pub webhook_secret_header: String,
    /// Shared secret expected in `webhook_secret_header`; unset accepts deliveries without it.
    /// Set it through `BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET`, not in a file.
    pub webhook_secret: Option<Secret>,
    /// Tasks per request when importing into Label Studio.
    pub import_chunk_size: usize,
    /// Seconds to wait for one Label Studio REST call.
    pub timeout_seconds: u64,
    /// Retries of a call that failed transiently (Label Studio unreachable, 429, 503, and for
    /// calls safe to repeat also 502, 504 and timeouts), with exponential backoff and jitter.
    pub retries: usize,
}

impl Default for LabelStudioConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:4115".into(),
            instance: crate::labelstudio::instance::Instance::default(),
            api_key: None,
            webhook_secret_header: "X-Batchlab-Secret".into(),
            webhook_secret: None,
            import_chunk_size: 500,
            timeout_seconds: 120,
            retries: crate::labelstudio::client::DEFAULT_RETRIES,
        }
    }
}

/// Where curated exports go and when they are written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CurationConfig {
    /// Directory of the training exports: `project_{id}_export.json` (the latest, rewritten by
    /// each export) and one file per export kept as written (`project_{id}_milestone_{m}.json`
    /// at a milestone); a sub-directory per Label Studio instance other than the default.
    pub training_dir: PathBuf,
    /// Counts of valid, non-cancelled annotations at which a project's export is written once.
    pub milestones: Vec<u64>,
    /// An accuracy record is kept each time a project's annotation count crosses a multiple of
    /// this (checked at most once a second per project while events keep coming).
    pub accuracy_every: u64,
    /// Webhook events the processor applies in one transaction (the rows they name read at
    /// once, no savepoint per event; a group in which an event fails is rolled back and applied
    /// again with a savepoint for each, so the failing one is undone alone); 0 counts as 1.
    /// Unset: 256 on PostgreSQL, 64 on SQLite. One claim and one commit per group keep the
    /// processor up with a burst (PostgreSQL, 2 cores: about 3,000 events/s end to end); on
    /// SQLite a group holds the write lock while it is applied, which deliveries wait for, so
    /// groups stay smaller there.
    pub events_per_transaction: Option<usize>,
}

impl Default for CurationConfig {
    fn default() -> Self {
        Self {
            training_dir: PathBuf::from("data/training"),
            milestones: vec![100, 500, 1_000, 5_000, 10_000],
            accuracy_every: 100,
            events_per_transaction: None,
        }
    }
}

/// What batchlab-api's background retention task deletes, and how often it looks
/// (`crate::retention`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Run the task at all. Off, nothing is ever deleted in the background.
    pub enabled: bool,
    /// Seconds between passes; the first runs at start. 0 counts as 1.
    pub interval_seconds: u64,
    /// Days a processed webhook event (applied or failed) is kept after it was processed; 0
    /// keeps them forever. Pending events are never deleted. Files need no setting: each is
    /// deleted once its own `expires_at` has passed (unless an unfinished batch still uses it).
    pub webhook_events_days: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 3_600,
            webhook_events_days: 30,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file given explicitly does not exist.
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    /// A value has the wrong type, a key is unknown, or a file does not parse.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The settings would leave a service open that must not be (see [`Config::check_security`]).
    #[error("refusing to start: {0}")]
    Insecure(String),
}

/// The network services whose start [`Config::check_security`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// batchlab-api: the API key and the webhook secret.
    Api,
    /// batchlab-ml-backend: basic auth.
    MlBackend,
}

/// Whether `host` (an address or a name to bind) reaches only this machine.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A setting's value unless it is absent or blank (a blank credential is no credential).
fn non_blank(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

/// `<PREFIX><SECTION>__<KEY>` variables. Every setting lives in a section, so variables without
/// `__` (`BATCHLAB_PROFILE`, `BATCHLAB_REQUIRE_POSTGRES`, ...) belong to scripts and tests, not here.
fn env_overrides(prefix: &str) -> Env {
    Env::prefixed(prefix)
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

/// The names Label Studio's own tools use (`label_studio_ml` and the SDK), mapped onto settings.
/// `BATCHLAB_*` variables are merged after these and win.
const LABEL_STUDIO_ENV: [(&str, &str); 4] = [
    ("LABEL_STUDIO_URL", "label_studio.url"),
    ("LABEL_STUDIO_API_KEY", "label_studio.api_key"),
    ("BASIC_AUTH_USER", "ml_backend.basic_auth_user"),
    ("BASIC_AUTH_PASS", "ml_backend.basic_auth_pass"),
];

/// Settings that are text whatever they look like: figment would read `BATCHLAB_API__API_KEY=0042`
/// as the number 42, so these are taken from the environment verbatim and merged last.
const TEXT_SETTINGS: [&str; 6] = [
    "api.api_key",
    "label_studio.url",
    "label_studio.api_key",
    "label_studio.webhook_secret",
    "ml_backend.basic_auth_user",
    "ml_backend.basic_auth_pass",
];

/// Where environment settings come from: `<prefix><SECTION>__<KEY>` variables, and Label
/// Studio's own names when `label_studio_names` is set.
struct EnvSource<'a> {
    prefix: &'a str,
    label_studio_names: bool,
}

impl EnvSource<'_> {
    /// The text settings present in the environment, verbatim, later entries winning.
    fn text_values(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.label_studio_names {
            for (name, key) in LABEL_STUDIO_ENV {
                if let Ok(v) = std::env::var(name) {
                    out.push((key, v));
                }
            }
        }
        for key in TEXT_SETTINGS {
            let name = format!("{}{}", self.prefix, key.replace('.', "__").to_uppercase());
            if let Ok(v) = std::env::var(name) {
                out.push((key, v));
            }
        }
        out
    }
}

impl Config {
    /// Loads defaults, `config/default.toml` if present, `file` if given, then `BATCHLAB_*`.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(
            Path::new(DEFAULT_CONFIG_FILE),
            file,
            EnvSource {
                prefix: "BATCHLAB_",
                label_studio_names: true,
            },
        )
    }

    fn load_from(
        default_file: &Path,
        file: Option<&Path>,
        env: EnvSource<'_>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if default_file.exists() {
            figment = figment.merge(Toml::file(default_file));
        }
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Missing(file.to_path_buf()));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(env_overrides(env.prefix));
        for (key, value) in env.text_values() {
            figment = figment.merge(Serialized::default(key, value));
        }
        figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))
    }

    /// Refuses settings that leave `service` open: basic auth half configured (one of user and
    /// password set), or a non-loopback bind without the service's credentials unless its
    /// `allow_unauthenticated` says so. The message names the missing settings.
    pub fn check_security(&self, service: Service) -> Result<(), ConfigError> {
        let refuse = |m: String| Err(ConfigError::Insecure(m));
        match service {
            Service::Api => {
                let api = &self.api;
                if is_loopback(&api.host) || api.allow_unauthenticated {
                    return Ok(());
                }
                let mut missing = Vec::new();
                if non_blank(api.api_key.as_deref()).is_none() {
                    missing.push("the API key (BATCHLAB_API__API_KEY)");
                }
                if non_blank(self.label_studio.webhook_secret.as_deref()).is_none() {
                    missing.push("the webhook secret (BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET)");
                }
                if missing.is_empty() {
                    return Ok(());
                }
                refuse(format!(
                    "batchlab-api would listen on {} without {}; set it, bind to 127.0.0.1, or set \
                     BATCHLAB_API__ALLOW_UNAUTHENTICATED=true to serve unauthenticated on purpose",
                    api.host,
                    missing.join(" and ")
                ))
            }
            Service::MlBackend => {
                let ml = &self.ml_backend;
                if ml.basic_auth()?.is_some() || is_loopback(&ml.host) || ml.allow_unauthenticated {
                    return Ok(());
                }
                refuse(format!(
                    "batchlab-ml-backend would listen on {} without basic auth; set BASIC_AUTH_USER and \
                     BASIC_AUTH_PASS, bind to 127.0.0.1, or set BATCHLAB_ML_BACKEND__ALLOW_UNAUTHENTICATED=true \
                     to serve unauthenticated on purpose",
                    ml.host
                ))
            }
        }
    }

    /// Request lines a worker keeps in flight: `worker.concurrency` when set, else twice
    /// `engine.max_batch` — a full batch running and as many lines parsed and waiting for the
    /// places it frees — within `engine.max_queue` (more would be refused as overloaded).
    pub fn worker_concurrency(&self) -> usize {
        let admitted = self.engine.max_queue.max(1);
        match self.worker.concurrency {
            0 => (2 * self.engine.max_batch.max(1)).min(admitted),
            n => n.min(admitted),
        }
    }

    /// The engine settings of `batchlab-worker`: the shared ones with the worker's own prompt
    /// cache budget (`worker.prefix_cache_mb`).
    pub fn worker_engine(&self) -> EngineSettings {
        EngineSettings {
            prefix_cache_mb: self.worker.prefix_cache_mb,
            ..self.engine.clone()
        }
    }

    /// The worker id to use: the configured one, or one made from host name, pid and randomness.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "worker".to_string()
        } else {
            host
        };
        format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn worker_concurrency_follows_the_engine_unless_set() {
        let mut c = Config::default();
        assert_eq!(c.worker_concurrency(), 2 * c.engine.max_batch);
        c.engine.max_batch = 4;
        assert_eq!(c.worker_concurrency(), 8);
        c.engine.max_queue = 5;
        assert_eq!(c.worker_concurrency(), 5, "within what the engine admits");
        c.worker.concurrency = 3;
        assert_eq!(c.worker_concurrency(), 3);
        c.worker.concurrency = 50;
        assert_eq!(c.worker_concurrency(), 5);
    }

    #[test]
    fn the_worker_engine_has_the_worker_prompt_cache_and_the_rest_shared() {
        let mut c = Config::default();
        assert_eq!(c.worker_engine().prefix_cache_mb, 32);
        assert_eq!(
            c.engine.prefix_cache_mb, 128,
            "the ML backend keeps its own"
        );
        c.engine.max_batch = 4;
        c.worker.prefix_cache_mb = 0;
        let w = c.worker_engine();
        assert_eq!((w.prefix_cache_mb, w.max_batch), (0, 4));
        assert_eq!(
            EngineSettings {
                prefix_cache_mb: c.engine.prefix_cache_mb,
                ..w
            },
            c.engine
        );
    }

    #[test]
    fn defaults_match_the_documented_ports_and_paths() {
        let c = Config::default();
        assert_eq!(c.api.port, 4080);
        assert_eq!(c.ml_backend.port, 4082);
        assert_eq!(c.database.url, "sqlite://data/batchlab.db");
        assert_eq!(c.batch.max_lines, 50_000);
    }

    #[test]
    fn shipped_default_toml_parses_and_equals_the_built_in_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let c = Config::load_from(
            &shipped,
            None,
            EnvSource {
                prefix: "BATCHLAB_NO_SUCH_PREFIX_",
                label_studio_names: false,
            },
        )
        .unwrap();
        assert_eq!(
            c,
            Config::default(),
            "config/default.toml drifted from Config::default()"
        );
    }

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "extra.toml",
                "[api]\nport = 5000\n[worker]\nconcurrency = 2\n",
            )?;
            jail.set_env("TESTCFG_API__PORT", "6000");
            jail.set_env("TESTCFG_DATABASE__URL", "postgres://x@localhost/db");
            jail.set_env("TESTCFG_PROFILE", "not a setting: ignored");
            let c = Config::load_from(
                Path::new("none.toml"),
                Some(Path::new("extra.toml")),
                EnvSource {
                    prefix: "TESTCFG_",
                    label_studio_names: false,
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(c.api.port, 6000);
            assert_eq!(c.worker.concurrency, 2);
            assert_eq!(c.database.url, "postgres://x@localhost/db");
            Ok(())
        });
    }

    #[test]
    fn retention_is_on_by_default_and_set_from_the_environment() {
        let r = RetentionConfig::default();
        assert!(r.enabled);
        assert_eq!((r.interval_seconds, r.webhook_events_days), (3_600, 30));
        figment::Jail::expect_with(|jail| {
            jail.set_env("TESTRET_RETENTION__ENABLED", "false");
            jail.set_env("TESTRET_RETENTION__INTERVAL_SECONDS", "60");
            jail.set_env("TESTRET_RETENTION__WEBHOOK_EVENTS_DAYS", "0");
            let c = Config::load_from(
                Path::new("none.toml"),
                None,
                EnvSource {
                    prefix: "TESTRET_",
                    label_studio_names: false,
                },
            )
            .map_err(|e| e.to_string())?;
            let expected = RetentionConfig {
                enabled: false,
                interval_seconds: 60,
                webhook_events_days: 0,
            };
            assert_eq!(c.retention, expected);
            Ok(())
        });
    }

    #[test]
    fn label_studio_variable_names_are_honoured_and_batchlab_names_win() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LABEL_STUDIO_URL", "http://ls.example:8080");
            jail.set_env("LABEL_STUDIO_API_KEY", "secret-key");
            jail.set_env("BASIC_AUTH_USER", "ml");
            jail.set_env("BASIC_AUTH_PASS", "0042");
            jail.set_env("TESTLS_ML_BACKEND__BASIC_AUTH_USER", "override");
            jail.set_env("TESTLS_API__API_KEY", "0123");
            let c = Config::load_from(
                Path::new("none.toml"),
                None,
                EnvSource {
                    prefix: "TESTLS_",
                    label_studio_names: true,
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(c.label_studio.url, "http://ls.example:8080");
            assert_eq!(c.label_studio.api_key.as_deref(), Some("secret-key"));
            assert_eq!(c.ml_backend.basic_auth_user.as_deref(), Some("override"));
            assert_eq!(
                c.ml_backend.basic_auth_pass.as_deref(),
                Some("0042"),
                "digits stay text, leading zeros too"
            );
            assert_eq!(c.api.api_key.as_deref(), Some("0123"));
            Ok(())
        });
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut c = Config::default();
        c.api.api_key = Some("api-hunter2".into());
        c.ml_backend.basic_auth_pass = Some("ml-hunter2".into());
        c.label_studio.api_key = Some("ls-hunter2".into());
        c.label_studio.webhook_secret = Some("hook-hunter2".into());
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn half_configured_basic_auth_refuses_to_start() {
        let mut c = Config::default();
        c.ml_backend.basic_auth_user = Some("ml".into());
        let err = c
            .check_security(Service::MlBackend)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BASIC_AUTH_USER is set but BASIC_AUTH_PASS is not"),
            "{err}"
        );
        c.ml_backend.basic_auth_user = None;
        c.ml_backend.basic_auth_pass = Some("pw".into());
        let err = c
            .check_security(Service::MlBackend)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BASIC_AUTH_PASS is set but BASIC_AUTH_USER is not"),
            "{err}"
        );
        c.ml_backend.basic_auth_user = Some("  ".into());
        assert!(
            c.check_security(Service::MlBackend).is_err(),
            "a blank user is no user"
        );
        c.ml_backend.basic_auth_user = Some("ml".into());
        assert!(c.check_security(Service::MlBackend).is_ok());
    }

    #[test]
    fn non_loopback_binds_need_credentials_or_an_explicit_opt_out() {
        let mut c = Config::default();
        assert!(
            c.check_security(Service::Api).is_ok() && c.check_security(Service::MlBackend).is_ok(),
            "loopback defaults"
        );
        for host in ["0.0.0.0", "::", "192.0.2.7", "api.example"] {
            c.api.host = host.into();
            c.ml_backend.host = host.into();
            let err = c.check_security(Service::Api).unwrap_err().to_string();
            assert!(
                err.contains("BATCHLAB_API__API_KEY")
                    && err.contains("BATCHLAB_LABEL_STUDIO__WEBHOOK_SECRET"),
                "{err}"
            );
            let err = c
                .check_security(Service::MlBackend)
                .unwrap_err()
                .to_string();
            assert!(err.contains("BASIC_AUTH_USER and BASIC_AUTH_PASS"), "{err}");
        }
        c.api.api_key = Some("k".into());
        let err = c.check_security(Service::Api).unwrap_err().to_string();
        assert!(
            !err.contains("BATCHLAB_API__API_KEY") && err.contains("WEBHOOK_SECRET"),
            "{err}"
        );
        c.label_studio.webhook_secret = Some("s".into());
        assert!(c.check_security(Service::Api).is_ok());
        c.api.api_key = None;
        c.api.allow_unauthenticated = true;
        assert!(c.check_security(Service::Api).is_ok());
        c.ml_backend.allow_unauthenticated = true;
        assert!(c.check_security(Service::MlBackend).is_ok());
        c.ml_backend.allow_unauthenticated = false;
        c.ml_backend.basic_auth_user = Some("ml".into());
        c.ml_backend.basic_auth_pass = Some("pw".into());
        assert!(c.check_security(Service::MlBackend).is_ok());
        for host in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"] {
            assert!(is_loopback(host), "{host}");
        }
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[api]\nprot = 1\n")?;
            let err = Config::load_from(
                Path::new("x"),
                Some(Path::new("bad.toml")),
                EnvSource {
                    prefix: "NOPE_",
                    label_studio_names: false,
                },
            );
            assert!(err.unwrap_err().to_string().contains("prot"));
            let err = Config::load_from(
                Path::new("x"),
                Some(Path::new("missing.toml")),
                EnvSource {
                    prefix: "NOPE_",
                    label_studio_names: false,
                },
            );
            assert!(matches!(err, Err(ConfigError::Missing(_))));
            Ok(())
        });
    }
}

/// Command-line options every batchlab binary shares.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigArgs {
    /// A TOML file layered over config/default.toml (environment variables BATCHLAB_<SECTION>__<KEY>
    /// override both).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// Loads the configuration these options point at.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref())
    }

    /// What every binary does first: start logging, then load the configuration.
    pub fn init(&self) -> Result<Config, ConfigError> {
        crate::telemetry::init_tracing();
        self.load()
    }
}
