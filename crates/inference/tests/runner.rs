//! The batch runner end to end inside one process: real SQLite store, real blob directory,
//! real default model. Covers validation into error lines, failing batches, resuming after a
//! killed worker, cancelling and expiry.

use std::path::PathBuf;
use std::sync::OnceLock;

use batchlab_core::blob::{BlobStore, WriteLimits};
use batchlab_core::store::{
    BatchLine, BatchRecord, BatchStatus, FileRecord, LineKind, NewBatch, Store,
};
use batchlab_core::testing::TestDb;
use batchlab_inference::completions::BodyLimits;
use batchlab_inference::engine::{Engine, EngineConfig};
use batchlab_inference::runner::{Runner, RunnerSettings};
use serde_json::Value;
use tokio::io::AsyncReadExt;

fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = std::env::var("BATCHLAB_MODEL")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
                });
            assert!(
                path.exists(),
                "model {} missing: run scripts/fetch-model.sh",
                path.display()
            );
            Engine::load(EngineConfig {
                model_path: path,
                model_id: "SmolLM2-135M-Instruct".into(),
                max_queue: 64,
                max_batch: 16,
                prefix_cache_bytes: 64 << 20,
                threads: None,
                max_context: None,
                requantize: true,
                device: "cpu".into(),
                limits: Default::default(),
            })
            .expect("load the default model")
        })
        .clone()
}

