//! A batch's results into Label Studio: each output line joined with its input line by
//! `custom_id` becomes a task (the request's `body.metadata` plus `custom_id`) whose prediction
//! is the model's answer mapped onto the project's labeling config.
//!
//! The answer is a JSON object keyed by control name (code fences and text around it are
//! tolerated), or plain text when the config has a single Choices or TextArea control. Values the
//! config does not allow are dropped and counted; a line whose request failed still becomes a
//! task, without a prediction, so nothing the batch ran is lost.
//!
//! # Running an import again
//!
//! An import that failed half-way (Label Studio refused or dropped chunk 3 of 10, batchlab
//! stopped) is run again with the same call, and creates each line's task once:
//!
//! - Every line sent is recorded in the store (`ls_import_lines`, keyed by project, batch and
//!   `custom_id`): marked sent, and committed, before the chunk's `POST .../import`; given its
//!   task id once Label Studio answered. A later run skips recorded lines
//!   ([`ImportReport::already_imported`]) and sends nothing when every line is recorded.
//! - A line marked sent without a task id is the ambiguous case: the request may have created
//!   its task and lost the answer (timeout, connection reset), or not. Every task carries
//!   `meta.batchlab_batch_id`, so before its first chunk a run looks such lines up in Label
//!   Studio by `data.custom_id` (`GET /api/tasks/` with a Data Manager `in_list` filter, a
//!   bounded group of ids per request, paged) and adopts the tasks whose meta names this batch
//!   ([`ImportReport::recovered`]): their predictions are stored and their ids recorded as if
//!   the answer had come. Lines it does not find are sent again.
//!
//! Not covered: two imports of the same batch into the same project at the same time (both may
//! send a line), and a task deleted in Label Studio after its import (it stays recorded and is
//! not created again).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Curation, CurationError};
use crate::blob::BlobStore;
use crate::labelstudio::client::{LabelStudioClient, LabelStudioError};
use crate::labelstudio::config::{ControlKind, LabelConfig};
use crate::labelstudio::region::Region;
use crate::prediction_key::{cache_key, IMPORTED};
use crate::store::{BatchRecord, CachedPrediction, PredictionRow};

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ImportReport {
    /// The Label Studio project.
    pub project_id: i64,
    /// The batch whose results were imported.
    pub batch_id: String,
    /// The `model_version` the predictions carry.
    pub model_version: String,
    /// Tasks this run created in Label Studio.
    pub tasks: u64,
    /// Predictions created with them.
    pub predictions: u64,
    /// Lines whose task an earlier run created (recorded, or found in Label Studio): not sent
    /// again.
    pub already_imported: u64,
    /// Of those, tasks found in Label Studio by `custom_id` because the run that created them
    /// never saw Label Studio's answer.
    pub recovered: u64,
    /// Lines left out, and predictions of this run's tasks left out, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Answer values the labeling config does not allow, dropped from predictions.
    pub values_dropped: u64,
    /// Tasks whose data lacks a field the labeling config shows.
    pub tasks_missing_data: u64,
    /// Label Studio's ids of every imported line's task, in output-file order, those of earlier
    /// runs included.
    pub task_ids: Vec<i64>,
}

impl ImportReport {
    fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }
}

/// The model's answer mapped onto a config: the regions, and how many values were dropped.
pub fn answer_regions(
    config: &LabelConfig,
    content: &str,
) -> Result<(Vec<Region>, u64), &'static str> {
    let single = match config.controls.as_slice() {
        [only]
            if matches!(
                only.kind,
                ControlKind::Choices { .. } | ControlKind::TextArea
            ) =>
        {
            Some(only)
        }
        _ => None,
    };
    let Some(object) = json_object(content) else {
        let control = single.ok_or("unparseable_answer")?;
        return match control.parse_answer(&Value::String(content.trim().to_string())) {
            Ok(v) => Ok((control.regions(&v, None), 0)),
            Err(_) => Ok((Vec::new(), 1)),
        };
    };
    // Regions in the config's order, whatever the answer's key order.
    let mut regions = Vec::new();
    let mut dropped = object
        .keys()
        .filter(|key| config.control(key).is_none())
        .count() as u64;
    for control in &config.controls {
        let Some(value) = object.get(&control.name) else {
            continue;
        };
        match control.parse_answer(value) {
            Ok(v) => regions.extend(control.regions(&v, None)),
            Err(_) => dropped += 1,
        }
    }
    Ok((regions, dropped))
}

