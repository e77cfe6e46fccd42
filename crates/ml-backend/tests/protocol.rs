//! The ML backend over a real socket, replaying the requests a real Label Studio 1.23 sent
//! (`tests/fixtures/label-studio-1.23` at the repository root): health, setup,
//! webhooks; basic auth; the webhook hand-off to a receiving server bound in the test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use batchlab_core::config::Config;
use batchlab_ml_backend::{router, MlState};
use serde_json::{json, Value};
use tokio::sync::mpsc;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/label-studio-1.23")
}

/// The `*-ml-<kind>*` fixture files, in order.
fn fixtures(kind: &str) -> Vec<(String, Value)> {
    let dir = fixtures_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(&format!("-ml-{kind}")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no -ml-{kind} fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()))
        .collect()
}

struct Server {
    base: String,
    client: reqwest::Client,
}

async fn serve(config: Config) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(MlState::new(config).unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, client: reqwest::Client::new() }
}

impl Server {
    /// Sends a fixture's method, path, headers (minus hop-by-hop ones) and body.
    async fn replay(&self, fixture: &Value) -> reqwest::Response {
        let method = reqwest::Method::from_bytes(fixture["method"].as_str().unwrap().as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{}", self.base, fixture["path"].as_str().unwrap()));
        for (name, value) in fixture["headers"].as_object().unwrap() {
            if !matches!(name.to_ascii_lowercase().as_str(), "host" | "content-length" | "connection" | "accept-encoding") {
                request = request.header(name.as_str(), value.as_str().unwrap());
            }
        }
        if !fixture["body"].is_null() {
            request = request.body(serde_json::to_vec(&fixture["body"]).unwrap());
        }
        request.send().await.unwrap()
    }
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let ct = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    (status, response.json().await.unwrap())
}

/// A batchlab-api stand-in: records each webhook hand-off (headers, body), after `delay`.
async fn receiver(delay: Duration) -> (String, mpsc::UnboundedReceiver<(HeaderMap, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Arc::new(tx);
    let app = axum::Router::new().route(
        "/v1/webhooks/label-studio",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send((headers, body));
                axum::Json(json!({"status": "ok"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

fn config_with_api(api_url: &str) -> Config {
    let mut c = Config::default();
    c.ml_backend.api_url = api_url.to_string();
    c.label_studio.webhook_secret = Some("s3cret".into());
    c
}

#[tokio::test]
async fn health_fixtures_answer_up() {
    let s = serve(Config::default()).await;
    for (name, f) in fixtures("health") {
        let (status, body) = json_of(s.replay(&f).await).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(body["status"], "UP", "{name}");
    }
}

#[tokio::test]
async fn setup_fixtures_answer_a_stable_version_that_follows_the_schema() {
    let s = serve(Config::default()).await;
    let mut versions = Vec::new();
    for (name, f) in fixtures("setup") {
        let started = Instant::now();
        let (status, body) = json_of(s.replay(&f).await).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert!(started.elapsed() < Duration::from_secs(1), "{name}: /setup must answer at once");
        versions.push(body["model_version"].as_str().unwrap_or_else(|| panic!("{name}: {body}")).to_string());
    }
    // Every captured /setup carried the same schema, so the same version.
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
    let v = &versions[0];
    assert!(v.starts_with("batchlab-SmolLM2-135M-Instruct-") && v.len() == "batchlab-SmolLM2-135M-Instruct-".len() + 8, "{v}");

    // Another schema: another version; extra_params without a prompt changes nothing more.
    let (_, f) = &fixtures("setup")[0];
    let mut other = f.clone();
    other["body"]["schema"] = json!("<View><Text name=\"t\" value=\"$text\"/></View>");
    other["body"]["extra_params"] = json!({"temperature": 0.1});
    let (status, body) = json_of(s.replay(&other).await).await;
    assert_eq!(status, 200);
    let w = body["model_version"].as_str().unwrap().to_string();
    assert_ne!(&w, v);
    other["body"]["extra_params"] = Value::Null;
    assert_eq!(json_of(s.replay(&other).await).await.1["model_version"], w.as_str());
    // A prompt template, as an object or a plain string, is part of the version.
    other["body"]["extra_params"] = json!({"prompt": "Classify: {text}"});
    let t = json_of(s.replay(&other).await).await.1["model_version"].as_str().unwrap().to_string();
    assert_ne!(t, w);
    other["body"]["extra_params"] = json!("Classify: {text}");
    assert_eq!(json_of(s.replay(&other).await).await.1["model_version"], t.as_str());

    // /versions lists all three.
    let (status, body) = json_of(s.client.get(format!("{}/versions", s.base)).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let mut expected = vec![v.clone(), w, t];
    expected.sort();
    assert_eq!(body, json!({"versions": expected}));

    // A restarted backend answers the same version (no per-process hashing).
    let s2 = serve(Config::default()).await;
    assert_eq!(json_of(s2.replay(f).await).await.1["model_version"], v.as_str());
}

#[tokio::test]
async fn every_webhook_fixture_is_acknowledged_and_handed_on_unchanged() {
    let (api, mut rx) = receiver(Duration::ZERO).await;
    let s = serve(config_with_api(&api)).await;
    let fx = fixtures("webhook");
    for (name, f) in &fx {
        let (status, body) = json_of(s.replay(f).await).await;
        assert_eq!((status, body), (200, json!({})), "{name}");
    }
    for _ in 0..fx.len() {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a hand-off").unwrap();
        assert_eq!(headers.get("x-batchlab-secret").unwrap(), "s3cret");
        let doc: Value = serde_json::from_slice(&body).unwrap();
        // Hand-offs run concurrently: match each by content.
        assert!(fx.iter().any(|(_, f)| f["body"] == doc), "handed-on body matches no fixture: {doc}");
    }
    let metrics = s.client.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("batchlab_ml_webhook_events_total"), "{metrics}");
    assert!(metrics.contains("batchlab_ml_http_requests_total"), "{metrics}");
}

#[tokio::test]
async fn start_training_reaches_the_api_with_the_secret_and_the_same_bytes() {
    let (api, mut rx) = receiver(Duration::ZERO).await;
    let s = serve(config_with_api(&api)).await;
    let (_, f) = fixtures("webhook").into_iter().find(|(n, _)| n.starts_with("39-")).expect("fixture 39");
    let sent = serde_json::to_vec(&f["body"]).unwrap();
    let r = s.client.post(format!("{}/webhook", s.base)).header("content-type", "application/json").body(sent.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (headers, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(body.as_ref(), sent.as_slice(), "body handed on byte for byte");
    assert_eq!(headers.get("x-batchlab-secret").unwrap(), "s3cret");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
}

#[tokio::test]
async fn webhook_answers_before_a_slow_api_finishes() {
    let (api, mut rx) = receiver(Duration::from_secs(3)).await;
    let s = serve(config_with_api(&api)).await;
    let started = Instant::now();
    let r = s.client.post(format!("{}/webhook", s.base)).json(&json!({"action": "START_TRAINING", "project": {"id": 1}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1), "acknowledged after {:?}", started.elapsed());
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the hand-off still arrives").unwrap();
}

#[tokio::test]
async fn webhook_bodies_without_payload_unknown_actions_and_malformed_json() {
    // Nothing listens on the API URL: the hand-off fails, Label Studio still gets 200.
    let s = serve(config_with_api("http://127.0.0.1:9")).await;
    let post = |body: &'static str| {
        s.client.post(format!("{}/webhook", s.base)).header("content-type", "application/json").body(body).send()
    };
    assert_eq!(json_of(post(r#"{"action": "TASKS_CREATED"}"#).await.unwrap()).await, (200, json!({})));
    assert_eq!(json_of(post(r#"{"action": "SOMETHING_NEW", "x": 1}"#).await.unwrap()).await, (200, json!({})));
    for bad in [r#"{"action": "#, "[1,2]", r#"{"no_action": true}"#] {
        let (status, body) = json_of(post(bad).await.unwrap()).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"]["message"].is_string() && body["error"]["code"].is_string(), "{body}");
    }
}

#[tokio::test]
async fn basic_auth_guards_every_route_when_configured() {
    let mut c = Config::default();
    c.ml_backend.basic_auth_user = Some("ml".into());
    c.ml_backend.basic_auth_pass = Some("pw".into());
    let s = serve(c).await;
    for path in ["/health", "/versions", "/metrics", "/nope"] {
        let url = format!("{}{path}", s.base);
        let none = s.client.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path}");
        assert!(none.headers().get("www-authenticate").unwrap().to_str().unwrap().starts_with("Basic"), "{path}");
        let (_, body) = json_of(none).await;
        assert_eq!(body["error"]["code"], "unauthorized");
        let wrong = s.client.get(&url).basic_auth("ml", Some("wrong")).send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let right = s.client.get(&url).basic_auth("ml", Some("pw")).send().await.unwrap();
        assert_eq!(right.status(), if path == "/nope" { 404 } else { 200 }, "{path}");
    }
    let (_, f) = &fixtures("setup")[0];
    assert_eq!(s.replay(f).await.status(), 401, "Label Studio's setup without credentials");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let s = serve(Config::default()).await;
    let (status, body) = json_of(s.client.get(format!("{}/nope", s.base)).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, body) = json_of(s.client.get(format!("{}/setup", s.base)).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    let r = s.client.get(format!("{}/health", s.base)).send().await.unwrap();
    assert!(r.headers().contains_key("x-request-id"));
}

/// A server whose ML backend reads the shared store of `db` and has no model.
async fn serve_with_store(db: &batchlab_core::testing::TestDb) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(MlState::new(Config::default()).unwrap().with_store(db.store.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, client: reqwest::Client::new() }
}

const TEXT_CONFIG: &str = r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text"><Choice value="human"/><Choice value="location"/></Choices></View>"#;

async fn post_json(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    json_of(s.client.post(format!("{}{path}", s.base)).json(body).send().await.unwrap()).await
}

#[tokio::test]
async fn without_a_model_predict_says_so_and_imported_predictions_still_answer() {
    use batchlab_core::predict::cache::{cache_key, IMPORTED};
    use batchlab_core::store::CachedPrediction;
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let s = serve_with_store(&db).await;
    let task = |text: &str| json!({"id": 1, "data": {"text": text, "custom_id": "r-1"}});
    let (status, e) = post_json(&s, "/predict", &json!({"tasks": [task("Who?")], "label_config": TEXT_CONFIG, "project": "3.0"})).await;
    assert_eq!(status, 503, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("not loaded"), "{e}");

    // A prediction imported from a batch for the same config and data (keys in another order).
    let data: Value = serde_json::from_str(r#"{"custom_id": "r-1", "text": "Who?"}"#).unwrap();
    let regions = json!([{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["human"]}}]);
    let row = CachedPrediction {
        key: cache_key(IMPORTED, TEXT_CONFIG, &data),
        model_version: "gpt:batch_1".into(),
        prediction: json!({"result": regions, "score": null}).to_string(),
    };
    db.store.cache_predictions(&[row]).await.unwrap();
    let (_, setup) = post_json(&s, "/setup", &json!({"project": "3.0", "schema": TEXT_CONFIG})).await;
    let (status, answer) = post_json(&s, "/predict", &json!({"tasks": [task("Who?")], "label_config": TEXT_CONFIG, "project": "3.0"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["result"], regions, "{answer}");
    assert_eq!(answer["results"][0]["model_version"], setup["model_version"], "{answer}");
    db.cleanup().await;
}

#[tokio::test]
async fn ground_truth_in_the_store_changes_the_model_version() {
    use batchlab_core::store::{AnnotationRow, NewWebhookEvent, TaskRow};
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let s = serve_with_store(&db).await;
    let setup = json!({"project": "5.1795812516", "schema": TEXT_CONFIG, "extra_params": null});
    let (_, before) = post_json(&s, "/setup", &setup).await;

    let (event, _) = db
        .store
        .insert_webhook_event(&NewWebhookEvent { delivery_key: "k", action: "ANNOTATION_CREATED", project_id: Some(5), body: "{}" })
        .await
        .unwrap();
    let mut tx = db.store.begin_event(event, "applied").await.unwrap().unwrap();
    tx.upsert_project(5, "p", TEXT_CONFIG, 1).await.unwrap();
    tx.upsert_task(&TaskRow { id: 9, project_id: 5, data: r#"{"text": "Who wrote Hamlet ?"}"#.into() }, 1).await.unwrap();
    let result = r#"[{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["human"]}}]"#;
    tx.upsert_annotation(&AnnotationRow {
        id: 90,
        project_id: 5,
        task_id: 9,
        result: result.into(),
        ground_truth: true,
        was_cancelled: false,
        lead_time: None,
        completed_by: None,
        created_at: None,
        updated_at: None,
        updated_at_us: 1,
        valid: true,
        invalid_reason: None,
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let (_, after) = post_json(&s, "/setup", &setup).await;
    assert_ne!(before["model_version"], after["model_version"], "one ground-truth example is a new example set");
    assert_eq!(post_json(&s, "/setup", &setup).await.1["model_version"], after["model_version"], "stable while the set is");
    db.cleanup().await;
}
