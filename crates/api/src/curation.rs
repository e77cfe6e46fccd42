//! Label Studio curation routes: the webhook target, project status, exports and accuracy.
//!
//! What batchlab holds is keyed by Label Studio instance (see
//! `batchlab_core::labelstudio::instance`): a webhook names its instance in the URL
//! (`/v1/webhooks/label-studio/{instance}`) or is of the configured `label_studio.instance`, and
//! the status, export and accuracy routes read the configured instance's projects unless
//! `?instance=NAME` names another. Import works with the configured Label Studio only.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchlab_core::curation::export::{ExportFilter, ExportFormat};
use batchlab_core::curation::import::ImportReport;
use batchlab_core::curation::{Curation, Ingested, ProjectStatus};
use batchlab_core::labelstudio::client::LabelStudioClient;
use batchlab_core::labelstudio::event::parse_timestamp_us;
use batchlab_core::labelstudio::instance::Instance;
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::extract::{ApiBytes, ApiJson, ApiPath, ApiQuery};
use crate::AppState;

/// `POST /v1/webhooks/label-studio`: stores the event and answers at once; a background
/// processor applies it. A body seen before is acknowledged as `duplicate`. The shared secret
/// and the limit on concurrent deliveries are checked before the body is read
/// ([`crate::http::guard_webhook`]).
pub async fn webhook(
    State(state): State<AppState>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Ingested>, ApiError> {
    Ok(Json(state.curation.ingest(&body).await?))
}

/// `POST /v1/webhooks/label-studio/{instance}`: [`webhook`] for the Label Studio instance the
/// URL names (what `setup-label-studio` registers), so that two Label Studios, or one re-created
/// with a fresh database, never share ids.
pub async fn instance_webhook(
    State(state): State<AppState>,
    ApiPath(instance): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Ingested>, ApiError> {
    let instance = parse_instance(&instance)?;
    Ok(Json(
        state.curation.with_instance(instance).ingest(&body).await?,
    ))
}

fn parse_instance(name: &str) -> Result<Instance, ApiError> {
    Instance::parse(name).map_err(|e| ApiError::invalid(e.into_message(), "instance"))
}

/// `?instance=NAME` of the curation routes: the Label Studio instance whose project is meant;
/// the configured one when absent.
#[derive(Debug, Default, Deserialize)]
pub struct InstanceQuery {
    instance: Option<String>,
}

impl InstanceQuery {
    /// The curation service for the instance asked for.
    fn curation(&self, state: &AppState) -> Result<Curation, ApiError> {
        Ok(match &self.instance {
            None => state.curation.clone(),
            Some(name) => state.curation.with_instance(parse_instance(name)?),
        })
    }
}

/// `GET /v1/label-studio/projects/{id}`: counts, ground truth, milestones, exports, invalid
/// annotations, accuracy history and conflicts.
pub async fn project(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(scope): ApiQuery<InstanceQuery>,
) -> Result<Json<ProjectStatus>, ApiError> {
    Ok(Json(scope.curation(&state)?.status(id).await?))
}

/// Query of the export route.
#[derive(Debug, Default, Deserialize)]
pub struct ExportQuery {
    /// `json` (default) or `jsonl-chat`.
    format: Option<String>,
    /// Only ground-truth annotations.
    #[serde(default)]
    ground_truth_only: bool,
    /// Only annotations updated at or after this time: RFC 3339 or unix seconds.
    since: Option<String>,
    /// Include skipped tasks.
    #[serde(default)]
    include_cancelled: bool,
    /// Include annotations that do not fit the labeling config.
    #[serde(default)]
    include_invalid: bool,
}

fn since_us(since: &str) -> Result<i64, ApiError> {
    if let Ok(secs) = since.parse::<i64>() {
        return Ok(secs.saturating_mul(1_000_000));
    }
    parse_timestamp_us(since).ok_or_else(|| {
        ApiError::invalid(
            format!("since {since:?} is neither RFC 3339 nor unix seconds"),
            "since",
        )
    })
}

/// `GET /v1/label-studio/export/{project_id}`: the curated training data, streamed.
pub async fn export(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(scope): ApiQuery<InstanceQuery>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let format: ExportFormat = q.format.as_deref().unwrap_or("json").parse().map_err(
        |e: batchlab_core::curation::CurationError| ApiError::invalid(e.to_string(), "format"),
    )?;
    let filter = ExportFilter {
        ground_truth_only: q.ground_truth_only,
        since_us: q.since.as_deref().map(since_us).transpose()?,
        include_cancelled: q.include_cancelled,
        include_invalid: q.include_invalid,
    };
    let cursor = scope
        .curation(&state)?
        .export_cursor(id, format, filter)
        .await?;
    let stream = cursor
        .into_stream()
        .inspect_err(move |e| tracing::error!(project_id = id, error = %e, "export stream failed"));
    let extension = if format == ExportFormat::Json {
        "json"
    } else {
        "jsonl"
    };
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"project_{id}_export.{extension}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `GET /v1/label-studio/exports/{project_id}/{file}`: one export file of the project, streamed
/// from wherever exports are kept (the training directory, or the object store beside the file
/// bodies): its latest export (`project_{id}_export.json`) or any file its status lists under
/// `exports` (milestone snapshots included). Its SHA-256 is the one the status shows.
pub async fn export_file(
    State(state): State<AppState>,
    ApiPath((id, file)): ApiPath<(i64, String)>,
    ApiQuery(scope): ApiQuery<InstanceQuery>,
) -> Result<Response, ApiError> {
    let reader = scope.curation(&state)?.open_export(id, &file).await?;
    let stream = tokio_util::io::ReaderStream::new(reader).inspect_err(
        move |e| tracing::error!(project_id = id, error = %e, "export file stream failed"),
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Body of `POST /v1/label-studio/accuracy/{project_id}`.
#[derive(Debug, Deserialize)]
pub struct AccuracyRequest {
    predictions: Vec<PredictionInput>,
}

/// One prediction to score.
#[derive(Debug, Deserialize)]
pub struct PredictionInput {
    task_id: i64,
    prediction: Map<String, Value>,
}

/// `POST /v1/label-studio/accuracy/{project_id}`: the given predictions against ground truth.
pub async fn accuracy(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(scope): ApiQuery<InstanceQuery>,
    ApiJson(req): ApiJson<AccuracyRequest>,
) -> Result<Json<Value>, ApiError> {
    let preds: Vec<(i64, Map<String, Value>)> = req
        .predictions
        .into_iter()
        .map(|p| (p.task_id, p.prediction))
        .collect();
    let report = scope.curation(&state)?.accuracy_of(id, &preds).await?;
    let mut body = serde_json::to_value(report)?;
    body["project_id"] = json!(id);
    Ok(Json(body))
}

/// `GET /v1/label-studio/accuracy/{project_id}`: stored predictions against ground truth, per
/// model version, with the records kept every `accuracy_every` annotations.
pub async fn stored_accuracy(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(scope): ApiQuery<InstanceQuery>,
) -> Result<Json<Value>, ApiError> {
    let curation = scope.curation(&state)?;
    let reports = curation.stored_accuracy(id).await?;
    let history = curation.status(id).await?.accuracy_history;
    Ok(Json(
        json!({"project_id": id, "model_versions": reports, "history": history}),
    ))
}

/// Body of `POST /v1/label-studio/import/{project_id}`.
#[derive(Debug, Deserialize)]
pub struct ImportRequest {
    batch_id: String,
    /// Defaults to the batch's output file.
    output_file_id: Option<String>,
}

/// `POST /v1/label-studio/import/{project_id}`: a finished batch's results into Label Studio as
/// tasks with predictions.
pub async fn import(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<ImportRequest>,
) -> Result<Json<ImportReport>, ApiError> {
    let batch =
        state.store.get_batch(&req.batch_id).await?.ok_or_else(|| {
            ApiError::NotFound(format!("No batch found with id '{}'.", req.batch_id))
        })?;
    let Some(batch_output) = batch.output_file_id.clone() else {
        return Err(ApiError::invalid(
            format!(
                "batch {} has no output file yet (status {})",
                batch.id,
                batch.status.as_str()
            ),
            "batch_id",
        ));
    };
    let output_file_id = req.output_file_id.unwrap_or_else(|| batch_output.clone());
    if output_file_id != batch_output {
        return Err(ApiError::invalid(
            format!(
                "file {output_file_id} is not the output file of batch {}",
                batch.id
            ),
            "output_file_id",
        ));
    }
    let client = LabelStudioClient::from_config(&state.config.label_studio)
        .map_err(|e| ApiError::Conflict(format!("Label Studio is not configured: {e}")))?;
    let chunk = state.config.label_studio.import_chunk_size;
    Ok(Json(
        state
            .curation
            .import_batch(&client, &state.blobs, id, &batch, &output_file_id, chunk)
            .await?,
    ))
}
