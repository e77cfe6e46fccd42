//! Label Studio's REST API, the calls batchlab needs: projects, task import, ML backends,
//! webhooks, tasks and annotations.
//!
//! Written against Label Studio 1.23 (see `reference/label-studio-running.md`): trailing slashes
//! are exactly the ones Label Studio accepts (`/api/ml/{id}` and `/import` have none), and both
//! kinds of API key work — a legacy token is sent as `Authorization: Token <key>`, a personal
//! access token (a JWT refresh token) is exchanged at `/api/token/refresh/` for a short-lived
//! access token sent as `Authorization: Bearer <access>`, refreshed once on a 401.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::secret::Secret;

/// How much of an error body is kept in [`LabelStudioError::Status`].
const ERROR_BODY_LIMIT: usize = 500;

/// Page size for listings; Label Studio's own UI asks for at most this many.
const PAGE_SIZE: usize = 1000;

/// Values looked up per task-list request ([`LabelStudioClient::find_tasks_by_data`]), and
/// their characters at most: the filter travels in the URL.
const LOOKUP_GROUP_VALUES: usize = 100;
const LOOKUP_GROUP_CHARS: usize = 2000;

/// The tasks of one page of `GET /api/tasks/`: a plain array, or an object's `tasks` (or
/// `results`).
fn task_page(doc: Value) -> Result<Vec<Value>, LabelStudioError> {
    match doc {
        Value::Array(items) => Ok(items),
        Value::Object(mut o) => match o.remove("tasks").or_else(|| o.remove("results")) {
            Some(Value::Array(items)) => Ok(items),
            _ => Err(LabelStudioError::Decode(
                "/api/tasks/: no `tasks` list".into(),
            )),
        },
        _ => Err(LabelStudioError::Decode(
            "/api/tasks/: not a JSON object".into(),
        )),
    }
}

/// Why a Label Studio call failed.
#[derive(Debug, thiserror::Error)]
pub enum LabelStudioError {
    /// No connection could be made (refused, DNS, TLS): nothing was sent, so any call may be
    /// tried again.
    #[error("Label Studio unreachable: {0}")]
    Connect(String),
    /// The request was sent but no complete answer came (timeout, connection reset).
    #[error("no answer from Label Studio: {0}")]
    Http(String),
    /// Label Studio answered with a non-success status.
    #[error("Label Studio answered {status} to {path}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The path called (without the base URL).
        path: String,
        /// The start of the answer's body (about 500 characters at most).
        body: String,
    },
    /// The API key is missing, or Label Studio rejected it (401), or the token exchange failed.
    #[error("Label Studio authentication failed: {0}")]
    Auth(String),
    /// The answer was not the JSON expected.
    #[error("unexpected answer from Label Studio: {0}")]
    Decode(String),
    /// The client's own settings are unusable (for example a malformed base URL).
    #[error("invalid Label Studio client settings: {0}")]
    Config(String),
}

/// A Label Studio project (the fields batchlab uses; the others are ignored).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LsProject {
    /// Project id.
    pub id: i64,
    /// Project title, unique by convention in batchlab's setup.
    #[serde(default)]
    pub title: String,
    /// The labeling configuration (XML).
    #[serde(default)]
    pub label_config: String,
}

/// What one task import created.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ImportResult {
    /// Tasks created.
    #[serde(default)]
    pub task_count: u64,
    /// Predictions created with them.
    #[serde(default)]
    pub prediction_count: u64,
    /// Ids of the created tasks, in import order.
    #[serde(default)]
    pub task_ids: Vec<i64>,
}

/// An ML backend connected to a project (the fields batchlab uses).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LsMlBackend {
    /// ML backend id.
    pub id: i64,
    /// The URL Label Studio calls.
    #[serde(default)]
    pub url: String,
    /// Project it serves.
    #[serde(default)]
    pub project: Option<i64>,
    /// Title shown in Label Studio.
    #[serde(default)]
    pub title: Option<String>,
    /// `CO` connected, `DI` disconnected, `ER` error, `TR` training, `PR` predicting.
    #[serde(default)]
    pub state: Option<String>,
    /// The `model_version` its `/setup` last answered.
    #[serde(default)]
    pub model_version: Option<String>,
    /// Why the last health or setup call failed, if it did.
    #[serde(default)]
    pub error_message: Option<String>,
}