struct Fixture {
    db: TestDb,
    blobs: BlobStore,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::on(TestDb::sqlite().await)
    }

    /// A fixture over a given database (SQLite or PostgreSQL).
    fn on(db: TestDb) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("files")).unwrap();
        Fixture { db, blobs, dir }
    }

    /// Fixtures over a fresh SQLite database and, when a server answers, a PostgreSQL one.
    async fn both() -> Vec<Fixture> {
        let mut all = vec![Fixture::new().await];
        if let Some(pg) = TestDb::postgres().await {
            all.push(Fixture::on(pg));
        }
        all
    }

    async fn cleanup(self) {
        self.db.cleanup().await;
    }

    fn store(&self) -> &Store {
        &self.db.store
    }

    fn settings(worker: &str) -> RunnerSettings {
        RunnerSettings {
            worker_id: worker.into(),
            lease_seconds: 30,
            concurrency: 2,
            body_limits: BodyLimits {
                default_max_tokens: 8,
                max_tokens_limit: 64,
                max_messages: 16,
            },
            max_lines: 100,
            max_line_bytes: 4096,
            max_attempts: 3,
            shutdown_grace: std::time::Duration::from_secs(30),
        }
    }

    fn runner(&self, worker: &str) -> Runner {
        self.runner_with(Fixture::settings(worker))
    }

    fn runner_with(&self, settings: RunnerSettings) -> Runner {
        Runner::new(self.store().clone(), self.blobs.clone(), engine(), settings)
    }

    async fn batch(&self, id: &str, lines: &[String], window_seconds: i64) -> BatchRecord {
        let body = lines.join("\n") + "\n";
        let file_id = format!("file-{id}");
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
        let limits = WriteLimits {
            max_bytes: 64 << 20,
            max_lines: None,
            require_utf8: true,
        };
        let stats = self
            .blobs
            .put_stream(&file_id, chunks, limits)
            .await
            .unwrap();
        let file = FileRecord {
            id: file_id.clone(),
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
            bytes: stats.bytes as i64,
            lines: stats.lines as i64,
            created_at: 0,
            expires_at: None,
        };
        self.store().insert_file(&file).await.unwrap();
        let new = NewBatch {
            id: id.into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: file_id,
            completion_window: "24h".into(),
            window_seconds,
            metadata: None,
            total: stats.lines as i64,
        };
        self.store().insert_batch(&new).await.unwrap()
    }

    async fn lines_of(&self, file_id: Option<&str>) -> Vec<Value> {
        let Some(id) = file_id else { return vec![] };
        let mut text = String::new();
        self.blobs
            .open_read(id)
            .await
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn chat(custom_id: &str, question: &str) -> String {
    serde_json::json!({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": question}], "max_tokens": 6, "temperature": 0},
    })
    .to_string()
}

fn custom_ids(lines: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap_or("<null>").to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn good_lines_complete_and_bad_lines_become_error_lines() {
    let f = Fixture::new().await;
    let lines = vec![
        chat("a", "What is the capital of France?"),
        "{this is not json".to_string(),
        chat("b", "Name a colour."),
        chat("c", "Say hello.").replace("/v1/chat/completions", "/v1/completions"),
        chat("a", "A duplicate custom_id."),
    ];
    let b = f.batch("batch_mixed", &lines, 86_400).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.id, b.id);
    assert_eq!(done.status, BatchStatus::Completed, "{done:?}");
    assert_eq!((done.total, done.completed, done.failed), (5, 2, 3));
    assert!(done.input_tokens > 0 && done.output_tokens > 0);
    assert!(
        done.in_progress_at.is_some()
            && done.finalizing_at.is_some()
            && done.completed_at.is_some()
    );

    let out = f.lines_of(done.output_file_id.as_deref()).await;
    assert_eq!(custom_ids(&out), ["a", "b"]);
    for line in &out {
        assert_eq!(line["response"]["status_code"], 200);
        let text = line["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(!text.trim().is_empty(), "the model answered {line}");
        assert!(line["error"].is_null());
    }
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    let codes: Vec<&str> = errors
        .iter()
        .map(|l| l["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["invalid_json_line", "mismatched_url", "duplicate_custom_id"]
    );
    assert_eq!(custom_ids(&errors), ["<null>", "a", "c"]);
    let outputs = f
        .store()
        .get_file(done.output_file_id.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (outputs.purpose.as_str(), outputs.lines),
        ("batch_output", 2)
    );
}

/// Lines run one after another that start alike are served from the prompt cache, each line's
/// usage says how much of its prompt was, and the batch's `cached_tokens` is their sum.
#[tokio::test]
async fn lines_that_start_alike_report_their_cached_tokens_and_the_batch_sums_them() {
    let f = Fixture::new().await;
    let shared = "Read the following instructions carefully before you answer: reply with one \
                  short word, in lower case, with no punctuation and nothing else at all.";
    let lines: Vec<String> = ["red", "green", "blue"]
        .iter()
        .map(|c| chat(c, &format!("{shared} Name something {c}.")))
        .collect();
    let b = f.batch("batch_cached", &lines, 86_400).await;
    // One line at a time, so that each later line finds the earlier ones' prompts cached.
    let runner = f.runner_with(RunnerSettings {
        concurrency: 1,
        ..Fixture::settings("w1")
    });
    let done = runner.run_once().await.unwrap().unwrap();
    assert_eq!(done.id, b.id);
    assert_eq!((done.completed, done.failed), (3, 0), "{done:?}");
    let out = f.lines_of(done.output_file_id.as_deref()).await;
    let cached: Vec<i64> = out
        .iter()
        .map(|l| {
            l["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_i64()
                .unwrap()
        })
        .collect();
    // The first line may find only the template's default system prompt (other tests' prompts
    // start with it too); the later ones find the shared instructions as well.
    assert!(
        cached[1] > cached[0] && cached[2] > cached[0],
        "cached tokens per line: {cached:?}"
    );
    assert_eq!(done.cached_tokens, cached.iter().sum::<i64>(), "{done:?}");
}

#[tokio::test]
async fn a_file_without_a_usable_line_fails_with_line_numbers() {
    let f = Fixture::new().await;
    let lines = vec!["nope".to_string(), chat("x", "q").replace("POST", "GET")];
    f.batch("batch_bad", &lines, 86_400).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Failed);
    let errors: Value = serde_json::from_str(done.errors.as_deref().unwrap()).unwrap();
    let lines: Vec<i64> = errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, [1, 2]);
    assert_eq!(errors[1]["code"], "invalid_method");
    assert!(done.output_file_id.is_none());
}

#[tokio::test]
async fn a_resumed_batch_never_redoes_a_finished_line() {
    let f = Fixture::new().await;
    let lines = vec![chat("a", "One?"), chat("b", "Two?"), chat("c", "Three?")];
    let b = f.batch("batch_resume", &lines, 86_400).await;
    // A first worker validated the batch, finished line 2 and died holding an expired lease.
    let dead = "dead-worker";
    f.store().claim_batch(dead, 30).await.unwrap().unwrap();
    f.store()
        .transition(
            &b.id,
            dead,
            &[BatchStatus::Validating],
            BatchStatus::InProgress,
        )
        .await
        .unwrap();
    let marker = r#"{"custom_id":"b","from":"the first worker"}"#;
    let finished = BatchLine {
        line_no: 2,
        custom_id: Some("b".into()),
        kind: LineKind::Output,
        body: marker.into(),
        input_tokens: 1,
        cached_tokens: 0,
        output_tokens: 1,
    };
    assert!(f.store().record_line(&b.id, &finished).await.unwrap());
    f.store().renew_lease(&b.id, dead, -1).await.unwrap();

    let done = f.runner("w2").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!((done.completed, done.failed), (3, 0));
    let out = f.lines_of(done.output_file_id.as_deref()).await;
    assert_eq!(custom_ids(&out), ["a", "b", "c"]);
    assert_eq!(
        out[1]["from"], "the first worker",
        "line 2 was kept, not redone"
    );
}

#[tokio::test]
async fn cancelling_keeps_finished_lines_and_expiry_reports_the_rest() {
    let f = Fixture::new().await;
    let lines: Vec<String> = (0..3).map(|i| chat(&format!("k{i}"), "Hi")).collect();
    let b = f.batch("batch_cancel", &lines, 86_400).await;
    let finished = BatchLine {
        line_no: 1,
        custom_id: Some("k0".into()),
        kind: LineKind::Output,
        body: r#"{"custom_id":"k0"}"#.into(),
        input_tokens: 1,
        cached_tokens: 0,
        output_tokens: 1,
    };
    f.store().record_line(&b.id, &finished).await.unwrap();
    f.store().request_cancel(&b.id).await.unwrap();
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert!(done.cancelled_at.is_some());
    assert_eq!(
        custom_ids(&f.lines_of(done.output_file_id.as_deref()).await),
        ["k0"]
    );

    let lines: Vec<String> = (0..4).map(|i| chat(&format!("e{i}"), "Hi")).collect();
    f.batch("batch_expire", &lines, 0).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Expired, "{done:?}");
    assert!(done.expired_at.is_some());
    assert_eq!(
        done.completed + done.failed,
        4,
        "every line is accounted for"
    );
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    assert!(errors.iter().all(|l| l["error"]["code"] == "batch_expired"));
    let out = f.lines_of(done.output_file_id.as_deref()).await;
    let mut all = custom_ids(&out);
    all.extend(custom_ids(&errors));
    all.sort();
    assert_eq!(all, ["e0", "e1", "e2", "e3"]);
}

/// A batch whose input file is gone cannot run: it ends `failed` with an `errors.data[]` entry
/// saying so, and the batch queued after it runs (before, the worker retried it forever).
#[tokio::test]
async fn a_batch_whose_input_file_vanished_fails_and_the_queue_moves_on() {
    for f in Fixture::both().await {
        let gone = f.batch("batch_gone", &[chat("a", "Hi")], 86_400).await;
        f.blobs.delete(&gone.input_file_id).await.unwrap();
        f.store().delete_file(&gone.input_file_id).await.unwrap();
        f.batch("batch_next", &[chat("b", "Hi")], 86_400).await;
        let runner = f.runner("w1");

        let failed = runner
            .run_once()
            .await
            .expect("a missing input is the batch's failure, not the worker's")
            .unwrap();
        assert_eq!(
            (failed.id.as_str(), failed.status),
            ("batch_gone", BatchStatus::Failed),
            "{failed:?}"
        );
        assert!(failed.failed_at.is_some());
        let errors: Value = serde_json::from_str(failed.errors.as_deref().unwrap()).unwrap();
        assert_eq!(errors[0]["code"], "input_file_missing", "{errors}");
        assert!(
            errors[0]["message"]
                .as_str()
                .unwrap()
                .contains(&gone.input_file_id),
            "{errors}"
        );

        let next = runner.run_once().await.unwrap().unwrap();
        assert_eq!(
            (next.id.as_str(), next.status),
            ("batch_next", BatchStatus::Completed),
            "{next:?}"
        );
        assert!(
            runner.run_once().await.unwrap().is_none(),
            "nothing is left in the queue"
        );
        f.cleanup().await;
    }
}

/// PostgreSQL text cannot hold U+0000: a `custom_id` holding one is refused at validation as
/// that line's error (its id echoed, escaped, in the error file) and the rest of the batch runs.
#[tokio::test]
async fn a_nul_in_a_custom_id_is_that_lines_error_and_the_batch_completes() {
    for f in Fixture::both().await {
        f.batch(
            "batch_nul",
            &[chat("ok", "Hi"), chat("bad\u{0}id", "Hi")],
            86_400,
        )
        .await;
        f.batch("batch_after", &[chat("c", "Hi")], 86_400).await;
        let runner = f.runner("w1");
        let done = runner
            .run_once()
            .await
            .expect("a NUL must not break the worker")
            .unwrap();
        assert_eq!(
            (done.id.as_str(), done.status),
            ("batch_nul", BatchStatus::Completed),
            "{done:?}"
        );
        assert_eq!((done.completed, done.failed), (1, 1));
        assert_eq!(
            custom_ids(&f.lines_of(done.output_file_id.as_deref()).await),
            ["ok"]
        );
        let errors = f.lines_of(done.error_file_id.as_deref()).await;
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0]["error"]["code"], "invalid_custom_id",
            "{}",
            errors[0]
        );
        assert_eq!(
            errors[0]["custom_id"], "bad\u{0}id",
            "the id is echoed, JSON-escaped"
        );
        let after = runner.run_once().await.unwrap().unwrap();
        assert_eq!(
            (after.id.as_str(), after.status),
            ("batch_after", BatchStatus::Completed)
        );
        f.cleanup().await;
    }
}