/// The JSON object in a model's answer: the whole text, or the span from the first `{` to the
/// last `}` (models wrap JSON in code fences and sentences).
fn json_object(content: &str) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(o)) = serde_json::from_str(content.trim()) {
        return Some(o);
    }
    let (start, end) = (content.find('{')?, content.rfind('}')?);
    match serde_json::from_str(content.get(start..=end)?) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// The assistant's text of a successful chat (or text) completion output line.
fn answer_text(line: &Value) -> Option<&str> {
    let response = line.get("response").filter(|r| !r.is_null())?;
    if response.get("status_code").and_then(Value::as_u64) != Some(200) {
        return None;
    }
    let choice = response.get("body")?.get("choices")?.get(0)?;
    choice
        .get("message")
        .and_then(|m| m.get("content"))
        .or_else(|| choice.get("text"))?
        .as_str()
}

/// Reads a JSONL blob line by line.
async fn lines(
    blobs: &BlobStore,
    id: &str,
) -> Result<tokio::io::Lines<BufReader<crate::blob::BlobReader>>, CurationError> {
    let file = blobs
        .open_read(id)
        .await
        .map_err(|e| CurationError::Invalid(format!("file {id}: {e}")))?;
    Ok(BufReader::new(file).lines())
}

/// The task meta key naming the batch a task was imported from.
const BATCH_META_KEY: &str = "batchlab_batch_id";

/// A line of the output file on its way into Label Studio.
enum Slot {
    /// An earlier run created and recorded its task.
    Recorded(i64),
    /// A task to create, or (`found`) one an earlier run created without seeing the answer.
    Line {
        custom_id: String,
        data: Value,
        regions: Option<Vec<Region>>,
        found: Option<i64>,
    },
}

/// What the import works with, the same for every chunk.
struct Target<'a> {
    client: &'a LabelStudioClient,
    project_id: i64,
    batch_id: &'a str,
    label_config: &'a str,
    model_version: &'a str,
}

impl Curation {
    /// Imports a finished batch's output file into a Label Studio project, `chunk` tasks per
    /// request, and keeps the predictions for accuracy. Lines an earlier run imported are not
    /// sent again (see the module's header).
    pub async fn import_batch(
        &self,
        client: &LabelStudioClient,
        blobs: &BlobStore,
        project_id: i64,
        batch: &BatchRecord,
        output_file_id: &str,
        chunk: usize,
    ) -> Result<ImportReport, CurationError> {
        let project = client.get_project(project_id).await?;
        let config =
            LabelConfig::parse(&project.label_config).map_err(|e| CurationError::LabelConfig {
                project: project_id,
                reason: e.to_string(),
            })?;
        self.store
            .ensure_project(
                self.instance.as_str(),
                project_id,
                &project.title,
                &project.label_config,
            )
            .await?;

        // custom_id → the request's metadata (task data); small next to the output.
        let mut inputs: HashMap<String, Map<String, Value>> = HashMap::new();
        let mut input = lines(blobs, &batch.input_file_id).await?;
        while let Some(line) = input.next_line().await? {
            let Ok(request) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let Some(custom_id) = request.get("custom_id").and_then(Value::as_str) else {
                continue;
            };
            let metadata = request
                .pointer("/body/metadata")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            inputs.insert(custom_id.to_string(), metadata);
        }

        // What earlier runs left: lines with their task, lines sent without an answer seen.
        let mut recorded: HashMap<String, i64> = HashMap::new();
        let mut unsure: Vec<String> = Vec::new();
        for line in self
            .store
            .imported_lines(self.instance.as_str(), project_id, &batch.id)
            .await?
        {
            match line.task_id {
                Some(task) => {
                    recorded.insert(line.custom_id, task);
                }
                None => unsure.push(line.custom_id),
            }
        }
        let found = if unsure.is_empty() {
            HashMap::new()
        } else {
            find_sent_tasks(client, project_id, &batch.id, &unsure).await?
        };

        let model_version = format!("{}:{}", batch.model.as_deref().unwrap_or("batch"), batch.id);
        let target = Target {
            client,
            project_id,
            batch_id: &batch.id,
            label_config: &project.label_config,
            model_version: &model_version,
        };
        let fields = config.data_fields();
        let mut report = ImportReport {
            project_id,
            batch_id: batch.id.clone(),
            model_version: model_version.clone(),
            ..Default::default()
        };
        // The counts of found tasks' lines are not this run's.
        let mut earlier = ImportReport::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut pending: Vec<Slot> = Vec::new();
        let mut output = lines(blobs, output_file_id).await?;
        while let Some(line) = output.next_line().await? {
            if line.trim().is_empty() {
                continue;
            }
            let Ok(line) = serde_json::from_str::<Value>(&line) else {
                report.skip("unreadable_output_line");
                continue;
            };
            let custom_id = line
                .get("custom_id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(metadata) = inputs.get(custom_id) else {
                report.skip("no_input_line");
                continue;
            };
            if custom_id.contains('\0') {
                // The store cannot record it, so a later run could not tell it was imported.
                report.skip("custom_id_with_nul");
                continue;
            }
            if !seen.insert(custom_id.to_string()) {
                // One task per custom_id: a second line with it cannot be told apart.
                report.skip("duplicate_custom_id");
                continue;
            }
            if let Some(&task) = recorded.get(custom_id) {
                report.already_imported += 1;
                pending.push(Slot::Recorded(task));
            } else {
                let found = found.get(custom_id).copied();
                let counts = if found.is_some() {
                    &mut earlier
                } else {
                    &mut report
                };
                let (data, regions) = task_of(&config, &fields, metadata, custom_id, &line, counts);
                pending.push(Slot::Line {
                    custom_id: custom_id.to_string(),
                    data,
                    regions,
                    found,
                });
            }
            if pending.len() >= chunk.max(1) {
                self.send_chunk(&target, &mut pending, &mut report).await?;
            }
        }
        if !pending.is_empty() {
            self.send_chunk(&target, &mut pending, &mut report).await?;
        }
        tracing::info!(project_id, batch_id = %batch.id, tasks = report.tasks, predictions = report.predictions,
            already_imported = report.already_imported, recovered = report.recovered,
            values_dropped = report.values_dropped, "batch results imported into Label Studio");
        Ok(report)
    }

