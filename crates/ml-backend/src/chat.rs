//! OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`, served by the same loaded
//! engine as `/predict`: for scripts, playgrounds and health checks that speak OpenAI.

use axum::extract::State;
use axum::Json;
use batchlab_core::openai::new_id;
use batchlab_core::store::now;
use batchlab_inference::completions::{chat_completion_object, parse_chat_request, BodyLimits};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::error::MlError;
use crate::MlState;

/// `GET /v1/models`: the one model this backend serves.
pub async fn models(State(state): State<MlState>) -> Json<Value> {
    let id = &state.config.engine.model_id;
    Json(
        json!({"object": "list", "data": [{"id": id, "object": "model", "created": 0, "owned_by": "batchlab"}]}),
    )
}

/// `POST /v1/chat/completions` (no streaming): the answer of the loaded model.
#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<MlState>,
    body: Bytes,
) -> Result<Json<Value>, MlError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| MlError::BadRequest(format!("invalid JSON body: {e}")))?;
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(MlError::BadRequest(
            "stream=true is not supported; ask without streaming".into(),
        ));
    }
    let (request, _model) =
        parse_chat_request(body, &BodyLimits::from_settings(&state.config.engine))
            .map_err(|e| MlError::BadRequest(e.into_message()))?;
    let engine = state.engine.engine().await?;
    let completion = engine.chat(request).await?;
    Ok(Json(chat_completion_object(
        &new_id("chatcmpl"),
        engine.model_id(),
        now(),
        &completion,
    )))
}
