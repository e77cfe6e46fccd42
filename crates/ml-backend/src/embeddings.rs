//! OpenAI-compatible `POST /v1/embeddings`, from the same loaded engine as `/predict` (the mean
//! of the model's final hidden states, of unit length): the official `openai` package's
//! `client.embeddings.create` works against it, floats or base64.

use axum::extract::State;
use axum::Json;
use batchlab_inference::embeddings::{embed, embeddings_object, parse_embeddings_body};
use bytes::Bytes;
use serde_json::Value;

use crate::error::MlError;
use crate::MlState;

/// `POST /v1/embeddings`: one vector per input, in order.
#[tracing::instrument(skip_all, fields(inputs))]
pub async fn embeddings(State(state): State<MlState>, body: Bytes) -> Result<Json<Value>, MlError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| MlError::BadRequest(format!("invalid JSON body: {e}")))?;
    let request = parse_embeddings_body(body).map_err(|e| MlError::BadRequest(e.into_message()))?;
    tracing::Span::current().record("inputs", request.inputs.len());
    let engine = state.engine.engine().await?;
    let vectors = embed(&engine, &request).await?;
    Ok(Json(embeddings_object(
        engine.model_id(),
        request.encoding,
        &vectors,
    )))
}
