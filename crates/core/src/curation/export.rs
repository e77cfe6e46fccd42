//! Curated training data out of the store, page by page, never whole in memory: the JSON file of
//! tasks with their annotations (the guide's `project_{id}_export.json`), or one OpenAI
//! fine-tuning line per task (`jsonl-chat`). The HTTP route streams the chunks; milestone and
//! START_TRAINING exports write the same chunks to a temp file renamed into place: the export's
//! own file, never rewritten, then a copy of it as the project's latest export file.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::{export_name, snapshot_name, Curation, CurationError};
use crate::blob::{BlobError, BlobStore};
use crate::labelstudio::config::LabelConfig;
use crate::labelstudio::instance::Instance;
use crate::labelstudio::region::{field_values, Region};
use crate::prompt;
use crate::store::{now, AnnotationRow, ExportRecord, PredictionRow, Store, TaskRow};

/// Tasks read per page.
const PAGE: i64 = 500;

/// The two export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// A JSON array of tasks with their annotations and predictions.
    Json,
    /// JSON Lines of `{"messages": [...]}`: the prompt the ML backend sends, the human labels as
    /// the assistant's JSON answer.
    JsonlChat,
}

impl FromStr for ExportFormat {
    type Err = CurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "jsonl-chat" => Ok(Self::JsonlChat),
            other => Err(CurationError::Invalid(format!(
                "unknown export format {other:?}: use json or jsonl-chat"
            ))),
        }
    }
}

impl ExportFormat {
    /// The HTTP content type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::JsonlChat => "application/jsonl",
        }
    }
}

/// Which annotations an export includes. The default is the curated set: valid, not skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Only ground-truth annotations.
    pub ground_truth_only: bool,
    /// Only annotations updated at or after this time (unix microseconds).
    pub since_us: Option<i64>,
    /// Include skipped tasks' annotations (`was_cancelled`).
    pub include_cancelled: bool,
    /// Include annotations that do not fit the labeling config.
    pub include_invalid: bool,
}

impl ExportFilter {
    fn keeps(&self, a: &AnnotationRow) -> bool {
        (a.valid || self.include_invalid)
            && (!a.was_cancelled || self.include_cancelled)
            && (a.ground_truth || !self.ground_truth_only)
            && self.since_us.is_none_or(|since| a.updated_at_us >= since)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Start,
    Body,
    Done,
}

/// Reads an export chunk by chunk; counts what it wrote.
pub struct ExportCursor {
    store: Store,
    instance: Instance,
    project_id: i64,
    format: ExportFormat,
    filter: ExportFilter,
    config: Option<Arc<LabelConfig>>,
    after: i64,
    stage: Stage,
    first_item: bool,
    /// Tasks written so far.
    pub tasks: i64,
    /// Annotations written so far.
    pub annotations: i64,
}

impl ExportCursor {
    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, CurationError> {
        match self.stage {
            Stage::Done => Ok(None),
            Stage::Start => {
                self.stage = Stage::Body;
                Ok(Some(Bytes::from_static(
                    if self.format == ExportFormat::Json {
                        b"["
                    } else {
                        b""
                    },
                )))
            }
            Stage::Body => {
                let mut out = String::new();
                // Pages whose tasks all filter out yield nothing; keep reading until text or the end.
                while out.is_empty() {
                    let tasks = self
                        .store
                        .tasks_page(self.instance.as_str(), self.project_id, self.after, PAGE)
                        .await?;
                    let (Some(first), Some(last)) = (tasks.first(), tasks.last()) else {
                        self.stage = Stage::Done;
                        if self.format == ExportFormat::Json {
                            out.push_str(if self.first_item { "]\n" } else { "\n]\n" });
                        }
                        break;
                    };
                    let (first, last) = (first.id, last.id);
                    self.after = last;
                    let annotations = self
                        .store
                        .annotations_in_range(self.instance.as_str(), self.project_id, first, last)
                        .await?;
                    let predictions = match self.format {
                        ExportFormat::Json => {
                            self.store
                                .predictions_in_range(
                                    self.instance.as_str(),
                                    self.project_id,
                                    first,
                                    last,
                                )
                                .await?
                        }
                        ExportFormat::JsonlChat => Vec::new(),
                    };
                    for task in &tasks {
                        let kept: Vec<&AnnotationRow> = annotations
                            .iter()
                            .filter(|a| a.task_id == task.id && self.filter.keeps(a))
                            .collect();
                        if kept.is_empty() {
                            continue;
                        }
                        let line = match self.format {
                            ExportFormat::Json => {
                                let preds: Vec<&PredictionRow> = predictions
                                    .iter()
                                    .filter(|p| p.task_id == task.id)
                                    .collect();
                                Some(json_task(task, &kept, &preds))
                            }
                            ExportFormat::JsonlChat => self
                                .config
                                .as_deref()
                                .and_then(|c| chat_line(c, task, &kept)),
                        };
                        let Some(line) = line else { continue };
                        self.tasks += 1;
                        self.annotations += kept.len() as i64;
                        match self.format {
                            ExportFormat::Json => {
                                out.push_str(if self.first_item { "\n" } else { ",\n" });
                                out.push_str(&line.to_string());
                            }
                            ExportFormat::JsonlChat => {
                                out.push_str(&line.to_string());
                                out.push('\n');
                            }
                        }
                        self.first_item = false;
                    }
                }
                Ok(Some(Bytes::from(out)))
            }
        }
    }

