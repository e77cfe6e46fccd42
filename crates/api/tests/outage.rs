//! A database outage: PostgreSQL goes away for a while and comes back. The API keeps running,
//! answers what needs the database with 503, `Retry-After` and OpenAI's error shape (not 500),
//! says in `/health` that the database is down, and serves again by itself once it is back.
//!
//! The outage is real at the network level: the API reaches PostgreSQL through a TCP proxy that
//! the test cuts (every open connection dropped, new ones refused) and restores.

use std::time::{Duration, Instant};

use batchlab_api::{router, AppState};
use batchlab_core::blob::BlobStore;
use batchlab_core::testing::{behind_proxy, TestDb};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;

async fn get(client: &reqwest::Client, url: &str) -> (StatusCode, Option<String>, Value) {
    let resp = client.get(url).send().await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_503_with_retry_after_and_heals_by_itself() {
    let Some(db) = TestDb::postgres().await else {
        return; // skipped with a message (fails instead under BATCHLAB_REQUIRE_POSTGRES=1)
    };
    let (proxy, mut config, store) = behind_proxy(&db).await;
    let dir = tempfile::tempdir().unwrap();
    config.storage.files_dir = dir.path().join("files");
    config.curation.training_dir = dir.path().join("training");
    let blobs = BlobStore::open(&config.storage.files_dir).unwrap();
    let state = AppState::new(store, blobs, config);
    state.start_background(&tokio_util::sync::CancellationToken::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let client = reqwest::Client::new();

    let (status, _, _) = get(&client, &format!("{base}/v1/batches")).await;
    assert_eq!(status, StatusCode::OK, "before the outage");

    proxy.cut();
    let started = Instant::now();
    let (status, retry, body) = get(&client, &format!("{base}/v1/batches")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry.is_some(), "a 503 says when to retry");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered within the acquire timeout, not hung: {:?}",
        started.elapsed()
    );
    let (status, _, health) = get(&client, &format!("{base}/health")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(health["database"], "error", "{health}");

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = get(&client, &format!("{base}/v1/batches")).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healed after the outage: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, health) = get(&client, &format!("{base}/health")).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    db.cleanup().await;
}
