//! The store's overview (batches by status, the queue, projects at a glance, workers' heartbeats)
//! against SQLite and PostgreSQL alike.

use batchlab_core::config::CurationConfig;
use batchlab_core::curation::Curation;
use batchlab_core::labelstudio::instance::Instance;
use batchlab_core::store::{NewBatch, Store, WorkerHeartbeat};
use serde_json::json;

const CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;

fn new_batch(id: &str) -> NewBatch {
    NewBatch {
        id: id.into(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-in".into(),
        completion_window: "24h".into(),
        window_seconds: 86_400,
        metadata: None,
        total: 2,
    }
}

/// An ANNOTATION_CREATED of task `id` (annotation `id` too) in `project`, answering `choice`.
fn annotation(project: i64, id: i64, choice: &str, ground_truth: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({"action": "ANNOTATION_CREATED",
        "project": {"id": project, "title": format!("project {project}"), "label_config": CONFIG},
        "task": {"id": id, "project": project, "data": {"text": format!("task {id}")}},
        "annotation": {"id": id, "task": id, "project": project, "was_cancelled": false,
            "ground_truth": ground_truth,
            "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [choice]}}]}}))
    .unwrap()
}

async fn batches_are_counted_by_status_with_the_queue(store: Store) {
    let empty = store.batch_counts().await.unwrap();
    assert_eq!(empty.by_status.len(), 8, "every status is listed");
    assert!(empty.by_status.values().all(|n| *n == 0));
    assert_eq!(empty.queue_depth, 0);

    for id in ["batch_1", "batch_2", "batch_3"] {
        store.insert_batch(&new_batch(id)).await.unwrap();
    }
    // One claimed (a live lease: not waiting), one cancelled, one waiting.
    let claimed = store.claim_batch("w1", 60).await.unwrap().unwrap();
    assert_eq!(claimed.id, "batch_1");
    store.request_cancel("batch_2").await.unwrap();
    let counts = store.batch_counts().await.unwrap();
    assert_eq!(counts.by_status["validating"], 2);
    assert_eq!(counts.by_status["cancelling"], 1);
    assert_eq!(counts.by_status["completed"], 0);
    assert_eq!(
        counts.queue_depth, 2,
        "the cancelling batch still needs a worker"
    );
    // An expired lease is waiting again.
    store.renew_lease("batch_1", "w1", -5).await.unwrap();
    assert_eq!(store.batch_counts().await.unwrap().queue_depth, 3);
}

async fn projects_show_counts_milestones_and_accuracy(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let _ = batchlab_core::telemetry::metrics_handle();
    let c = Curation::new(
        store.clone(),
        CurationConfig {
            training_dir: dir.path().to_path_buf(),
            milestones: vec![3, 100],
            accuracy_every: 0,
            ..Default::default()
        },
        Instance::default(),
    );
    assert!(store.project_overviews(10).await.unwrap().is_empty());
    for (id, choice, gt) in [
        (1, "a", true),
        (2, "b", false),
        (3, "a", true),
        (4, "zzz", false),
    ] {
        c.ingest(&annotation(7, id, choice, gt)).await.unwrap();
    }
    // The same project id in another Label Studio instance is another project.
    c.with_instance(Instance::parse("ls-b").unwrap())
        .ingest(&annotation(7, 1, "a", false))
        .await
        .unwrap();
    while c.process_pending().await.unwrap() > 0 {}
    for (checkpoint, acc) in [(2, 0.5), (4, 0.75)] {
        let report = json!({
            "m:old": {"overall_accuracy": 0.1, "field_accuracy": {"c": 0.1}, "counts": {"comparisons": 1}},
            "m:new": {"overall_accuracy": acc, "field_accuracy": {"c": acc}, "counts": {"comparisons": 4}},
        });
        store
            .insert_accuracy_record("default", 7, checkpoint, &report.to_string())
            .await
            .unwrap();
    }

    let projects = store.project_overviews(10).await.unwrap();
    assert_eq!(
        projects
            .iter()
            .map(|p| (p.instance.as_str(), p.id))
            .collect::<Vec<_>>(),
        [("default", 7), ("ls-b", 7)]
    );
    let p = &projects[0];
    assert_eq!(p.title, "project 7");
    // The same counts the project route shows.
    assert_eq!(p.counts, c.status(7).await.unwrap().counts);
    assert_eq!(
        (
            p.counts.annotations,
            p.counts.ground_truth,
            p.counts.invalid
        ),
        (4, 2, 1)
    );
    assert_eq!(p.milestones.len(), 1, "{:?}", p.milestones);
    assert_eq!(p.milestones[0].milestone, 3);
    assert_eq!(p.milestones[0].file, "project_7_milestone_3.json");
    assert!(p.milestones[0].sha256.is_some());
    assert_eq!(p.exports, 1);
    assert_eq!(p.accuracy_history.len(), 2);
    assert_eq!(
        p.accuracy_history[1].model_version.as_deref(),
        Some("m:new")
    );
    assert_eq!(p.latest_accuracy.get("c"), Some(&0.75));
    let other = &projects[1];
    assert_eq!((other.counts.annotations, other.milestones.len()), (1, 0));
    assert!(other.latest_accuracy.is_empty());

    // Applying the events timed each from its receipt.
    let text = batchlab_core::telemetry::metrics_handle().render();
    assert!(
        text.contains("batchlab_webhook_event_lag_seconds_bucket"),
        "the lag is a histogram with buckets"
    );
}

async fn workers_heartbeats_are_upserted_and_listed(store: Store) {
    store.insert_batch(&new_batch("batch_1")).await.unwrap();
    let mut beat = WorkerHeartbeat {
        id: "w1",
        model: "SmolLM2",
        model_path: "/models/smol.gguf",
        model_sha256: None,
        generated_tokens: 10,
        tokens_per_second: 0.0,
        started_at: 1_000,
    };
    store.upsert_worker(&beat).await.unwrap();
    let seen = store.workers_seen_within(30).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (
            seen[0].model.as_str(),
            seen[0].generated_tokens,
            seen[0].batch_id.as_deref()
        ),
        ("SmolLM2", 10, None)
    );

    // The next beat replaces the row and names the batch the worker holds a lease on.
    store.claim_batch("w1", 60).await.unwrap().unwrap();
    beat.generated_tokens = 60;
    beat.tokens_per_second = 12.5;
    beat.model_sha256 = Some("ab12");
    store.upsert_worker(&beat).await.unwrap();
    store
        .upsert_worker(&WorkerHeartbeat {
            id: "w2",
            model: "Gemma",
            ..beat.clone()
        })
        .await
        .unwrap();
    let seen = store.workers_seen_within(30).await.unwrap();
    assert_eq!(
        seen.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        ["w2", "w1"],
        "by model, then id"
    );
    let w1 = &seen[1];
    assert_eq!(
        (
            w1.generated_tokens,
            w1.tokens_per_second,
            w1.batch_id.as_deref(),
            w1.model_sha256.as_deref()
        ),
        (60, 12.5, Some("batch_1"), Some("ab12"))
    );
    assert_eq!(w1.started_at, 1_000);
    assert!(w1.last_seen >= batchlab_core::store::now() - 5);

    // A worker not seen lately is not listed, and is forgotten after a while.
    assert!(store.workers_seen_within(-10).await.unwrap().is_empty());
    assert_eq!(store.forget_workers_unseen_for(3600).await.unwrap(), 0);
    assert_eq!(store.forget_workers_unseen_for(-10).await.unwrap(), 2);
    assert!(store.workers_seen_within(30).await.unwrap().is_empty());
}

batchlab_core::on_both_backends!(
    batches_are_counted_by_status_with_the_queue,
    projects_show_counts_milestones_and_accuracy,
    workers_heartbeats_are_upserted_and_listed,
);
