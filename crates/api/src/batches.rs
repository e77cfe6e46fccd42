//! The OpenAI Batches API: create (queues the batch for a worker), retrieve, list, cancel.

use axum::extract::{Path, State};
use axum::Json;
use batchlab_core::openai::{self, BATCH_ENDPOINTS, COMPLETION_WINDOW, COMPLETION_WINDOW_SECONDS};
use batchlab_core::store::{BatchRecord, BatchStatus, NewBatch};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery};
use crate::AppState;

/// Body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
}

/// `POST /v1/batches`: checks the request and the input file, then queues the batch in
/// `validating`; a worker validates each line and runs it.
pub async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateBatch>,
) -> Result<Json<Value>, ApiError> {
    let input_file_id = req.input_file_id.ok_or_else(|| {
        ApiError::invalid(
            "missing required parameter 'input_file_id'",
            "input_file_id",
        )
    })?;
    let endpoint = req
        .endpoint
        .ok_or_else(|| ApiError::invalid("missing required parameter 'endpoint'", "endpoint"))?;
    if !BATCH_ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(ApiError::invalid(
            format!("endpoint '{endpoint}' is not supported; use one of {BATCH_ENDPOINTS:?}"),
            "endpoint",
        ));
    }
    let window = req.completion_window.unwrap_or_default();
    if window != COMPLETION_WINDOW {
        return Err(ApiError::invalid(
            format!("completion_window '{window}' is not supported; only '{COMPLETION_WINDOW}'"),
            "completion_window",
        ));
    }
    let metadata = match req.metadata {
        None | Some(Value::Null) => None,
        Some(m) => {
            openai::validate_metadata(&m)
                .map_err(|e| ApiError::invalid(e.into_message(), "metadata"))?;
            Some(m.to_string())
        }
    };
    let file = state
        .store
        .get_file(&input_file_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No such File object: {input_file_id}")))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            format!(
                "file {input_file_id} has purpose '{}'; batch input files need purpose 'batch'",
                file.purpose
            ),
            "input_file_id",
        ));
    }
    let batch = state
        .store
        .insert_batch(&NewBatch {
            id: openai::new_id("batch_"),
            endpoint,
            input_file_id,
            completion_window: window,
            window_seconds: COMPLETION_WINDOW_SECONDS,
            metadata,
            total: file.lines,
        })
        .await?;
    metrics::counter!("batchlab_batches_created_total").increment(1);
    tracing::info!(batch = %batch.id, file = %batch.input_file_id, "batch queued");
    Ok(Json(openai::batch_object(&batch)))
}

async fn find(state: &AppState, id: &str) -> Result<BatchRecord, ApiError> {
    state
        .store
        .get_batch(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No such Batch object: {id}")))
}

/// `GET /v1/batches/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(openai::batch_object(&find(&state, &id).await?)))
}

/// Query of `GET /v1/batches`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/batches`: newest first, `limit` 1..100 (default 20), `after` a batch id.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid(
            "limit must be between 1 and 100",
            "limit",
        ));
    }
    let mut rows = state.store.list_batches(q.after.as_deref(), limit).await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(openai::list_page(
        rows.iter().map(openai::batch_object).collect(),
        has_more,
    )))
}

/// `POST /v1/batches/{id}/cancel`: an active batch moves to `cancelling`; a worker writes its
/// finished lines out and ends it `cancelled`.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let before = find(&state, &id).await?;
    if !before.status.is_active() {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "cannot cancel a batch with status '{}'",
                before.status.as_str()
            ),
            param: None,
        });
    }
    let after = state.store.request_cancel(&id).await?.unwrap_or(before);
    if after.status == BatchStatus::Cancelling {
        tracing::info!(batch = %id, "cancel requested");
    }
    Ok(Json(openai::batch_object(&after)))
}