/// What batchlab asks Label Studio to create or change for an ML backend. Its `Debug` (and so
/// any log line or span that records it) shows the password as `***`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MlBackendSpec {
    /// The URL Label Studio calls (`/health`, `/setup`, `/predict`, `/webhook` are appended).
    pub url: String,
    /// Project to serve.
    pub project: i64,
    /// Title shown in Label Studio.
    pub title: String,
    /// Whether Label Studio may call it for interactive (smart-tool) predictions.
    pub is_interactive: bool,
    /// `NONE` or `BASIC_AUTH`.
    pub auth_method: String,
    /// Basic-auth user when `auth_method` is `BASIC_AUTH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_auth_user: Option<String>,
    /// Basic-auth password when `auth_method` is `BASIC_AUTH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_auth_pass: Option<Secret>,
}

impl MlBackendSpec {
    /// A spec without authentication.
    pub fn new(url: &str, project: i64, title: &str) -> Self {
        Self {
            url: url.to_string(),
            project,
            title: title.to_string(),
            is_interactive: false,
            auth_method: "NONE".into(),
            basic_auth_user: None,
            basic_auth_pass: None,
        }
    }

    /// The same spec with HTTP basic auth (Label Studio's `BASIC_AUTH` method).
    pub fn with_basic_auth(mut self, user: &str, pass: &str) -> Self {
        self.auth_method = "BASIC_AUTH".into();
        self.basic_auth_user = Some(user.to_string());
        self.basic_auth_pass = Some(pass.into());
        self
    }
}

/// A webhook registered in Label Studio.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct LsWebhook {
    /// Webhook id.
    pub id: i64,
    /// Project it belongs to; `None` for organization-wide webhooks.
    #[serde(default)]
    pub project: Option<i64>,
    /// Where deliveries go.
    #[serde(default)]
    pub url: String,
    /// Whether deliveries carry the event's objects, not only the action.
    #[serde(default)]
    pub send_payload: bool,
    /// Whether every action is delivered (otherwise only `actions`).
    #[serde(default)]
    pub send_for_all_actions: bool,
    /// Headers sent with every delivery (batchlab's shared secret among them).
    #[serde(default)]
    pub headers: serde_json::Map<String, Value>,
    /// Whether deliveries are made at all.
    #[serde(default)]
    pub is_active: bool,
    /// Actions delivered when `send_for_all_actions` is false.
    #[serde(default)]
    pub actions: Vec<String>,
}

/// What batchlab asks Label Studio to create or change for a webhook. Its `Debug` shows header
/// values (batchlab's shared secret among them) as `***`.
#[derive(Clone, Serialize, PartialEq)]
pub struct WebhookSpec {
    /// Project the webhook belongs to.
    pub project: i64,
    /// Where deliveries go.
    pub url: String,
    /// Deliver the event's objects, not only the action.
    pub send_payload: bool,
    /// Deliver every action.
    pub send_for_all_actions: bool,
    /// Headers sent with every delivery.
    pub headers: serde_json::Map<String, Value>,
    /// Deliver at all.
    pub is_active: bool,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&String, &str)> = self.headers.keys().map(|k| (k, "***")).collect();
        f.debug_struct("WebhookSpec")
            .field("project", &self.project)
            .field("url", &self.url)
            .field("send_payload", &self.send_payload)
            .field("send_for_all_actions", &self.send_for_all_actions)
            .field("headers", &headers)
            .field("is_active", &self.is_active)
            .finish()
    }
}

impl WebhookSpec {
    /// Every action, with payloads, active, with `headers`.
    pub fn all_actions(project: i64, url: &str, headers: serde_json::Map<String, Value>) -> Self {
        Self {
            project,
            url: url.to_string(),
            send_payload: true,
            send_for_all_actions: true,
            headers,
            is_active: true,
        }
    }
}

