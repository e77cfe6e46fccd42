//! What the API's socket tests share: a server on a fresh SQLite database and a temporary
//! directory, and the check every error body must pass.
// Each test binary uses part of this module.
#![allow(dead_code)]

use batchlab_api::{router, AppState};
use batchlab_core::blob::BlobStore;
use batchlab_core::config::Config;
use batchlab_core::testing::TestDb;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

/// A running API, with its background work, on a bound socket.
pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    /// The database it serves (its store arranges states a test cannot reach over HTTP).
    pub db: TestDb,
    /// Its file bodies.
    pub blobs: BlobStore,
    _dir: tempfile::TempDir,
}

/// Starts the API on defaults with files and training data under a temporary directory,
/// adjusted by `configure`, over a fresh SQLite database.
pub async fn start(configure: impl FnOnce(&mut Config)) -> Server {
    start_on(TestDb::sqlite().await, configure).await
}

/// [`start`] over the database `db`.
pub async fn start_on(db: TestDb, configure: impl FnOnce(&mut Config)) -> Server {
    start_with(db, None, configure).await
}

/// [`start_on`] storing file bodies in `blobs` (a local directory when `None`).
pub async fn start_with(
    db: TestDb,
    blobs: Option<BlobStore>,
    configure: impl FnOnce(&mut Config),
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.storage.files_dir = dir.path().join("files");
    config.curation.training_dir = dir.path().join("training");
    configure(&mut config);
    let blobs = blobs.unwrap_or_else(|| BlobStore::open(&config.storage.files_dir).unwrap());
    let state = AppState::new(db.store.clone(), blobs.clone(), config);
    state.start_background(&tokio_util::sync::CancellationToken::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    Server {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        db,
        blobs,
        _dir: dir,
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn upload(&self, body: Vec<u8>, purpose: &str) -> reqwest::Response {
        self.upload_named(body, purpose, "in.jsonl").await
    }

    pub async fn upload_named(
        &self,
        body: Vec<u8>,
        purpose: &str,
        filename: &str,
    ) -> reqwest::Response {
        let form = Form::new()
            .text("purpose", purpose.to_string())
            .part("file", Part::bytes(body).file_name(filename.to_string()));
        self.client
            .post(self.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn create_batch(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/batches"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

/// Asserts an error in OpenAI's shape with the given status; answers the body.
pub async fn assert_openai_error(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.expect("error bodies are JSON");
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    body
}
