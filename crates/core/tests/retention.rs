//! Retention (`batchlab_core::retention`), on SQLite and PostgreSQL alike: expired files go and
//! their space comes back, files an unfinished batch uses stay, processed webhook events past
//! the cutoff go while newer and pending ones stay, and the background task stops when told.

use std::path::Path;
use std::time::Duration;

use batchlab_core::blob::{BlobStore, WriteLimits};
use batchlab_core::config::RetentionConfig;
use batchlab_core::retention::{Retention, RetentionReport};
use batchlab_core::store::{
    now, BatchStatus, FileDeletion, FileRecord, NewBatch, NewWebhookEvent, Store,
};
use bytes::Bytes;
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400;

/// A database and a blob directory for one test.
struct Fixture {
    store: Store,
    /// The database's URL, for ageing rows behind the store's back.
    url: String,
    blobs: BlobStore,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn retention(&self, config: &RetentionConfig) -> Retention {
        Retention::new(self.store.clone(), self.blobs.clone(), config)
    }

    /// Stores a body of `size` bytes and records it as a file expiring at `expires_at`.
    async fn put(&self, id: &str, size: usize, expires_at: Option<i64>) {
        let body = Bytes::from(vec![b'x'; size]);
        let limits = WriteLimits {
            max_bytes: u64::MAX,
            max_lines: None,
            require_utf8: true,
        };
        let stats = self
            .blobs
            .put_stream(
                id,
                futures::stream::iter([Ok::<_, std::io::Error>(body)]),
                limits,
            )
            .await
            .unwrap();
        assert_eq!(stats.bytes, size as u64);
        self.store
            .insert_file(&record(id, size, expires_at))
            .await
            .unwrap();
    }

    fn body_exists(&self, id: &str) -> bool {
        self.dir.path().join(id).exists()
    }

    /// Bytes of every file in the blob directory: what the disk holds for file bodies.
    fn dir_bytes(&self) -> u64 {
        dir_bytes(self.dir.path())
    }

