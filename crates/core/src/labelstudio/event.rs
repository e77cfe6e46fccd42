//! Label Studio's webhook events: the actions, and tolerant readers for the objects they carry.
//!
//! Label Studio sends `{"action": ..., <payload>}`; the payload's shape depends on the action and
//! on the version, and a webhook registered without `send_payload` sends only the action. The
//! readers here take what they need from a `serde_json::Value` and ignore everything else, so a
//! new field in a newer Label Studio never breaks ingestion.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The events batchlab acts on; every other action is kept as [`Action::Unknown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// One annotation created (`ANNOTATION_CREATED`).
    AnnotationCreated,
    /// Several annotations created at once (`ANNOTATIONS_CREATED`, newer Label Studio).
    AnnotationsCreated,
    /// An annotation changed, ground-truth star included (`ANNOTATION_UPDATED`).
    AnnotationUpdated,
    /// Annotations deleted, ids only (`ANNOTATIONS_DELETED`; the guide's `ANNOTATION_DELETED`).
    AnnotationsDeleted,
    /// Tasks imported (`TASKS_CREATED`; the guide's `TASK_CREATED`).
    TasksCreated,
    /// Tasks deleted, ids only (`TASKS_DELETED`; the guide's `TASK_DELETED`).
    TasksDeleted,
    /// `PROJECT_CREATED` (organization webhooks only).
    ProjectCreated,
    /// `PROJECT_UPDATED`, e.g. a new labeling config.
    ProjectUpdated,
    /// `PROJECT_DELETED` (organization webhooks only).
    ProjectDeleted,
    /// The Start Training button (sent to the ML backend, which hands it on).
    StartTraining,
    /// Anything else: logged and acknowledged.
    Unknown(String),
}

impl Action {
    /// Reads an action name, accepting the singular aliases the original guide uses.
    pub fn parse(name: &str) -> Action {
        match name {
            "ANNOTATION_CREATED" => Self::AnnotationCreated,
            "ANNOTATIONS_CREATED" => Self::AnnotationsCreated,
            "ANNOTATION_UPDATED" => Self::AnnotationUpdated,
            "ANNOTATIONS_DELETED" | "ANNOTATION_DELETED" => Self::AnnotationsDeleted,
            "TASKS_CREATED" | "TASK_CREATED" => Self::TasksCreated,
            "TASKS_DELETED" | "TASK_DELETED" => Self::TasksDeleted,
            "PROJECT_CREATED" => Self::ProjectCreated,
            "PROJECT_UPDATED" => Self::ProjectUpdated,
            "PROJECT_DELETED" => Self::ProjectDeleted,
            "START_TRAINING" => Self::StartTraining,
            other => Self::Unknown(other.to_string()),
        }
    }

    /// True for the events that can change a project's annotation counts.
    pub fn touches_annotations(&self) -> bool {
        matches!(
            self,
            Self::AnnotationCreated
                | Self::AnnotationsCreated
                | Self::AnnotationUpdated
                | Self::AnnotationsDeleted
                | Self::TasksDeleted
                | Self::ProjectUpdated
        )
    }
}

/// Why a webhook body cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    /// The body is JSON but not an object with a string `action`.
    #[error("the body must be a JSON object with a string \"action\"")]
    NoAction,
}

/// What ingestion needs of a delivery before storing it.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The action as sent.
    pub action: String,
    /// The project it concerns, when the body says.
    pub project_id: Option<i64>,
    /// sha256 of the body, hex: the same delivery twice has the same key.
    pub delivery_key: String,
}

/// Checks a delivery's body and reads its envelope.
pub fn envelope(body: &[u8]) -> Result<(Envelope, Value), WebhookError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::Json(e.to_string()))?;
    let action = value
        .get("action")
        .and_then(Value::as_str)
        .ok_or(WebhookError::NoAction)?
        .to_string();
    let project_id = project_id(&value);
    let delivery_key = Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((
        Envelope {
            action,
            project_id,
            delivery_key,
        },
        value,
    ))
}

