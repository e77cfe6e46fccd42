//! Curation against SQLite and PostgreSQL alike: every webhook request a real Label Studio 1.23
//! sent, replayed in order, twice, and backwards; validation, milestones, exports, accuracy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use batchlab_core::config::CurationConfig;
use batchlab_core::curation::export::{ExportFilter, ExportFormat};
use batchlab_core::curation::{Curation, CurationError};
use batchlab_core::labelstudio::instance::Instance;
use batchlab_core::store::Store;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/label-studio-1.23"
);

/// The bodies Label Studio posted to the API's webhook, in the order it sent them, and the
/// START_TRAINING it sent to the ML backend (which hands it on).
fn deliveries() -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.contains("-webhook-") && (!n.contains("-ml-") || n.contains("START_TRAINING"))
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 11, "{names:?}");
    names.iter().map(|p| body_of(p)).collect()
}

fn body_of(path: &Path) -> Vec<u8> {
    let request: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    serde_json::to_vec(&request["body"]).unwrap()
}

fn curation(store: &Store, dir: &Path, milestones: Vec<u64>) -> Curation {
    Curation::new(
        store.clone(),
        CurationConfig {
            training_dir: dir.to_path_buf(),
            milestones,
            accuracy_every: 2,
            ..Default::default()
        },
        Instance::default(),
    )
}

async fn drain(c: &Curation) {
    while c.process_pending().await.unwrap() > 0 {}
}

async fn export(c: &Curation, format: ExportFormat, filter: ExportFilter) -> String {
    let mut cursor = c.export_cursor(1, format, filter).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = cursor.next_chunk().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    String::from_utf8(out).unwrap()
}