    /// The chunks as a stream, for an HTTP body.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, CurationError>> + Send {
        futures::stream::try_unfold(self, |mut cursor| async move {
            Ok(cursor.next_chunk().await?.map(|chunk| (chunk, cursor)))
        })
    }
}

fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn json_task(
    task: &TaskRow,
    annotations: &[&AnnotationRow],
    predictions: &[&PredictionRow],
) -> Value {
    let annotations: Vec<Value> = annotations
        .iter()
        .map(|a| {
            let mut o = json!({
                "id": a.id, "result": parsed(&a.result), "ground_truth": a.ground_truth, "was_cancelled": a.was_cancelled,
                "lead_time": a.lead_time, "completed_by": a.completed_by, "created_at": a.created_at, "updated_at": a.updated_at,
            });
            if !a.valid {
                o["valid"] = Value::Bool(false);
                o["invalid_reason"] = json!(a.invalid_reason);
            }
            o
        })
        .collect();
    let predictions: Vec<Value> = predictions
        .iter()
        .map(|p| json!({"model_version": p.model_version, "score": p.score, "result": parsed(&p.result), "source": p.source}))
        .collect();
    json!({"id": task.id, "data": parsed(&task.data), "annotations": annotations, "predictions": predictions})
}

/// The fine-tuning line of a task: its prompt, and as the answer the ground-truth annotation
/// (else the newest) in the shape the model is asked for. `None` when it labels nothing.
fn chat_line(
    config: &LabelConfig,
    task: &TaskRow,
    annotations: &[&AnnotationRow],
) -> Option<Value> {
    let best = annotations
        .iter()
        .filter(|a| !a.was_cancelled)
        .max_by_key(|a| (a.ground_truth, a.updated_at_us, a.id))?;
    let regions: Vec<Region> = serde_json::from_str(&best.result).ok()?;
    let values = field_values(config, &regions);
    let mut answer = Map::new();
    for control in &config.controls {
        if let Some(v) = values.get(&control.name) {
            answer.insert(control.name.clone(), v.to_json(control));
        }
    }
    if answer.is_empty() {
        return None;
    }
    let data = parsed(&task.data);
    let mut messages = prompt::messages(config, &data);
    messages.push(prompt::Message::new(
        "assistant",
        Value::Object(answer).to_string(),
    ));
    Some(json!({"messages": messages}))
}

impl Curation {
    /// A cursor over a project's export; `jsonl-chat` needs the project's labeling config.
    pub async fn export_cursor(
        &self,
        project_id: i64,
        format: ExportFormat,
        filter: ExportFilter,
    ) -> Result<ExportCursor, CurationError> {
        let project = self.project(project_id).await?;
        let config = match format {
            ExportFormat::Json => None,
            ExportFormat::JsonlChat => Some(Arc::new(self.label_config(&project).await?)),
        };
        Ok(ExportCursor {
            store: self.store.clone(),
            instance: self.instance.clone(),
            project_id,
            format,
            filter,
            config,
            after: i64::MIN,
            stage: Stage::Start,
            first_item: true,
            tasks: 0,
            annotations: 0,
        })
    }

