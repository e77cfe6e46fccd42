//! The ML backend over a real socket, replaying the requests a real Label Studio 1.23 sent
//! (`tests/fixtures/label-studio-1.23` at the repository root): health, setup,
//! webhooks stored in the shared store; basic auth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use batchlab_core::config::Config;
use batchlab_ml_backend::{router, MlState};
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/label-studio-1.23")
}

/// The `*-ml-<kind>*` fixture files, in order.
fn fixtures(kind: &str) -> Vec<(String, Value)> {
    let dir = fixtures_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(&format!("-ml-{kind}"))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no -ml-{kind} fixtures in {}",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
            )
        })
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
    Server {
        base,
        client: reqwest::Client::new(),
    }
}

impl Server {
    /// Sends a fixture's method, path, headers (minus hop-by-hop ones) and body.
    async fn replay(&self, fixture: &Value) -> reqwest::Response {
        let method =
            reqwest::Method::from_bytes(fixture["method"].as_str().unwrap().as_bytes()).unwrap();
        let mut request = self.client.request(
            method,
            format!("{}{}", self.base, fixture["path"].as_str().unwrap()),
        );
        for (name, value) in fixture["headers"].as_object().unwrap() {
            if !matches!(
                name.to_ascii_lowercase().as_str(),
                "host" | "content-length" | "connection" | "accept-encoding"
            ) {
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
    let ct = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn health_fixtures_are_answered_down_without_a_model() {
    // This service has no model (the protocol alone): Label Studio's probes get 503 and the
    // reason in its shape. With a model, the same probe answers 200 `UP`
    // (tests/predict.rs::health_and_setup_wait_for_the_model_whose_file_the_version_names).
    let s = serve(Config::default()).await;
    for (name, f) in fixtures("health") {
        let (status, body) = json_of(s.replay(&f).await).await;
        assert_eq!(status, 503, "{name}");
        assert_eq!(body["status"], "DOWN", "{name}");
        assert_eq!(body["model_class"], "batchlab", "{name}");
        assert!(
            body["error"].as_str().unwrap().contains("not loaded"),
            "{name}"
        );
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
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{name}: /setup must answer at once"
        );
        versions.push(
            body["model_version"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {body}"))
                .to_string(),
        );
    }
    // Every captured /setup carried the same schema, so the same version.
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
    let v = &versions[0];
    assert!(
        v.starts_with("batchlab-SmolLM2-135M-Instruct-")
            && v.len() == "batchlab-SmolLM2-135M-Instruct-".len() + 8,
        "{v}"
    );

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
    assert_eq!(
        json_of(s.replay(&other).await).await.1["model_version"],
        w.as_str()
    );
    // A prompt template, as an object or a plain string, is part of the version.
    other["body"]["extra_params"] = json!({"prompt": "Classify: {text}"});
    let t = json_of(s.replay(&other).await).await.1["model_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(t, w);
    other["body"]["extra_params"] = json!("Classify: {text}");
    assert_eq!(
        json_of(s.replay(&other).await).await.1["model_version"],
        t.as_str()
    );

    // /versions lists all three.
    let (status, body) = json_of(
        s.client
            .get(format!("{}/versions", s.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let mut expected = vec![v.clone(), w, t];
    expected.sort();
    assert_eq!(body, json!({"versions": expected}));

    // A restarted backend answers the same version (no per-process hashing).
    let s2 = serve(Config::default()).await;
    assert_eq!(
        json_of(s2.replay(f).await).await.1["model_version"],
        v.as_str()
    );
}

/// A server whose ML backend records webhook events in `db`'s store, with `config`.
async fn serve_config_with_store(config: Config, db: &batchlab_core::testing::TestDb) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(MlState::new(config).unwrap().with_store(db.store.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        base,
        client: reqwest::Client::new(),
    }
}

/// Every event Label Studio sent to the ML backend is stored in the shared store, body for body,
/// where batchlab-api's processor applies it; a second delivery of a body is a duplicate.
#[tokio::test]
async fn every_webhook_fixture_is_stored_for_the_api_to_apply() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let s = serve_config_with_store(Config::default(), &db).await;
    let fx = fixtures("webhook");
    for (name, f) in &fx {
        let (status, body) = json_of(s.replay(f).await).await;
        assert_eq!((status, body), (200, json!({})), "{name}");
    }
    let distinct: std::collections::BTreeSet<String> =
        fx.iter().map(|(_, f)| f["body"].to_string()).collect();
    let counts = db.store.webhook_event_counts(None).await.unwrap();
    assert_eq!(
        counts.received as usize,
        distinct.len(),
        "one stored event per distinct body"
    );
    let stored = db
        .store
        .pending_webhook_events(1_000, usize::MAX)
        .await
        .unwrap();
    for event in &stored {
        let doc: Value = serde_json::from_str(&event.body).unwrap();
        assert!(
            fx.iter().any(|(_, f)| f["body"] == doc),
            "stored body matches no fixture: {doc}"
        );
    }
    // Replayed: acknowledged, stored nothing new.
    for (name, f) in &fx {
        assert_eq!(s.replay(f).await.status(), 200, "{name}");
    }
    assert_eq!(
        db.store.webhook_event_counts(None).await.unwrap().received,
        counts.received
    );
    let metrics = s
        .client
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("batchlab_ml_webhook_events_total"),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"duplicate\""), "{metrics}");
    db.cleanup().await;
}

/// START_TRAINING, which Label Studio sends only to the ML backend, is stored with the bytes
/// Label Studio sent. Before, the ML backend relayed any body to batchlab-api adding the
/// webhook secret itself, so anyone who reached it bypassed the secret.
#[tokio::test]
async fn start_training_is_stored_byte_for_byte_and_nothing_is_relayed() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let mut config = Config::default();
    config.label_studio.webhook_secret = Some("s3cret".into());
    let s = serve_config_with_store(config, &db).await;
    let (_, f) = fixtures("webhook")
        .into_iter()
        .find(|(n, _)| n.starts_with("39-"))
        .expect("fixture 39");
    let sent = serde_json::to_vec(&f["body"]).unwrap();
    let r = s
        .client
        .post(format!("{}/webhook", s.base))
        .header("content-type", "application/json")
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stored = db
        .store
        .pending_webhook_events(10, usize::MAX)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].action, "START_TRAINING");
    assert_eq!(
        stored[0].body.as_bytes(),
        sent.as_slice(),
        "stored byte for byte"
    );
    db.cleanup().await;
}

/// With basic auth on, `/webhook` is exactly as trusted as every other route: no credentials,
/// nothing stored.
#[tokio::test]
async fn webhook_events_need_the_ml_backends_credentials() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let mut config = Config::default();
    config.ml_backend.basic_auth_user = Some("ml".into());
    config.ml_backend.basic_auth_pass = Some("pw".into());
    let s = serve_config_with_store(config, &db).await;
    let event = json!({"action": "START_TRAINING", "project": {"id": 1}});
    let r = s
        .client
        .post(format!("{}/webhook", s.base))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        db.store.webhook_event_counts(None).await.unwrap().received,
        0
    );
    let r = s
        .client
        .post(format!("{}/webhook", s.base))
        .basic_auth("ml", Some("pw"))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        db.store.webhook_event_counts(None).await.unwrap().received,
        1
    );
    db.cleanup().await;
}