/// The state the fixture sequence leaves: tasks 1–4 (5 deleted); annotations 1 (updated to
/// "no"), 2 (ground truth) and 4 (3 deleted).
async fn assert_final_state(c: &Curation) {
    let status = c.status(1).await.unwrap();
    assert_eq!(status.title, "Candidate Evaluation");
    let counts = status.counts;
    assert_eq!(
        (
            counts.tasks,
            counts.annotations,
            counts.valid,
            counts.ground_truth
        ),
        (4, 3, 3, 1),
        "{counts:?}"
    );
    assert_eq!(counts.invalid, 0);
    let exported: Value =
        serde_json::from_str(&export(c, ExportFormat::Json, ExportFilter::default()).await)
            .unwrap();
    let tasks = exported.as_array().unwrap();
    assert_eq!(
        tasks
            .iter()
            .map(|t| t["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert_eq!(
        tasks[0]["annotations"][0]["result"][0]["value"]["choices"],
        json!(["no"]),
        "the newer update wins"
    );
    assert_eq!(tasks[1]["annotations"][0]["ground_truth"], json!(true));
    assert_eq!(tasks[0]["data"]["name"], json!("Ada Lovelace"));
    // Replays, duplicates and deliveries out of order contradict nothing.
    assert_eq!(status.conflicts.count, 0, "{:?}", status.conflicts.latest);
}

async fn replay_in_order_twice(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![2, 3, 100]);
    for body in deliveries() {
        assert_eq!(c.ingest(&body).await.unwrap().status, "accepted");
        assert_eq!(c.ingest(&body).await.unwrap().status, "duplicate");
    }
    drain(&c).await;
    assert_final_state(&c).await;
    assert_eq!(store.webhook_event_counts(None).await.unwrap().received, 11);
    assert_eq!(store.webhook_event_counts(None).await.unwrap().pending, 0);

    // Milestones 2 and 3 were crossed once each; START_TRAINING exported on demand.
    let status = c.status(1).await.unwrap();
    assert_eq!(status.milestones_reached, vec![2, 3]);
    let reasons: Vec<&str> = status.exports.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons.iter().filter(|r| **r == "milestone").count(), 2);
    assert_eq!(
        reasons.iter().filter(|r| **r == "start_training").count(),
        1
    );
    let file: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("project_1_export.json")).unwrap())
            .unwrap();
    assert_eq!(file.as_array().unwrap().len(), 3);
    // Processing again changes nothing, and writes no milestone twice.
    c.check_milestones(1).await.unwrap();
    assert_eq!(c.status(1).await.unwrap().exports.len(), 3);
    // A claim whose export was never written is not shown, and is taken over once stale.
    assert!(store
        .claim_milestone("default", 1, 7, "p", 600)
        .await
        .unwrap());
    assert!(
        !store
            .claim_milestone("default", 1, 7, "p", 600)
            .await
            .unwrap(),
        "claimed once"
    );
    assert_eq!(
        c.status(1).await.unwrap().exports.len(),
        3,
        "unwritten claims are not listed"
    );
    assert!(
        store
            .claim_milestone("default", 1, 7, "p", -1)
            .await
            .unwrap(),
        "a stale claim is taken over"
    );
    // An accuracy record was kept at checkpoint 2 (accuracy_every = 2).
    assert_eq!(
        status
            .accuracy_history
            .iter()
            .map(|h| h["checkpoint"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [2]
    );
}

async fn replay_backwards(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    for body in deliveries().iter().rev() {
        c.ingest(body).await.unwrap();
    }
    drain(&c).await;
    assert_final_state(&c).await;
}

async fn replay_one_by_one_with_late_duplicates(store: Store) {
    // Each event processed as it arrives, then every delivery again, then backwards once more.
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    let all = deliveries();
    for body in &all {
        c.ingest(body).await.unwrap();
        drain(&c).await;
    }
    for body in all.iter().rev() {
        assert_eq!(c.ingest(body).await.unwrap().status, "duplicate");
    }
    drain(&c).await;
    assert_final_state(&c).await;
}

async fn invalid_annotations_are_kept_flagged_and_left_out(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    let mut event: Value = serde_json::from_slice(&body_of(
        &Path::new(FIXTURES).join("22-webhook-ANNOTATION_CREATED.json"),
    ))
    .unwrap();
    event["annotation"]["result"][0]["value"]["choices"] = json!(["maybe_not"]);
    c.ingest(&serde_json::to_vec(&event).unwrap())
        .await
        .unwrap();
    c.ingest(br#"{"action": "LABEL_LINK_CREATED", "label_link": {"id": 1}}"#)
        .await
        .unwrap();
    c.ingest(br#"{"action": "PROJECT_UPDATED"}"#).await.unwrap();
    drain(&c).await;
    let status = c.status(1).await.unwrap();
    assert_eq!(
        (
            status.counts.annotations,
            status.counts.valid,
            status.counts.invalid
        ),
        (1, 0, 1)
    );
    let reason = status.invalid_annotations[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("recommendation") && reason.contains("maybe_not"),
        "{reason}"
    );
    assert_eq!(
        export(&c, ExportFormat::Json, ExportFilter::default())
            .await
            .trim(),
        "[]"
    );
    let with_invalid = export(
        &c,
        ExportFormat::Json,
        ExportFilter {
            include_invalid: true,
            ..Default::default()
        },
    )
    .await;
    let with_invalid: Value = serde_json::from_str(&with_invalid).unwrap();
    assert_eq!(with_invalid[0]["annotations"][0]["valid"], json!(false));
    assert_eq!(
        store.webhook_event_counts(None).await.unwrap().pending,
        0,
        "unknown and payload-less events are acknowledged"
    );
}

async fn accuracy_and_chat_export(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    for body in deliveries() {
        c.ingest(&body).await.unwrap();
    }
    drain(&c).await;
    // Ground truth is task 2 only: maybe / good / good / "annotator reasoning 1".
    let preds = vec![
        (
            2,
            json!({"recommendation": "Maybe", "trajectory_rating": "good", "pedigree_rating": "strong"}),
        ),
        (1, json!({"recommendation": "no"})),
    ];
    let preds: Vec<_> = preds
        .into_iter()
        .map(|(t, p)| (t, p.as_object().unwrap().clone()))
        .collect();
    let report = c.accuracy_of(1, &preds).await.unwrap();
    assert_eq!(report.counts.tasks_compared, 1);
    assert_eq!(report.counts.skipped_no_ground_truth, 1);
    assert_eq!(report.overall_accuracy, Some(2.0 / 3.0));
    assert_eq!(report.field_accuracy["pedigree_rating"], Some(0.0));
    assert_eq!(report.field_accuracy["recommendation"], Some(1.0));
    assert!(c.accuracy_of(99, &preds).await.is_err(), "unknown project");

    let chat = export(&c, ExportFormat::JsonlChat, ExportFilter::default()).await;
    let lines: Vec<Value> = chat
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let messages = lines[1]["messages"].as_array().unwrap();
    assert_eq!(
        messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["system", "user", "assistant"]
    );
    assert!(messages[1]["content"]
        .as_str()
        .unwrap()
        .contains("Grace Hopper"));
    let answer: Value = serde_json::from_str(messages[2]["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        answer,
        json!({"recommendation": "maybe", "trajectory_rating": "good", "pedigree_rating": "good",
        "reasoning": "annotator reasoning 1"})
    );
    let gt_only = export(
        &c,
        ExportFormat::JsonlChat,
        ExportFilter {
            ground_truth_only: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(gt_only.lines().count(), 1);
    let future = export(
        &c,
        ExportFormat::Json,
        ExportFilter {
            since_us: Some(i64::MAX),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(future.trim(), "[]");
}

/// Runs processing passes until `done` holds, failing after `limit` (a pass may leave an event
/// waiting for its retry time, so this polls instead of draining once).
async fn process_until<F, Fut>(c: &Curation, limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        c.process_pending().await.unwrap();
        if done().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_training_is_kept_until_its_export_is_written(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    // A file where the training directory belongs: no export can be written there.
    let training = dir.path().join("training");
    std::fs::write(&training, b"not a directory").unwrap();
    let c = curation(&store, &training, vec![]);
    for body in deliveries() {
        c.ingest(&body).await.unwrap();
    }
    drain(&c).await;
    let counts = store
        .webhook_event_counts(Some(("default", 1)))
        .await
        .unwrap();
    assert_eq!(
        (counts.pending, counts.failed),
        (1, 0),
        "START_TRAINING stays pending while its export cannot be written: {counts:?}"
    );
    assert!(c.status(1).await.unwrap().exports.is_empty());

    // The directory becomes writable: a later pass writes the export and only then marks the
    // event processed.
    std::fs::remove_file(&training).unwrap();
    process_until(
        &c,
        Duration::from_secs(30),
        "the START_TRAINING export was retried",
        || async {
            store
                .webhook_event_counts(Some(("default", 1)))
                .await
                .unwrap()
                .pending
                == 0
        },
    )
    .await;
    let status = c.status(1).await.unwrap();
    assert_eq!(
        status.webhook_events.failed, 0,
        "{:?}",
        status.failed_events
    );
    let trainings = |s: &batchlab_core::curation::ProjectStatus| {
        s.exports
            .iter()
            .filter(|e| e.reason == "start_training")
            .count()
    };
    assert_eq!(trainings(&status), 1);
    let record = status
        .exports
        .iter()
        .find(|e| e.reason == "start_training")
        .unwrap();
    assert!(
        record.path.contains("project_1_start_training_"),
        "{}",
        record.path
    );
    let own = std::fs::read(&record.path).unwrap();
    assert_eq!(
        record.sha256.as_deref(),
        Some(format!("{:x}", Sha256::digest(&own)).as_str())
    );
    let file: Value =
        serde_json::from_slice(&std::fs::read(training.join("project_1_export.json")).unwrap())
            .unwrap();
    assert_eq!(file.as_array().unwrap().len(), 3);
    // Done once: more passes and a duplicate delivery export nothing again.
    c.ingest(deliveries().last().unwrap()).await.unwrap();
    drain(&c).await;
    assert_eq!(trainings(&c.status(1).await.unwrap()), 1);
}

const SIMPLE_CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;

/// An ANNOTATION_CREATED of a new task `id` (annotation `id` too) in `project`.
fn annotation_created(project: i64, id: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"action": "ANNOTATION_CREATED", "project": {"id": project},
        "task": {"id": id, "project": project, "data": {"text": format!("task {id}")}},
        "annotation": {"id": id, "task": id, "project": project, "was_cancelled": false, "ground_truth": false,
            "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": ["a"]}}]}}))
    .unwrap()
}

/// Annotations in an export file.
fn annotations_in(file: &[u8]) -> usize {
    let tasks: Value = serde_json::from_slice(file).unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["annotations"].as_array().unwrap().len())
        .sum()
}

async fn milestone_exports_are_snapshots(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![100, 150]);
    let project = json!({"action": "PROJECT_CREATED", "project": {"id": 5, "title": "p", "label_config": SIMPLE_CONFIG}});
    c.ingest(&serde_json::to_vec(&project).unwrap())
        .await
        .unwrap();
    for id in 1..=100 {
        c.ingest(&annotation_created(5, id)).await.unwrap();
    }
    drain(&c).await;
    for id in 101..=150 {
        c.ingest(&annotation_created(5, id)).await.unwrap();
    }
    drain(&c).await;

    let status = c.status(5).await.unwrap();
    assert_eq!(status.milestones_reached, vec![100, 150]);
    for (milestone, annotations) in [(100, 100), (150, 150)] {
        let record = status
            .exports
            .iter()
            .find(|e| e.milestone == Some(milestone))
            .unwrap();
        assert_eq!(record.annotations, annotations as i64);
        let file = std::fs::read(&record.path).unwrap();
        assert_eq!(
            annotations_in(&file),
            annotations,
            "the file recorded for milestone {milestone} ({}) holds its snapshot",
            record.path
        );
        assert_eq!(
            record.path,
            dir.path()
                .join(format!("project_5_milestone_{milestone}.json"))
                .display()
                .to_string()
        );
        assert_eq!(
            record.sha256.as_deref(),
            Some(format!("{:x}", Sha256::digest(&file)).as_str()),
            "the recorded checksum is the file's"
        );
    }
    let latest = std::fs::read(dir.path().join("project_5_export.json")).unwrap();
    assert_eq!(
        annotations_in(&latest),
        150,
        "the latest export is the newest"
    );
}

/// While events keep coming, a project's milestones are checked at most once a second (each
/// check counts all its annotations): a pass right after a check leaves the milestone for
/// later, and the next pass that finds no event checks it.
async fn milestone_checks_wait_while_events_keep_coming(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![3]);
    let project = json!({"action": "PROJECT_CREATED", "project": {"id": 5, "title": "p", "label_config": SIMPLE_CONFIG}});
    c.ingest(&serde_json::to_vec(&project).unwrap())
        .await
        .unwrap();
    c.ingest(&annotation_created(5, 1)).await.unwrap();
    assert_eq!(c.process_pending().await.unwrap(), 2);
    for id in 2..=3 {
        c.ingest(&annotation_created(5, id)).await.unwrap();
    }
    assert_eq!(c.process_pending().await.unwrap(), 2);
    let status = c.status(5).await.unwrap();
    assert_eq!(status.counts.valid, 3);
    assert!(
        status.milestones_reached.is_empty(),
        "checked less than a second ago: {:?}",
        status.milestones_reached
    );
    assert_eq!(c.process_pending().await.unwrap(), 0);
    assert_eq!(c.status(5).await.unwrap().milestones_reached, vec![3]);
}

