//! `POST /setup`: Label Studio announces the project's labeling config before every prediction
//! batch (3 s timeout); the answer is the `model_version` predictions will carry: from the model
//! id, the config, the project's prompt template (`extra_params`) and ground-truth examples
//! (see `project`) and the model file's SHA-256, so it is refused (503) while the model loads.
//! Nothing is loaded here.

use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use batchlab_core::labelstudio::config::LabelConfig;

use crate::error::MlError;
use crate::predict::config_error;
use crate::project::{project_id, template_of};
use crate::MlState;

/// The body Label Studio 1.23 sends (fields batchlab reads; others are ignored).
#[derive(Debug, Deserialize)]
pub struct SetupRequest {
    /// `"<project id>.<created unix time>"`.
    #[serde(default)]
    pub project: Option<Value>,
    /// The labeling config (XML).
    #[serde(default)]
    pub schema: Option<String>,
    /// Label Studio's own URL as it reports it.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The project creator's legacy token: never logged, not used (batchlab uses its own key).
    #[serde(default)]
    pub access_token: Option<String>,
    /// The ML backend's `extra_params`: an object, a string or null.
    #[serde(default)]
    pub extra_params: Option<Value>,
}

/// `POST /setup` → `{"model_version": V}`.
#[tracing::instrument(skip_all)]
pub async fn setup(State(state): State<MlState>, body: Bytes) -> Result<Json<Value>, MlError> {
    let request: SetupRequest = serde_json::from_slice(&body)
        .map_err(|e| MlError::BadRequest(format!("invalid /setup body: {e}")))?;
    state.engine.refuse_while_loading()?;
    let schema = request.schema.as_deref().unwrap_or("");
    let project = request.project.as_ref().and_then(project_id);
    if let Some(project) = project {
        state
            .templates
            .set(project, template_of(request.extra_params.as_ref()));
    }
    // A config that does not parse still gets a version (Label Studio shows the error from
    // /predict); one refused for its size is refused here already.
    let config = match LabelConfig::parse(schema) {
        Ok(config) => Some(config),
        Err(e) if e.is_limit() => return Err(config_error(e)),
        Err(_) => None,
    };
    let version = state
        .project_context(project, schema, config.as_ref())
        .await
        .version;
    tracing::info!(project = ?request.project, hostname = ?request.hostname, model_version = %version, "setup");
    metrics::counter!("batchlab_ml_setup_total").increment(1);
    Ok(Json(json!({"model_version": version})))
}

/// `GET /versions` → `{"versions": [...]}`: every model version `/setup` has answered since start.
pub async fn versions(State(state): State<MlState>) -> Json<Value> {
    Json(json!({"versions": state.known_versions()}))
}
