//! The curation routes over a real socket and SQLite: the webhook's secret, bad bodies, big
//! bodies, unknown projects, and every error in OpenAI's shape.

use std::time::Duration;

mod common;

use common::{assert_openai_error, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/label-studio-1.23"
);
const SECRET: &str = "s3cret";

/// The API with a webhook secret unless `configure` removes it.
async fn start(configure: impl FnOnce(&mut batchlab_core::config::Config)) -> Server {
    common::start(|c| {
        c.label_studio.webhook_secret = Some(SECRET.into());
        configure(c);
    })
    .await
}

async fn deliver(
    s: &Server,
    body: impl Into<reqwest::Body>,
    secret: Option<&str>,
) -> reqwest::Response {
    deliver_to(s, "/v1/webhooks/label-studio", body, secret).await
}

async fn deliver_to(
    s: &Server,
    path: &str,
    body: impl Into<reqwest::Body>,
    secret: Option<&str>,
) -> reqwest::Response {
    let mut req = s
        .client
        .post(s.url(path))
        .header("content-type", "application/json");
    if let Some(secret) = secret {
        req = req.header("X-Batchlab-Secret", secret);
    }
    req.body(body).send().await.unwrap()
}

/// Polls the project until `check` holds (the processor runs in the background).
async fn project_until(s: &Server, id: i64, check: impl Fn(&Value) -> bool) -> Value {
    project_of_until(s, &id.to_string(), check).await
}