#[tokio::test]
async fn webhook_bodies_without_payload_unknown_actions_and_malformed_json() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let s = serve_config_with_store(Config::default(), &db).await;
    let post = |body: &'static str| {
        s.client
            .post(format!("{}/webhook", s.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        json_of(post(r#"{"action": "TASKS_CREATED"}"#).await.unwrap()).await,
        (200, json!({}))
    );
    assert_eq!(
        json_of(
            post(r#"{"action": "SOMETHING_NEW", "x": 1}"#)
                .await
                .unwrap()
        )
        .await,
        (200, json!({}))
    );
    for bad in [r#"{"action": "#, "[1,2]", r#"{"no_action": true}"#, "\u{0}"] {
        let (status, body) = json_of(post(bad).await.unwrap()).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"]["message"].is_string() && body["error"]["code"].is_string(),
            "{body}"
        );
    }
    assert_eq!(
        db.store.webhook_event_counts(None).await.unwrap().received,
        2
    );
    db.cleanup().await;
}

/// Without a store (a protocol-only setup) events cannot be kept: 503, never a silent drop.
#[tokio::test]
async fn webhook_without_a_store_is_unavailable() {
    let s = serve(Config::default()).await;
    let r = s
        .client
        .post(format!("{}/webhook", s.base))
        .json(&json!({"action": "START_TRAINING"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
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
        assert!(
            none.headers()
                .get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("Basic"),
            "{path}"
        );
        let (_, body) = json_of(none).await;
        assert_eq!(body["error"]["code"], "unauthorized");
        let wrong = s
            .client
            .get(&url)
            .basic_auth("ml", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let right = s
            .client
            .get(&url)
            .basic_auth("ml", Some("pw"))
            .send()
            .await
            .unwrap();
        // Past the auth: /health answers for the model, which this service does not have.
        let expected = match path {
            "/nope" => 404,
            "/health" => 503,
            _ => 200,
        };
        assert_eq!(right.status(), expected, "{path}");
    }
    let (_, f) = &fixtures("setup")[0];
    let refused = s.replay(f).await;
    assert_eq!(
        refused.status(),
        401,
        "Label Studio's setup without credentials"
    );
    // Refused before its body was read: the connection closes, and says so (a client that
    // kept it could find it closed under its next request).
    assert_eq!(
        refused.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let s = serve(Config::default()).await;
    let (status, body) = json_of(
        s.client
            .get(format!("{}/nope", s.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = json_of(
        s.client
            .get(format!("{}/setup", s.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let r = s
        .client
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-request-id"));
}

/// A server whose ML backend reads the shared store of `db` and has no model.
async fn serve_with_store(db: &batchlab_core::testing::TestDb) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(
        MlState::new(Config::default())
            .unwrap()
            .with_store(db.store.clone()),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        base,
        client: reqwest::Client::new(),
    }
}

const TEXT_CONFIG: &str = r#"<View><Text name="text" value="$text"/><Choices name="label" toName="text"><Choice value="human"/><Choice value="location"/></Choices></View>"#;

async fn post_json(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    json_of(
        s.client
            .post(format!("{}{path}", s.base))
            .json(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn without_a_model_predict_says_so_and_imported_predictions_still_answer() {
    use batchlab_core::prediction_key::{cache_key, IMPORTED};
    use batchlab_core::store::CachedPrediction;
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let s = serve_with_store(&db).await;
    let task = |text: &str| json!({"id": 1, "data": {"text": text, "custom_id": "r-1"}});
    let (status, e) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task("Who?")], "label_config": TEXT_CONFIG, "project": "3.0"}),
    )
    .await;
    assert_eq!(status, 503, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not loaded"),
        "{e}"
    );

    // A prediction imported from a batch for the same config and data (keys in another order).
    let data: Value = serde_json::from_str(r#"{"custom_id": "r-1", "text": "Who?"}"#).unwrap();
    let regions = json!([{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["human"]}}]);
    let row = CachedPrediction {
        key: cache_key(IMPORTED, TEXT_CONFIG, &data),
        model_version: "gpt:batch_1".into(),
        prediction: json!({"result": regions, "score": null}).to_string(),
    };
    db.store.cache_predictions(&[row]).await.unwrap();
    let (_, setup) = post_json(
        &s,
        "/setup",
        &json!({"project": "3.0", "schema": TEXT_CONFIG}),
    )
    .await;
    let (status, answer) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task("Who?")], "label_config": TEXT_CONFIG, "project": "3.0"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["result"], regions, "{answer}");
    assert_eq!(
        answer["results"][0]["model_version"], setup["model_version"],
        "{answer}"
    );
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
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: "k",
            action: "ANNOTATION_CREATED",
            project_id: Some(5),
            body: "{}",
        })
        .await
        .unwrap();
    let mut tx = db
        .store
        .begin_event(event, "applied")
        .await
        .unwrap()
        .unwrap();
    tx.upsert_project(5, "p", TEXT_CONFIG, 1).await.unwrap();
    tx.upsert_task(
        &TaskRow {
            id: 9,
            project_id: 5,
            data: r#"{"text": "Who wrote Hamlet ?"}"#.into(),
        },
        1,
    )
    .await
    .unwrap();
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
    assert_ne!(
        before["model_version"], after["model_version"],
        "one ground-truth example is a new example set"
    );
    assert_eq!(
        post_json(&s, "/setup", &setup).await.1["model_version"],
        after["model_version"],
        "stable while the set is"
    );
    db.cleanup().await;
}

/// Hostile labeling configs and templates: each a 400 naming the limit (or a quick answer),
/// and the service answers `/health` afterwards. A config nested 20,000 deep once aborted the
/// process (stack overflow); a template of a million `{` took minutes of a runtime thread.
#[tokio::test]
async fn hostile_configs_and_templates_cost_one_answer() {
    let s = serve(Config::default()).await;
    let deep = format!(
        "{}<Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\"><Choice value=\"a\"/></Choices>{}",
        "<View>".repeat(20_000),
        "</View>".repeat(20_000)
    );
    let (status, e) = post_json(&s, "/setup", &json!({"project": "1.0", "schema": deep})).await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deeper than 64 levels"),
        "{e}"
    );
    let task = json!({"id": 1, "data": {"text": "x"}});
    let (status, e) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task], "label_config": deep}),
    )
    .await;
    assert_eq!(status, 400, "{e}");

    let choices: String = (0..5_000)
        .map(|i| format!("<Choice value=\"o{i}\"/>"))
        .collect();
    let wide = format!("<View><Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\">{choices}</Choices></View>");
    let (status, e) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task], "label_config": wide}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ml_backend.max_choices"),
        "{e}"
    );
    let choices: String = (0..50_000)
        .map(|i| format!("<Choice value=\"o{i}\"/>"))
        .collect();
    let wider = format!("<View><Text name=\"t\" value=\"$text\"/><Choices name=\"c\" toName=\"t\">{choices}</Choices></View>");
    let (status, e) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task], "label_config": wider}),
    )
    .await;
    assert_eq!(status, 400, "{e}");

    let entity = r#"<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><View><Text name="t" value="&b;"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>"#;
    let (status, e) = post_json(
        &s,
        "/predict",
        &json!({"tasks": [task], "label_config": entity}),
    )
    .await;
    assert_eq!(status, 422, "a config with a DTD does not parse: {e}");

    let template = format!("{}{{text}}", "{".repeat(1_000_000));
    let (status, e) = post_json(
        &s,
        "/setup",
        &json!({"project": "2.0", "schema": TEXT_CONFIG, "extra_params": {"prompt": template}}),
    )
    .await;
    assert_eq!(status, 200, "{e}");

    // OpenAI's chat endpoint: absurd bodies are refused before any model work.
    let empty: Vec<Value> = (0..20_000)
        .map(|_| json!({"role": "user", "content": ""}))
        .collect();
    let (status, e) = post_json(
        &s,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": empty}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("4096"),
        "{e}"
    );
    let one = json!([{"role": "user", "content": "hi"}]);
    let (status, e) = post_json(
        &s,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": one, "max_tokens": 1_000_000_000u64}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeds this server's limit of 4096"),
        "{e}"
    );

    for bad in [
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        b"\xff\xfe".to_vec(),
        Vec::new(),
    ] {
        for path in ["/setup", "/predict", "/webhook", "/v1/chat/completions"] {
            let r = s
                .client
                .post(format!("{}{path}", s.base))
                .header("content-type", "application/json")
                .body(bad.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert!(
                (400..500).contains(&status) || (path == "/webhook" && status == 503),
                "{path}: {status}"
            );
            let body: Value = r.json().await.unwrap();
            assert!(body["error"]["message"].is_string(), "{path}: {body}");
        }
    }
    // Still serving: /health answers in its shape (503 here only because this service has no
    // model).
    let health: Value = s
        .client
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["model_class"], "batchlab", "{health}");
}