    /// Writes the project's curated JSON export to a file of its own ([`snapshot_name`]) and
    /// to the project's latest export file ([`export_name`]), in the instance's training
    /// directory (each a temp file renamed into place) or in the object store (each an object
    /// that appears complete or not at all), and records the export's own file with its SHA-256.
    pub async fn write_export_file(
        &self,
        project_id: i64,
        reason: &str,
        milestone: Option<i64>,
    ) -> Result<ExportRecord, CurationError> {
        let name = snapshot_name(project_id, reason, milestone);
        let mut cursor = self
            .export_cursor(project_id, ExportFormat::Json, ExportFilter::default())
            .await?;
        let location = self.export_location(&name)?;
        let sha256 = match self.export_blobs()? {
            Some(blobs) => {
                write_objects(&blobs, &name, &export_name(project_id), &mut cursor).await?
            }
            None => {
                let path = self.training_dir().join(&name);
                let sha256 = write_atomically(&path, &mut cursor).await?;
                let latest = self.training_dir().join(export_name(project_id));
                if let Err(e) = copy_atomically(&path, &latest).await {
                    // Unrecorded, so the export is tried again: leave no file behind it.
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(e);
                }
                sha256
            }
        };
        let record = ExportRecord {
            project_id,
            reason: reason.to_string(),
            milestone,
            path: location,
            sha256: Some(sha256),
            tasks: cursor.tasks,
            annotations: cursor.annotations,
            created_at: now(),
        };
        self.store
            .record_export(self.instance.as_str(), &record)
            .await?;
        Ok(record)
    }

    /// Opens the export file `name` of a project for reading: its latest export
    /// ([`export_name`]) or one a recorded export wrote, from wherever exports go; any other
    /// name is [`CurationError::UnknownExport`], so no other file can be read through it.
    pub async fn open_export(
        &self,
        project_id: i64,
        name: &str,
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>, CurationError> {
        self.project(project_id).await?;
        let unknown = || CurationError::UnknownExport {
            project: project_id,
            name: name.chars().take(200).collect(),
        };
        let recorded = self
            .store
            .exports(self.instance.as_str(), project_id)
            .await?
            .iter()
            .any(|r| r.path.rsplit(['/', '\\']).next() == Some(name));
        if !(recorded || name == export_name(project_id)) {
            return Err(unknown());
        }
        match self.export_blobs()? {
            Some(blobs) => match blobs.open_read(name).await {
                Ok(reader) => Ok(Box::pin(reader)),
                Err(BlobError::NotFound(_)) => Err(unknown()),
                Err(e) => Err(e.into()),
            },
            None => match tokio::fs::File::open(self.training_dir().join(name)).await {
                Ok(file) => Ok(Box::pin(file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(unknown()),
                Err(e) => Err(e.into()),
            },
        }
    }
}

/// Writes the cursor's chunks to the objects `name` and `latest` at once (each appears only
/// when complete); when the second cannot be finished the first is deleted, so that an
/// unrecorded export leaves nothing behind. Answers the hex SHA-256 of the bytes.
async fn write_objects(
    blobs: &BlobStore,
    name: &str,
    latest: &str,
    cursor: &mut ExportCursor,
) -> Result<String, CurationError> {
    let mut own = blobs.writer(name).await?;
    let mut last = match blobs.writer(latest).await {
        Ok(w) => w,
        Err(e) => {
            own.abort().await;
            return Err(e.into());
        }
    };
    let mut hasher = Sha256::new();
    let written = async {
        while let Some(chunk) = cursor.next_chunk().await? {
            hasher.update(&chunk);
            own.write(&chunk).await?;
            last.write(&chunk).await?;
        }
        Ok::<(), CurationError>(())
    }
    .await;
    if let Err(e) = written {
        own.abort().await;
        last.abort().await;
        return Err(e);
    }
    if let Err(e) = own.finish().await {
        last.abort().await;
        return Err(e.into());
    }
    if let Err(e) = last.finish().await {
        let _ = blobs.delete(name).await;
        return Err(e.into());
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// A temp file name beside `path`, in its directory (created if missing), so that renaming it
/// into place is atomic.
async fn temp_beside(path: &Path) -> Result<PathBuf, CurationError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir).await?;
    Ok(dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("export"),
        uuid::Uuid::new_v4().simple()
    )))
}

/// Writes the cursor's chunks to `path` through a temp file renamed into place; answers the
/// hex SHA-256 of the bytes written.
async fn write_atomically(path: &Path, cursor: &mut ExportCursor) -> Result<String, CurationError> {
    let tmp = temp_beside(path).await?;
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = cursor.next_chunk().await? {
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        tokio::fs::rename(&tmp, path).await?;
        Ok::<String, CurationError>(format!("{:x}", hasher.finalize()))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// Copies `from` to `to` through a temp file renamed into place, so that a reader of `to` sees
/// the old file or the new one, never a part.
async fn copy_atomically(from: &Path, to: &Path) -> Result<(), CurationError> {
    let tmp = temp_beside(to).await?;
    let result = async {
        tokio::fs::copy(from, &tmp).await?;
        tokio::fs::File::open(&tmp).await?.sync_all().await?;
        tokio::fs::rename(&tmp, to).await?;
        Ok::<(), CurationError>(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
