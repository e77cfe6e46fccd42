//! Object storage out of reach: an upload is answered 503 with `Retry-After` in OpenAI's error
//! shape (code `storage_unavailable`), within the bounded retries, instead of a 500 after the
//! object_store crate's three minutes of retrying, and the API keeps serving what does not
//! need the storage. The storage is the S3 client the API uses (`BlobStore::s3_from`, with the
//! service's retry bounds), pointed at a local port nothing listens on.

mod common;

use std::time::{Duration, Instant};

use batchlab_core::blob::BlobStore;
use batchlab_core::testing::TestDb;
use reqwest::StatusCode;

#[tokio::test]
async fn an_upload_while_the_object_storage_is_down_is_503_with_retry_after() {
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let builder = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test");
    let blobs = BlobStore::s3_from(builder, "s3://batchlab/files").unwrap();
    let s = common::start_with(TestDb::sqlite().await, Some(blobs), |_| {}).await;

    let started = Instant::now();
    let line = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;
    let resp = s.upload(format!("{line}\n").into_bytes(), "batch").await;
    let elapsed = started.elapsed();
    assert!(
        resp.headers().get("retry-after").is_some(),
        "a 503 says when to retry"
    );
    let body = common::assert_openai_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    assert!(
        elapsed < Duration::from_secs(20),
        "answered within the bounded retries: {elapsed:?}"
    );
    // Nothing was recorded, and the API still serves what needs only the database.
    let files: serde_json::Value = s
        .client
        .get(s.url("/v1/files"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(files["data"].as_array().map(Vec::len), Some(0), "{files}");
    s.db.cleanup().await;
}