/// The project an event concerns: `project` (an object or an id), else the annotation's or the
/// first task's.
pub fn project_id(body: &Value) -> Option<i64> {
    body.get("project")
        .and_then(id_of)
        .or_else(|| {
            first(body.get("annotation"))
                .and_then(|a| a.get("project"))
                .and_then(id_of)
        })
        .or_else(|| {
            first(body.get("tasks"))
                .and_then(|t| t.get("project"))
                .and_then(id_of)
        })
}

/// `v` itself when it is an object, else its first element when it is a list.
fn first(v: Option<&Value>) -> Option<&Value> {
    match v? {
        Value::Array(items) => items.first(),
        other => Some(other),
    }
}

/// An id given as a number, a numeric string, or an object with `id`.
pub fn id_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.split('.').next()?.parse().ok(),
        Value::Object(o) => o.get("id").and_then(id_of),
        _ => None,
    }
}

/// A list payload (`tasks`, `annotations`, `annotation` in bulk events) as a slice; a single
/// object counts as a list of one.
pub fn items<'a>(body: &'a Value, key: &str) -> Vec<&'a Value> {
    match body.get(key) {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => Vec::new(),
    }
}

/// Label Studio's ISO-8601 timestamps (`2026-11-27T20:48:49.480354Z`) as unix microseconds;
/// 0 when absent or unreadable, which loses to any real time.
pub fn timestamp_us(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_str)
        .and_then(parse_timestamp_us)
        .unwrap_or(0)
}

/// Whether two of Label Studio's timestamps name the same instant, however written (`Z` or
/// `+00:00`, with or without microseconds); text that does not parse is compared as text.
pub fn same_instant(a: &str, b: &str) -> bool {
    match (parse_timestamp_us(a), parse_timestamp_us(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// Parses an RFC 3339 timestamp into unix microseconds.
pub fn parse_timestamp_us(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000).ok()
}

/// A project as webhook payloads carry it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectPayload {
    /// Label Studio's id.
    pub id: i64,
    /// Its title.
    pub title: String,
    /// Its labeling config; empty when the payload did not carry it.
    pub label_config: String,
    /// `updated_at` in unix microseconds.
    pub updated_at_us: i64,
    /// `created_at` as sent (an ISO timestamp), when it parses as one: what tells a project
    /// re-created under the same id from the one batchlab knows.
    pub created_at: Option<String>,
}

impl ProjectPayload {
    /// Reads the `project` of an event; `None` when it is only an id or absent.
    pub fn read(body: &Value) -> Option<ProjectPayload> {
        let p = body.get("project").filter(|p| p.is_object())?;
        Some(ProjectPayload {
            id: id_of(p)?,
            title: p
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            label_config: p
                .get("label_config")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            updated_at_us: timestamp_us(p.get("updated_at")),
            created_at: p
                .get("created_at")
                .and_then(Value::as_str)
                .filter(|t| parse_timestamp_us(t).is_some())
                .map(str::to_owned),
        })
    }
}

/// A task as webhook payloads carry it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskPayload {
    /// Label Studio's id.
    pub id: i64,
    /// Its project, when the payload says.
    pub project_id: Option<i64>,
    /// Its `data` object; `None` in deletion events, which carry only ids.
    pub data: Option<Value>,
    /// `updated_at` in unix microseconds.
    pub updated_at_us: i64,
}

impl TaskPayload {
    /// Reads one task object (or a bare id).
    pub fn read(t: &Value) -> Option<TaskPayload> {
        Some(TaskPayload {
            id: id_of(t)?,
            project_id: t.get("project").and_then(id_of),
            data: t.get("data").filter(|d| d.is_object()).cloned(),
            updated_at_us: timestamp_us(t.get("updated_at")),
        })
    }
}

/// An annotation as webhook payloads carry it.
#[derive(Clone, Debug, PartialEq)]
pub struct AnnotationPayload {
    /// Label Studio's id.
    pub id: i64,
    /// Its task.
    pub task_id: Option<i64>,
    /// Its project, when the payload says.
    pub project_id: Option<i64>,
    /// The `result` list (empty when absent).
    pub result: Value,
    /// Starred as ground truth.
    pub ground_truth: bool,
    /// The annotator skipped the task.
    pub was_cancelled: bool,
    /// Seconds spent.
    pub lead_time: Option<f64>,
    /// The annotator's user id.
    pub completed_by: Option<i64>,
    /// ISO creation time as sent.
    pub created_at: Option<String>,
    /// ISO update time as sent.
    pub updated_at: Option<String>,
    /// `updated_at` in unix microseconds (creation time when there is no update time).
    pub updated_at_us: i64,
}

