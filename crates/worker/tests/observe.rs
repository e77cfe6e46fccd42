//! batchlab-worker is observable like the other services: the real binary, on a real SQLite
//! store and the real default model, serves `/health` (model and database) and `/metrics`
//! (the batch path's counters and the engine's) on `worker.port`, runs a queued batch, and
//! exits cleanly on SIGTERM.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use batchlab_core::blob::{BlobStore, WriteLimits};
use batchlab_core::store::{BatchStatus, FileRecord, NewBatch, Store};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Queues a two-line chat batch in `store`, its input in `blobs`.
async fn queue_batch(store: &Store, blobs: &BlobStore) {
    let lines: Vec<String> = ["a", "b"]
        .iter()
        .map(|id| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                   "body": {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}})
            .to_string()
        })
        .collect();
    let body = lines.join("\n") + "\n";
    let chunks = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
    let limits = WriteLimits {
        max_bytes: 1 << 20,
        max_lines: None,
        require_utf8: true,
    };
    let stats = blobs.put_stream("file-in", chunks, limits).await.unwrap();
    store
        .insert_file(&FileRecord {
            id: "file-in".into(),
            filename: "in.jsonl".into(),
            purpose: "batch".into(),
            bytes: stats.bytes as i64,
            lines: stats.lines as i64,
            created_at: 0,
            expires_at: None,
        })
        .await
        .unwrap();
    store
        .insert_batch(&NewBatch {
            id: "batch_observed".into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-in".into(),
            completion_window: "24h".into(),
            window_seconds: 86_400,
            metadata: None,
            total: stats.lines as i64,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_serves_health_and_metrics_of_the_batch_path() {
    // The one helper every model test uses: a missing file fails under
    // BATCHLAB_REQUIRE_MODELS (whatever its value), else the test says it skips.
    let Some(model) =
        batchlab_inference::engine::testing::model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("batchlab.db").display());
    let files = dir.path().join("files");
    let store = Store::connect(&db_url, 2).await.unwrap();
    let blobs = BlobStore::open(&files).unwrap();
    queue_batch(&store, &blobs).await;

    let port = free_port();
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_batchlab-worker"))
        .current_dir(repo())
        .env("BATCHLAB_DATABASE__URL", &db_url)
        .env("BATCHLAB_STORAGE__FILES_DIR", &files)
        .env("BATCHLAB_ENGINE__MODEL_PATH", &model)
        .env("BATCHLAB_WORKER__PORT", port.to_string())
        .env("BATCHLAB_WORKER__POLL_INTERVAL_MS", "50")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    // Ready: the model is loaded and the database answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let health: Value = loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                break r.json().await.unwrap();
            }
        }
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker exited: {}",
            log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no /health within 120 s: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["database"], "ok", "{health}");
    assert_eq!(health["model"], "SmolLM2-135M-Instruct", "{health}");

    // The queued batch runs; its counters and the engine's are scraped from the worker.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = store.get_batch("batch_observed").await.unwrap().unwrap();
        if b.status == BatchStatus::Completed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "batch not done: {b:?}\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "batchlab_batches_finished_total{status=\"completed\"} 1",
        "batchlab_engine_generated_tokens_total",
        "batchlab_engine_forward_passes_total",
        "batchlab_engine_forward_rows_total",
        "batchlab_worker_http_requests_total",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }

    // SIGTERM: a clean exit.
    let pid = worker.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}: {}", log_text());
}
