//! The status page and the JSON routes it reads, over a real socket and SQLite: `GET /` without
//! the key, `GET /v1/status`, `GET /v1/label-studio/projects` and `GET /v1/models` behind it,
//! and the store's gauges on `/metrics`.

use std::time::Duration;

mod common;

use batchlab_core::store::{BatchLine, LineKind, NewBatch, WorkerHeartbeat};
use common::{assert_openai_error, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY: &str = "status-key";
const CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;

async fn start() -> Server {
    common::start(|c| {
        c.api.api_key = Some(KEY.into());
        c.curation.milestones = vec![2];
    })
    .await
}

async fn get(s: &Server, path: &str) -> reqwest::Response {
    s.client
        .get(s.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
}

async fn get_json(s: &Server, path: &str) -> Value {
    let resp = get(s, path).await;
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    resp.json().await.unwrap()
}

/// Polls `GET path` until `check` holds (the event processor runs in the background).
async fn until(s: &Server, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = get_json(s, path).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never reached the expected state: {last}");
}

fn new_batch(id: &str, total: i64) -> NewBatch {
    NewBatch {
        id: id.into(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-x".into(),
        completion_window: "24h".into(),
        window_seconds: 86_400,
        metadata: None,
        total,
    }
}

/// Serialises the tests that read `/metrics`: the gauges are the process's, shared by every
/// test of this binary.
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn annotation(id: i64, choice: &str, ground_truth: bool) -> Value {
    json!({"action": "ANNOTATION_CREATED",
        "project": {"id": 3, "title": "Status <b>project</b>", "label_config": CONFIG},
        "task": {"id": id, "project": 3, "data": {"text": format!("task {id}")}},
        "annotation": {"id": id, "task": id, "project": 3, "was_cancelled": false,
            "ground_truth": ground_truth,
            "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [choice]}}]}})
}

#[tokio::test]
async fn the_page_is_public_and_the_data_is_behind_the_key() {
    let s = start().await;
    let page = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let content_type = page.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("v1/status") && html.contains("id=\"batches\""));
    assert!(
        !html.contains("<script src") && !html.contains("<link"),
        "nothing is fetched from elsewhere"
    );

    for path in ["/v1/status", "/v1/models", "/v1/label-studio/projects"] {
        let resp = s.client.get(s.url(path)).send().await.unwrap();
        assert_openai_error(resp, StatusCode::UNAUTHORIZED).await;
    }
    let empty = get_json(&s, "/v1/status").await;
    assert_eq!(empty["object"], "batchlab.status");
    assert_eq!(empty["batches"]["queue_depth"], 0);
    assert_eq!(empty["batches"]["recent"], json!([]));
    assert_eq!(empty["projects"], json!([]));
    assert_eq!(
        get_json(&s, "/v1/models").await,
        json!({"object": "list", "data": []})
    );
}

#[tokio::test]
async fn status_shows_batches_projects_and_models() {
    let _metrics = METRICS.lock().await;
    let s = start().await;
    let store = &s.db.store;
    // A batch with one of two lines done.
    store.insert_batch(&new_batch("batch_s1", 2)).await.unwrap();
    store
        .record_line(
            "batch_s1",
            &BatchLine {
                line_no: 1,
                custom_id: Some("a".into()),
                kind: LineKind::Output,
                body: "{}".into(),
                input_tokens: 1,
                cached_tokens: 0,
                output_tokens: 1,
            },
        )
        .await
        .unwrap();
    store.insert_batch(&new_batch("batch_s2", 1)).await.unwrap();
    // A worker's heartbeat.
    store
        .upsert_worker(&WorkerHeartbeat {
            id: "worker-1",
            model: "SmolLM2-135M-Instruct",
            model_path: "/models/smol.gguf",
            model_sha256: None,
            generated_tokens: 120,
            tokens_per_second: 24.0,
            started_at: 1_700_000_000,
        })
        .await
        .unwrap();
    // Webhook events: two valid annotations (one ground truth, milestone 2), one invalid.
    for body in [
        annotation(1, "a", true),
        annotation(2, "b", false),
        annotation(3, "nope", false),
    ] {
        let resp = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    let projects = until(&s, "/v1/label-studio/projects", |v| {
        v["data"][0]["counts"]["annotations"] == 3 && v["data"][0]["milestones"][0].is_object()
    })
    .await;
    assert_eq!(projects["object"], "list");
    let p = &projects["data"][0];
    assert_eq!((&p["instance"], &p["id"]), (&json!("default"), &json!(3)));
    assert_eq!(p["title"], "Status <b>project</b>");
    assert_eq!(p["counts"]["ground_truth"], 1);
    assert_eq!(p["counts"]["invalid"], 1);
    assert_eq!(p["milestones"][0]["milestone"], 2);
    assert_eq!(p["milestones"][0]["file"], "project_3_milestone_2.json");
    // The same counts as the project's own route.
    let one = get_json(&s, "/v1/label-studio/projects/3").await;
    assert_eq!(one["counts"], p["counts"]);

    let status = get_json(&s, "/v1/status").await;
    let batches = &status["batches"];
    assert_eq!(batches["by_status"]["validating"], 2);
    assert_eq!(batches["queue_depth"], 2);
    let recent = batches["recent"].as_array().unwrap();
    assert_eq!(recent[0]["id"], "batch_s2", "newest first");
    let b1 = &recent[1];
    assert_eq!(
        b1["request_counts"],
        json!({"total": 2, "completed": 1, "failed": 0})
    );
    assert_eq!(b1["progress"], 0.5);
    assert_eq!(status["projects"][0]["counts"], p["counts"]);
    assert_eq!(status["workers"][0]["id"], "worker-1");
    assert_eq!(status["models"][0]["tokens_per_second"], 24.0);

    let models = get_json(&s, "/v1/models").await;
    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "SmolLM2-135M-Instruct", "object": "model",
            "created": 1_700_000_000, "owned_by": "batchlab"}]})
    );

    // /metrics (no key: it holds counts only) reads the store when scraped.
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "batchlab_batches{status=\"validating\"} 2",
        "batchlab_batches{status=\"completed\"} 0",
        "batchlab_batch_queue_depth 2",
        "batchlab_project_annotations{instance=\"default\",project=\"3\"} 3",
        "batchlab_project_ground_truth{instance=\"default\",project=\"3\"} 1",
        "batchlab_project_invalid_annotations{instance=\"default\",project=\"3\"} 1",
        "batchlab_project_milestones_reached{instance=\"default\",project=\"3\"} 1",
        // Read at the scrape too, not by the processor: every event is applied by now.
        "batchlab_webhook_events_pending 0",
        "batchlab_webhook_events_failed 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    assert!(text.contains("batchlab_webhook_event_lag_seconds_bucket"));
}

#[tokio::test]
async fn metrics_keep_their_last_values_when_the_store_fails() {
    let _metrics = METRICS.lock().await;
    let s = common::start(|_| {}).await;
    let metrics = || async {
        s.client
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = metrics().await;
    assert!(before.contains("batchlab_batch_queue_depth 0"), "{before}");
    s.db.store.close().await;
    let resp = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a failing store does not fail the scrape"
    );
    let after = resp.text().await.unwrap();
    assert!(after.contains("batchlab_batch_queue_depth 0"), "{after}");
    assert!(
        after.contains("batchlab_status_refresh_failures_total"),
        "{after}"
    );
}