impl AnnotationPayload {
    /// Reads one annotation object; `None` without an id.
    pub fn read(a: &Value) -> Option<AnnotationPayload> {
        let text = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
        let updated_at_us = match timestamp_us(a.get("updated_at")) {
            0 => timestamp_us(a.get("created_at")),
            t => t,
        };
        Some(AnnotationPayload {
            id: id_of(a.get("id")?)?,
            task_id: a.get("task").and_then(id_of),
            project_id: a.get("project").and_then(id_of),
            result: a
                .get("result")
                .filter(|r| r.is_array())
                .cloned()
                .unwrap_or_else(|| Value::Array(Vec::new())),
            ground_truth: a
                .get("ground_truth")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            was_cancelled: a
                .get("was_cancelled")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            lead_time: a.get("lead_time").and_then(Value::as_f64),
            completed_by: a.get("completed_by").and_then(id_of),
            created_at: text("created_at"),
            updated_at: text("updated_at"),
            updated_at_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aliases_map_to_label_studio_names() {
        assert_eq!(Action::parse("TASK_CREATED"), Action::TasksCreated);
        assert_eq!(
            Action::parse("ANNOTATION_DELETED"),
            Action::AnnotationsDeleted
        );
        assert_eq!(
            Action::parse("LABEL_LINK_CREATED"),
            Action::Unknown("LABEL_LINK_CREATED".into())
        );
    }

    #[test]
    fn envelopes_need_an_object_with_an_action() {
        assert!(matches!(envelope(b"{nope"), Err(WebhookError::Json(_))));
        assert!(matches!(envelope(b"[1]"), Err(WebhookError::NoAction)));
        assert!(matches!(
            envelope(br#"{"action": 3}"#),
            Err(WebhookError::NoAction)
        ));
        let (e, _) = envelope(br#"{"action": "START_TRAINING", "project": {"id": 7}}"#).unwrap();
        assert_eq!(
            (e.action.as_str(), e.project_id),
            ("START_TRAINING", Some(7))
        );
        assert_eq!(e.delivery_key.len(), 64);
        let (only_action, _) = envelope(br#"{"action": "PROJECT_UPDATED"}"#).unwrap();
        assert_eq!(only_action.project_id, None);
        assert_ne!(only_action.delivery_key, e.delivery_key);
    }

    #[test]
    fn project_ids_come_from_wherever_the_body_has_them() {
        assert_eq!(project_id(&json!({"annotation": {"project": 3}})), Some(3));
        assert_eq!(
            project_id(&json!({"tasks": [{"id": 1, "project": 4}]})),
            Some(4)
        );
        assert_eq!(project_id(&json!({"project": "7.1716371234"})), Some(7));
    }

    #[test]
    fn timestamps_order_with_and_without_fractions() {
        let whole = parse_timestamp_us("2026-11-27T20:48:49Z").unwrap();
        let later = parse_timestamp_us("2026-11-27T20:48:49.5Z").unwrap();
        assert_eq!(later - whole, 500_000);
        assert_eq!(timestamp_us(Some(&json!("yesterday"))), 0);
    }

    #[test]
    fn annotations_read_with_defaults() {
        let a = AnnotationPayload::read(
            &json!({"id": 5, "task": {"id": 9}, "completed_by": {"id": 2, "email": "x"},
            "created_at": "2026-11-27T20:48:49Z"}),
        )
        .unwrap();
        assert_eq!(
            (a.task_id, a.completed_by, a.ground_truth),
            (Some(9), Some(2), false)
        );
        assert_eq!(a.result, json!([]));
        assert_eq!(
            a.updated_at_us,
            parse_timestamp_us("2026-11-27T20:48:49Z").unwrap()
        );
        assert!(AnnotationPayload::read(&json!({"result": []})).is_none());
    }
}
