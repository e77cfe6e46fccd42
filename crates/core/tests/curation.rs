//! Curation against SQLite and PostgreSQL alike: every webhook request a real Label Studio 1.23
//! sent, replayed in order, twice, and backwards; validation, milestones, exports, accuracy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use batchlab_core::config::CurationConfig;
use batchlab_core::curation::export::{ExportFilter, ExportFormat};
use batchlab_core::curation::Curation;
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
        },
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
    assert!(store.claim_milestone(1, 7, "p", 600).await.unwrap());
    assert!(
        !store.claim_milestone(1, 7, "p", 600).await.unwrap(),
        "claimed once"
    );
    assert_eq!(
        c.status(1).await.unwrap().exports.len(),
        3,
        "unwritten claims are not listed"
    );
    assert!(
        store.claim_milestone(1, 7, "p", -1).await.unwrap(),
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
    let counts = store.webhook_event_counts(Some(1)).await.unwrap();
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
        || async { store.webhook_event_counts(Some(1)).await.unwrap().pending == 0 },
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

const SIMPLE_CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>"#;

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

batchlab_core::on_both_backends!(
    replay_in_order_twice,
    replay_backwards,
    replay_one_by_one_with_late_duplicates,
    invalid_annotations_are_kept_flagged_and_left_out,
    accuracy_and_chat_export,
    start_training_is_kept_until_its_export_is_written,
    milestone_exports_are_snapshots,
);
