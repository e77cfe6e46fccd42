//! A batch's results into Label Studio: each output line joined with its input line by
//! `custom_id` becomes a task (the request's `body.metadata` plus `custom_id`) whose prediction
//! is the model's answer mapped onto the project's labeling config.
//!
//! The answer is a JSON object keyed by control name (code fences and text around it are
//! tolerated), or plain text when the config has a single Choices or TextArea control. Values the
//! config does not allow are dropped and counted; a line whose request failed still becomes a
//! task, without a prediction, so nothing the batch ran is lost.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Curation, CurationError};
use crate::blob::BlobStore;
use crate::labelstudio::client::LabelStudioClient;
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
    /// Tasks created in Label Studio.
    pub tasks: u64,
    /// Predictions created with them.
    pub predictions: u64,
    /// Lines or predictions left out, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Answer values the labeling config does not allow, dropped from predictions.
    pub values_dropped: u64,
    /// Tasks whose data lacks a field the labeling config shows.
    pub tasks_missing_data: u64,
    /// Label Studio's ids of the created tasks, in output-file order.
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
) -> Result<tokio::io::Lines<BufReader<tokio::fs::File>>, CurationError> {
    let file = blobs
        .open_read(id)
        .await
        .map_err(|e| CurationError::Invalid(format!("file {id}: {e}")))?;
    Ok(BufReader::new(file).lines())
}

impl Curation {
    /// Imports a finished batch's output file into a Label Studio project, `chunk` tasks per
    /// request, and keeps the predictions for accuracy.
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
            .ensure_project(project_id, &project.title, &project.label_config)
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

        let model_version = format!("{}:{}", batch.model.as_deref().unwrap_or("batch"), batch.id);
        let fields = config.data_fields();
        let mut report = ImportReport {
            project_id,
            batch_id: batch.id.clone(),
            model_version: model_version.clone(),
            ..Default::default()
        };
        let mut pending: Vec<(Value, Option<Vec<Region>>)> = Vec::new();
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
            let mut data = metadata.clone();
            data.insert("custom_id".into(), json!(custom_id));
            if fields.iter().any(|f| !data.contains_key(f)) {
                report.tasks_missing_data += 1;
            }
            let regions = match answer_text(&line) {
                None => {
                    report.skip("request_failed");
                    None
                }
                Some(text) => match answer_regions(&config, text) {
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
            pending.push((Value::Object(data), regions));
            if pending.len() >= chunk.max(1) {
                self.send_chunk(
                    client,
                    project_id,
                    &project.label_config,
                    &model_version,
                    &mut pending,
                    &mut report,
                )
                .await?;
            }
        }
        if !pending.is_empty() {
            self.send_chunk(
                client,
                project_id,
                &project.label_config,
                &model_version,
                &mut pending,
                &mut report,
            )
            .await?;
        }
        tracing::info!(project_id, batch_id = %batch.id, tasks = report.tasks, predictions = report.predictions,
            values_dropped = report.values_dropped, "batch results imported into Label Studio");
        Ok(report)
    }

    async fn send_chunk(
        &self,
        client: &LabelStudioClient,
        project_id: i64,
        label_config: &str,
        model_version: &str,
        pending: &mut Vec<(Value, Option<Vec<Region>>)>,
        report: &mut ImportReport,
    ) -> Result<(), CurationError> {
        let tasks: Vec<Value> = pending
            .iter()
            .map(|(data, regions)| match regions {
                Some(r) => json!({"data": data, "predictions": [{"model_version": model_version, "result": r}]}),
                None => json!({"data": data}),
            })
            .collect();
        let result = client.import_tasks(project_id, &tasks).await?;
        let mut predictions = Vec::new();
        let mut cached = Vec::new();
        for ((data, regions), task_id) in pending.iter().zip(&result.task_ids) {
            if let Some(r) = regions {
                // The ML backend answers this task from here instead of predicting it again.
                cached.push(CachedPrediction {
                    key: cache_key(IMPORTED, label_config, data),
                    model_version: model_version.to_string(),
                    prediction: json!({"result": r, "score": null}).to_string(),
                });
                predictions.push(PredictionRow {
                    project_id,
                    task_id: *task_id,
                    model_version: model_version.to_string(),
                    source: "import".into(),
                    score: None,
                    result: serde_json::to_string(r).unwrap_or_else(|_| "[]".into()),
                });
            }
        }
        self.store.upsert_predictions(&predictions).await?;
        self.store.cache_predictions(&cached).await?;
        report.tasks += result.task_count;
        report.predictions += result.prediction_count;
        report.task_ids.extend(&result.task_ids);
        pending.clear();
        Ok(())
    }
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
