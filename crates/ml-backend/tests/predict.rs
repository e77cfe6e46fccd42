//! `/predict`, `/status` and the OpenAI routes over a real socket with the real default model
//! (`models/SmolLM2-135M-Instruct.Q4_1.gguf`; `BATCHLAB_MODEL` names another): the `/predict`
//! requests a real Label Studio 1.23 sent, the deadline and the cache, and bad input.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use batchlab_core::config::Config;
use batchlab_inference::engine::Engine;
use batchlab_ml_backend::slot::EngineSlot;
use batchlab_ml_backend::{router, MlState};
use serde_json::{json, Value};

fn model_path() -> PathBuf {
    std::env::var("BATCHLAB_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn config() -> Config {
    let mut c = Config::default();
    c.engine.model_path = model_path();
    c.ml_backend.predict_deadline_seconds = 120.0;
    // A short context keeps the too-long-task test quick; every other prompt here fits.
    c.engine.max_context = 2048;
    c
}

/// One engine for every test of this file (each test has its own runtime; the engine has its
/// own thread).
fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = model_path();
            assert!(
                path.is_file(),
                "model {} is missing: run scripts/fetch-model.sh",
                path.display()
            );
            Engine::load(batchlab_inference::engine_config(&config().engine))
                .expect("the default model loads")
        })
        .clone()
}

async fn serve(config: Config) -> String {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(
        MlState::new(config)
            .unwrap()
            .with_model(EngineSlot::ready(engine())),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/label-studio-1.23")
        .join(name);
    serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap()).unwrap()["body"].clone()
}

const CONTROLS: [&str; 4] = [
    "recommendation",
    "trajectory_rating",
    "pedigree_rating",
    "reasoning",
];

fn check_candidate_prediction(p: &Value, version: &str) {
    assert_eq!(p["model_version"], version, "{p}");
    let regions = p["result"]
        .as_array()
        .unwrap_or_else(|| panic!("no result: {p}"));
    let names: Vec<&str> = regions
        .iter()
        .map(|r| r["from_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, CONTROLS, "{p}");
    let ratings = ["exceptional", "strong", "good", "average", "weak"];
    for r in regions {
        assert_eq!(r["to_name"], "candidate_name");
        match r["type"].as_str().unwrap() {
            "choices" => {
                let (choice,) = (r["value"]["choices"][0].as_str().unwrap(),);
                let allowed: &[&str] = if r["from_name"] == "recommendation" {
                    &["strong_yes", "yes", "maybe", "no", "strong_no"]
                } else {
                    &ratings
                };
                assert!(allowed.contains(&choice), "{r}");
                let s = r["score"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&s), "{r}");
            }
            "textarea" => assert!(r["value"]["text"][0].is_string(), "{r}"),
            other => panic!("unexpected region type {other}: {r}"),
        }
    }
    let score = p["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "{p}");
}

#[tokio::test]
async fn label_studios_predict_requests_get_a_prediction_per_task_with_the_setup_version() {
    let base = serve(config()).await;
    for name in [
        "09-ml-predict.json",
        "12-ml-predict.json",
        "13-ml-predict.json",
        "20-ml-predict.json",
    ] {
        let body = fixture(name);
        let (status, setup) =
            post(&base, "/setup", &json!({"project": body["project"], "schema": body["label_config"], "extra_params": null})).await;
        assert_eq!(status, 200, "{setup}");
        let version = setup["model_version"].as_str().unwrap().to_string();
        let (status, answer) = post(&base, "/predict", &body).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let results = answer["results"].as_array().unwrap();
        assert_eq!(
            results.len(),
            body["tasks"].as_array().unwrap().len(),
            "{name}"
        );
        for p in results {
            check_candidate_prediction(p, &version);
        }
    }
}

#[tokio::test]
async fn unfinished_tasks_answer_without_result_and_finish_into_the_cache() {
    let mut c = config();
    c.ml_backend.predict_deadline_seconds = 0.0;
    let base = serve(c).await;
    let mut body = fixture("12-ml-predict.json");
    // Data no other test predicts, so nothing is cached yet.
    for (i, t) in body["tasks"].as_array_mut().unwrap().iter_mut().enumerate() {
        t["data"]["name"] = json!(format!("Deadline Candidate {i}"));
    }
    let (status, answer) = post(&base, "/predict", &body).await;
    assert_eq!(status, 200, "{answer}");
    let n = body["tasks"].as_array().unwrap().len();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), n);
    assert!(
        results
            .iter()
            .all(|p| p.get("result").is_none() && p["model_version"].is_string()),
        "{answer}"
    );

    // The jobs continue; /status shows them, and the next request is answered from the cache.
    let client = reqwest::Client::new();
    let mut cached = 0;
    for _ in 0..600 {
        let status: Value = client
            .get(format!("{base}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["model"]["state"], "ready", "{status}");
        cached = status["predictions"]["cached"].as_u64().unwrap();
        if cached as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cached as usize >= n, "jobs never finished: {cached} of {n}");
    let (_, again) = post(&base, "/predict", &body).await;
    for p in again["results"].as_array().unwrap() {
        assert!(
            p["result"].is_array(),
            "deadline 0 answers only what is cached: {again}"
        );
    }
}

/// Shutdown (what batchlab-ml-backend does on SIGTERM): jobs still waiting for a slot are not
/// started, the running one finishes, and its prediction is in the shared store, where a new
/// process (the restarted service) answers it at once.
#[tokio::test]
async fn shutdown_finishes_running_jobs_into_the_store_and_drops_queued_ones() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let mut c = config();
    c.ml_backend.predict_deadline_seconds = 0.0;
    // One bulk task at a time (the tasks in flight follow the engine's batch).
    c.engine.max_batch = 1;
    let state = MlState::new(c.clone())
        .unwrap()
        .with_model(EngineSlot::ready(engine()))
        .with_store(db.store.clone());
    let jobs = state.jobs.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });

    let mut body = fixture("12-ml-predict.json");
    let task = body["tasks"][0].clone();
    let n = 8;
    body["tasks"] = Value::Array(
        (0..n)
            .map(|i| {
                let mut t = task.clone();
                t["id"] = json!(1000 + i);
                t["data"]["name"] = json!(format!("Shutdown Candidate {i}"));
                t
            })
            .collect(),
    );
    let (status, answer) = post(&base, "/predict", &body).await;
    assert_eq!(status, 200, "{answer}");
    let started = jobs.counts();
    assert!(started.pending > 1 && started.queued > 0, "{started:?}");

    jobs.stop_queued();
    tokio::time::timeout(Duration::from_secs(120), jobs.finished())
        .await
        .expect("the running jobs finish");
    assert_eq!(jobs.counts().pending, 0, "every job ended");

    // "Restarted": a fresh state over the same store answers from it what was finished.
    let restarted = MlState::new(c)
        .unwrap()
        .with_model(EngineSlot::ready(engine()))
        .with_store(db.store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(restarted)).await.unwrap() });
    let (status, again) = post(&base, "/predict", &body).await;
    assert_eq!(status, 200, "{again}");
    let answered = again["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["result"].is_array())
        .count();
    assert!(
        answered >= 1,
        "the job running at shutdown reached the store: {again}"
    );
    assert!(
        answered < n as usize,
        "queued jobs were not started at shutdown, yet all {n} were predicted: {again}"
    );
    db.cleanup().await;
}