/// Serialises the tests that read `batchlab_label_studio_conflicts_total` (the recorder is the
/// process's, shared by every test), so that each sees only its own increments.
static CONFLICT_METRIC: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `batchlab_label_studio_conflicts_total{kind}` as `/metrics` shows it now.
fn conflicts_counted(kind: &str) -> u64 {
    let text = batchlab_core::telemetry::metrics_handle().render();
    let prefix = format!("batchlab_label_studio_conflicts_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

fn project_created(project: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"action": "PROJECT_CREATED",
        "project": {"id": project, "title": format!("project {project}"), "label_config": SIMPLE_CONFIG}}))
    .unwrap()
}

/// An annotation event (`ANNOTATION_CREATED`, `ANNOTATION_UPDATED`) of annotation `id` on task
/// `task` of `project`, with its task, created at `created` and answering `choice`.
fn annotation_event(
    action: &str,
    project: i64,
    task: i64,
    id: i64,
    created: &str,
    choice: &str,
) -> Vec<u8> {
    serde_json::to_vec(&json!({"action": action, "project": {"id": project},
        "task": {"id": task, "project": project, "data": {"text": format!("task {task} of project {project}")}},
        "annotation": {"id": id, "task": task, "project": project, "was_cancelled": false, "ground_truth": false,
            "created_at": created, "updated_at": created,
            "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [choice]}}]}}))
    .unwrap()
}

fn tasks_event(action: &str, project: i64, tasks: &[(i64, &str)]) -> Vec<u8> {
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|(id, text)| json!({"id": id, "project": project, "data": {"text": text}}))
        .collect();
    serde_json::to_vec(&json!({"action": action, "project": {"id": project}, "tasks": tasks}))
        .unwrap()
}

fn annotations_deleted(project: i64, ids: impl IntoIterator<Item = i64>) -> Vec<u8> {
    let ids: Vec<Value> = ids.into_iter().map(|id| json!({"id": id})).collect();
    serde_json::to_vec(
        &json!({"action": "ANNOTATIONS_DELETED", "project": {"id": project}, "annotations": ids}),
    )
    .unwrap()
}

/// A project's live annotations as (id, task, result).
async fn annotations_of(store: &Store, project: i64) -> Vec<(i64, i64, Value)> {
    store
        .annotations_in_range("default", project, i64::MIN, i64::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.task_id, serde_json::from_str(&a.result).unwrap()))
        .collect()
}

/// A project's live tasks as (id, data).
async fn tasks_of(store: &Store, project: i64) -> Vec<(i64, Value)> {
    store
        .tasks_page("default", project, i64::MIN, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.id, serde_json::from_str(&t.data).unwrap()))
        .collect()
}

async fn outcome_of(store: &Store, event_id: i64) -> String {
    store
        .webhook_event_outcome(event_id)
        .await
        .unwrap()
        .expect("the event was processed")
}

/// The first Label Studio of the reported case, applied: project 1 with annotation 99 on task 9,
/// and 100–105 on tasks 10–15 created (seven valid at once: a milestone of 3 is reached) and
/// then deleted (batchlab keeps their tombstones).
async fn old_project_with_deleted_annotations(c: &Curation) {
    c.ingest(&project_created(1)).await.unwrap();
    for id in 99..=105 {
        let body = annotation_event(
            "ANNOTATION_CREATED",
            1,
            id - 90,
            id,
            "2025-03-01T10:00:00Z",
            "a",
        );
        c.ingest(&body).await.unwrap();
    }
    drain(c).await;
    c.ingest(&annotations_deleted(1, 100..=105)).await.unwrap();
    drain(c).await;
}

/// The reported case: Label Studio re-created with a fresh database while batchlab kept its
/// own. Old project 1 had annotations 100–105, since deleted (batchlab holds their tombstones);
/// the new instance's project 5 hands out ids 100–105 again, on tasks of its own. Each of the six
/// is kept as a conflict with its reason (before, the tombstones swallowed them without a word),
/// shown in project 5's status, counted, and project 1 is left exactly as it was.
async fn reused_ids_of_deleted_annotations_are_conflicts(store: Store) {
    let _metric = CONFLICT_METRIC.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    old_project_with_deleted_annotations(&c).await;
    let before = c.status(1).await.unwrap();
    assert_eq!(
        (before.counts.tasks, before.counts.annotations),
        (7, 1),
        "{:?}",
        before.counts
    );
    let kind = "annotation_deleted_in_other_project";
    let counted = conflicts_counted(kind);

    // The new instance: project 5, tasks 1–6, annotations 100–105 once more.
    c.ingest(&project_created(5)).await.unwrap();
    let mut events = Vec::new();
    for id in 100..=105 {
        let body = annotation_event(
            "ANNOTATION_CREATED",
            5,
            id - 99,
            id,
            "2026-06-01T09:00:00Z",
            "a",
        );
        events.push((id, c.ingest(&body).await.unwrap().event_id));
    }
    drain(&c).await;

    let status = c.status(5).await.unwrap();
    assert_eq!(status.conflicts.count, 6, "{:?}", status.conflicts.latest);
    let mut latest = status.conflicts.latest.clone();
    latest.sort_by_key(|k| k.entity_id);
    for (k, (id, event_id)) in latest.iter().zip(&events) {
        assert_eq!(k.kind, kind);
        assert_eq!(k.entity, "annotation");
        assert_eq!(k.entity_id, *id);
        assert_eq!(k.event_id, *event_id);
        assert_eq!(k.action, "ANNOTATION_CREATED");
        assert_eq!(k.project_id, 5);
        assert_eq!(k.known_project_id, Some(1));
        assert_eq!(k.known_task_id, Some(id - 90));
        assert!(k.known_deleted);
        assert!(
            k.reason.contains(&format!("annotation {id}"))
                && k.reason.contains("project 1")
                && k.reason.contains("deleted"),
            "{}",
            k.reason
        );
        // The annotation as delivered is kept whole, for a later replay.
        let body: Value = serde_json::from_str(&k.body).unwrap();
        assert_eq!(body["id"], json!(id));
        assert_eq!(body["task"], json!(id - 99));
        assert_eq!(body["result"][0]["value"]["choices"], json!(["a"]));
        let outcome = outcome_of(&store, *event_id).await;
        assert!(
            outcome.starts_with("conflict: ") && outcome.contains(&format!("annotation {id}")),
            "{outcome}"
        );
    }
    assert_eq!(
        status.webhook_events.failed, 0,
        "kept, not failed: {:?}",
        status.failed_events
    );
    assert_eq!(status.webhook_events.pending, 0);
    assert_eq!(conflicts_counted(kind) - counted, 6);
    // Project 5's tasks are its own; its annotations wait in the conflicts, not in its counts.
    assert_eq!(
        (status.counts.tasks, status.counts.annotations),
        (6, 0),
        "{:?}",
        status.counts
    );
    // Project 1 is untouched.
    let after = c.status(1).await.unwrap();
    assert_eq!(after.counts, before.counts);
    assert_eq!(after.conflicts.count, 0);
    assert_eq!(annotations_of(&store, 1).await.len(), 1);

    // The same deliveries again are duplicates: no second record.
    for id in 100..=105 {
        let body = annotation_event(
            "ANNOTATION_CREATED",
            5,
            id - 99,
            id,
            "2026-06-01T09:00:00Z",
            "a",
        );
        assert_eq!(c.ingest(&body).await.unwrap().status, "duplicate");
    }
    drain(&c).await;
    assert_eq!(c.status(5).await.unwrap().conflicts.count, 6);
    assert_eq!(conflicts_counted(kind) - counted, 6);
}

/// A task id that batchlab holds under project 1 arriving in project 2 — in a task import, with
/// a new annotation, and in a deletion — is a conflict each time: project 1's task keeps its
/// project and data (before, the import moved it to project 2 and the deletion deleted it with
/// its annotation), and what project 2 sent is kept with the reason.
async fn a_task_id_moving_project_is_a_conflict(store: Store) {
    let _metric = CONFLICT_METRIC.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    c.ingest(&project_created(1)).await.unwrap();
    c.ingest(&tasks_event("TASKS_CREATED", 1, &[(7, "old")]))
        .await
        .unwrap();
    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        7,
        70,
        "2025-03-01T10:00:00Z",
        "a",
    ))
    .await
    .unwrap();
    drain(&c).await;
    let before = c.status(1).await.unwrap().counts;
    assert_eq!((before.tasks, before.annotations), (1, 1));
    let kinds = [
        "task_in_other_project",
        "annotation_on_task_of_other_project",
        "task_deletion_in_other_project",
    ];
    let counted: Vec<u64> = kinds.iter().map(|k| conflicts_counted(k)).collect();

    c.ingest(&project_created(2)).await.unwrap();
    let imported = c
        .ingest(&tasks_event(
            "TASKS_CREATED",
            2,
            &[(7, "new"), (8, "eight")],
        ))
        .await
        .unwrap()
        .event_id;
    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        2,
        7,
        80,
        "2026-06-01T09:00:00Z",
        "a",
    ))
    .await
    .unwrap();
    c.ingest(&tasks_event("TASKS_DELETED", 2, &[(7, "")]))
        .await
        .unwrap();
    drain(&c).await;

    // Project 1 as it was: task 7 with its data (as its annotation's event last sent it),
    // annotation 70 on it.
    assert_eq!(
        tasks_of(&store, 1).await,
        [(7, json!({"text": "task 7 of project 1"}))]
    );
    assert_eq!(
        annotations_of(&store, 1)
            .await
            .iter()
            .map(|a| (a.0, a.1))
            .collect::<Vec<_>>(),
        [(70, 7)]
    );
    assert_eq!(c.status(1).await.unwrap().counts, before);
    // Project 2 has task 8; task 7 (twice), annotation 80 and the deletion are conflicts.
    let status = c.status(2).await.unwrap();
    assert_eq!(tasks_of(&store, 2).await, [(8, json!({"text": "eight"}))]);
    assert_eq!(status.counts.annotations, 0);
    let mut found: Vec<(String, String, i64)> = status
        .conflicts
        .latest
        .iter()
        .map(|k| (k.kind.clone(), k.entity.clone(), k.entity_id))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            (
                "annotation_on_task_of_other_project".into(),
                "annotation".into(),
                80
            ),
            ("task_deletion_in_other_project".into(), "task".into(), 7),
            ("task_in_other_project".into(), "task".into(), 7),
            ("task_in_other_project".into(), "task".into(), 7),
        ]
    );
    assert_eq!(status.conflicts.count, 4);
    for k in &status.conflicts.latest {
        assert_eq!(k.known_project_id, Some(1), "{k:?}");
        assert!(k.reason.contains("project 1"), "{}", k.reason);
    }
    let import = status
        .conflicts
        .latest
        .iter()
        .find(|k| k.event_id == imported)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&import.body).unwrap()["data"],
        json!({"text": "new"})
    );
    assert!(outcome_of(&store, imported)
        .await
        .starts_with("conflict: task 7"));
    let deltas: Vec<u64> = kinds
        .iter()
        .zip(&counted)
        .map(|(k, n)| conflicts_counted(k) - n)
        .collect();
    assert_eq!(deltas, [2, 1, 1]);
}