/// How requests are authenticated.
enum Auth {
    /// `Authorization: Token <key>`.
    Legacy(String),
    /// A personal access token (JWT refresh token) and the access token last obtained with it.
    Personal {
        refresh: String,
        access: Mutex<Option<String>>,
    },
}

/// A client of one Label Studio instance. Cheap to clone; clones share the connection pool and
/// the cached access token.
#[derive(Clone)]
pub struct LabelStudioClient {
    http: reqwest::Client,
    base: String,
    auth: Arc<Auth>,
    /// Retries of a transiently failed call.
    retries: usize,
}

/// Retries of a transiently failed call unless configured (`label_studio.retries`).
pub const DEFAULT_RETRIES: usize = 4;

impl std::fmt::Debug for LabelStudioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match *self.auth {
            Auth::Legacy(_) => "legacy token",
            Auth::Personal { .. } => "personal access token",
        };
        f.debug_struct("LabelStudioClient")
            .field("base", &self.base)
            .field("auth", &kind)
            .finish()
    }
}

/// Whether `key` looks like a JWT: three base64url parts whose middle one decodes to a JSON
/// object. Label Studio's personal access tokens are JWTs; legacy tokens are 40 hex digits.
pub fn is_jwt(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return false;
    }
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = parts[1].trim_end_matches('=');
    engine
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|v| v.is_object())
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= ERROR_BODY_LIMIT {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(ERROR_BODY_LIMIT).collect();
    cut.push('…');
    cut
}

fn transport(e: reqwest::Error) -> LabelStudioError {
    // reqwest's Display hides the cause ("error sending request"); the chain says why.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        LabelStudioError::Connect(msg)
    } else {
        LabelStudioError::Http(msg)
    }
}

impl LabelStudioError {
    /// Whether calling again may succeed: Label Studio was unreachable or said to retry (429,
    /// 503); for a call safe to repeat (`idempotent`: GET, PUT, PATCH, DELETE) also a gateway
    /// failure (502, 504) or a lost answer, which for a POST could mean it was done already.
    pub fn is_transient(&self, idempotent: bool) -> bool {
        match self {
            LabelStudioError::Connect(_) => true,
            LabelStudioError::Status { status, .. } => {
                matches!(status, 429 | 503) || (idempotent && matches!(status, 502 | 504))
            }
            LabelStudioError::Http(_) => idempotent,
            LabelStudioError::Auth(_)
            | LabelStudioError::Decode(_)
            | LabelStudioError::Config(_) => false,
        }
    }
}

/// A listing that Label Studio answers either as a plain array or as a page `{"results": [...]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Listing<T> {
    Plain(Vec<T>),
    Page { results: Vec<T> },
}

impl<T> Listing<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Listing::Plain(v) | Listing::Page { results: v } => v,
        }
    }
}