    /// Creates the tasks of the lines in `pending` that have none (marking them sent first),
    /// then stores the predictions of every line and records its task.
    async fn send_chunk(
        &self,
        target: &Target<'_>,
        pending: &mut Vec<Slot>,
        report: &mut ImportReport,
    ) -> Result<(), CurationError> {
        let (project_id, batch_id) = (target.project_id, target.batch_id);
        let mut sent: Vec<&str> = Vec::new();
        let mut tasks: Vec<Value> = Vec::new();
        for slot in pending.iter() {
            if let Slot::Line {
                custom_id,
                data,
                regions,
                found: None,
            } = slot
            {
                sent.push(custom_id);
                let meta = json!({ BATCH_META_KEY: batch_id });
                tasks.push(match regions {
                    Some(r) => json!({"data": data, "meta": meta,
                        "predictions": [{"model_version": target.model_version, "result": r}]}),
                    None => json!({"data": data, "meta": meta}),
                });
            }
        }
        let mut created = Vec::new();
        if !tasks.is_empty() {
            // Committed before the request: a run after a lost answer looks these lines up.
            self.store
                .mark_import_sent(self.instance.as_str(), project_id, batch_id, &sent)
                .await?;
            let result = target.client.import_tasks(project_id, &tasks).await?;
            if result.task_ids.len() != tasks.len() {
                return Err(CurationError::LabelStudio(LabelStudioError::Decode(
                    format!(
                        "project {project_id}: {} tasks created for the {} sent",
                        result.task_ids.len(),
                        tasks.len()
                    ),
                )));
            }
            report.tasks += result.task_count;
            report.predictions += result.prediction_count;
            created = result.task_ids;
        }
        let mut created = created.into_iter();
        let mut predictions = Vec::new();
        let mut cached = Vec::new();
        let mut record: Vec<(&str, i64)> = Vec::new();
        for slot in pending.iter() {
            let (custom_id, data, regions, task_id) = match slot {
                Slot::Recorded(task) => {
                    report.task_ids.push(*task);
                    continue;
                }
                Slot::Line {
                    custom_id,
                    data,
                    regions,
                    found,
                } => {
                    let task = match found {
                        Some(task) => {
                            report.already_imported += 1;
                            report.recovered += 1;
                            *task
                        }
                        // As many ids as tasks sent (checked above).
                        None => created.next().unwrap_or_default(),
                    };
                    (custom_id, data, regions, task)
                }
            };
            report.task_ids.push(task_id);
            record.push((custom_id, task_id));
            if let Some(r) = regions {
                // The ML backend answers this task from here instead of predicting it again.
                cached.push(CachedPrediction {
                    key: cache_key(IMPORTED, target.label_config, data),
                    model_version: target.model_version.to_string(),
                    prediction: json!({"result": r, "score": null}).to_string(),
                });
                predictions.push(PredictionRow {
                    project_id,
                    task_id,
                    model_version: target.model_version.to_string(),
                    source: "import".into(),
                    score: None,
                    result: serde_json::to_string(r).unwrap_or_else(|_| "[]".into()),
                });
            }
        }
        if !record.is_empty() {
            self.store
                .upsert_predictions(self.instance.as_str(), &predictions)
                .await?;
            self.store.cache_predictions(&cached).await?;
            // Last: a line recorded is never looked at again, so its predictions come first.
            self.store
                .record_imported_tasks(self.instance.as_str(), project_id, batch_id, &record)
                .await?;
        }
        pending.clear();
        Ok(())
    }
}

