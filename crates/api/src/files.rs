//! The OpenAI Files API: upload (streamed to the blob store), list, retrieve, content, delete.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchlab_core::blob::{WriteLimits, WriteStats};
use batchlab_core::openai::{self, UPLOAD_PURPOSES};
use batchlab_core::store::{now, FileDeletion, FileRecord};
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::io::ReaderStream;

use crate::error::ApiError;
use crate::extract::{ApiMultipart, ApiQuery};
use crate::AppState;

/// Batch-purpose files expire after 30 days by default, as at OpenAI.
const BATCH_FILE_TTL_SECONDS: i64 = 30 * 24 * 3600;

/// `POST /v1/files`: multipart `file` + `purpose`. Batch inputs must be UTF-8 JSONL within the
/// batch limits; the body streams to disk and is never held in memory.
pub async fn create(
    State(state): State<AppState>,
    ApiMultipart(mut form): ApiMultipart,
) -> Result<Json<Value>, ApiError> {
    let mut purpose: Option<String> = None;
    let mut uploaded: Option<(String, String, WriteStats)> = None;
    let result = async {
        while let Some(field) = form.next_field().await? {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await?.trim().to_string()),
                Some("file") => {
                    if uploaded.is_some() {
                        return Err(ApiError::invalid("only one file may be uploaded per request", "file"));
                    }
                    let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                    if filename.contains('\0') {
                        return Err(ApiError::invalid("the file name must not contain the NUL character (U+0000)", "file"));
                    }
                    let limits = upload_limits(&state, purpose.as_deref());
                    let id = openai::new_id("file-");
                    let stream = field.map_err(|e| e.body_text());
                    let stats = state.blobs.put_stream(&id, Box::pin(stream), limits).await?;
                    uploaded = Some((id, filename, stats));
                }
                _ => {}
            }
        }
        let purpose = purpose.ok_or_else(|| ApiError::invalid("missing required parameter 'purpose'", "purpose"))?;
        if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
            return Err(ApiError::invalid(
                format!("'{purpose}' is not one of {UPLOAD_PURPOSES:?} - 'purpose'"),
                "purpose",
            ));
        }
        let (id, filename, stats) =
            uploaded.clone().ok_or_else(|| ApiError::invalid("missing required parameter 'file'", "file"))?;
        check_content(&state, &purpose, &stats)?;
        let created_at = now();
        let record = FileRecord {
            id,
            filename,
            purpose: purpose.clone(),
            bytes: stats.bytes as i64,
            lines: stats.lines as i64,
            created_at,
            expires_at: (purpose == "batch").then_some(created_at + BATCH_FILE_TTL_SECONDS),
        };
        state.store.insert_file(&record).await?;
        tracing::info!(file = %record.id, purpose = %record.purpose, bytes = record.bytes, lines = record.lines, "file uploaded");
        Ok(Json(openai::file_object(&record)))
    }
    .await;
    if result.is_err() {
        if let Some((id, _, _)) = &uploaded {
            let _ = state.blobs.delete(id).await;
        }
    }
    result
}

fn upload_limits(state: &AppState, purpose: Option<&str>) -> WriteLimits {
    match purpose {
        Some("batch") => WriteLimits {
            max_bytes: state.config.batch.max_input_bytes,
            max_lines: Some(state.config.batch.max_lines),
            require_utf8: true,
        },
        _ => WriteLimits {
            max_bytes: state.config.api.max_upload_bytes,
            max_lines: None,
            require_utf8: false,
        },
    }
}

/// Checks that apply once both the purpose and the whole body are known.
fn check_content(state: &AppState, purpose: &str, stats: &WriteStats) -> Result<(), ApiError> {
    if stats.bytes == 0 {
        return Err(ApiError::invalid("the uploaded file is empty", "file"));
    }
    if purpose == "batch" {
        let limits = &state.config.batch;
        if stats.bytes > limits.max_input_bytes {
            return Err(ApiError::TooLarge(format!(
                "batch input files may be {} bytes at most",
                limits.max_input_bytes
            )));
        }
        if stats.lines > limits.max_lines {
            return Err(ApiError::invalid(
                format!(
                    "batch input files may hold {} requests at most",
                    limits.max_lines
                ),
                "file",
            ));
        }
        if let Some(at) = stats.invalid_utf8_at {
            return Err(ApiError::invalid(
                format!("batch input must be UTF-8 JSONL; invalid byte at offset {at}"),
                "file",
            ));
        }
        if stats.longest_line > limits.max_line_bytes {
            return Err(ApiError::invalid(
                format!(
                    "line {} of the batch input is {} bytes long; request lines may be {} bytes at most",
                    stats.longest_line_no, stats.longest_line, limits.max_line_bytes
                ),
                "file",
            ));
        }
    }
    Ok(())
}

/// Query of `GET /v1/files`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
}

/// `GET /v1/files`: a cursor page, newest first unless `order=asc`.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit must be between 1 and 10000",
            "limit",
        ));
    }
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("order must be 'asc' or 'desc', not '{other}'"),
                "order",
            ))
        }
    };
    let mut rows = state
        .store
        .list_files(q.purpose.as_deref(), q.after.as_deref(), limit, ascending)
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(openai::list_page(
        rows.iter().map(openai::file_object).collect(),
        has_more,
    )))
}

async fn find(state: &AppState, id: &str) -> Result<FileRecord, ApiError> {
    state
        .store
        .get_file(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No such File object: {id}")))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(openai::file_object(&find(&state, &id).await?)))
}

/// `GET /v1/files/{id}/content`: the body, streamed from disk.
pub async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = find(&state, &id).await?;
    let file = state.blobs.open_read(&record.id).await?;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, record.bytes.to_string()),
        (
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{}\"",
                record.filename.replace('"', "")
            ),
        ),
    ];
    Ok((
        headers,
        Body::from_stream(ReaderStream::with_capacity(file, 1 << 16)),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`. The input file of an unfinished batch (validating, in_progress,
/// finalizing or cancelling) is refused with 409: its worker still reads it.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = find(&state, &id).await?;
    match state.store.delete_file_if_unused(&record.id).await? {
        FileDeletion::Deleted => {}
        FileDeletion::NotFound => {
            return Err(ApiError::NotFound(format!("No such File object: {id}")))
        }
        FileDeletion::InUse { batch_id, status } => {
            return Err(ApiError::Conflict(format!(
                "file {id} is the input of batch {batch_id}, which is {}; cancel the batch or wait until it ends \
                 before deleting the file",
                status.as_str()
            )));
        }
    }
    state.blobs.delete(&record.id).await?;
    Ok(Json(
        json!({"id": record.id, "object": "file", "deleted": true}),
    ))
}
