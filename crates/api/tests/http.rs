//! The API over a real socket and a real SQLite database: shapes, pagination and every error
//! answered in OpenAI's error shape.

mod common;

use common::{assert_openai_error, start};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Asserts an OpenAI-shaped error with the given status and, if named, parameter.
async fn assert_error(resp: reqwest::Response, status: StatusCode, param: Option<&str>) -> Value {
    let body = assert_openai_error(resp, status).await;
    if let Some(p) = param {
        assert_eq!(body["error"]["param"], p, "{body}");
    }
    body
}

const LINE: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;

#[tokio::test]
async fn files_upload_list_retrieve_content_delete() {
    let s = start(|_| {}).await;
    let body = format!("{LINE}\n{}\n", LINE.replace("\"a\"", "\"b\""));
    let resp = s.upload(body.clone().into_bytes(), "batch").await;
    assert_eq!(resp.status(), 200);
    let f: Value = resp.json().await.unwrap();
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "batch");
    assert_eq!(f["bytes"], body.len());
    assert_eq!(f["filename"], "in.jsonl");
    assert!(f["id"].as_str().unwrap().starts_with("file-"));
    let id = f["id"].as_str().unwrap().to_string();

    let second: Value = s
        .upload(b"x".to_vec(), "fine-tune")
        .await
        .json()
        .await
        .unwrap();
    let list: Value = s
        .client
        .get(s.url("/v1/files?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], true);
    assert_eq!(list["data"][0]["id"], second["id"]);
    let after = format!(
        "/v1/files?limit=1&after={}",
        list["last_id"].as_str().unwrap()
    );
    let page2: Value = s
        .client
        .get(s.url(&after))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2["data"][0]["id"], id.as_str());
    assert_eq!(page2["has_more"], false);
    let only_batch: Value = s
        .client
        .get(s.url("/v1/files?purpose=batch"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(only_batch["data"].as_array().unwrap().len(), 1);

    let got: Value = s
        .client
        .get(s.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got, f);
    let content = s
        .client
        .get(s.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_eq!(content.text().await.unwrap(), body);

    let deleted: Value = s
        .client
        .delete(s.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "file", "deleted": true})
    );
    let gone = s
        .client
        .get(s.url(&format!("/v1/files/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_error(gone, StatusCode::NOT_FOUND, None).await;
}

#[tokio::test]
async fn bad_uploads_are_refused_clearly() {
    let s = start(|c| {
        c.batch.max_input_bytes = 1000;
        c.batch.max_lines = 3;
    })
    .await;
    assert_error(
        s.upload(vec![], "batch").await,
        StatusCode::BAD_REQUEST,
        Some("file"),
    )
    .await;
    assert_error(
        s.upload(b"ok\n\xff\xfe\n".to_vec(), "batch").await,
        StatusCode::BAD_REQUEST,
        Some("file"),
    )
    .await;
    assert_error(
        s.upload(vec![b'x'; 2000], "batch").await,
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    )
    .await;
    assert_error(
        s.upload(b"1\n2\n3\n4\n".to_vec(), "batch").await,
        StatusCode::BAD_REQUEST,
        Some("file"),
    )
    .await;
    assert_error(
        s.upload(b"x".to_vec(), "nonsense").await,
        StatusCode::BAD_REQUEST,
        Some("purpose"),
    )
    .await;
    let no_purpose = Form::new().part("file", Part::bytes(b"x".to_vec()).file_name("a"));
    let resp = s
        .client
        .post(s.url("/v1/files"))
        .multipart(no_purpose)
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, Some("purpose")).await;
    let resp = s
        .client
        .post(s.url("/v1/files"))
        .body("plain")
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, None).await;
    // Nothing half-written was kept.
    let list: Value = s
        .client
        .get(s.url("/v1/files"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]));
}

#[tokio::test]
async fn batches_are_created_listed_and_cancelled() {
    let s = start(|_| {}).await;
    let file: Value = s
        .upload(format!("{LINE}\n").into_bytes(), "batch")
        .await
        .json()
        .await
        .unwrap();
    let create = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"run": "t1"}});
    let resp = s.create_batch(create.clone()).await;
    assert_eq!(resp.status(), 200);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["object"], "batch");
    assert_eq!(b["status"], "validating");
    assert_eq!(
        b["request_counts"],
        json!({"total": 1, "completed": 0, "failed": 0})
    );
    assert_eq!(b["metadata"], json!({"run": "t1"}));
    assert_eq!(
        b["expires_at"].as_i64().unwrap() - b["created_at"].as_i64().unwrap(),
        86_400
    );
    for key in [
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "completed_at",
        "cancelled_at",
        "errors",
    ] {
        assert!(b[key].is_null(), "{key} starts null");
    }
    assert_eq!(b["usage"]["total_tokens"], 0);
    let id = b["id"].as_str().unwrap();

    let b2: Value = s.create_batch(create).await.json().await.unwrap();
    let list: Value = s
        .client
        .get(s.url("/v1/batches?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (list["data"][0]["id"].clone(), list["has_more"].clone()),
        (b2["id"].clone(), json!(true))
    );
    let rest: Value = s
        .client
        .get(s.url(&format!("/v1/batches?after={}", b2["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["data"][0]["id"], id);

    let got: Value = s
        .client
        .get(s.url(&format!("/v1/batches/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id);
    let cancelled: Value = s
        .client
        .post(s.url(&format!("/v1/batches/{id}/cancel")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelling");
    assert!(cancelled["cancelling_at"].is_i64());
}

#[tokio::test]
async fn bad_batch_requests_name_the_parameter() {
    let s = start(|_| {}).await;
    let file: Value = s
        .upload(format!("{LINE}\n").into_bytes(), "batch")
        .await
        .json()
        .await
        .unwrap();
    let other: Value = s
        .upload(b"x".to_vec(), "fine-tune")
        .await
        .json()
        .await
        .unwrap();
    let ok = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    assert_error(
        s.create_batch(with("endpoint", json!("/v1/responses")))
            .await,
        StatusCode::BAD_REQUEST,
        Some("endpoint"),
    )
    .await;
    assert_error(
        s.create_batch(with("completion_window", json!("1h"))).await,
        StatusCode::BAD_REQUEST,
        Some("completion_window"),
    )
    .await;
    assert_error(
        s.create_batch(with("metadata", json!({"k": 1}))).await,
        StatusCode::BAD_REQUEST,
        Some("metadata"),
    )
    .await;
    assert_error(
        s.create_batch(with("input_file_id", other["id"].clone()))
            .await,
        StatusCode::BAD_REQUEST,
        Some("input_file_id"),
    )
    .await;
    assert_error(
        s.create_batch(with("input_file_id", json!("file-nope")))
            .await,
        StatusCode::NOT_FOUND,
        None,
    )
    .await;
    let bad_json = s
        .client
        .post(s.url("/v1/batches"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_error(bad_json, StatusCode::BAD_REQUEST, None).await;
    for path in [
        "/v1/batches/batch_nope",
        "/v1/files/file-nope",
        "/v1/files/..%2F..%2Fetc/content",
        "/v1/nothing",
    ] {
        assert_error(
            s.client.get(s.url(path)).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            None,
        )
        .await;
    }
    let resp = s
        .client
        .post(s.url("/v1/batches/batch_nope/cancel"))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, None).await;
    let resp = s
        .client
        .get(s.url("/v1/batches?limit=0"))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, Some("limit")).await;
    let resp = s.client.put(s.url("/v1/batches")).send().await.unwrap();
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, None).await;
}

#[tokio::test]
async fn the_api_key_guards_v1_but_not_health() {
    let s = start(|c| c.api.api_key = Some("sekret".into())).await;
    assert_error(
        s.client.get(s.url("/v1/files")).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        None,
    )
    .await;
    let wrong = s
        .client
        .get(s.url("/v1/files"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, None).await;
    let right = s
        .client
        .get(s.url("/v1/files"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let health: Value = s
        .client
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let metrics = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("batchlab_http_requests_total"),
        "{metrics}"
    );
}

/// The API runs retention in the background: a file past its `expires_at` disappears, row and
/// body, without anyone asking.
#[tokio::test]
async fn expired_files_are_deleted_in_the_background() {
    use batchlab_core::blob::{BlobError, WriteLimits};
    use batchlab_core::store::{now, FileRecord};
    let server = start(|c| c.retention.interval_seconds = 1).await;
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{}\n"))]);
    let limits = WriteLimits {
        max_bytes: 1 << 20,
        max_lines: None,
        require_utf8: true,
    };
    server
        .blobs
        .put_stream("file-expired", body, limits)
        .await
        .unwrap();
    server
        .db
        .store
        .insert_file(&FileRecord {
            id: "file-expired".into(),
            filename: "old.jsonl".into(),
            purpose: "batch".into(),
            bytes: 3,
            lines: 1,
            created_at: now() - 100,
            expires_at: Some(now() - 10),
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = server
            .client
            .get(server.url("/v1/files/file-expired"))
            .send()
            .await
            .unwrap()
            .status();
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(matches!(
        server.blobs.open_read("file-expired").await,
        Err(BlobError::NotFound(_))
    ));
}