/// A line longer than `max_line_bytes` is that line's `line_too_long` error (read past, never
/// held whole); the other lines run.
#[tokio::test]
async fn an_over_long_line_is_that_lines_error_and_the_rest_runs() {
    let f = Fixture::new().await;
    let huge = chat("huge", &"word ".repeat(1 << 20));
    let lines = vec![chat("a", "Hi"), huge, chat("b", "Hi")];
    f.batch("batch_long", &lines, 86_400).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Completed, "{done:?}");
    assert_eq!((done.total, done.completed, done.failed), (3, 2, 1));
    assert_eq!(
        custom_ids(&f.lines_of(done.output_file_id.as_deref()).await),
        ["a", "b"]
    );
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["error"]["code"], "line_too_long", "{}", errors[0]);
    assert!(
        errors[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4096 bytes at most"),
        "{}",
        errors[0]
    );
    f.cleanup().await;
}

/// `max_tokens` above the server's limit is that line's `invalid_body` error naming the limit.
#[tokio::test]
async fn max_tokens_above_the_limit_is_that_lines_error() {
    let f = Fixture::new().await;
    let greedy = chat("greedy", "Hi").replace("\"max_tokens\":6", "\"max_tokens\":1000000000");
    f.batch("batch_greedy", &[chat("a", "Hi"), greedy], 86_400)
        .await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.completed, done.failed),
        (BatchStatus::Completed, 1, 1),
        "{done:?}"
    );
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    assert_eq!(errors[0]["custom_id"], "greedy");
    assert_eq!(errors[0]["error"]["code"], "invalid_body");
    assert_eq!(
        errors[0]["error"]["message"],
        "max_tokens 1000000000 exceeds this server's limit of 64"
    );
    f.cleanup().await;
}