/// [`project_until`] for `path`: an id, with a query when it needs one.
async fn project_of_until(s: &Server, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let resp = s
            .client
            .get(s.url(&format!("/v1/label-studio/projects/{path}")))
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::OK {
            let v: Value = resp.json().await.unwrap();
            if check(&v) {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("project {path} never reached the expected state");
}

fn fixture_body(name: &str) -> Value {
    let request: Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/{name}")).unwrap()).unwrap();
    request["body"].clone()
}

async fn assert_error(resp: reqwest::Response, status: StatusCode, code: Option<&str>) -> Value {
    let body = assert_openai_error(resp, status).await;
    if let Some(code) = code {
        assert_eq!(body["error"]["code"], json!(code), "{body}");
    }
    body
}

#[tokio::test]
async fn the_secret_header_is_required_when_configured() {
    let s = start(|_| {}).await;
    let body = serde_json::to_vec(&fixture_body("06-webhook-TASKS_CREATED.json")).unwrap();
    assert_error(
        deliver(&s, body.clone(), None).await,
        StatusCode::UNAUTHORIZED,
        Some("invalid_webhook_secret"),
    )
    .await;
    assert_error(
        deliver(&s, body.clone(), Some("wrong")).await,
        StatusCode::UNAUTHORIZED,
        Some("invalid_webhook_secret"),
    )
    .await;
    let first: Value = deliver(&s, body.clone(), Some(SECRET))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (first["status"].as_str(), first["action"].as_str()),
        (Some("accepted"), Some("TASKS_CREATED"))
    );
    let again: Value = deliver(&s, body, Some(SECRET)).await.json().await.unwrap();
    assert_eq!(again["status"], json!("duplicate"));
    assert_eq!(again["event_id"], first["event_id"]);
    project_until(&s, 1, |p| p["counts"]["tasks"] == json!(5)).await;
}

#[tokio::test]
async fn bad_bodies_get_clear_errors_and_odd_ones_are_acknowledged() {
    let s = start(|c| c.label_studio.webhook_secret = None).await;
    assert_error(
        deliver(&s, "{not json", None).await,
        StatusCode::BAD_REQUEST,
        None,
    )
    .await;
    assert_error(
        deliver(&s, "[1, 2]", None).await,
        StatusCode::BAD_REQUEST,
        None,
    )
    .await;
    assert_error(
        deliver(&s, r#"{"no_action": true}"#, None).await,
        StatusCode::BAD_REQUEST,
        None,
    )
    .await;
    for body in [
        r#"{"action": "PROJECT_UPDATED"}"#,
        r#"{"action": "SOMETHING_NEW", "x": 1}"#,
    ] {
        let resp = deliver(&s, body, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
    }
    // An annotation naming a label outside the config is kept, flagged, and not counted valid.
    let mut event = fixture_body("22-webhook-ANNOTATION_CREATED.json");
    event["annotation"]["result"][0]["value"]["choices"] = json!(["definitely"]);
    assert_eq!(
        deliver(&s, serde_json::to_vec(&event).unwrap(), None)
            .await
            .status(),
        StatusCode::OK
    );
    let p = project_until(&s, 1, |p| p["counts"]["annotations"] == json!(1)).await;
    assert_eq!(p["counts"]["valid"], json!(0));
    assert!(
        p["invalid_annotations"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("definitely"),
        "{p}"
    );
}

#[tokio::test]
async fn a_ten_megabyte_import_event_is_stored_and_bodies_over_the_limit_get_413() {
    let s = start(|c| {
        c.label_studio.webhook_secret = None;
        c.api.max_webhook_bytes = 16 * 1024 * 1024;
    })
    .await;
    let mut event = fixture_body("06-webhook-TASKS_CREATED.json");
    let text = "x".repeat(10_000);
    let tasks: Vec<Value> = (1..=1_000)
        .map(|i| json!({"id": i, "project": 1, "data": {"name": format!("{i} {text}")}}))
        .collect();
    event["tasks"] = Value::Array(tasks);
    let body = serde_json::to_vec(&event).unwrap();
    assert!(body.len() > 10_000_000);
    assert_eq!(deliver(&s, body, None).await.status(), StatusCode::OK);
    project_until(&s, 1, |p| p["counts"]["tasks"] == json!(1_000)).await;

    let huge = vec![b' '; 17 * 1024 * 1024];
    assert_error(
        deliver(&s, huge, None).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    )
    .await;
}

/// The same Label Studio ids delivered for two instances are two projects: one by the webhook
/// URL's instance, one by the configured instance (the URL without one); the curation routes
/// read the configured instance unless `?instance=` names another. Bad names are 400s naming
/// the parameter, the secret is required on every webhook URL, and an instance without the
/// project is a 404 that names it.
#[tokio::test]
async fn instances_are_named_in_the_webhook_url_and_the_query() {
    let s = start(|_| {}).await;
    let tasks = serde_json::to_vec(&fixture_body("06-webhook-TASKS_CREATED.json")).unwrap();
    let annotation =
        serde_json::to_vec(&fixture_body("22-webhook-ANNOTATION_CREATED.json")).unwrap();
    assert_error(
        deliver_to(&s, "/v1/webhooks/label-studio/ls2", tasks.clone(), None).await,
        StatusCode::UNAUTHORIZED,
        None,
    )
    .await;
    for path in ["/v1/webhooks/label-studio/ls2", "/v1/webhooks/label-studio"] {
        let resp = deliver_to(&s, path, tasks.clone(), Some(SECRET)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], json!("accepted"), "{path}: {v}");
    }
    let resp = deliver_to(
        &s,
        "/v1/webhooks/label-studio/ls2",
        annotation,
        Some(SECRET),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let ls2 = project_of_until(&s, "1?instance=ls2", |p| {
        p["counts"]["annotations"] == json!(1)
    })
    .await;
    assert_eq!(ls2["instance"], json!("ls2"));
    assert_eq!(ls2["counts"]["tasks"], json!(5));
    let default = project_of_until(&s, "1", |p| p["counts"]["tasks"] == json!(5)).await;
    assert_eq!(default["instance"], json!("default"));
    assert_eq!(default["counts"]["annotations"], json!(0), "{default}");
    let explicit = project_of_until(&s, "1?instance=default", |_| true).await;
    assert_eq!(explicit["counts"], default["counts"]);
    let export: Value = s
        .client
        .get(s.url("/v1/label-studio/export/1?instance=ls2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(export.as_array().map(Vec::len), Some(1), "{export}");

    for bad in ["Bad", "a.b", "-x", "a%2Fb"] {
        let body = assert_error(
            deliver_to(
                &s,
                &format!("/v1/webhooks/label-studio/{bad}"),
                tasks.clone(),
                Some(SECRET),
            )
            .await,
            StatusCode::BAD_REQUEST,
            None,
        )
        .await;
        assert_eq!(body["error"]["param"], json!("instance"), "{bad}: {body}");
        let body = assert_error(
            s.client
                .get(s.url(&format!("/v1/label-studio/projects/1?instance={bad}")))
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            None,
        )
        .await;
        assert_eq!(body["error"]["param"], json!("instance"), "{bad}: {body}");
    }
    let body = assert_error(
        s.client
            .get(s.url("/v1/label-studio/projects/1?instance=ls3"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        Some("not_found"),
    )
    .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("'ls3'"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_projects_and_bad_queries_are_named() {
    let s = start(|_| {}).await;
    for path in [
        "/v1/label-studio/projects/999",
        "/v1/label-studio/export/999",
        "/v1/label-studio/accuracy/999",
    ] {
        assert_error(
            s.client.get(s.url(path)).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            Some("not_found"),
        )
        .await;
    }
    let resp = s
        .client
        .post(s.url("/v1/label-studio/accuracy/999"))
        .json(&json!({"predictions": []}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::NOT_FOUND, None).await;
    let resp = s
        .client
        .post(s.url("/v1/label-studio/accuracy/1"))
        .json(&json!({"nope": 1}))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, None).await;
    assert_error(
        s.client
            .get(s.url("/v1/label-studio/projects/abc"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        None,
    )
    .await;

    deliver(
        &s,
        serde_json::to_vec(&fixture_body("22-webhook-ANNOTATION_CREATED.json")).unwrap(),
        Some(SECRET),
    )
    .await;
    project_until(&s, 1, |p| p["counts"]["valid"] == json!(1)).await;
    let bad_format = s
        .client
        .get(s.url("/v1/label-studio/export/1?format=csv"))
        .send()
        .await
        .unwrap();
    let body = assert_error(bad_format, StatusCode::BAD_REQUEST, None).await;
    assert_eq!(body["error"]["param"], json!("format"));
    let bad_since = s
        .client
        .get(s.url("/v1/label-studio/export/1?since=yesterday"))
        .send()
        .await
        .unwrap();
    assert_error(bad_since, StatusCode::BAD_REQUEST, None).await;

    let export = s
        .client
        .get(s.url("/v1/label-studio/export/1?format=jsonl-chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(export.headers()["content-type"], "application/jsonl");
    assert_eq!(export.text().await.unwrap().lines().count(), 1);
    let export: Value = s
        .client
        .get(s.url("/v1/label-studio/export/1?since=2026-01-01T00:00:00Z"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(export[0]["annotations"][0]["id"], json!(1));

    let import = s
        .client
        .post(s.url("/v1/label-studio/import/1"))
        .json(&json!({"batch_id": "batch_nope"}))
        .send()
        .await
        .unwrap();
    assert_error(import, StatusCode::NOT_FOUND, Some("not_found")).await;
}

/// Delivers one annotation to a server whose first milestone is 1 annotation, and answers the
/// export record the project status lists once the milestone is reached.
async fn first_milestone_export(s: &Server) -> Value {
    deliver(
        s,
        serde_json::to_vec(&fixture_body("22-webhook-ANNOTATION_CREATED.json")).unwrap(),
        Some(SECRET),
    )
    .await;
    let p = project_until(s, 1, |p| p["milestones_reached"] == json!([1])).await;
    p["exports"][0].clone()
}

/// The project status lists each export with the file it wrote and that file's SHA-256.
#[tokio::test]
async fn exports_are_listed_with_their_checksum() {
    use sha2::{Digest, Sha256};
    let s = start(|c| c.curation.milestones = vec![1]).await;
    let export = &first_milestone_export(&s).await;
    let path = export["path"].as_str().unwrap();
    assert!(path.ends_with("project_1_milestone_1.json"), "{export}");
    let file = std::fs::read(path).unwrap();
    assert_eq!(
        export["sha256"],
        json!(format!("{:x}", Sha256::digest(&file))),
        "{export}"
    );
    // The export route serves that file and the latest export, and nothing else.
    let get = |name: &str| {
        s.client
            .get(s.url(&format!("/v1/label-studio/exports/1/{name}")))
            .send()
    };
    let served = get("project_1_milestone_1.json").await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.bytes().await.unwrap(), file);
    let latest = get("project_1_export.json").await.unwrap();
    assert_eq!(latest.bytes().await.unwrap(), file);
    for other in [
        "project_2_export.json",
        "..%2Fproject_1_export.json",
        "batchlab.db",
    ] {
        assert_error(
            get(other).await.unwrap(),
            StatusCode::NOT_FOUND,
            Some("not_found"),
        )
        .await;
    }
}

/// With file bodies in an object store, exports go beside them (under `training/`), not to the
/// API's disk, and the export route serves them from there.
#[tokio::test]
async fn exports_go_beside_file_bodies_in_an_object_store() {
    use sha2::{Digest, Sha256};
    let memory = std::sync::Arc::new(object_store::memory::InMemory::new());
    let blobs = batchlab_core::blob::BlobStore::object(memory.clone(), "files".into());
    let s = common::start_with(
        batchlab_core::testing::TestDb::sqlite().await,
        Some(blobs),
        |c| {
            c.label_studio.webhook_secret = Some(SECRET.into());
            c.curation.milestones = vec![1];
        },
    )
    .await;
    let export = &first_milestone_export(&s).await;
    let path = export["path"].as_str().unwrap();
    assert!(
        path.ends_with("/files/training/project_1_milestone_1.json"),
        "{export}"
    );
    use object_store::ObjectStoreExt;
    let stored = memory
        .get(&"files/training/project_1_milestone_1.json".into())
        .await
        .expect("the snapshot is an object beside the file bodies")
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        export["sha256"],
        json!(format!("{:x}", Sha256::digest(&stored)))
    );
    let served = s
        .client
        .get(s.url("/v1/label-studio/exports/1/project_1_export.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.bytes().await.unwrap(), stored);
}