/// An annotation id that batchlab holds on task 1 arriving on task 2 of the same project is a
/// conflict: the stored annotation keeps its task and result (before, it moved silently).
async fn an_annotation_moving_task_is_a_conflict(store: Store) {
    let _metric = CONFLICT_METRIC.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    c.ingest(&project_created(1)).await.unwrap();
    let created = "2025-03-01T10:00:00Z";
    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        1,
        9,
        created,
        "a",
    ))
    .await
    .unwrap();
    c.ingest(&tasks_event("TASKS_CREATED", 1, &[(2, "two")]))
        .await
        .unwrap();
    drain(&c).await;
    let counted = conflicts_counted("annotation_on_other_task");

    let mut moved: Value = serde_json::from_slice(&annotation_event(
        "ANNOTATION_UPDATED",
        1,
        2,
        9,
        created,
        "b",
    ))
    .unwrap();
    moved["annotation"]["updated_at"] = json!("2025-03-02T10:00:00Z");
    let event = c
        .ingest(&serde_json::to_vec(&moved).unwrap())
        .await
        .unwrap()
        .event_id;
    drain(&c).await;

    assert_eq!(
        annotations_of(&store, 1).await,
        [(
            9,
            1,
            json!([{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": ["a"]}}])
        )]
    );
    let status = c.status(1).await.unwrap();
    assert_eq!(status.conflicts.count, 1);
    let k = &status.conflicts.latest[0];
    assert_eq!(
        (
            k.kind.as_str(),
            k.entity_id,
            k.known_project_id,
            k.known_task_id
        ),
        ("annotation_on_other_task", 9, Some(1), Some(1))
    );
    assert!(
        k.reason.contains("task 2") && k.reason.contains("task 1"),
        "{}",
        k.reason
    );
    assert!(outcome_of(&store, event).await.starts_with("conflict: "));
    assert_eq!(conflicts_counted("annotation_on_other_task") - counted, 1);
}

/// A fresh Label Studio often hands out project 1 and task 1 again: then only the creation time
/// tells a new annotation from the one batchlab holds under the same id. It is a conflict; the
/// stored one is left as it was. (An update of the same annotation keeps its creation time.)
async fn a_reused_annotation_id_with_another_creation_time_is_a_conflict(store: Store) {
    let _metric = CONFLICT_METRIC.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    c.ingest(&project_created(1)).await.unwrap();
    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        1,
        1,
        "2025-03-01T10:00:00.123456Z",
        "a",
    ))
    .await
    .unwrap();
    drain(&c).await;
    let counted = conflicts_counted("annotation_recreated");
    // The same creation time written otherwise is the same annotation: an ordinary update.
    let mut update: Value = serde_json::from_slice(&annotation_event(
        "ANNOTATION_UPDATED",
        1,
        1,
        1,
        "2025-03-01T10:00:00.123456+00:00",
        "a",
    ))
    .unwrap();
    update["annotation"]["updated_at"] = json!("2025-03-01T11:00:00Z");
    c.ingest(&serde_json::to_vec(&update).unwrap())
        .await
        .unwrap();
    drain(&c).await;
    assert_eq!(c.status(1).await.unwrap().conflicts.count, 0);

    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        1,
        1,
        "2026-06-01T09:00:00Z",
        "b",
    ))
    .await
    .unwrap();
    drain(&c).await;
    let status = c.status(1).await.unwrap();
    assert_eq!(status.conflicts.count, 1);
    assert_eq!(status.conflicts.latest[0].kind, "annotation_recreated");
    assert_eq!(
        annotations_of(&store, 1).await[0].2[0]["value"]["choices"],
        json!(["a"])
    );
    assert_eq!(conflicts_counted("annotation_recreated") - counted, 1);
}