/// Retrieve Predictions over many tasks while an annotator opens another: the opened task is
/// answered while the bulk work is still queued (it goes ahead of it, in this service and in
/// the engine), and `/status` shows the project's progress until the bulk work is done.
#[tokio::test]
async fn an_opened_task_is_answered_while_bulk_work_is_queued() {
    let base = serve(config()).await;
    let client = reqwest::Client::new();
    let status = || async {
        client
            .get(format!("{base}/status"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let mut body = fixture("12-ml-predict.json");
    let task = body["tasks"][0].clone();
    let n = 30;
    body["tasks"] = Value::Array(
        (0..n)
            .map(|i| {
                let mut t = task.clone();
                t["id"] = json!(2000 + i);
                t["data"]["name"] = json!(format!("Bulk Candidate {i}"));
                t
            })
            .collect(),
    );
    let bulk = tokio::spawn({
        let (base, body) = (base.clone(), body.clone());
        async move { post(&base, "/predict", &body).await }
    });
    // Wait until the bulk request's jobs are in (some running, the rest queued).
    loop {
        let s = status().await;
        if s["predictions"]["queued"].as_u64().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut opened = body.clone();
    let mut one = task.clone();
    one["data"]["name"] = json!("Opened Candidate");
    opened["tasks"] = json!([one]);
    let (code, answer) = post(&base, "/predict", &opened).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer["results"][0]["result"].is_array(), "{answer}");
    let s = status().await;
    let projects = s["projects"].as_object().unwrap();
    assert_eq!(projects.len(), 1, "{s}");
    let (_, p) = projects.iter().next().unwrap();
    let left = p["queued"].as_u64().unwrap() + p["running"].as_u64().unwrap();
    assert!(
        left > 0,
        "the opened task waited for the whole bulk request: {s}"
    );
    assert!(p["done"].as_u64().unwrap() >= 1, "{s}");

    // The bulk request answers what is done by its deadline; the rest finish into the cache.
    let (code, answer) = bulk.await.unwrap();
    assert_eq!(code, 200, "{answer}");
    let progress = loop {
        let s = status().await;
        let p = s["projects"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        if p["queued"] == 0 && p["running"] == 0 {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(progress["done"].as_u64(), Some(n + 1), "{progress}");
    let (_, again) = post(&base, "/predict", &body).await;
    assert!(
        again["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["result"].is_array()),
        "{again}"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_error() {
    let base = serve(config()).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/predict"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid /predict body"),
        "{e}"
    );

    let image = r#"<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img"><Label value="cat"/></RectangleLabels></View>"#;
    let (status, e) = post(
        &base,
        "/predict",
        &json!({"tasks": [{"id": 1, "data": {"image": "x.png"}}], "label_config": image}),
    )
    .await;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("RectangleLabels"),
        "{e}"
    );

    let text = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;
    let (status, e) = post(
        &base,
        "/predict",
        &json!({"tasks": [{"id": 1, "data": {"other": "x"}}], "label_config": text}),
    )
    .await;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("text"),
        "{e}"
    );

    // A text far longer than the context is cut to fit (and logged), not refused.
    let long = "The candidate wrote many compilers. ".repeat(400);
    let (status, answer) = post(
        &base,
        "/predict",
        &json!({"tasks": [{"id": 2, "data": {"text": long}}], "label_config": text}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["results"][0]["result"][0]["from_name"], "c",
        "{answer}"
    );
}

#[tokio::test]
async fn every_predictable_control_kind_gets_a_region() {
    let base = serve(config()).await;
    let xml = r#"<View><Text name="t" value="$text"/>
      <Choices name="topic" toName="t" choice="multiple"><Choice value="science"/><Choice value="sport"/><Choice value="music"/></Choices>
      <Rating name="quality" toName="t" maxRating="5"/>
      <Number name="year" toName="t" min="1900" max="2100"/>
      <Labels name="ner" toName="t"><Label value="PERSON"/><Label value="CITY"/></Labels></View>"#;
    let data = json!({"text": "In 1905 Albert Einstein published special relativity while living in Bern."});
    let (status, answer) = post(
        &base,
        "/predict",
        &json!({"tasks": [{"id": 1, "data": data}], "label_config": xml}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let regions = answer["results"][0]["result"].as_array().unwrap();
    let by = |name: &str| {
        regions
            .iter()
            .find(|r| r["from_name"] == name)
            .unwrap_or_else(|| panic!("no {name}: {answer}"))
    };
    assert!(
        !by("topic")["value"]["choices"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{answer}"
    );
    let stars = by("quality")["value"]["rating"].as_u64().unwrap();
    assert!((1..=5).contains(&stars), "{answer}");
    let text = data["text"].as_str().unwrap();
    for span in regions.iter().filter(|r| r["type"] == "labels") {
        let (s, e) = (
            span["value"]["start"].as_u64().unwrap() as usize,
            span["value"]["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            &text[s..e],
            span["value"]["text"].as_str().unwrap(),
            "{span}"
        );
    }
    eprintln!("{}", serde_json::to_string_pretty(regions).unwrap());
    // Structured output: the number is always one, in range.
    let y = by("year")["value"]["number"].as_f64().unwrap();
    assert!((1900.0..=2100.0).contains(&y), "{answer}");
}

#[tokio::test]
async fn openai_chat_completions_and_models() {
    let base = serve(config()).await;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct", "{models}");
    let (status, c) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert!(
        !c["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{c}"
    );
    assert!(c["usage"]["completion_tokens"].as_u64().unwrap() <= 8);
    let (status, e) = post(&base, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
}

/// `/v1/embeddings` answers OpenAI's list of unit vectors of the model's hidden size, in input
/// order, the same for a text however it is asked for; malformed bodies and a `dimensions` the
/// model cannot serve are 400s in OpenAI's error shape.
#[tokio::test]
async fn openai_embeddings() {
    let base = serve(config()).await;
    let (status, e) = post(
        &base,
        "/v1/embeddings",
        &json!({"model": "SmolLM2-135M-Instruct", "input": ["The cat sat on the mat.", "Revenue grew."]}),
    )
    .await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["object"], "list");
    let data = e["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vectors: Vec<Vec<f64>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(
                (d["object"].as_str(), d["index"].as_u64()),
                (Some("embedding"), Some(i as u64))
            );
            serde_json::from_value(d["embedding"].clone()).unwrap()
        })
        .collect();
    for v in &vectors {
        assert_eq!(v.len(), 576);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    assert!(e["usage"]["prompt_tokens"].as_u64().unwrap() >= 4, "{e}");
    assert_eq!(e["usage"]["prompt_tokens"], e["usage"]["total_tokens"]);
    // The first text alone, with the native dimensions named: the same vector.
    let (status, alone) = post(
        &base,
        "/v1/embeddings",
        &json!({"input": "The cat sat on the mat.", "dimensions": 576}),
    )
    .await;
    assert_eq!(status, 200, "{alone}");
    let alone: Vec<f64> = serde_json::from_value(alone["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(alone, vectors[0]);
    for (body, expected) in [
        (json!({"input": []}), "empty array"),
        (
            json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (json!({"input": "x", "dimensions": 64}), "576 dimensions"),
        (
            json!({"input": [[1, 99_999_999]]}),
            "outside the vocabulary",
        ),
    ] {
        let (status, e) = post(&base, "/v1/embeddings", &body).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
}

const TOPIC_CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t" choice="single"><Choice value="a"/><Choice value="b"/></Choices></View>"#;

/// Task texts of two topics the option names ("a", "b") say nothing about: zero-shot is a
/// guess, while the embeddings tell the topics apart.
fn topic_text(topic: usize, i: usize) -> String {
    let pets = ["cat", "dog", "kitten", "puppy", "parrot", "hamster"];
    let places = ["sofa", "garden", "kitchen", "window", "bed", "porch"];
    let firms = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"];
    match topic {
        0 => format!(
            "My {} slept all afternoon on the {}.",
            pets[i % 6],
            places[(i / 6) % 6]
        ),
        _ => format!(
            "Shares of {} fell {}% after quarterly earnings missed forecasts.",
            firms[i % 6],
            2 + i % 9
        ),
    }
}

/// Label Studio's webhook bodies for project `project` with `n` annotated tasks, alternating
/// topics (the first four ground truth), as batchlab-api records them.
async fn annotated_project(store: &batchlab_core::store::Store, project: i64, n: usize) {
    let curation = batchlab_core::curation::Curation::new(
        store.clone(),
        Config::default().curation,
        Config::default().label_studio.instance,
    );
    let created = json!({"action": "PROJECT_CREATED", "project": {"id": project, "title": "topics", "label_config": TOPIC_CONFIG}});
    curation
        .ingest(&serde_json::to_vec(&created).unwrap())
        .await
        .unwrap();
    for i in 0..n {
        let (id, topic) = (i as i64 + 1, i % 2);
        let label = ["a", "b"][topic];
        let event = json!({"action": "ANNOTATION_CREATED", "project": {"id": project},
            "task": {"id": id, "project": project, "data": {"text": topic_text(topic, i / 2)}},
            "annotation": {"id": id, "task": id, "project": project, "was_cancelled": false, "ground_truth": i < 4,
                "created_at": "2026-12-05T10:00:00Z", "updated_at": "2026-12-05T10:00:00Z",
                "result": [{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [label]}}]}});
        curation
            .ingest(&serde_json::to_vec(&event).unwrap())
            .await
            .unwrap();
    }
    while curation.process_pending().await.unwrap() > 0 {}
}

/// `/status` of `base` once project `project`'s learning has a finished training.
async fn learned_status(base: &str, project: i64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let status: Value = reqwest::get(format!("{base}/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let report = &status["learning"][project.to_string()];
        if report["trained_at"].as_i64().unwrap_or(0) > 0 && report["training"] == json!(false) {
            return report.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no training finished: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Learning from annotations: a project's annotations (recorded in the shared store) train a
/// classifier in the background; `/status` reports held-out accuracy of zero-shot and of the
/// classifier; a classifier that beats zero-shot answers under a new `model_version`; and it is
/// in the store, so a restarted process predicts with it at once, without training again.
#[tokio::test]
async fn a_project_learns_from_its_annotations_and_keeps_what_it_learned() {
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let project = 7;
    annotated_project(&db.store, project, 24).await;
    let mut c = config();
    c.ml_backend.learn_debounce_seconds = 0.0;
    let serve_state = |c: Config| {
        let store = db.store.clone();
        async move {
            let state = MlState::new(c)
                .unwrap()
                .with_model(EngineSlot::ready(engine()))
                .with_store(store);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
            base
        }
    };
    let fresh: Vec<(String, &str)> = (0..3)
        .flat_map(|i| [(topic_text(0, 20 + i), "a"), (topic_text(1, 20 + i), "b")])
        .collect();
    let request = json!({"project": format!("{project}.1764928800"), "label_config": TOPIC_CONFIG,
        "tasks": fresh.iter().enumerate().map(|(i, (text, _))| json!({"id": 100 + i, "data": {"text": text}})).collect::<Vec<_>>()});

    let base = serve_state(c.clone()).await;
    let (status, zero) = post(&base, "/predict", &request).await;
    assert_eq!(status, 200, "{zero}");
    let zero_version = zero["results"][0]["model_version"]
        .as_str()
        .unwrap()
        .to_string();
    let report = learned_status(&base, project).await;
    assert_eq!(report["annotations"], json!(24), "{report}");
    let control = &report["controls"]["c"];
    assert_eq!(control["answered_by"], json!("learned"), "{report}");
    assert!(
        control["learned_accuracy"].as_f64().unwrap()
            > control["zero_shot_accuracy"].as_f64().unwrap(),
        "{report}"
    );
    assert!(control["learned_ece"].as_f64().unwrap() <= 1.0, "{report}");

    let (status, learned) = post(&base, "/predict", &request).await;
    assert_eq!(status, 200, "{learned}");
    let version = learned["results"][0]["model_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(
        version, zero_version,
        "a new classifier is a new model version"
    );
    let right = |answer: &Value| {
        fresh
            .iter()
            .zip(answer["results"].as_array().unwrap())
            .filter(|((_, label), p)| p["result"][0]["value"]["choices"][0] == json!(label))
            .count()
    };
    assert!(
        right(&learned) >= 5,
        "{} of 6 fresh tasks right: {learned}",
        right(&learned)
    );

    // Restarted: the stored classifier answers at once, under the same version, and the
    // report says when it was trained (no new training: the annotations did not change).
    let restarted = serve_state(c).await;
    let (status, again) = post(&restarted, "/predict", &request).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["results"][0]["model_version"],
        json!(version),
        "{again}"
    );
    let after = learned_status(&restarted, project).await;
    assert_eq!(after["trained_at"], report["trained_at"], "{after}");
    db.cleanup().await;
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A service whose model slot is `slot`, on a free port.
async fn serve_slot(slot: EngineSlot) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(MlState::new(config()).unwrap().with_model(slot));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// `/health` is 503 until the model is loaded and after a failed load (as llama.cpp's server
/// answers), so Label Studio and a container's health check wait for a backend that can
/// predict; `/setup` waits too, because the `model_version` it answers names the model file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_setup_wait_for_the_model_whose_file_the_version_names() {
    let schema = "<View><Text name=\"text\" value=\"$text\"/><Choices name=\"c\" toName=\"text\"><Choice value=\"a\"/><Choice value=\"b\"/></Choices></View>";
    let setup = json!({"project": "7.1700000000", "schema": schema});
    let (slot, loader) = EngineSlot::pending();
    let base = serve_slot(slot).await;

    let (status, body) = get(&base, "/health").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("LOADING")),
        "{body}"
    );
    let (status, body) = post(&base, "/setup", &setup).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "model_unavailable", "{body}");
    let (status, body) = post(
        &base,
        "/predict",
        &json!({"tasks": [{"id": 1, "data": {"text": "x"}}], "label_config": schema}),
    )
    .await;
    assert_eq!(status, 503, "{body}");

    let engine = engine();
    loader.finish(Ok(engine.clone()));
    let (status, body) = get(&base, "/health").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("UP")),
        "{body}"
    );
    let (status, body) = post(&base, "/setup", &setup).await;
    assert_eq!(status, 200, "{body}");
    let version = body["model_version"].as_str().unwrap().to_string();
    // The version is the one for this model file's SHA-256: another GGUF under the same
    // model_id answers another version, and the prediction cache (keyed by it) misses.
    let sha = engine.model_sha256();
    assert_eq!(sha.len(), 64, "{sha}");
    let model_id = &config().engine.model_id;
    use batchlab_core::labelstudio::version::prediction_version;
    assert_eq!(
        version,
        prediction_version(model_id, Some(sha), schema, None, 0)
    );
    assert_ne!(
        version,
        prediction_version(model_id, Some(&"0".repeat(64)), schema, None, 0)
    );

    // A failed load: 503 DOWN with the reason, for good.
    let (slot, loader) = EngineSlot::pending();
    let base = serve_slot(slot).await;
    loader.finish(Err(batchlab_inference::engine::EngineError::Load(
        "models/missing.gguf: no such file".into(),
    )));
    let (status, body) = get(&base, "/health").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("DOWN")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("missing.gguf"),
        "{body}"
    );
}
