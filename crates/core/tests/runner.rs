//! The batch runner end to end inside one process: real SQLite store, real blob directory,
//! real default model. Covers validation into error lines, failing batches, resuming after a
//! killed worker, cancelling and expiry.

use std::path::PathBuf;
use std::sync::OnceLock;

use batchlab_core::blob::{BlobStore, WriteLimits};
use batchlab_core::engine::{Engine, EngineConfig};
use batchlab_core::runner::{Runner, RunnerSettings};
use batchlab_core::store::{BatchLine, BatchRecord, BatchStatus, FileRecord, LineKind, NewBatch, Store};
use batchlab_core::testing::TestDb;
use serde_json::Value;
use tokio::io::AsyncReadExt;

fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = std::env::var("BATCHLAB_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
            assert!(path.exists(), "model {} missing: run scripts/fetch-model.sh", path.display());
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
            })
            .expect("load the default model")
        })
        .clone()
}

struct Fixture {
    db: TestDb,
    blobs: BlobStore,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("files")).unwrap();
        Fixture { db: TestDb::sqlite().await, blobs, _dir: dir }
    }

    fn store(&self) -> &Store {
        &self.db.store
    }

    fn runner(&self, worker: &str) -> Runner {
        let settings = RunnerSettings {
            worker_id: worker.into(),
            lease_seconds: 30,
            concurrency: 2,
            default_max_tokens: 8,
            max_lines: 100,
        };
        Runner::new(self.store().clone(), self.blobs.clone(), engine(), settings)
    }

    async fn batch(&self, id: &str, lines: &[String], window_seconds: i64) -> BatchRecord {
        let body = lines.join("\n") + "\n";
        let file_id = format!("file-{id}");
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
        let limits = WriteLimits { max_bytes: 1 << 20, max_lines: None, require_utf8: true };
        let stats = self.blobs.put_stream(&file_id, chunks, limits).await.unwrap();
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
        self.blobs.open_read(id).await.unwrap().read_to_string(&mut text).await.unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
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
    let mut ids: Vec<String> = lines.iter().map(|l| l["custom_id"].as_str().unwrap_or("<null>").to_string()).collect();
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
    assert!(done.in_progress_at.is_some() && done.finalizing_at.is_some() && done.completed_at.is_some());

    let out = f.lines_of(done.output_file_id.as_deref()).await;
    assert_eq!(custom_ids(&out), ["a", "b"]);
    for line in &out {
        assert_eq!(line["response"]["status_code"], 200);
        let text = line["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "the model answered {line}");
        assert!(line["error"].is_null());
    }
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    let codes: Vec<&str> = errors.iter().map(|l| l["error"]["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["invalid_json_line", "mismatched_url", "duplicate_custom_id"]);
    assert_eq!(custom_ids(&errors), ["<null>", "a", "c"]);
    let outputs = f.store().get_file(done.output_file_id.as_deref().unwrap()).await.unwrap().unwrap();
    assert_eq!((outputs.purpose.as_str(), outputs.lines), ("batch_output", 2));
}

#[tokio::test]
async fn a_file_without_a_usable_line_fails_with_line_numbers() {
    let f = Fixture::new().await;
    let lines = vec!["nope".to_string(), chat("x", "q").replace("POST", "GET")];
    f.batch("batch_bad", &lines, 86_400).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Failed);
    let errors: Value = serde_json::from_str(done.errors.as_deref().unwrap()).unwrap();
    let lines: Vec<i64> = errors.as_array().unwrap().iter().map(|e| e["line"].as_i64().unwrap()).collect();
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
    f.store().transition(&b.id, dead, &[BatchStatus::Validating], BatchStatus::InProgress).await.unwrap();
    let marker = r#"{"custom_id":"b","from":"the first worker"}"#;
    let finished = BatchLine {
        line_no: 2,
        custom_id: Some("b".into()),
        kind: LineKind::Output,
        body: marker.into(),
        input_tokens: 1,
        output_tokens: 1,
    };
    assert!(f.store().record_line(&b.id, &finished).await.unwrap());
    f.store().renew_lease(&b.id, dead, -1).await.unwrap();

    let done = f.runner("w2").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Completed);
    assert_eq!((done.completed, done.failed), (3, 0));
    let out = f.lines_of(done.output_file_id.as_deref()).await;
    assert_eq!(custom_ids(&out), ["a", "b", "c"]);
    assert_eq!(out[1]["from"], "the first worker", "line 2 was kept, not redone");
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
        output_tokens: 1,
    };
    f.store().record_line(&b.id, &finished).await.unwrap();
    f.store().request_cancel(&b.id).await.unwrap();
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Cancelled);
    assert!(done.cancelled_at.is_some());
    assert_eq!(custom_ids(&f.lines_of(done.output_file_id.as_deref()).await), ["k0"]);

    let lines: Vec<String> = (0..4).map(|i| chat(&format!("e{i}"), "Hi")).collect();
    f.batch("batch_expire", &lines, 0).await;
    let done = f.runner("w1").run_once().await.unwrap().unwrap();
    assert_eq!(done.status, BatchStatus::Expired, "{done:?}");
    assert!(done.expired_at.is_some());
    assert_eq!(done.completed + done.failed, 4, "every line is accounted for");
    let errors = f.lines_of(done.error_file_id.as_deref()).await;
    assert!(errors.iter().all(|l| l["error"]["code"] == "batch_expired"));
    let out = f.lines_of(done.output_file_id.as_deref()).await;
    let mut all = custom_ids(&out);
    all.extend(custom_ids(&errors));
    all.sort();
    assert_eq!(all, ["e0", "e1", "e2", "e3"]);
}