    /// Runs `sql` on the database directly (to age rows the store only ever stamps with now).
    async fn exec(&self, sql: &str) {
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        conn.execute(sql).await.unwrap();
        conn.close().await.unwrap();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn record(id: &str, size: usize, expires_at: Option<i64>) -> FileRecord {
    FileRecord {
        id: id.into(),
        filename: format!("{id}.jsonl"),
        purpose: "batch".into(),
        bytes: size as i64,
        lines: 1,
        created_at: now() - 40 * DAY,
        expires_at,
    }
}

fn new_batch(id: &str, input: &str) -> NewBatch {
    NewBatch {
        id: id.into(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: input.into(),
        completion_window: "24h".into(),
        window_seconds: DAY,
        metadata: None,
        total: 1,
    }
}

fn config(webhook_events_days: u64, interval_seconds: u64) -> RetentionConfig {
    RetentionConfig {
        enabled: true,
        interval_seconds,
        webhook_events_days,
    }
}

async fn event(store: &Store, key: &str) -> i64 {
    let (id, new) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: key,
            action: "ANNOTATION_CREATED",
            project_id: Some(1),
            body: &format!("{{\"key\":\"{key}\"}}"),
        })
        .await
        .unwrap();
    assert!(new);
    id
}

/// An expired file's row and body go, and the blob directory shrinks by exactly its size; files
/// not expired yet, or without an expiry, stay whole.
async fn expired_files_go_and_their_space_comes_back(fx: Fixture) {
    let t = now();
    fx.put("file-old", 1_000, Some(t - 10)).await;
    fx.put("file-fresh", 300, Some(t + 3_600)).await;
    fx.put("file-forever", 200, None).await;
    let before = fx.dir_bytes();
    assert_eq!(before, 1_500);

    let report = fx.retention(&config(30, 3_600)).run_once().await.unwrap();
    assert_eq!(
        report,
        RetentionReport {
            files_deleted: 1,
            bytes_freed: 1_000,
            ..RetentionReport::default()
        }
    );
    assert_eq!(fx.dir_bytes(), before - 1_000, "the space came back");
    assert!(!fx.body_exists("file-old"));
    assert!(fx.store.get_file("file-old").await.unwrap().is_none());
    for kept in ["file-fresh", "file-forever"] {
        assert!(fx.body_exists(kept), "{kept}");
        assert!(fx.store.get_file(kept).await.unwrap().is_some(), "{kept}");
    }

    let again = fx.retention(&config(30, 3_600)).run_once().await.unwrap();
    assert_eq!(again, RetentionReport::default(), "nothing left to delete");
    assert_eq!(fx.dir_bytes(), 500);
}

/// A file past its expiry that an unfinished batch uses (its input, or its output or error file)
/// stays through every unfinished status, as `DELETE /v1/files` refuses it (409); the pass that
/// follows the batch's end deletes it.
async fn files_an_unfinished_batch_uses_stay_until_it_ends(fx: Fixture) {
    let expired = Some(now() - DAY);
    for id in ["file-in", "file-out", "file-err", "file-done-in"] {
        fx.put(id, 100, expired).await;
    }
    // A batch that has ended: its expired input goes at once.
    fx.store
        .insert_batch(&new_batch("batch_done", "file-done-in"))
        .await
        .unwrap();
    fx.store.claim_batch("w", 60).await.unwrap().unwrap();
    assert!(fx.store.fail_batch("batch_done", "w", "[]").await.unwrap());
    fx.store.release_lease("batch_done", "w").await.unwrap();

    fx.store
        .insert_batch(&new_batch("batch_live", "file-in"))
        .await
        .unwrap();
    fx.store
        .set_output_files("batch_live", Some("file-out"), Some("file-err"))
        .await
        .unwrap();
    let retention = fx.retention(&config(30, 3_600));
    let first = retention.run_once().await.unwrap();
    assert_eq!((first.files_deleted, first.bytes_freed), (1, 100));
    assert!(!fx.body_exists("file-done-in"));

    fx.store.claim_batch("w", 60).await.unwrap().unwrap();
    let steps = [
        (BatchStatus::Validating, BatchStatus::InProgress),
        (BatchStatus::InProgress, BatchStatus::Finalizing),
        (BatchStatus::Finalizing, BatchStatus::Cancelling),
    ];
    let mut status = BatchStatus::Validating;
    for step in 0..=steps.len() {
        let report = retention.run_once().await.unwrap();
        assert_eq!(report.files_deleted, 0, "{status:?}");
        for id in ["file-in", "file-out", "file-err"] {
            assert!(fx.body_exists(id), "{id} while {status:?}");
            assert!(fx.store.get_file(id).await.unwrap().is_some(), "{id}");
        }
        // The same rule as `DELETE /v1/files`.
        assert_eq!(
            fx.store.delete_file_if_unused("file-in").await.unwrap(),
            FileDeletion::InUse {
                batch_id: "batch_live".into(),
                status
            }
        );
        if let Some(&(from, to)) = steps.get(step) {
            assert!(fx
                .store
                .transition("batch_live", "w", &[from], to)
                .await
                .unwrap());
            status = to;
        }
    }
    assert_eq!(
        status,
        BatchStatus::Cancelling,
        "every unfinished status was seen"
    );

    assert!(fx
        .store
        .transition(
            "batch_live",
            "w",
            &[BatchStatus::Cancelling],
            BatchStatus::Cancelled
        )
        .await
        .unwrap());
    let last = retention.run_once().await.unwrap();
    assert_eq!((last.files_deleted, last.bytes_freed), (3, 300));
    assert_eq!(fx.dir_bytes(), 0);
}

/// Processed events (applied or failed) older than the cutoff go; newer ones stay, and pending
/// ones stay however old, a START_TRAINING held for its export included. 0 days keeps all.
async fn processed_events_past_the_cutoff_go(fx: Fixture) {
    let store = &fx.store;
    let applied_old = event(store, "applied-old").await;
    let failed_old = event(store, "failed-old").await;
    let applied_recent = event(store, "applied-recent").await;
    let pending_old = event(store, "pending-old").await;
    let held_old = event(store, "held-old").await;
    for id in [applied_old, applied_recent] {
        store
            .begin_event(id, "ok")
            .await
            .unwrap()
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    store.fail_event(failed_old, "bad result").await.unwrap();
    let mut held = store.begin_event(held_old, "x").await.unwrap().unwrap();
    held.keep_pending("awaiting export", now() + 3_600)
        .await
        .unwrap();
    held.commit().await.unwrap();

    let t = now();
    let old = t - 31 * DAY;
    fx.exec(&format!(
        "UPDATE webhook_events SET received_at = {old}, processed_at = {old} WHERE id IN ({applied_old}, {failed_old})"
    ))
    .await;
    fx.exec(&format!(
        "UPDATE webhook_events SET received_at = {old}, processed_at = {} WHERE id = {applied_recent}",
        t - 29 * DAY
    ))
    .await;
    fx.exec(&format!(
        "UPDATE webhook_events SET received_at = {old} WHERE id IN ({pending_old}, {held_old})"
    ))
    .await;
    let counts = store.webhook_event_counts(None).await.unwrap();
    assert_eq!((counts.received, counts.pending, counts.failed), (5, 2, 1));

    let forever = fx.retention(&config(0, 3_600)).run_once().await.unwrap();
    assert_eq!(forever.events_deleted, 0, "0 days keeps every event");
    assert_eq!(store.webhook_event_counts(None).await.unwrap(), counts);

    let report = fx.retention(&config(30, 3_600)).run_once().await.unwrap();
    assert_eq!(
        report,
        RetentionReport {
            events_deleted: 2,
            ..RetentionReport::default()
        }
    );
    let counts = store.webhook_event_counts(None).await.unwrap();
    assert_eq!((counts.received, counts.pending, counts.failed), (3, 2, 0));
    let pending: Vec<i64> = store
        .pending_webhook_events(10, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        pending,
        [pending_old],
        "the held one is pending but not due yet"
    );
    // The recent processed event is still there: a second delivery of its body is a duplicate.
    let (id, new) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: "applied-recent",
            action: "ANNOTATION_CREATED",
            project_id: Some(1),
            body: "{}",
        })
        .await
        .unwrap();
    assert_eq!((id, new), (applied_recent, false));
}

