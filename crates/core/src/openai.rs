//! OpenAI's wire shapes for Files and Batches: the objects the API answers, its error body, the
//! lines of output and error files, and identifiers. Converting requests to and from the engine's
//! terms is `batchlab-inference`'s job (`completions`); nothing here knows a model.

use crate::error::InvalidInput;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::store::{BatchRecord, FileRecord};

/// Endpoints a batch may target.
pub const BATCH_ENDPOINTS: [&str; 3] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
/// File purposes accepted on upload.
pub const UPLOAD_PURPOSES: [&str; 6] = [
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];
/// The only completion window OpenAI accepts.
pub const COMPLETION_WINDOW: &str = "24h";
/// `24h` in seconds.
pub const COMPLETION_WINDOW_SECONDS: i64 = 24 * 3600;

/// A fresh OpenAI-style identifier such as `file-3f2a...` or `batch_9c1e...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// The body for `message`, of OpenAI error `kind` (`invalid_request_error`, `server_error`,
    /// ...), naming the parameter at fault and a machine-readable code when there are ones.
    pub fn new(
        message: impl Into<String>,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }

    /// The answer to an internal failure: generic, since details are logged, never returned.
    pub fn server_error() -> ErrorBody {
        ErrorBody::new(SERVER_ERROR_MESSAGE, "server_error", None, None)
    }

    /// The body as a JSON value (for an output file's line, or a `Json` answer).
    pub fn to_value(&self) -> Value {
        let e = &self.error;
        json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
    }
}

/// What a client is told of an internal failure (OpenAI's own wording).
pub const SERVER_ERROR_MESSAGE: &str = "The server had an error while processing your request.";

/// The inside of [`ErrorBody`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<String>,
}

/// The File object.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// The Batch object, every field OpenAI defines.
pub fn batch_object(b: &BatchRecord) -> Value {
    let errors = b
        .errors
        .as_deref()
        .and_then(|e| serde_json::from_str::<Value>(e).ok())
        .map(|data| json!({"object": "list", "data": data}));
    let metadata = b
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok());
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "usage": {
            "input_tokens": b.input_tokens,
            "input_tokens_details": {"cached_tokens": b.cached_tokens},
            "output_tokens": b.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": b.input_tokens + b.output_tokens,
        },
        "metadata": metadata,
    })
}

/// A cursor page: `{object: "list", data, first_id, last_id, has_more}`.
pub fn list_page(data: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// Checks a batch's `metadata`: at most 16 pairs, keys ≤ 64 and values ≤ 512 characters.
pub fn validate_metadata(metadata: &Value) -> Result<(), InvalidInput> {
    metadata_problem(metadata).map_err(InvalidInput)
}

fn metadata_problem(metadata: &Value) -> Result<(), String> {
    let Some(map) = metadata.as_object() else {
        return Err("metadata must be an object of string keys and string values".into());
    };
    if map.len() > 16 {
        return Err(format!(
            "metadata may hold at most 16 pairs, got {}",
            map.len()
        ));
    }
    for (k, v) in map {
        let Some(v) = v.as_str() else {
            return Err(format!("metadata value of {k:?} must be a string"));
        };
        if k.chars().count() > 64 || v.chars().count() > 512 {
            return Err(format!(
                "metadata key {k:?}: keys may be 64 and values 512 characters long at most"
            ));
        }
    }
    Ok(())
}

/// One output-file line: `{id, custom_id, response: {status_code, request_id, body}, error: null}`.
pub fn output_line(custom_id: &str, status_code: u16, body: Value) -> String {
    json!({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": new_id("req_"), "body": body},
        "error": null,
    })
    .to_string()
}

/// One error-file line for a request that never ran: `{id, custom_id, response: null, error}`.
pub fn error_line(custom_id: Option<&str>, code: &str, message: &str) -> String {
    json!({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

/// A batch-level error entry (`errors.data[]`).
pub fn batch_error(code: &str, message: &str, line: Option<i64>) -> Value {
    json!({"code": code, "message": message, "param": null, "line": line})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_limits() {
        assert!(validate_metadata(&json!({"k": "v"})).is_ok());
        assert!(validate_metadata(&json!({"k": 1})).is_err());
        assert!(validate_metadata(&json!("x")).is_err());
        let many: serde_json::Map<String, Value> =
            (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(validate_metadata(&Value::Object(many)).is_err());
    }
}
