//! Connecting Label Studio to batchlab in one idempotent step: the project with its labeling
//! config, the ML backend, and the webhook with batchlab's shared-secret header — the manual
//! "Settings" steps of a Label Studio guide, done through its REST API.
//!
//! Running it twice creates nothing the second time: the project is found by title, the ML
//! backend and the webhook by URL.

use serde::Serialize;
use serde_json::Value;

use super::client::{LabelStudioClient, LabelStudioError, LsWebhook, MlBackendSpec, WebhookSpec};
use crate::secret::Secret;

/// What to set up. Its `Debug` shows the password and the shared secret as `***`.
#[derive(Clone, Debug)]
pub struct SetupOptions {
    /// Project title; an existing project with exactly this title is reused.
    pub title: String,
    /// Labeling configuration (XML text); an existing project's is replaced when it differs.
    pub label_config: String,
    /// Description of a newly created project.
    pub description: String,
    /// URL of batchlab-ml-backend as Label Studio reaches it; `None` connects none.
    pub ml_backend_url: Option<String>,
    /// Title of a newly connected ML backend.
    pub ml_backend_title: String,
    /// Basic-auth user and password of the ML backend, when it requires them.
    pub ml_backend_basic_auth: Option<(String, Secret)>,
    /// URL of batchlab-api's webhook endpoint as Label Studio reaches it; `None` registers none.
    pub webhook_url: Option<String>,
    /// The webhook endpoint without an instance: a webhook of the project at it, or at it
    /// followed by `/<another instance>` (an earlier setup's), is updated to `webhook_url`
    /// instead of adding another, so that one Label Studio delivers to one instance only.
    pub webhook_replaces: Option<String>,
    /// The shared-secret header (name, value) every webhook delivery carries.
    pub webhook_header: Option<(String, Secret)>,
}

/// What setup found, created and changed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SetupReport {
    /// The project's id.
    pub project_id: i64,
    /// Whether the project was created by this run.
    pub project_created: bool,
    /// Whether an existing project's labeling config was replaced.
    pub config_updated: bool,
    /// The ML backend's id, when one was asked for.
    pub ml_backend_id: Option<i64>,
    /// Whether the ML backend was connected by this run.
    pub ml_backend_created: bool,
    /// The ML backend's state as Label Studio reports it (`CO` when connected).
    pub ml_backend_state: Option<String>,
    /// The webhook's id, when one was asked for.
    pub webhook_id: Option<i64>,
    /// Whether the webhook was registered by this run.
    pub webhook_created: bool,
}

/// URLs compare equal whatever their trailing slashes.
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether `url` is the webhook endpoint `base`, with or without an instance after it.
fn same_endpoint(url: &str, base: &str) -> bool {
    let (url, base) = (url.trim_end_matches('/'), base.trim_end_matches('/'));
    url == base
        || url
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|instance| !instance.is_empty() && !instance.contains('/'))
}

/// Whether an existing webhook already is exactly what `spec` asks for.
fn webhook_matches(existing: &LsWebhook, spec: &WebhookSpec) -> bool {
    existing.send_payload == spec.send_payload
        && existing.send_for_all_actions == spec.send_for_all_actions
        && existing.is_active == spec.is_active
        && existing.headers == spec.headers
        && existing.url == spec.url
}

/// Creates or reuses the project, the ML backend and the webhook that `opts` describe.
#[tracing::instrument(skip_all, fields(title = %opts.title, label_studio = %client.base_url()), err(Display))]
pub async fn setup(
    client: &LabelStudioClient,
    opts: &SetupOptions,
) -> Result<SetupReport, LabelStudioError> {
    let (project, project_created, config_updated) = match client.find_project(&opts.title).await? {
        Some(existing) if existing.label_config.trim() == opts.label_config.trim() => {
            (existing, false, false)
        }
        Some(existing) => {
            tracing::info!(
                project = existing.id,
                "labeling config differs; updating it"
            );
            (
                client
                    .update_project_config(existing.id, &opts.label_config)
                    .await?,
                false,
                true,
            )
        }
        None => {
            let created = client
                .create_project(&opts.title, &opts.label_config, &opts.description)
                .await?;
            tracing::info!(project = created.id, "project created");
            (created, true, false)
        }
    };
    let mut report = SetupReport {
        project_id: project.id,
        project_created,
        config_updated,
        ml_backend_id: None,
        ml_backend_created: false,
        ml_backend_state: None,
        webhook_id: None,
        webhook_created: false,
    };

    if let Some(url) = &opts.ml_backend_url {
        let mut spec = MlBackendSpec::new(url, project.id, &opts.ml_backend_title);
        if let Some((user, pass)) = &opts.ml_backend_basic_auth {
            spec = spec.with_basic_auth(user, pass);
        }
        let existing = client
            .list_ml_backends(project.id)
            .await?
            .into_iter()
            .find(|b| same_url(&b.url, url));
        let backend = match existing {
            Some(b) => {
                tracing::info!(ml_backend = b.id, state = ?b.state, "ML backend already connected");
                b
            }
            None => {
                let b = client.create_ml_backend(&spec).await?;
                tracing::info!(ml_backend = b.id, state = ?b.state, "ML backend connected");
                report.ml_backend_created = true;
                b
            }
        };
        report.ml_backend_id = Some(backend.id);
        report.ml_backend_state = backend.state;
    }

    if let Some(url) = &opts.webhook_url {
        let mut headers = serde_json::Map::new();
        if let Some((name, value)) = &opts.webhook_header {
            headers.insert(name.clone(), Value::String(value.expose().to_owned()));
        }
        let spec = WebhookSpec::all_actions(project.id, url, headers);
        let existing = client
            .list_webhooks(project.id)
            .await?
            .into_iter()
            .find(|w| {
                same_url(&w.url, url)
                    || opts
                        .webhook_replaces
                        .as_deref()
                        .is_some_and(|base| same_endpoint(&w.url, base))
            });
        let hook = match existing {
            Some(w) if webhook_matches(&w, &spec) => w,
            Some(w) => {
                tracing::info!(
                    webhook = w.id,
                    "webhook exists with other settings or headers; updating it"
                );
                client.update_webhook(w.id, &spec).await?
            }
            None => {
                let w = client.create_webhook(&spec).await?;
                tracing::info!(webhook = w.id, "webhook registered");
                report.webhook_created = true;
                w
            }
        };
        report.webhook_id = Some(hook.id);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::same_endpoint;

    #[test]
    fn an_endpoint_matches_with_or_without_an_instance() {
        let base = "http://api:4080/v1/webhooks/label-studio";
        for url in [
            base,
            "http://api:4080/v1/webhooks/label-studio/",
            "http://api:4080/v1/webhooks/label-studio/ls2",
        ] {
            assert!(same_endpoint(url, base), "{url}");
        }
        for url in [
            "http://api:4080/v1/webhooks/label-studio-x",
            "http://api:4080/v1/webhooks/label-studio/a/b",
            "http://other:4080/v1/webhooks/label-studio",
        ] {
            assert!(!same_endpoint(url, base), "{url}");
        }
    }
}