/// Each statement deletes a bounded page; a pass repeats them until nothing is left, and a
/// missing body is no error (nothing freed for it).
async fn passes_work_in_bounded_pages(fx: Fixture) {
    let t = now();
    for i in 0..5 {
        fx.store
            .insert_file(&record(&format!("file-row-{i}"), 10, Some(t - 1)))
            .await
            .unwrap();
    }
    let pages: Vec<Vec<String>> = {
        let mut pages = Vec::new();
        loop {
            let page = fx.store.delete_expired_files(t, 2).await.unwrap();
            let done = page.is_empty();
            pages.push(page.into_iter().map(|f| f.id).collect());
            if done {
                break;
            }
        }
        pages
    };
    assert_eq!(
        pages,
        [
            vec!["file-row-0", "file-row-1"],
            vec!["file-row-2", "file-row-3"],
            vec!["file-row-4"],
            vec![]
        ]
    );

    for i in 0..5 {
        let id = event(&fx.store, &format!("e{i}")).await;
        fx.store
            .begin_event(id, "ok")
            .await
            .unwrap()
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let cutoff = now() + 1;
    let mut deleted = Vec::new();
    loop {
        let n = fx
            .store
            .delete_processed_webhook_events(cutoff, 2)
            .await
            .unwrap();
        deleted.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(deleted, [2, 2, 1, 0]);

    // One pass of pages of 2 takes all 5 files, bodies or not.
    for i in 0..4 {
        fx.put(&format!("file-body-{i}"), 50, Some(t - 1)).await;
    }
    fx.store
        .insert_file(&record("file-no-body", 70, Some(t - 1)))
        .await
        .unwrap();
    let report = fx
        .retention(&config(30, 3_600))
        .with_page_size(2)
        .run_once()
        .await
        .unwrap();
    assert_eq!(
        report,
        RetentionReport {
            files_deleted: 5,
            bytes_freed: 200,
            ..RetentionReport::default()
        }
    );
    assert_eq!(fx.dir_bytes(), 0);
    assert!(fx.store.get_file("file-no-body").await.unwrap().is_none());
}

/// The task runs a pass at start, then sleeps its interval; cancelling the token ends it at
/// once, mid-sleep.
async fn the_task_runs_at_start_and_stops_when_cancelled(fx: Fixture) {
    fx.put("file-old", 123, Some(now() - 1)).await;
    let retention = fx.retention(&config(30, 3_600));
    let mut status = retention.subscribe();
    let shutdown = CancellationToken::new();
    let task = retention.spawn(shutdown.clone());
    let seen = tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.passes >= 1))
        .await
        .expect("a first pass within 30 s")
        .expect("the task is alive")
        .clone();
    assert_eq!(seen.failures, 0);
    assert_eq!(
        seen.last.map(|r| (r.files_deleted, r.bytes_freed)),
        Some((1, 123))
    );
    assert!(!fx.body_exists("file-old"));
    assert!(!task.is_finished(), "it waits for the next tick");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task ends promptly once cancelled")
        .expect("the task did not panic");
    assert_eq!(status.borrow().passes, 1, "an hour did not pass");
}