impl LabelStudioClient {
    /// A client of the Label Studio at `base_url` using `api_key` (legacy token or personal
    /// access token), with `timeout` for every call.
    pub fn new(base_url: &str, api_key: &str, timeout: Duration) -> Result<Self, LabelStudioError> {
        let base = base_url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| LabelStudioError::Config(format!("base URL {base_url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(LabelStudioError::Config(format!(
                "base URL {base_url:?} is not http(s)"
            )));
        }
        let key = api_key.trim();
        if key.is_empty() {
            return Err(LabelStudioError::Auth(
                "no API key: set LABEL_STUDIO_API_KEY".into(),
            ));
        }
        let auth = if is_jwt(key) {
            Auth::Personal {
                refresh: key.to_string(),
                access: Mutex::new(None),
            }
        } else {
            Auth::Legacy(key.to_string())
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("batchlab/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LabelStudioError::Config(e.to_string()))?;
        Ok(Self {
            http,
            base,
            auth: Arc::new(auth),
            retries: DEFAULT_RETRIES,
        })
    }

    /// The same client retrying a transient failure at most `retries` times (0: never).
    pub fn with_retries(mut self, retries: usize) -> Self {
        self.retries = retries;
        self
    }

    /// A client from the `[label_studio]` configuration; an `Auth` error when no key is set.
    pub fn from_config(c: &crate::config::LabelStudioConfig) -> Result<Self, LabelStudioError> {
        let key = c.api_key.as_deref().unwrap_or("");
        Ok(
            Self::new(&c.url, key, Duration::from_secs(c.timeout_seconds.max(1)))?
                .with_retries(c.retries),
        )
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Whether the key is a personal access token (exchanged for Bearer access tokens).
    pub fn uses_personal_access_token(&self) -> bool {
        matches!(*self.auth, Auth::Personal { .. })
    }

    /// Exchanges the personal access token for a fresh access token and caches it.
    async fn refresh_access(
        &self,
        refresh: &str,
        cache: &Mutex<Option<String>>,
    ) -> Result<String, LabelStudioError> {
        let url = format!("{}/api/token/refresh/", self.base);
        let response = self
            .http
            .post(&url)
            .json(&json!({"refresh": refresh}))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        if !status.is_success() {
            return Err(LabelStudioError::Auth(format!(
                "exchanging the personal access token at /api/token/refresh/ failed ({}): {}",
                status.as_u16(),
                truncate(&text)
            )));
        }
        let access = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("access").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| {
                LabelStudioError::Decode(format!(
                    "/api/token/refresh/ answered without `access`: {}",
                    truncate(&text)
                ))
            })?;
        *cache.lock().await = Some(access.clone());
        Ok(access)
    }

    /// The `Authorization` header value to send now (exchanging the token first if needed).
    async fn authorization(&self, force_refresh: bool) -> Result<String, LabelStudioError> {
        match &*self.auth {
            Auth::Legacy(key) => Ok(format!("Token {key}")),
            Auth::Personal { refresh, access } => {
                let cached = if force_refresh {
                    None
                } else {
                    access.lock().await.clone()
                };
                let token = match cached {
                    Some(t) => t,
                    None => self.refresh_access(refresh, access).await?,
                };
                Ok(format!("Bearer {token}"))
            }
        }
    }

    /// Sends one request, retrying transient failures ([`LabelStudioError::is_transient`]) up
    /// to the client's retries with exponential backoff and jitter (250 ms doubling to 5 s).
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<String, LabelStudioError> {
        let idempotent = method != Method::POST;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(self.retries)
            .with_jitter();
        (|| self.send_once(method.clone(), path, query, body))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| e.is_transient(idempotent))
            .notify(|e, delay| {
                tracing::warn!(path, %method, error = %e, retry_in_ms = delay.as_millis() as u64, "Label Studio call failed; retrying")
            })
            .await
    }

    /// Sends one request; with a personal access token a 401 refreshes the access token and
    /// retries once. Non-success answers become errors; the success body is returned as text.
    async fn send_once(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<String, LabelStudioError> {
        let url = format!("{}{}", self.base, path);
        let mut refreshed = false;
        loop {
            let authorization = self.authorization(refreshed).await?;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header(reqwest::header::AUTHORIZATION, authorization);
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(transport)?;
            let status = response.status();
            let text = response.text().await.map_err(transport)?;
            if status == StatusCode::UNAUTHORIZED {
                if matches!(*self.auth, Auth::Personal { .. }) && !refreshed {
                    tracing::debug!(path, "401 with a cached access token; refreshing once");
                    refreshed = true;
                    continue;
                }
                return Err(LabelStudioError::Auth(format!(
                    "{path} answered 401: {}",
                    truncate(&text)
                )));
            }
            if !status.is_success() {
                return Err(LabelStudioError::Status {
                    status: status.as_u16(),
                    path: path.to_string(),
                    body: truncate(&text),
                });
            }
            return Ok(text);
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T, LabelStudioError> {
        let text = self.send(method, path, query, body).await?;
        serde_json::from_str(&text)
            .map_err(|e| LabelStudioError::Decode(format!("{path}: {e}: {}", truncate(&text))))
    }

    /// `GET path?project=N`, answered as a plain array or as a page of `results`.
    async fn list_for_project<T: DeserializeOwned>(
        &self,
        path: &str,
        project: i64,
    ) -> Result<Vec<T>, LabelStudioError> {
        let listing: Listing<T> = self
            .call(Method::GET, path, &[("project", project.to_string())], None)
            .await?;
        Ok(listing.into_vec())
    }

    fn to_value<T: Serialize>(v: &T) -> Result<Value, LabelStudioError> {
        serde_json::to_value(v).map_err(|e| LabelStudioError::Decode(e.to_string()))
    }

    // ---------------------------------------------------------------------------------------
    // projects

    /// `GET /api/projects/{id}/`.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn get_project(&self, id: i64) -> Result<LsProject, LabelStudioError> {
        self.call(Method::GET, &format!("/api/projects/{id}/"), &[], None)
            .await
    }

    /// The project titled exactly `title` (the lowest id if several are), or `None`.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn find_project(&self, title: &str) -> Result<Option<LsProject>, LabelStudioError> {
        let query = [
            ("title", title.to_string()),
            ("page_size", PAGE_SIZE.to_string()),
        ];
        let listing: Listing<LsProject> = self
            .call(Method::GET, "/api/projects/", &query, None)
            .await?;
        Ok(listing
            .into_vec()
            .into_iter()
            .filter(|p| p.title == title)
            .min_by_key(|p| p.id))
    }

    /// `POST /api/projects/`: a new project.
    #[tracing::instrument(skip(self, label_config, description), err(Display))]
    pub async fn create_project(
        &self,
        title: &str,
        label_config: &str,
        description: &str,
    ) -> Result<LsProject, LabelStudioError> {
        let body =
            json!({"title": title, "label_config": label_config, "description": description});
        self.call(Method::POST, "/api/projects/", &[], Some(&body))
            .await
    }

    /// `PATCH /api/projects/{id}/` with a new labeling config (Label Studio refuses, 400, a
    /// config that existing annotations would violate).
    #[tracing::instrument(skip(self, label_config), err(Display))]
    pub async fn update_project_config(
        &self,
        id: i64,
        label_config: &str,
    ) -> Result<LsProject, LabelStudioError> {
        let body = json!({"label_config": label_config});
        self.call(
            Method::PATCH,
            &format!("/api/projects/{id}/"),
            &[],
            Some(&body),
        )
        .await
    }

    /// `POST /api/projects/{id}/import?return_task_ids=true`: imports `tasks` (each
    /// `{"data", "predictions"}`) in one synchronous call.
    #[tracing::instrument(skip(self, tasks), fields(tasks = tasks.len()), err(Display))]
    pub async fn import_tasks(
        &self,
        project: i64,
        tasks: &[Value],
    ) -> Result<ImportResult, LabelStudioError> {
        let body = Value::Array(tasks.to_vec());
        let path = format!("/api/projects/{project}/import");
        let result: ImportResult = self
            .call(
                Method::POST,
                &path,
                &[("return_task_ids", "true".into())],
                Some(&body),
            )
            .await?;
        if result.task_ids.len() as u64 != result.task_count {
            return Err(LabelStudioError::Decode(format!(
                "{path}: {} tasks imported but {} task ids returned (an asynchronous import?)",
                result.task_count,
                result.task_ids.len()
            )));
        }
        Ok(result)
    }

    /// The tasks of `project` whose `data.{field}` is one of `values`, as Label Studio lists
    /// them (`id`, `data`, `meta`, ...; no annotations or predictions): `GET /api/tasks/` with
    /// a Data Manager filter (`filter:tasks:data.{field}` `in_list`), a bounded group of
    /// values per request so the URL stays short, every page of each.
    #[tracing::instrument(skip(self, values), fields(values = values.len()), err(Display))]
    pub async fn find_tasks_by_data(
        &self,
        project: i64,
        field: &str,
        values: &[String],
    ) -> Result<Vec<Value>, LabelStudioError> {
        let mut tasks = Vec::new();
        let mut rest = values;
        while !rest.is_empty() {
            // At least one value per group, then as many as fit.
            let mut take = 1;
            let mut chars = rest[0].len();
            while take < rest.len()
                && take < LOOKUP_GROUP_VALUES
                && chars + rest[take].len() <= LOOKUP_GROUP_CHARS
            {
                chars += rest[take].len();
                take += 1;
            }
            let (group, next) = rest.split_at(take);
            rest = next;
            let filter = json!({"filters": {"conjunction": "and", "items": [{
                "filter": format!("filter:tasks:data.{field}"),
                "operator": "in_list",
                "type": "String",
                "value": group,
            }]}});
            // Label Studio 1.23 percent-decodes `query` once more after the URL was decoded
            // (`json.loads(unquote(...))`), so a literal `%` must arrive as `%25`.
            let filter = filter.to_string().replace('%', "%25");
            for page in 1.. {
                let query = [
                    ("project", project.to_string()),
                    ("query", filter.clone()),
                    ("page_size", PAGE_SIZE.to_string()),
                    ("page", page.to_string()),
                ];
                let doc: Value = match self.call(Method::GET, "/api/tasks/", &query, None).await {
                    // Past the last page Label Studio answers 404.
                    Err(LabelStudioError::Status { status: 404, .. }) if page > 1 => break,
                    other => other?,
                };
                let batch = task_page(doc)?;
                let last = batch.len() < PAGE_SIZE;
                tasks.extend(batch);
                if last {
                    break;
                }
            }
        }
        Ok(tasks)
    }

    // ---------------------------------------------------------------------------------------
    // ML backends

    /// `GET /api/ml/?project=N`: the project's ML backends. Label Studio re-checks each one's
    /// health and setup while listing, so `state` is current.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn list_ml_backends(
        &self,
        project: i64,
    ) -> Result<Vec<LsMlBackend>, LabelStudioError> {
        self.list_for_project("/api/ml/", project).await
    }

    /// `POST /api/ml/`: connects an ML backend (Label Studio calls its `/health` and `/setup`
    /// first and refuses the URL if they fail).
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn create_ml_backend(
        &self,
        spec: &MlBackendSpec,
    ) -> Result<LsMlBackend, LabelStudioError> {
        self.call(Method::POST, "/api/ml/", &[], Some(&Self::to_value(spec)?))
            .await
    }

    /// `PATCH /api/ml/{id}` (no trailing slash): changes an ML backend; the spec always carries
    /// `url` and `project`, without which Label Studio 1.23 answers 500.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn update_ml_backend(
        &self,
        id: i64,
        spec: &MlBackendSpec,
    ) -> Result<LsMlBackend, LabelStudioError> {
        self.call(
            Method::PATCH,
            &format!("/api/ml/{id}"),
            &[],
            Some(&Self::to_value(spec)?),
        )
        .await
    }

    /// `POST /api/ml/{id}/train`: Label Studio sends START_TRAINING to the backend's `/webhook`.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn train_ml_backend(&self, id: i64) -> Result<Value, LabelStudioError> {
        let text = self
            .send(
                Method::POST,
                &format!("/api/ml/{id}/train"),
                &[],
                Some(&json!({})),
            )
            .await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    // ---------------------------------------------------------------------------------------
    // webhooks

    /// `GET /api/webhooks/?project=N`: the project's webhooks.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn list_webhooks(&self, project: i64) -> Result<Vec<LsWebhook>, LabelStudioError> {
        let listing: Vec<LsWebhook> = self.list_for_project("/api/webhooks/", project).await?;
        // Older versions ignore the filter; keep only this project's.
        Ok(listing
            .into_iter()
            .filter(|w| w.project == Some(project))
            .collect())
    }

    /// `POST /api/webhooks/`: registers a webhook.
    #[tracing::instrument(skip(self, spec), fields(project = spec.project, url = %spec.url), err(Display))]
    pub async fn create_webhook(&self, spec: &WebhookSpec) -> Result<LsWebhook, LabelStudioError> {
        self.call(
            Method::POST,
            "/api/webhooks/",
            &[],
            Some(&Self::to_value(spec)?),
        )
        .await
    }

    /// `PATCH /api/webhooks/{id}/`: rewrites a webhook's URL, flags and headers.
    #[tracing::instrument(skip(self, spec), fields(project = spec.project, url = %spec.url), err(Display))]
    pub async fn update_webhook(
        &self,
        id: i64,
        spec: &WebhookSpec,
    ) -> Result<LsWebhook, LabelStudioError> {
        self.call(
            Method::PATCH,
            &format!("/api/webhooks/{id}/"),
            &[],
            Some(&Self::to_value(spec)?),
        )
        .await
    }

    // ---------------------------------------------------------------------------------------
    // tasks and annotations

    /// `GET /api/tasks/?project=N&fields=all`, every page: the project's tasks with their
    /// annotations and predictions, as Label Studio serializes them.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn list_tasks(&self, project: i64) -> Result<Vec<Value>, LabelStudioError> {
        let mut tasks = Vec::new();
        for page in 1.. {
            let query = [
                ("project", project.to_string()),
                ("page_size", PAGE_SIZE.to_string()),
                ("page", page.to_string()),
                ("fields", "all".to_string()),
            ];
            let doc: Value = match self.call(Method::GET, "/api/tasks/", &query, None).await {
                // Past the last page Label Studio answers 404.
                Err(LabelStudioError::Status { status: 404, .. }) if page > 1 => break,
                other => other?,
            };
            let batch = match doc {
                Value::Array(items) => items,
                Value::Object(mut o) => match o.remove("tasks").or_else(|| o.remove("results")) {
                    Some(Value::Array(items)) => items,
                    _ => {
                        return Err(LabelStudioError::Decode(
                            "/api/tasks/: no `tasks` list".into(),
                        ))
                    }
                },
                _ => {
                    return Err(LabelStudioError::Decode(
                        "/api/tasks/: not a JSON object".into(),
                    ))
                }
            };
            let last = batch.len() < PAGE_SIZE;
            tasks.extend(batch);
            if last {
                break;
            }
        }
        Ok(tasks)
    }

    /// One page of the project's tasks in id order, those with an id above `after` (keyset
    /// paging, so tasks created or deleted meanwhile neither shift nor repeat a page), each with
    /// its annotations and predictions as Label Studio serializes them, task data as stored
    /// (`resolve_uri=false`): `GET /api/tasks/?project=N&fields=all` with a Data Manager filter
    /// `filter:tasks:id` `greater` and ordering `tasks:id`. Only an empty page means there are
    /// no more: Label Studio may cap the page size (`TASK_API_PAGE_SIZE_MAX`).
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn tasks_after(
        &self,
        project: i64,
        after: i64,
        page_size: usize,
    ) -> Result<Vec<Value>, LabelStudioError> {
        let query = json!({
            "filters": {"conjunction": "and", "items": [{
                "filter": "filter:tasks:id",
                "operator": "greater",
                "type": "Number",
                "value": after,
            }]},
            "ordering": ["tasks:id"],
        });
        let query = [
            ("project", project.to_string()),
            ("fields", "all".to_string()),
            ("resolve_uri", "false".to_string()),
            ("page_size", page_size.max(1).to_string()),
            ("page", "1".to_string()),
            ("query", query.to_string()),
        ];
        let doc: Value = self.call(Method::GET, "/api/tasks/", &query, None).await?;
        task_page(doc)
    }

    /// `GET /api/projects/{id}/` as Label Studio answers it, every field (webhook payloads carry
    /// the same object).
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn project_object(&self, id: i64) -> Result<Value, LabelStudioError> {
        self.call(Method::GET, &format!("/api/projects/{id}/"), &[], None)
            .await
    }

    /// Whether `GET path` finds the object: true on 2xx, false on 404.
    async fn exists(&self, path: &str) -> Result<bool, LabelStudioError> {
        match self.send(Method::GET, path, &[], None).await {
            Ok(_) => Ok(true),
            Err(LabelStudioError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the task still exists (`GET /api/tasks/{id}/`; false on 404).
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn task_exists(&self, id: i64) -> Result<bool, LabelStudioError> {
        self.exists(&format!("/api/tasks/{id}/")).await
    }

    /// Whether the annotation still exists (`GET /api/annotations/{id}/`; false on 404).
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn annotation_exists(&self, id: i64) -> Result<bool, LabelStudioError> {
        self.exists(&format!("/api/annotations/{id}/")).await
    }

    /// `POST /api/tasks/{id}/annotations/` with `{"result", "was_cancelled", "ground_truth",
    /// "lead_time"}`: the created annotation.
    #[tracing::instrument(skip(self, annotation), err(Display))]
    pub async fn create_annotation(
        &self,
        task: i64,
        annotation: &Value,
    ) -> Result<Value, LabelStudioError> {
        self.call(
            Method::POST,
            &format!("/api/tasks/{task}/annotations/"),
            &[],
            Some(annotation),
        )
        .await
    }

    /// `PATCH /api/annotations/{id}/` (a new `result`, or `{"ground_truth": true}`).
    #[tracing::instrument(skip(self, changes), err(Display))]
    pub async fn update_annotation(
        &self,
        id: i64,
        changes: &Value,
    ) -> Result<Value, LabelStudioError> {
        self.call(
            Method::PATCH,
            &format!("/api/annotations/{id}/"),
            &[],
            Some(changes),
        )
        .await
    }

    /// `DELETE /api/annotations/{id}/`.
    #[tracing::instrument(skip(self), err(Display))]
    pub async fn delete_annotation(&self, id: i64) -> Result<(), LabelStudioError> {
        self.send(
            Method::DELETE,
            &format!("/api/annotations/{id}/"),
            &[],
            None,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            e.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            e.encode(payload),
            e.encode("signature")
        )
    }

    #[test]
    fn jwt_detection_tells_personal_access_tokens_from_legacy_keys() {
        assert!(is_jwt(&jwt(r#"{"token_type":"refresh","exp":4102444800}"#)));
        assert!(!is_jwt("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_jwt("a.b.c"), "parts that are not base64 JSON");
        assert!(!is_jwt(&jwt("[1,2]")), "payload must be an object");
        assert!(!is_jwt(&format!("{}.", jwt("{}"))), "four parts");
    }

    #[test]
    fn keys_choose_the_auth_scheme_and_empty_keys_are_refused() {
        let t = Duration::from_secs(5);
        let legacy = LabelStudioClient::new(
            "http://127.0.0.1:1/",
            "0123456789abcdef0123456789abcdef01234567",
            t,
        )
        .unwrap();
        assert!(!legacy.uses_personal_access_token());
        assert_eq!(legacy.base_url(), "http://127.0.0.1:1");
        let pat =
            LabelStudioClient::new("http://127.0.0.1:1", &jwt(r#"{"token_type":"refresh"}"#), t)
                .unwrap();
        assert!(pat.uses_personal_access_token());
        assert!(matches!(
            LabelStudioClient::new("http://x", " ", t),
            Err(LabelStudioError::Auth(_))
        ));
        assert!(matches!(
            LabelStudioClient::new("not a url", "k", t),
            Err(LabelStudioError::Config(_))
        ));
        let config = crate::config::LabelStudioConfig::default();
        assert!(matches!(
            LabelStudioClient::from_config(&config),
            Err(LabelStudioError::Auth(_))
        ));
    }

    #[test]
    fn long_error_bodies_are_truncated() {
        let long = "x".repeat(2000);
        let t = truncate(&long);
        assert!(t.chars().count() <= ERROR_BODY_LIMIT + 1 && t.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