/// A batch whose processing keeps failing (here: its input cannot be read) goes behind the
/// other batches after each failure and ends `failed` after `max_attempts`.
#[tokio::test]
async fn a_batch_that_keeps_failing_lets_others_pass_then_fails() {
    for f in Fixture::both().await {
        let broken = f.batch("batch_broken", &[chat("a", "Hi")], 86_400).await;
        // A directory where the input's body should be: opening works, every read fails.
        f.blobs.delete(&broken.input_file_id).await.unwrap();
        std::fs::create_dir(f.dir.path().join("files").join(&broken.input_file_id)).unwrap();
        f.batch("batch_fine", &[chat("b", "Hi")], 86_400).await;
        let runner = f.runner_with(RunnerSettings {
            max_attempts: 2,
            ..Fixture::settings("w1")
        });

        assert!(
            runner.run_once().await.is_err(),
            "the first failure is reported and retried later"
        );
        let broken_now = f.store().get_batch("batch_broken").await.unwrap().unwrap();
        assert_eq!(
            (broken_now.status, broken_now.lease_owner.as_deref()),
            (BatchStatus::Validating, None)
        );
        let fine = runner.run_once().await.unwrap().unwrap();
        assert_eq!(
            (fine.id.as_str(), fine.status),
            ("batch_fine", BatchStatus::Completed),
            "the queue moved on"
        );

        let failed = runner
            .run_once()
            .await
            .expect("the last attempt fails the batch")
            .unwrap();
        assert_eq!(
            (failed.id.as_str(), failed.status),
            ("batch_broken", BatchStatus::Failed),
            "{failed:?}"
        );
        let errors: Value = serde_json::from_str(failed.errors.as_deref().unwrap()).unwrap();
        assert_eq!(errors[0]["code"], "processing_failed", "{errors}");
        assert!(
            errors[0]["message"]
                .as_str()
                .unwrap()
                .contains("failed 2 times"),
            "{errors}"
        );
        assert!(runner.run_once().await.unwrap().is_none());
        f.cleanup().await;
    }
}