/// The reported case again, with the second Label Studio named as what it is: its webhooks
/// arrive for instance `ls2`. Then its project 5's annotations 100–105 are simply its own: all
/// counted, no conflict, its milestone file apart from the first instance's; instance
/// `default`'s project 1 is left exactly as it was, and neither instance sees the other's
/// projects.
async fn the_same_ids_in_two_instances_are_two_namespaces(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let first = curation(&store, dir.path(), vec![3]);
    old_project_with_deleted_annotations(&first).await;
    let before = first.status(1).await.unwrap();
    assert_eq!((before.counts.tasks, before.counts.annotations), (7, 1));

    let ls2 = Instance::parse("ls2").unwrap();
    let second = first.with_instance(ls2.clone());
    second.ingest(&project_created(5)).await.unwrap();
    first.ingest(&project_created(5)).await.unwrap();
    for id in 100..=105 {
        let body = annotation_event(
            "ANNOTATION_CREATED",
            5,
            id - 99,
            id,
            "2026-06-01T09:00:00Z",
            "b",
        );
        assert_eq!(second.ingest(&body).await.unwrap().status, "accepted");
        // The same body from the first instance is another delivery, not a duplicate.
        assert_eq!(first.ingest(&body).await.unwrap().status, "accepted");
    }
    // Only the second instance's deliveries are applied there; the first instance's copies
    // contradict its tombstones and are conflicts there, as before.
    drain(&first).await;
    let status = second.status(5).await.unwrap();
    assert_eq!(status.instance, "ls2");
    assert_eq!(
        (
            status.counts.tasks,
            status.counts.annotations,
            status.counts.valid
        ),
        (6, 6, 6),
        "{:?}",
        status.counts
    );
    assert_eq!(status.conflicts.count, 0, "{:?}", status.conflicts.latest);
    assert_eq!(status.milestones_reached, vec![3]);
    let milestone = dir.path().join("ls2").join("project_5_milestone_3.json");
    assert_eq!(
        annotations_in(&std::fs::read(&milestone).unwrap()),
        6,
        "{}",
        milestone.display()
    );
    assert!(dir.path().join("project_1_milestone_3.json").exists());
    assert!(!dir.path().join("project_5_milestone_3.json").exists());
    let after = first.status(1).await.unwrap();
    assert_eq!(after.counts, before.counts);
    assert_eq!(after.conflicts.count, 0);
    assert_eq!(first.status(5).await.unwrap().conflicts.count, 6);
    assert!(matches!(
        second.status(1).await,
        Err(CurationError::UnknownProject { project: 1, .. })
    ));
    let ls2_rows = store
        .annotations_in_range("ls2", 5, i64::MIN, i64::MAX)
        .await
        .unwrap();
    assert_eq!(
        ls2_rows.iter().map(|a| a.id).collect::<Vec<_>>(),
        (100..=105).collect::<Vec<_>>()
    );
    assert_eq!(
        serde_json::from_str::<Value>(&ls2_rows[0].result).unwrap()[0]["value"]["choices"],
        json!(["b"])
    );
}