/// A pass that fails (the database is away) is logged and retried on the next tick: the task
/// goes on until cancelled.
async fn failed_passes_are_retried_and_never_end_the_task(fx: Fixture) {
    fx.store.close().await;
    let retention = fx.retention(&config(30, 1));
    let mut status = retention.subscribe();
    let shutdown = CancellationToken::new();
    let task = retention.spawn(shutdown.clone());
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.failures >= 2),
    )
    .await
    .expect("two failed passes within 30 s")
    .expect("the task is alive")
    .clone();
    assert_eq!(seen.passes, 0);
    assert!(!task.is_finished(), "failures never end the loop");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task ends promptly once cancelled")
        .expect("the task did not panic");
}

/// Turned off, the task ends at once without a pass: an expired file stays.
async fn a_disabled_task_deletes_nothing(fx: Fixture) {
    fx.put("file-old", 10, Some(now() - 1)).await;
    let mut off = config(30, 3_600);
    off.enabled = false;
    let retention = fx.retention(&off);
    let status = retention.subscribe();
    let task = retention.spawn(CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("a disabled task ends by itself")
        .expect("the task did not panic");
    let seen = status.borrow().clone();
    assert_eq!((seen.passes, seen.failures), (0, 0));
    assert!(fx.body_exists("file-old"));
    assert!(fx.store.get_file("file-old").await.unwrap().is_some());
}

fn fixture(db: &batchlab_core::testing::TestDb) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        store: db.store.clone(),
        url: db.url.clone(),
        blobs: BlobStore::open(dir.path()).unwrap(),
        dir,
    }
}

batchlab_core::on_both_backends!(
    with fixture;
    expired_files_go_and_their_space_comes_back,
    files_an_unfinished_batch_uses_stay_until_it_ends,
    processed_events_past_the_cutoff_go,
    passes_work_in_bounded_pages,
    the_task_runs_at_start_and_stops_when_cancelled,
    failed_passes_are_retried_and_never_end_the_task,
    a_disabled_task_deletes_nothing,
);