/// Shutting a worker down mid-batch (SIGTERM) loses nothing and stalls nothing: it starts no
/// new line, releases its lease at once, so another worker resumes the batch instead of waiting
/// out `lease_seconds` or the lines in flight, and records those lines; every `custom_id` comes
/// out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_records_its_lines_and_hands_the_batch_over_at_once() {
    for f in Fixture::both().await {
        // With time to finish the lines in flight, and with none (they are abandoned unrecorded).
        for grace_seconds in [30, 0] {
            let ids: Vec<String> = (0..24).map(|i| format!("d{i:02}")).collect();
            let lines: Vec<String> = ids.iter().map(|id| chat(id, "Count to three.")).collect();
            let b = f
                .batch(&format!("batch_drain_{grace_seconds}"), &lines, 86_400)
                .await;
            let mut settings = Fixture::settings("w1");
            // A lease far longer than the test: only a released lease lets w2 in.
            settings.lease_seconds = 3_600;
            settings.shutdown_grace = std::time::Duration::from_secs(grace_seconds);
            let first = f.runner_with(settings);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = tokio::spawn({
                let first = first.clone();
                async move {
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    first
                        .run_forever(std::time::Duration::from_millis(20), shutdown)
                        .await
                }
            });
            // Shut down once a few lines are recorded (so lines are in flight, most not started).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                let now = f.store().get_batch(&b.id).await.unwrap().unwrap();
                if now.completed + now.failed >= 2 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no line was recorded in time: {now:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            stop.send(()).unwrap();
            // The lease is given back first, while the lines in flight still run: lines are
            // recorded after it is free (before, a slow CPU kept the batch seconds from others).
            let recorded_at_release = loop {
                let now = f.store().get_batch(&b.id).await.unwrap().unwrap();
                if now.lease_owner.is_none() {
                    break now.completed + now.failed;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), running)
                .await
                .expect("the worker drains within its grace period")
                .unwrap();
            let handed_over = f.store().get_batch(&b.id).await.unwrap().unwrap();
            if grace_seconds > 0 {
                assert!(
                    handed_over.completed + handed_over.failed > recorded_at_release,
                    "lines in flight are recorded after the lease is released: {recorded_at_release} then {handed_over:?}"
                );
            }
            assert_eq!(
                handed_over.status,
                BatchStatus::InProgress,
                "{handed_over:?}"
            );
            assert_eq!(
                handed_over.lease_owner, None,
                "the lease is released, not left to expire: {handed_over:?}"
            );
            assert!(
                handed_over.completed + handed_over.failed < ids.len() as i64,
                "the worker stopped starting lines: {handed_over:?}"
            );

            let done = f
                .runner("w2")
                .run_once()
                .await
                .unwrap()
                .expect("another worker claims the batch at once");
            assert_eq!(done.status, BatchStatus::Completed);
            let mut all = f.lines_of(done.output_file_id.as_deref()).await;
            all.extend(f.lines_of(done.error_file_id.as_deref()).await);
            assert_eq!(
                custom_ids(&all),
                ids,
                "every line exactly once (grace {grace_seconds} s)"
            );
        }
        f.cleanup().await;
    }
}