/// A line's task data (the request's metadata plus `custom_id`) and prediction regions, counting
/// what was left out in `report`.
fn task_of(
    config: &LabelConfig,
    fields: &[String],
    metadata: &Map<String, Value>,
    custom_id: &str,
    line: &Value,
    report: &mut ImportReport,
) -> (Value, Option<Vec<Region>>) {
    let mut data = metadata.clone();
    data.insert("custom_id".into(), json!(custom_id));
    if fields.iter().any(|f| !data.contains_key(f)) {
        report.tasks_missing_data += 1;
    }
    let regions = match answer_text(line) {
        None => {
            report.skip("request_failed");
            None
        }
        Some(text) => match answer_regions(config, text) {
            Err(reason) => {
                report.skip(reason);
                None
            }
            Ok((regions, dropped)) => {
                report.values_dropped += dropped;
                if regions.is_empty() {
                    report.skip("no_usable_value");
                    None
                } else {
                    Some(regions)
                }
            }
        },
    };
    (Value::Object(data), regions)
}

/// The tasks an earlier run sent for `custom_ids` of `batch_id` and may have created without
/// seeing the answer: those of the project with one of these `data.custom_id`s whose meta
/// names the batch (a task of another batch with the same custom_id is not this line's), the
/// lowest id when there are several.
async fn find_sent_tasks(
    client: &LabelStudioClient,
    project_id: i64,
    batch_id: &str,
    custom_ids: &[String],
) -> Result<HashMap<String, i64>, CurationError> {
    let wanted: HashSet<&str> = custom_ids.iter().map(String::as_str).collect();
    let mut found: HashMap<String, i64> = HashMap::new();
    for task in client
        .find_tasks_by_data(project_id, "custom_id", custom_ids)
        .await?
    {
        let batch = task.get("meta").and_then(|m| m.get(BATCH_META_KEY));
        let custom_id = task.pointer("/data/custom_id").and_then(Value::as_str);
        let id = task.get("id").and_then(Value::as_i64);
        if let (Some(id), Some(custom_id)) = (id, custom_id) {
            if batch.and_then(Value::as_str) == Some(batch_id) && wanted.contains(custom_id) {
                let entry = found.entry(custom_id.to_string()).or_insert(id);
                *entry = (*entry).min(id);
            }
        }
    }
    tracing::info!(
        project_id,
        batch_id,
        sent = custom_ids.len(),
        found = found.len(),
        "lines an earlier import sent without seeing the answer, looked up in Label Studio"
    );
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANDIDATE: &str =
        include_str!("../../../../config/label-configs/candidate-evaluation.xml");

    #[test]
    fn json_answers_map_onto_the_config_and_strays_are_counted() {
        let config = LabelConfig::parse(CANDIDATE).unwrap();
        let text = "Here you go:\n```json\n{\"recommendation\": \"Yes\", \"trajectory_rating\": \"stellar\", \"mood\": \"ok\", \"reasoning\": \"Solid.\"}\n```";
        let (regions, dropped) = answer_regions(&config, text).unwrap();
        let names: Vec<&str> = regions.iter().map(|r| r.from_name.as_str()).collect();
        assert_eq!(names, ["recommendation", "reasoning"]);
        assert_eq!(regions[0].value, json!({"choices": ["yes"]}));
        assert_eq!(
            dropped, 2,
            "a value outside the choices and a key outside the config"
        );
        assert_eq!(
            answer_regions(&config, "strong yes"),
            Err("unparseable_answer")
        );
    }

    #[test]
    fn plain_text_answers_fit_a_single_control() {
        let config = LabelConfig::parse(r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="spam"/><Choice value="ham"/></Choices></View>"#).unwrap();
        let (regions, _) = answer_regions(&config, " Spam.\n").unwrap();
        assert_eq!(regions[0].value, json!({"choices": ["spam"]}));
        assert_eq!(answer_regions(&config, "eggs").unwrap(), (vec![], 1));
    }
}
