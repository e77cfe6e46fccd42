//! The store's test suite, run against SQLite and PostgreSQL alike.

use std::collections::HashSet;

use batchlab_core::store::{
    BatchLine, BatchStatus, CachedPrediction, FileDeletion, FileRecord, LineKind, NewBatch,
    NewWebhookEvent, NulInText, Store, StoreError,
};

fn file(id: &str, purpose: &str) -> FileRecord {
    FileRecord {
        id: id.into(),
        filename: format!("{id}.jsonl"),
        purpose: purpose.into(),
        bytes: 10,
        lines: 2,
        created_at: 1_700_000_000,
        expires_at: None,
    }
}

fn new_batch(id: &str) -> NewBatch {
    NewBatch {
        id: id.into(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-in".into(),
        completion_window: "24h".into(),
        window_seconds: 86_400,
        metadata: Some(r#"{"k":"v"}"#.into()),
        total: 3,
    }
}

fn line(no: i64, kind: LineKind) -> BatchLine {
    BatchLine {
        line_no: no,
        custom_id: Some(format!("c{no}")),
        kind,
        body: format!("{{\"line\":{no}}}"),
        input_tokens: 10,
        cached_tokens: 4,
        output_tokens: 5,
    }
}

async fn files_round_trip_and_page(store: Store) {
    for i in 0..5 {
        store
            .insert_file(&file(
                &format!("file-{i}"),
                if i % 2 == 0 { "batch" } else { "fine-tune" },
            ))
            .await
            .unwrap();
    }
    assert_eq!(
        store.get_file("file-3").await.unwrap().unwrap(),
        file("file-3", "fine-tune")
    );
    assert!(store.get_file("file-x").await.unwrap().is_none());

    let newest = store.list_files(None, None, 2, false).await.unwrap();
    assert_eq!(
        newest.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["file-4", "file-3", "file-2"]
    );
    let next = store
        .list_files(None, Some("file-3"), 2, false)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["file-2", "file-1", "file-0"]
    );
    let oldest = store
        .list_files(Some("batch"), Some("file-0"), 10, true)
        .await
        .unwrap();
    assert_eq!(
        oldest.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["file-2", "file-4"]
    );

    assert!(store.delete_file("file-2").await.unwrap());
    assert!(!store.delete_file("file-2").await.unwrap());
    assert!(store.get_file("file-2").await.unwrap().is_none());
}

async fn batches_are_created_listed_and_cancelled(store: Store) {
    let b = store.insert_batch(&new_batch("batch_a")).await.unwrap();
    assert_eq!(b.status, BatchStatus::Validating);
    assert_eq!(b.expires_at, Some(b.created_at + 86_400));
    assert_eq!(b.metadata.as_deref(), Some(r#"{"k":"v"}"#));
    store.insert_batch(&new_batch("batch_b")).await.unwrap();
    store.insert_batch(&new_batch("batch_c")).await.unwrap();

    let page = store.list_batches(None, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        ["batch_c", "batch_b", "batch_a"]
    );
    let rest = store.list_batches(Some("batch_b"), 2).await.unwrap();
    assert_eq!(
        rest.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        ["batch_a"]
    );

    let cancelled = store.request_cancel("batch_a").await.unwrap().unwrap();
    assert_eq!(cancelled.status, BatchStatus::Cancelling);
    assert!(cancelled.cancelling_at.is_some());
    assert!(store.request_cancel("batch_nope").await.unwrap().is_none());
}

async fn leases_give_each_batch_to_one_worker(store: Store) {
    store.insert_batch(&new_batch("batch_1")).await.unwrap();
    store.insert_batch(&new_batch("batch_2")).await.unwrap();

    let first = store.claim_batch("w1", 60).await.unwrap().unwrap();
    assert_eq!(first.id, "batch_1", "oldest first");
    assert_eq!(first.lease_owner.as_deref(), Some("w1"));
    let second = store.claim_batch("w2", 60).await.unwrap().unwrap();
    assert_eq!(second.id, "batch_2", "a live lease is not taken");
    assert!(store.claim_batch("w3", 60).await.unwrap().is_none());

    assert!(store.renew_lease("batch_1", "w1", 60).await.unwrap());
    assert!(
        !store.renew_lease("batch_1", "w2", 60).await.unwrap(),
        "only the owner renews"
    );

    // An expired lease (a killed worker) is taken over.
    assert!(store.renew_lease("batch_2", "w2", -5).await.unwrap());
    let taken = store.claim_batch("w3", 60).await.unwrap().unwrap();
    assert_eq!(
        (taken.id.as_str(), taken.lease_owner.as_deref()),
        ("batch_2", Some("w3"))
    );
    assert!(
        !store.renew_lease("batch_2", "w2", 60).await.unwrap(),
        "the old owner has lost it"
    );

    store.release_lease("batch_1", "w1").await.unwrap();
    assert_eq!(
        store.claim_batch("w4", 60).await.unwrap().unwrap().id,
        "batch_1"
    );
}

async fn concurrent_claims_never_share_a_batch(store: Store) {
    for i in 0..4 {
        store
            .insert_batch(&new_batch(&format!("batch_{i}")))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.claim_batch(&format!("w{w}"), 60).await.unwrap()
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        if let Some(b) = t.await.unwrap() {
            claimed.push(b.id);
        }
    }
    let unique: HashSet<_> = claimed.iter().collect();
    assert_eq!(claimed.len(), 4, "every batch claimed: {claimed:?}");
    assert_eq!(unique.len(), 4, "no batch claimed twice: {claimed:?}");
}

async fn transitions_are_guarded_and_stamped(store: Store) {
    store.insert_batch(&new_batch("batch_t")).await.unwrap();
    store.claim_batch("w", 60).await.unwrap().unwrap();
    assert!(!store
        .transition(
            "batch_t",
            "other",
            &[BatchStatus::Validating],
            BatchStatus::InProgress
        )
        .await
        .unwrap());
    assert!(!store
        .transition(
            "batch_t",
            "w",
            &[BatchStatus::InProgress],
            BatchStatus::Finalizing
        )
        .await
        .unwrap());
    assert!(store
        .transition(
            "batch_t",
            "w",
            &[BatchStatus::Validating],
            BatchStatus::InProgress
        )
        .await
        .unwrap());
    assert!(store
        .transition(
            "batch_t",
            "w",
            &[BatchStatus::InProgress],
            BatchStatus::Finalizing
        )
        .await
        .unwrap());
    store
        .set_output_files("batch_t", Some("file-out"), None)
        .await
        .unwrap();
    assert!(store
        .transition(
            "batch_t",
            "w",
            &[BatchStatus::Finalizing],
            BatchStatus::Completed
        )
        .await
        .unwrap());
    let b = store.get_batch("batch_t").await.unwrap().unwrap();
    assert_eq!(b.status, BatchStatus::Completed);
    assert!(b.in_progress_at.is_some() && b.finalizing_at.is_some() && b.completed_at.is_some());
    assert_eq!(b.output_file_id.as_deref(), Some("file-out"));
    assert!(
        store.claim_batch("w", 60).await.unwrap().is_none(),
        "finished batches leave the queue"
    );

    store.insert_batch(&new_batch("batch_f")).await.unwrap();
    store.claim_batch("w", 60).await.unwrap().unwrap();
    assert!(store
        .fail_batch(
            "batch_f",
            "w",
            r#"[{"code":"x","message":"m","param":null,"line":1}]"#
        )
        .await
        .unwrap());
    let f = store.get_batch("batch_f").await.unwrap().unwrap();
    assert_eq!(f.status, BatchStatus::Failed);
    assert!(f.failed_at.is_some() && f.errors.is_some());
}

async fn lines_are_recorded_exactly_once(store: Store) {
    store.insert_batch(&new_batch("batch_l")).await.unwrap();
    assert!(store
        .record_line("batch_l", &line(1, LineKind::Output))
        .await
        .unwrap());
    assert!(store
        .record_line("batch_l", &line(3, LineKind::Output))
        .await
        .unwrap());
    assert!(store
        .record_line("batch_l", &line(2, LineKind::Error))
        .await
        .unwrap());
    assert!(
        !store
            .record_line("batch_l", &line(1, LineKind::Output))
            .await
            .unwrap(),
        "a replay changes nothing"
    );
    let b = store.get_batch("batch_l").await.unwrap().unwrap();
    assert_eq!(
        (
            b.completed,
            b.failed,
            b.input_tokens,
            b.cached_tokens,
            b.output_tokens
        ),
        (2, 1, 30, 12, 15)
    );

    let mut done = store.finished_line_numbers("batch_l").await.unwrap();
    done.sort();
    assert_eq!(done, [1, 2, 3]);
    let out = store
        .batch_lines("batch_l", LineKind::Output, 0, 1)
        .await
        .unwrap();
    assert_eq!(out.iter().map(|l| l.line_no).collect::<Vec<_>>(), [1]);
    assert_eq!(out[0], line(1, LineKind::Output), "stored as recorded");
    let out = store
        .batch_lines("batch_l", LineKind::Output, 1, 10)
        .await
        .unwrap();
    assert_eq!(out, vec![line(3, LineKind::Output)]);
    let err = store
        .batch_lines("batch_l", LineKind::Error, 0, 10)
        .await
        .unwrap();
    assert_eq!(err.len(), 1);
}

async fn predictions_are_cached_by_key_and_replaced(store: Store) {
    let row = |key: &str, version: &str, p: &str| CachedPrediction {
        key: key.into(),
        model_version: version.into(),
        prediction: p.into(),
    };
    assert!(store
        .cached_predictions(&["k1".into()])
        .await
        .unwrap()
        .is_empty());
    store
        .cache_predictions(&[row("k1", "v1", r#"{"result":[]}"#), row("k2", "v1", "{}")])
        .await
        .unwrap();
    store
        .cache_predictions(&[row("k1", "v2", r#"{"result":[1]}"#)])
        .await
        .unwrap();
    // More keys than one statement takes.
    let mut keys: Vec<String> = (0..1200).map(|i| format!("missing-{i}")).collect();
    keys.extend(["k1".to_string(), "k2".to_string()]);
    let found = store.cached_predictions(&keys).await.unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found["k1"], row("k1", "v2", r#"{"result":[1]}"#));
    assert_eq!(found["k2"].model_version, "v1");
}

/// Text with U+0000 is refused the same way on both backends (PostgreSQL cannot store it;
/// SQLite could, so a test on SQLite alone would not see the failure a PostgreSQL worker hits).
async fn text_with_nul_is_refused_alike(store: Store) {
    store.insert_batch(&new_batch("batch_n")).await.unwrap();
    let mut nul = line(1, LineKind::Error);
    nul.custom_id = Some("a\0b".into());
    let err = store.record_line("batch_n", &nul).await.unwrap_err();
    let StoreError::Database(sqlx::Error::Encode(inner)) = &err else {
        panic!("an encoding error expected: {err:?}")
    };
    assert_eq!(
        inner.downcast_ref::<NulInText>().map(|e| e.column),
        Some("batch_lines.custom_id"),
        "{err}"
    );
    assert!(
        store
            .finished_line_numbers("batch_n")
            .await
            .unwrap()
            .is_empty(),
        "nothing was recorded"
    );
    let b = store.get_batch("batch_n").await.unwrap().unwrap();
    assert_eq!((b.completed, b.failed), (0, 0));
    let mut bad_meta = new_batch("batch_m");
    bad_meta.metadata = Some("{\"k\":\"\0\"}".into());
    assert!(store.insert_batch(&bad_meta).await.is_err());
    // The store still works after the refusals.
    assert!(store
        .record_line("batch_n", &line(1, LineKind::Error))
        .await
        .unwrap());
}

/// A batch that failed an attempt goes behind the others; any unfinished batch can be failed.
async fn failed_attempts_send_a_batch_to_the_back(store: Store) {
    store.insert_batch(&new_batch("batch_1")).await.unwrap();
    store.insert_batch(&new_batch("batch_2")).await.unwrap();
    assert_eq!(
        store.claim_batch("w1", 60).await.unwrap().unwrap().id,
        "batch_1"
    );
    assert_eq!(
        store.note_failed_attempt("batch_1", "other").await.unwrap(),
        None,
        "only the lease owner counts"
    );
    assert_eq!(
        store.note_failed_attempt("batch_1", "w1").await.unwrap(),
        Some(1)
    );
    store.release_lease("batch_1", "w1").await.unwrap();
    assert_eq!(
        store.claim_batch("w1", 60).await.unwrap().unwrap().id,
        "batch_2",
        "fewer failures first"
    );
    assert_eq!(
        store.claim_batch("w2", 60).await.unwrap().unwrap().id,
        "batch_1",
        "then the failing one"
    );
    assert_eq!(
        store.note_failed_attempt("batch_1", "w2").await.unwrap(),
        Some(2)
    );

    // An in-progress batch can be failed by its lease owner.
    assert!(store
        .transition(
            "batch_2",
            "w1",
            &[BatchStatus::Validating],
            BatchStatus::InProgress
        )
        .await
        .unwrap());
    let errors = r#"[{"code":"input_file_missing","message":"m","param":null,"line":null}]"#;
    assert!(
        !store.fail_batch("batch_2", "w2", errors).await.unwrap(),
        "not by another worker"
    );
    assert!(store.fail_batch("batch_2", "w1", errors).await.unwrap());
    let b = store.get_batch("batch_2").await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.errors.as_deref()),
        (BatchStatus::Failed, Some(errors))
    );
    assert!(
        !store.fail_batch("batch_2", "w1", errors).await.unwrap(),
        "an ended batch stays as it is"
    );
}

/// A file an unfinished batch reads is not deleted; once every such batch has ended, it is.
async fn files_in_use_are_not_deleted(store: Store) {
    store.insert_file(&file("file-in", "batch")).await.unwrap();
    store
        .insert_file(&file("file-free", "batch"))
        .await
        .unwrap();
    store.insert_batch(&new_batch("batch_u")).await.unwrap();
    assert_eq!(
        store.delete_file_if_unused("file-free").await.unwrap(),
        FileDeletion::Deleted
    );
    assert_eq!(
        store.delete_file_if_unused("file-free").await.unwrap(),
        FileDeletion::NotFound
    );
    let in_use = FileDeletion::InUse {
        batch_id: "batch_u".into(),
        status: BatchStatus::Validating,
    };
    assert_eq!(
        store.delete_file_if_unused("file-in").await.unwrap(),
        in_use
    );
    store.claim_batch("w", 60).await.unwrap().unwrap();
    for (from, to) in [
        (BatchStatus::Validating, BatchStatus::InProgress),
        (BatchStatus::InProgress, BatchStatus::Finalizing),
        (BatchStatus::Finalizing, BatchStatus::Cancelling),
    ] {
        assert!(store.transition("batch_u", "w", &[from], to).await.unwrap());
        let in_use = FileDeletion::InUse {
            batch_id: "batch_u".into(),
            status: to,
        };
        assert_eq!(
            store.delete_file_if_unused("file-in").await.unwrap(),
            in_use
        );
    }
    assert!(store.get_file("file-in").await.unwrap().is_some());
    assert!(store
        .transition(
            "batch_u",
            "w",
            &[BatchStatus::Cancelling],
            BatchStatus::Cancelled
        )
        .await
        .unwrap());
    assert_eq!(
        store.delete_file_if_unused("file-in").await.unwrap(),
        FileDeletion::Deleted
    );
    assert!(store.get_file("file-in").await.unwrap().is_none());
}

/// What the ML backend's learning reads and writes: one annotation per task (ground truth
/// first, cancelled ones never), newest tasks first and bounded; a cheap state that changes
/// with the annotations; classifiers replaced whole per project.
async fn learning_reads_annotations_and_replaces_models(store: Store) {
    use batchlab_core::store::LearnedModel;
    use serde_json::json;
    let config = batchlab_core::config::Config::default();
    let curation = batchlab_core::curation::Curation::new(
        store.clone(),
        config.curation.clone(),
        config.label_studio.instance.clone(),
    );
    let schema = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;
    let event = |id: i64,
                 task: i64,
                 choice: &str,
                 ground_truth: bool,
                 cancelled: bool,
                 at: &str| {
        serde_json::to_vec(&json!({"action": "ANNOTATION_CREATED", "project": {"id": 5},
            "task": {"id": task, "project": 5, "data": {"text": format!("task {task}")}},
            "annotation": {"id": id, "task": task, "project": 5, "was_cancelled": cancelled, "ground_truth": ground_truth,
                "created_at": at, "updated_at": at,
                "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [choice]}}]}}))
        .unwrap()
    };
    let created = json!({"action": "PROJECT_CREATED", "project": {"id": 5, "title": "p", "label_config": schema}});
    curation
        .ingest(&serde_json::to_vec(&created).unwrap())
        .await
        .unwrap();
    for body in [
        event(1, 1, "a", false, false, "2026-12-05T10:00:00Z"),
        event(2, 1, "b", true, false, "2026-12-05T10:00:01Z"),
        event(3, 2, "a", false, false, "2026-12-05T10:00:02Z"),
        event(4, 3, "b", false, true, "2026-12-05T10:00:03Z"),
    ] {
        curation.ingest(&body).await.unwrap();
    }
    while curation.process_pending().await.unwrap() > 0 {}
    let instance = config.label_studio.instance.as_str();

    let state = store.annotation_state(instance, 5).await.unwrap();
    assert_eq!(
        state.annotations, 3,
        "the cancelled one is not learned from"
    );
    assert!(state.newest_us > 0);
    let rows = store.training_annotations(instance, 5, 10).await.unwrap();
    let got: Vec<(i64, bool, bool)> = rows
        .iter()
        .map(|r| (r.task_id, r.ground_truth, r.result.contains("\"b\"")))
        .collect();
    assert_eq!(got, vec![(2, false, false), (1, true, true)], "{rows:?}");
    assert!(rows[0].data.contains("task 2"));
    assert_eq!(
        store
            .training_annotations(instance, 5, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    let model = |control: &str| LearnedModel {
        control: control.into(),
        config_hash: "h".into(),
        fingerprint: "3:1".into(),
        classifier: "{}".into(),
        evaluation: "{}".into(),
        trained_at: 0,
    };
    store
        .save_learned_models(instance, 5, &[model("c"), model("d")])
        .await
        .unwrap();
    store
        .save_learned_models(instance, 6, &[model("c")])
        .await
        .unwrap();
    store
        .save_learned_models(instance, 5, &[model("d")])
        .await
        .unwrap();
    let five = store.learned_models(instance, 5).await.unwrap();
    assert_eq!(
        five.iter().map(|m| m.control.as_str()).collect::<Vec<_>>(),
        ["d"]
    );
    assert!(five[0].trained_at > 0, "stamped on save");
    assert_eq!(store.learned_models(instance, 6).await.unwrap().len(), 1);
    assert!(store.learned_models("other", 5).await.unwrap().is_empty());
}

/// The webhook processor reads its queue in passes bounded by count and by bytes of bodies, so a
/// run of huge deliveries (each may be up to `api.max_webhook_bytes`) cannot make one pass hold
/// them all; a pass takes at least one, however large, so the queue always moves.
async fn pending_events_are_read_in_passes_bounded_by_bytes(store: Store) {
    let sizes = [100usize, 5_000, 100, 300, 100];
    for (n, size) in sizes.iter().enumerate() {
        let body = format!("{{\"action\":\"X\",\"pad\":\"{}\"}}", "x".repeat(*size));
        store
            .insert_webhook_event(&NewWebhookEvent {
                instance: "default",
                delivery_key: &format!("key-{n}"),
                action: "X",
                project_id: None,
                body: &body,
            })
            .await
            .unwrap();
    }
    let ids = |events: Vec<batchlab_core::store::WebhookEvent>| -> Vec<usize> {
        events.iter().map(|e| e.body.len()).collect()
    };
    let all = store.pending_webhook_events(10, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(
        store
            .pending_webhook_events(3, usize::MAX)
            .await
            .unwrap()
            .len(),
        3,
        "bounded by count"
    );
    let lens = ids(store.pending_webhook_events(10, 1_000).await.unwrap());
    assert_eq!(
        lens.len(),
        2,
        "the second body crosses 1,000 bytes: {lens:?}"
    );
    assert!(lens[1] > 5_000);
    assert_eq!(
        store.pending_webhook_events(10, 1).await.unwrap().len(),
        1,
        "always at least one"
    );
}

batchlab_core::on_both_backends!(
    pending_events_are_read_in_passes_bounded_by_bytes,
    learning_reads_annotations_and_replaces_models,
    files_round_trip_and_page,
    batches_are_created_listed_and_cancelled,
    leases_give_each_batch_to_one_worker,
    concurrent_claims_never_share_a_batch,
    transitions_are_guarded_and_stamped,
    lines_are_recorded_exactly_once,
    predictions_are_cached_by_key_and_replaced,
    text_with_nul_is_refused_alike,
    failed_attempts_send_a_batch_to_the_back,
    files_in_use_are_not_deleted,
);

#[tokio::test]
async fn unsupported_urls_are_refused_by_name() {
    let err = Store::connect("mysql://x", 1).await.unwrap_err();
    assert!(err.to_string().contains("mysql://x"));
}

#[tokio::test]
async fn several_processes_can_open_a_new_sqlite_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("race.db").display());
    let opens: Vec<_> = (0..12)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Store::connect(&url, 2).await })
        })
        .collect();
    for open in opens {
        let store = open.await.unwrap().expect("every opener succeeds");
        store.ping().await.unwrap();
    }
}