fn project_with_creation(action: &str, project: i64, created_at: &str) -> Value {
    json!({"action": action, "project": {"id": project, "title": format!("project {project}"),
        "label_config": SIMPLE_CONFIG, "created_at": created_at, "updated_at": created_at}})
}

/// Label Studio re-created with a fresh database, delivering to the same instance: its
/// project 1 has another creation time than the project 1 batchlab knows. Every event about it
/// is kept aside whole as a `project_recreated` conflict, whatever ids it carries (a new
/// annotation id too, which no id check would catch), nothing of it is applied, a
/// START_TRAINING of it exports nothing, and the project status says what happened. The same
/// creation time written otherwise is the same project. Delivered to a new instance name, the
/// same events are applied there.
async fn a_project_recreated_under_its_id_is_kept_aside(store: Store) {
    let _metric = CONFLICT_METRIC.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    let old = "2025-03-01T10:00:00.000000Z";
    c.ingest(&serde_json::to_vec(&project_with_creation("PROJECT_CREATED", 1, old)).unwrap())
        .await
        .unwrap();
    let mut first = serde_json::from_slice::<Value>(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        1,
        1,
        "2025-03-01T11:00:00Z",
        "a",
    ))
    .unwrap();
    // The same instant, written with an offset instead of Z.
    first["project"]["created_at"] = json!("2025-03-01T10:00:00+00:00");
    let event = c
        .ingest(&serde_json::to_vec(&first).unwrap())
        .await
        .unwrap();
    drain(&c).await;
    assert_eq!(outcome_of(&store, event.event_id).await, "applied");
    let before = c.status(1).await.unwrap();
    assert_eq!((before.counts.tasks, before.counts.annotations), (1, 1));
    let counted = conflicts_counted("project_recreated");

    // The new Label Studio's project 1: a task, an annotation with a new id, a deletion of
    // annotation 1 (its own, unrelated one), then START_TRAINING.
    let new = "2026-06-01T09:00:00.000000Z";
    let mut bodies = Vec::new();
    let mut annotation =
        serde_json::from_slice::<Value>(&annotation_event("ANNOTATION_CREATED", 1, 2, 7, new, "b"))
            .unwrap();
    annotation["project"] = project_with_creation("", 1, new)["project"].clone();
    bodies.push(annotation);
    let mut deleted = serde_json::from_slice::<Value>(&annotations_deleted(1, [1])).unwrap();
    deleted["project"] = project_with_creation("", 1, new)["project"].clone();
    bodies.push(deleted);
    bodies.push(project_with_creation("START_TRAINING", 1, new));
    let mut events = Vec::new();
    for body in &bodies {
        events.push(
            c.ingest(&serde_json::to_vec(body).unwrap())
                .await
                .unwrap()
                .event_id,
        );
    }
    drain(&c).await;
    for event_id in &events {
        let outcome = outcome_of(&store, *event_id).await;
        assert!(
            outcome.starts_with("conflict: project 1 was created at 2026-06-01")
                && outcome.contains("nothing of the event applied"),
            "{outcome}"
        );
    }
    let status = c.status(1).await.unwrap();
    assert_eq!(status.counts, before.counts, "nothing was applied");
    assert!(status.exports.is_empty(), "{:?}", status.exports);
    assert_eq!(status.webhook_events.pending, 0);
    assert_eq!(status.conflicts.count, 3, "{:?}", status.conflicts.latest);
    for k in &status.conflicts.latest {
        assert_eq!(
            (k.kind.as_str(), k.entity.as_str(), k.entity_id),
            ("project_recreated", "project", 1)
        );
        assert!(
            k.reason.contains(old) && k.reason.contains("new instance name"),
            "{}",
            k.reason
        );
        let body: Value = serde_json::from_str(&k.body).unwrap();
        assert_eq!(
            body["project"]["created_at"],
            json!(new),
            "the whole event is kept"
        );
    }
    assert_eq!(conflicts_counted("project_recreated") - counted, 3);

    // Named as a new instance, the same deliveries are applied there.
    let fresh = c.with_instance(Instance::parse("ls-2026").unwrap());
    fresh
        .ingest(&serde_json::to_vec(&project_with_creation("PROJECT_CREATED", 1, new)).unwrap())
        .await
        .unwrap();
    for body in &bodies[..1] {
        fresh
            .ingest(&serde_json::to_vec(body).unwrap())
            .await
            .unwrap();
    }
    drain(&c).await;
    let status = fresh.status(1).await.unwrap();
    assert_eq!((status.counts.tasks, status.counts.annotations), (1, 1));
    assert_eq!(status.conflicts.count, 0);
}

