//! Batch input files over a real socket, on SQLite and PostgreSQL: the input of an unfinished
//! batch cannot be deleted (409 in OpenAI's error shape), an over-long request line is refused
//! at upload, and text PostgreSQL cannot store (U+0000) is a client error, never a 500.

mod common;

use batchlab_core::store::BatchStatus;
use batchlab_core::testing::TestDb;
use common::{start_on, Server};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LINE: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#;

/// Servers over a fresh SQLite database and, when a server answers, a PostgreSQL one.
async fn both() -> Vec<Server> {
    let mut all = vec![start_on(TestDb::sqlite().await, |_| {}).await];
    if let Some(pg) = TestDb::postgres().await {
        all.push(start_on(pg, |_| {}).await);
    }
    all
}

async fn upload(s: &Server, body: &str, filename: &str) -> reqwest::Response {
    s.upload_named(body.as_bytes().to_vec(), "batch", filename)
        .await
}

async fn delete_file(s: &Server, id: &str) -> reqwest::Response {
    s.client
        .delete(s.url(&format!("/v1/files/{id}")))
        .send()
        .await
        .unwrap()
}

/// An error in OpenAI's shape with this status and type `invalid_request_error`; answers the body.
async fn assert_openai_error(resp: reqwest::Response, status: StatusCode) -> Value {
    let body = common::assert_openai_error(resp, status).await;
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    body
}

#[tokio::test]
async fn the_input_file_of_an_unfinished_batch_cannot_be_deleted() {
    for s in both().await {
        let file: Value = upload(&s, &format!("{LINE}\n"), "in.jsonl")
            .await
            .json()
            .await
            .unwrap();
        let file_id = file["id"].as_str().unwrap().to_string();
        let create = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let batch: Value = s
            .client
            .post(s.url("/v1/batches"))
            .json(&create)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let batch_id = batch["id"].as_str().unwrap().to_string();

        // Validating, then cancelling: both still read the input.
        let body = assert_openai_error(delete_file(&s, &file_id).await, StatusCode::CONFLICT).await;
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&batch_id) && message.contains("validating"),
            "{message}"
        );
        s.client
            .post(s.url(&format!("/v1/batches/{batch_id}/cancel")))
            .send()
            .await
            .unwrap();
        assert_openai_error(delete_file(&s, &file_id).await, StatusCode::CONFLICT).await;
        let still: Value = s
            .client
            .get(s.url(&format!("/v1/files/{file_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            still["id"],
            file_id.as_str(),
            "the refused delete kept the file"
        );
        let content = s
            .client
            .get(s.url(&format!("/v1/files/{file_id}/content")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            content.text().await.unwrap(),
            format!("{LINE}\n"),
            "and its body"
        );

        // Once the batch has ended, the file goes.
        s.db.store.claim_batch("w1", 30).await.unwrap().unwrap();
        assert!(s
            .db
            .store
            .transition(
                &batch_id,
                "w1",
                &[BatchStatus::Cancelling],
                BatchStatus::Cancelled
            )
            .await
            .unwrap());
        let deleted = delete_file(&s, &file_id).await;
        assert_eq!(deleted.status(), StatusCode::OK);
        let deleted: Value = deleted.json().await.unwrap();
        assert_eq!(
            deleted,
            json!({"id": file_id, "object": "file", "deleted": true})
        );
        s.db.cleanup().await;
    }
}

#[tokio::test]
async fn text_with_nul_is_a_bad_request_not_a_server_error() {
    for s in both().await {
        let resp = upload(&s, &format!("{LINE}\n"), "in\u{0}.jsonl").await;
        let body = assert_openai_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(body["error"]["param"], "file", "{body}");
        let create = json!({"input_file_id": "file-\u{0}", "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let resp = s
            .client
            .post(s.url("/v1/batches"))
            .json(&create)
            .send()
            .await
            .unwrap();
        assert_openai_error(resp, StatusCode::NOT_FOUND).await;
        for path in [
            "/v1/files/file-%00",
            "/v1/files/file-%00/content",
            "/v1/batches/batch_%00",
        ] {
            let resp = s.client.get(s.url(path)).send().await.unwrap();
            assert_openai_error(resp, StatusCode::NOT_FOUND).await;
        }
        assert_openai_error(delete_file(&s, "file-%00").await, StatusCode::NOT_FOUND).await;
        s.db.cleanup().await;
    }
}

#[tokio::test]
async fn an_over_long_request_line_is_refused_at_upload() {
    let s = start_on(TestDb::sqlite().await, |c| c.batch.max_line_bytes = 200).await;
    let long = LINE.replace("hi", &"x".repeat(300));
    let body = format!("{LINE}\n{LINE}\n{long}\n{LINE}\n");
    let resp = upload(&s, &body, "in.jsonl").await;
    let body = assert_openai_error(resp, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["error"]["param"], "file", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 3")
            && message.contains(&format!("{} bytes", long.len()))
            && message.contains("200 bytes at most"),
        "{message}"
    );
    let list: Value = s
        .client
        .get(s.url("/v1/files"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([]), "nothing was kept");
    // Lines at the limit are fine, and other purposes are not held to it.
    let at_limit = LINE.replace("hi", &"x".repeat(200 - LINE.len() + 2));
    assert_eq!(at_limit.len(), 200);
    assert_eq!(
        upload(&s, &format!("{at_limit}\n"), "in.jsonl")
            .await
            .status(),
        StatusCode::OK
    );
    let part = Part::bytes(long.into_bytes()).file_name("notes.txt");
    let form = Form::new().text("purpose", "user_data").part("file", part);
    assert_eq!(
        s.client
            .post(s.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    s.db.cleanup().await;
}