/// Events are applied many to a transaction, each under a savepoint: one that fails midway
/// (an annotation naming no project, after its task was written) is undone alone and marked
/// failed, and the events before and after it in the same pass are applied. A project title
/// with a NUL byte, which PostgreSQL refuses (aborting the transaction until the savepoint is
/// rolled back), fails alone there too; SQLite stores it.
async fn a_failing_event_among_many_is_undone_alone(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    c.ingest(&project_created(1)).await.unwrap();
    let ok = |task, id| {
        annotation_event(
            "ANNOTATION_CREATED",
            1,
            task,
            id,
            "2026-01-01T00:00:00Z",
            "a",
        )
    };
    c.ingest(&ok(1, 1)).await.unwrap();
    let no_project = serde_json::to_vec(&json!({"action": "ANNOTATION_CREATED",
        "task": {"id": 2, "project": 1, "data": {"text": "task 2"}},
        "annotation": {"id": 2, "task": 2, "result": [], "created_at": "2026-01-01T00:00:00Z"}}))
    .unwrap();
    let failed = c.ingest(&no_project).await.unwrap().event_id;
    let nul_title = serde_json::to_vec(&json!({"action": "PROJECT_UPDATED",
        "project": {"id": 1, "title": "a\u{0}b", "label_config": SIMPLE_CONFIG}}))
    .unwrap();
    let nul = c.ingest(&nul_title).await.unwrap().event_id;
    c.ingest(&ok(3, 3)).await.unwrap();

    assert_eq!(c.process_pending().await.unwrap(), 5, "one pass");
    assert_eq!(
        tasks_of(&store, 1)
            .await
            .iter()
            .map(|t| t.0)
            .collect::<Vec<_>>(),
        [1, 3],
        "the failed event's task is undone"
    );
    assert_eq!(
        annotations_of(&store, 1)
            .await
            .iter()
            .map(|a| a.0)
            .collect::<Vec<_>>(),
        [1, 3]
    );
    let outcome = outcome_of(&store, failed).await;
    assert!(
        outcome.starts_with("failed: ") && outcome.contains("names no project"),
        "{outcome}"
    );
    let status = c.status(1).await.unwrap();
    assert_eq!(status.webhook_events.pending, 0);
    let nul_outcome = outcome_of(&store, nul).await;
    match store.backend() {
        batchlab_core::store::Backend::Postgres => {
            assert!(nul_outcome.starts_with("failed: "), "{nul_outcome}");
            // The event naming no project is not counted in the project's status.
            assert_eq!(status.webhook_events.failed, 1);
            assert_eq!(status.title, "project 1");
        }
        batchlab_core::store::Backend::Sqlite => {
            assert_eq!(nul_outcome, "applied");
            assert_eq!(status.webhook_events.failed, 0);
        }
    }
}

/// Events of one group share what their transaction read and wrote of a project (so that a
/// burst does not read and write the project once per event), but an event undone takes its
/// project change with it: the events after it in the same group see the config stored before
/// it. Here an event changes project 1's config so that only "b" is valid, then fails (on
/// PostgreSQL: an annotation time holding a NUL byte, which its text type refuses) and is
/// undone; the next event's "a" is then judged against the config stored before, where it is
/// valid. SQLite stores the NUL byte, so there the change stands and "a" is invalid.
async fn a_project_change_undone_with_its_event_is_forgotten_by_the_group(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let c = curation(&store, dir.path(), vec![]);
    c.ingest(&project_created(1)).await.unwrap();
    let only_b = SIMPLE_CONFIG.replace(r#"<Choice value="a"/>"#, "");
    let mut undone: Value = serde_json::from_slice(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        2,
        2,
        "2026-01-01T00:00:00\u{0}Z",
        "b",
    ))
    .unwrap();
    undone["project"] = json!({"id": 1, "title": "only b", "label_config": only_b,
        "updated_at": "2026-02-01T00:00:00Z"});
    let undone = c
        .ingest(&serde_json::to_vec(&undone).unwrap())
        .await
        .unwrap()
        .event_id;
    c.ingest(&annotation_event(
        "ANNOTATION_CREATED",
        1,
        3,
        3,
        "2026-01-01T00:00:00Z",
        "a",
    ))
    .await
    .unwrap();

    assert_eq!(c.process_pending().await.unwrap(), 3, "one pass, one group");
    let status = c.status(1).await.unwrap();
    let outcome = outcome_of(&store, undone).await;
    match store.backend() {
        batchlab_core::store::Backend::Postgres => {
            assert!(outcome.starts_with("failed: "), "{outcome}");
            assert_eq!(status.title, "project 1", "the change was undone");
            assert_eq!(
                (status.counts.annotations, status.counts.invalid),
                (1, 0),
                "annotation 3 judged against the config stored before the undone event"
            );
        }
        batchlab_core::store::Backend::Sqlite => {
            assert_eq!(outcome, "applied");
            assert_eq!(status.title, "only b");
            assert_eq!((status.counts.annotations, status.counts.invalid), (2, 1));
        }
    }
}

/// A stream of deliveries that reuse a few ids every way Label Studio can (creations, updates
/// old and new, deletions of tasks and annotations, annotations moving task or project,
/// another creation time, ground-truth stars, updates naming no task), from a seeded generator.
fn tangled_deliveries(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut state = seed;
    let mut next = |below: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % below
    };
    let mut out = vec![project_created(1), project_created(2)];
    for _ in 0..n {
        let project = 1 + next(2) as i64;
        let task = 1 + next(6) as i64;
        let id = 1 + next(8) as i64;
        let body = match next(10) {
            0 => json!({"action": "TASKS_DELETED", "project": {"id": project},
                "tasks": [{"id": task}]}),
            1 => json!({"action": "ANNOTATIONS_DELETED", "project": {"id": project},
                "annotations": [{"id": id}]}),
            2 => json!({"action": "TASKS_CREATED", "project": {"id": project},
                "tasks": [{"id": task, "project": project, "data": {"text": format!("t{task}")}}]}),
            // An update that names no task (the stored one is kept).
            3 => json!({"action": "ANNOTATION_UPDATED", "project": {"id": project},
                "annotation": {"id": id, "project": project, "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": format!("2026-03-0{}T00:00:00Z", 1 + next(4)),
                    "result": [{"from_name": "c", "to_name": "t", "type": "choices",
                        "value": {"choices": ["b"]}}]}}),
            k => {
                let created =
                    ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"][next(8).min(1) as usize];
                let updated = format!("2026-03-0{}T00:00:00Z", 1 + next(4));
                let (gt, choice) = (next(4) == 0, ["a", "b"][next(2) as usize]);
                json!({"action": if k % 2 == 0 { "ANNOTATION_CREATED" } else { "ANNOTATION_UPDATED" },
                    "project": {"id": project},
                    "task": {"id": task, "project": project, "data": {"text": format!("t{task} {updated}")},
                        "updated_at": updated},
                    "annotation": {"id": id, "task": task, "project": project, "was_cancelled": false,
                        "ground_truth": gt, "created_at": created, "updated_at": updated,
                        "result": [{"from_name": "c", "to_name": "t", "type": "choices",
                            "value": {"choices": [choice]}}]}})
            }
        };
        out.push(serde_json::to_vec(&body).unwrap());
    }
    out
}

/// Everything the deliveries left, as text: each event's outcome, both projects' live tasks
/// and annotations (ground-truth stars and validity too) and their conflicts by kind and entity.
async fn everything_applied(store: &Store, events: &[i64]) -> String {
    let mut out = String::new();
    for id in events {
        out.push_str(&format!("event {id}: {}\n", outcome_of(store, *id).await));
    }
    for project in [1, 2] {
        out.push_str(&format!(
            "tasks {project}: {:?}\n",
            tasks_of(store, project).await
        ));
        let annotations = store
            .annotations_in_range("default", project, i64::MIN, i64::MAX)
            .await
            .unwrap();
        for a in annotations {
            out.push_str(&format!(
                "annotation {} task {} {} gt {} valid {} at {}\n",
                a.id, a.task_id, a.result, a.ground_truth, a.valid, a.updated_at_us
            ));
        }
        let conflicts = store.conflicts("default", project, 1_000).await.unwrap();
        let mut seen: Vec<String> = conflicts
            .latest
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} event {}",
                    c.kind, c.entity, c.entity_id, c.event_id
                )
            })
            .collect();
        seen.sort();
        out.push_str(&format!("conflicts {project}: {seen:?}\n"));
    }
    out
}

/// A group of events is applied without savepoints, each delivery checked against the rows
/// as the group's earlier events left them (read once for the group, then kept by the
/// transaction itself): the same deliveries applied one per transaction, each checked against
/// the rows read just before, leave exactly the same outcomes, rows and conflicts.
#[tokio::test]
async fn a_group_sees_its_own_writes_as_events_applied_one_by_one_do() {
    // Its conflicts count in the process's metric, which other tests read.
    let _metric = CONFLICT_METRIC.lock().await;
    for seed in 1..=4 {
        let deliveries = tangled_deliveries(seed, 300);
        let mut results = Vec::new();
        for per_transaction in [1, 256] {
            let db = batchlab_core::testing::TestDb::sqlite().await;
            let dir = tempfile::tempdir().unwrap();
            let c = Curation::new(
                db.store.clone(),
                CurationConfig {
                    training_dir: dir.path().to_path_buf(),
                    events_per_transaction: Some(per_transaction),
                    ..Default::default()
                },
                Instance::default(),
            );
            let mut events = Vec::new();
            for body in &deliveries {
                events.push(c.ingest(body).await.unwrap().event_id);
            }
            drain(&c).await;
            results.push(everything_applied(&db.store, &events).await);
        }
        assert!(
            results[0].contains("conflicts 1: [\""),
            "seed {seed}: the stream makes conflicts"
        );
        assert!(
            results[0].contains("older than or deleted"),
            "seed {seed}: and stale deliveries"
        );
        assert_eq!(results[0], results[1], "seed {seed}");
    }
}

batchlab_core::on_both_backends!(
    a_project_change_undone_with_its_event_is_forgotten_by_the_group,
    a_failing_event_among_many_is_undone_alone,
    the_same_ids_in_two_instances_are_two_namespaces,
    a_project_recreated_under_its_id_is_kept_aside,
    reused_ids_of_deleted_annotations_are_conflicts,
    a_task_id_moving_project_is_a_conflict,
    an_annotation_moving_task_is_a_conflict,
    a_reused_annotation_id_with_another_creation_time_is_a_conflict,
    replay_in_order_twice,
    replay_backwards,
    replay_one_by_one_with_late_duplicates,
    invalid_annotations_are_kept_flagged_and_left_out,
    accuracy_and_chat_export,
    start_training_is_kept_until_its_export_is_written,
    milestone_exports_are_snapshots,
    milestone_checks_wait_while_events_keep_coming,
);
