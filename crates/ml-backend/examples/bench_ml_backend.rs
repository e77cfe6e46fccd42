//! Benchmark of batchlab-ml-backend (run by `scripts/bench-ml-backend.sh`): the router on a real
//! socket with the real model, as Label Studio uses it. Prints a markdown table.
//!
//! Usage: bench_ml_backend MODEL TREC_JSONL [all|bulk|protocol]
//!
//! `bulk` measures bulk `/predict` (Retrieve Predictions) against one task at a time, both in
//! this run: 200 candidate-evaluation tasks, 200 TREC tasks with 4 few-shot examples each (from
//! 20 ground-truth annotations in a SQLite store), an annotator's task opened meanwhile, and
//! `/health` throughout; for each comparison, the engine's forward passes and rows a task in
//! both modes and what they imply (a pass's fixed and per-row cost, and the most batching
//! alone could give). `protocol` is the rest (one task, `/health` and `/setup` under load,
//! a 100-task request under a 10 s deadline, TREC agreement). `all` (the default) runs both.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchlab_core::config::Config;
use batchlab_core::labelstudio::config::LabelConfig;
use batchlab_core::store::Store;
use batchlab_inference::engine::{ChatRequest, Engine, ForwardWork, SamplingParams};
use batchlab_inference::predict::examples::{Example, ExampleSet};
use batchlab_inference::predict::task::{predict_task, PredictOptions, Priors, Teaching};
use batchlab_ml_backend::slot::EngineSlot;
use batchlab_ml_backend::{router, MlState};
use serde_json::{json, Value};

const CANDIDATE: &str = include_str!("../../../config/label-configs/candidate-evaluation.xml");
const TREC_LABELS: [&str; 6] = [
    "abbreviation",
    "description",
    "entity",
    "human",
    "location",
    "numeric",
];

fn candidate(i: usize) -> Value {
    let titles = [
        "Staff Engineer",
        "Research Scientist",
        "Product Manager",
        "Data Analyst",
        "Compiler Engineer",
    ];
    let companies = [
        "UNIVAC",
        "Bletchley Park",
        "Initech",
        "Globex",
        "Analytical Engines",
    ];
    json!({"name": format!("Candidate {i}"), "title": titles[i % 5], "company": companies[(i / 5) % 5]})
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    client
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn tasks(range: std::ops::Range<usize>, offset: usize) -> Value {
    Value::Array(
        range
            .map(|i| json!({"id": i + 1, "data": candidate(i + offset)}))
            .collect(),
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().expect("MODEL"));
    let trec = PathBuf::from(args.next().expect("TREC_JSONL"));
    let sections = args.next().unwrap_or_else(|| "all".into());
    let mut config = Config::default();
    config.engine.model_path = model;
    // The few-shot rows measure prompts that carry examples: a classifier learned from the
    // same ground truth (scripts/bench-quality.sh measures those) would answer instead, and
    // change the model version half-way.
    config.ml_backend.learn = false;
    let engine =
        Engine::load(batchlab_inference::engine_config(&config.engine)).expect("model loads");
    println!("| metric | measured | ratio (same run) | target |");
    println!("| --- | --- | --- | --- |");
    if sections == "all" || sections == "bulk" {
        bulk(&config, &engine, &trec).await;
    }
    if sections == "all" || sections == "protocol" {
        protocol(config, engine, trec).await;
    }
}

/// The ML backend on `engine` with `config`, over `store` when given; its base URL.
async fn serve_on(config: &Config, engine: &Engine, store: Option<Store>) -> String {
    let mut state = MlState::new(config.clone())
        .unwrap()
        .with_model(EngineSlot::ready(engine.clone()));
    if let Some(store) = store {
        state = state.with_store(store);
    }
    let app = router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// How many tasks the one-at-a-time baselines predict (their rate is steady; 200 would take
/// minutes for nothing).
const ONE_AT_A_TIME: usize = 20;

/// Tasks of bulk requests in each comparison.
const BULK: usize = 200;

/// Rounds of each comparison: single-task and bulk requests alternate (each round a quarter of
/// both), so that a machine whose load changes during the run weighs on both alike.
const ROUNDS: usize = 4;

/// What [`compare`] measured: tasks per second in bulk and one at a time, and the engine's
/// forward passes for each (differences of [`Engine::forward_work`] readings) with their tasks.
struct Compared {
    bulk: f64,
    single: f64,
    bulk_work: (ForwardWork, usize),
    single_work: (ForwardWork, usize),
}

/// Bulk `/predict` of `bulk` against one task at a time over `singles`, in alternating rounds,
/// each rate over its own requests' time.
async fn compare(
    engine: &Engine,
    client: &reqwest::Client,
    url: &str,
    singles: &[Value],
    bulk: &[Value],
    extra: &Value,
) -> Compared {
    let (mut single_s, mut bulk_s) = (0.0, 0.0);
    let (mut single_work, mut bulk_work) = (ForwardWork::default(), ForwardWork::default());
    for r in 0..ROUNDS {
        let s = &singles[r * singles.len() / ROUNDS..(r + 1) * singles.len() / ROUNDS];
        let b = &bulk[r * bulk.len() / ROUNDS..(r + 1) * bulk.len() / ROUNDS];
        let before = engine.forward_work();
        single_s += s.len() as f64 / one_at_a_time(client, url, s, extra).await;
        let between = engine.forward_work();
        bulk_s += b.len() as f64 / bulk_request(client, url, b.to_vec(), extra, None).await;
        single_work = single_work + (between - before);
        bulk_work = bulk_work + (engine.forward_work() - between);
    }
    Compared {
        bulk: bulk.len() as f64 / bulk_s,
        single: singles.len() as f64 / single_s,
        bulk_work: (bulk_work, bulk.len()),
        single_work: (single_work, singles.len()),
    }
}

/// Passes, rows and milliseconds of `work` a task.
fn per_task((work, tasks): (ForwardWork, usize)) -> (f64, f64, f64) {
    let n = tasks.max(1) as f64;
    (
        work.passes as f64 / n,
        work.rows as f64 / n,
        work.seconds * 1000.0 / n,
    )
}

/// The table row that reads a comparison's forward passes: per task, one at a time and in
/// bulk, the passes, rows and model time; a pass's cost fitted from the two as a fixed part
/// (reading the weights) plus a part per row; and the ratio bulk would reach if its passes
/// cost nothing beyond their rows, the most that batching alone can give on this machine.
fn forward_row(name: &str, c: &Compared) -> [String; 4] {
    let (ps, rs, ts) = per_task(c.single_work);
    let (pb, rb, tb) = per_task(c.bulk_work);
    let det = ps * rb - pb * rs;
    let fit = (det.abs() > f64::EPSILON).then(|| {
        let per_pass = (ts * rb - tb * rs) / det;
        let per_row = (ps * tb - pb * ts) / det;
        (per_pass, per_row)
    });
    // A fit has both parts positive; where the two modes' rows cost differently (few-shot
    // prompts each task's own one at a time, shared in bulk), the two-part model does not fit.
    let reading = match fit {
        Some((per_pass, per_row)) if per_pass > 0.0 && per_row > 0.0 => format!(
            "a pass ≈ {per_pass:.1} ms + {per_row:.2} ms a row: at most {:.2}x with passes free",
            ts / (rb * per_row)
        ),
        _ => "no fit: the two modes' rows differ in kind".into(),
    };
    [
        format!("forward work a task, {name}: one at a time / bulk"),
        format!("{ps:.1} / {pb:.1} passes, {rs:.0} / {rb:.0} rows, {ts:.0} / {tb:.0} ms"),
        reading,
        "(diagnostic)".into(),
    ]
}

/// Few-shot examples shown per task (the default `ml_backend.few_shot_examples`), from this
/// many ground-truth annotations.
const GROUND_TRUTH: usize = 20;

/// Predicts `tasks` one `/predict` each, one after another; tasks per second.
async fn one_at_a_time(client: &reqwest::Client, url: &str, tasks: &[Value], extra: &Value) -> f64 {
    let started = Instant::now();
    for t in tasks {
        let mut body = extra.clone();
        body["tasks"] = json!([t]);
        let a = post(client, url, &body).await;
        assert!(a["results"][0]["result"].is_array(), "{a}");
    }
    tasks.len() as f64 / started.elapsed().as_secs_f64()
}

/// One bulk `/predict` of `tasks`, answered when all are done (the deadline is long); tasks per
/// second. Meanwhile, when `opened` is given, an annotator opens one task (new data each time)
/// every 3 seconds, as long as the bulk request runs, and its latencies are pushed there.
async fn bulk_request(
    client: &reqwest::Client,
    url: &str,
    tasks: Vec<Value>,
    extra: &Value,
    opened: Option<(&[Value], &mut Vec<f64>)>,
) -> f64 {
    let n = tasks.len();
    let mut body = extra.clone();
    body["tasks"] = Value::Array(tasks);
    let started = Instant::now();
    let bulk = tokio::spawn({
        let (client, url) = (client.clone(), url.to_string());
        async move { post(&client, &url, &body).await }
    });
    if let Some((singles, latencies)) = opened {
        // Let the bulk request fill the engine first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for t in singles {
            if bulk.is_finished() {
                break;
            }
            let mut body = extra.clone();
            body["tasks"] = json!([t]);
            let t0 = Instant::now();
            let a = post(client, url, &body).await;
            assert!(a["results"][0]["result"].is_array(), "{a}");
            latencies.push(t0.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    let answer = bulk.await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let done = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["result"].is_array())
        .count();
    assert_eq!(done, n, "every task answered within the long deadline");
    n as f64 / seconds
}

/// Stores `examples` (text, label) as ground-truth annotations of TREC project `project`.
async fn ground_truth(store: &Store, project: i64, config: &str, examples: &[(String, String)]) {
    use batchlab_core::store::{AnnotationRow, NewWebhookEvent, TaskRow};
    let (event, _) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: "bench",
            action: "ANNOTATION_CREATED",
            project_id: Some(project),
            body: "{}",
        })
        .await
        .unwrap();
    let mut tx = store.begin_event(event, "applied").await.unwrap().unwrap();
    tx.upsert_project(project, "TREC", config, 1).await.unwrap();
    for (i, (text, label)) in examples.iter().enumerate() {
        let id = 100_000 + i as i64;
        tx.upsert_task(
            &TaskRow {
                id,
                project_id: project,
                data: json!({"text": text}).to_string(),
            },
            1,
        )
        .await
        .unwrap();
        let result = json!([{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]);
        tx.upsert_annotation(&AnnotationRow {
            id,
            project_id: project,
            task_id: id,
            result: result.to_string(),
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
    }
    tx.commit().await.unwrap();
}

/// Bulk `/predict` against one task at a time, in this run (see the module's doc).
async fn bulk(config: &Config, engine: &Engine, trec: &std::path::Path) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1200))
        .build()
        .unwrap();
    let mut c = config.clone();
    c.ml_backend.predict_deadline_seconds = 1000.0;
    let db = batchlab_core::testing::TestDb::sqlite().await;
    let base = serve_on(&c, engine, Some(db.store.clone())).await;
    let url = format!("{base}/predict");

    // /health every 20 ms from here to the end of the bulk runs.
    let stop = Arc::new(AtomicBool::new(false));
    let health = tokio::spawn({
        let (client, url, stop) = (client.clone(), format!("{base}/health"), stop.clone());
        async move {
            let mut ms = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                client.get(&url).send().await.unwrap();
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ms
        }
    });

    // Candidate evaluation (3 Choices + TextArea), zero-shot.
    let candidates = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| json!({"id": i + 1, "data": candidate(i)}))
            .collect()
    };
    let extra = json!({"label_config": CANDIDATE, "project": "1.0"});
    let compared = compare(
        engine,
        &client,
        &url,
        &candidates(10_000, ONE_AT_A_TIME),
        &candidates(30_000, BULK),
        &extra,
    )
    .await;
    let (rate, single) = (compared.bulk, compared.single);
    Rows.push([
        format!(
            "bulk `/predict`, {BULK} tasks ({ROUNDS} requests of {}), candidate-evaluation (3 Choices + TextArea)",
            BULK / ROUNDS
        ),
        format!("{rate:.2} tasks/s"),
        format!(
            "{:.2}x one at a time ({single:.2} tasks/s, {ONE_AT_A_TIME} single-task requests, alternating with the bulk ones)",
            rate / single
        ),
        "≥ 3x".into(),
    ]);
    Rows.push(forward_row("candidate-evaluation", &compared));
    // An annotator opens a task every 3 s while another bulk request runs (its own run: the
    // opened tasks go first and pause the bulk work while they run).
    let mut opened = Vec::new();
    let opened_tasks = candidates(20_000, 100);
    let busy_rate = bulk_request(
        &client,
        &url,
        candidates(40_000, BULK / 2),
        &extra,
        Some((&opened_tasks, &mut opened)),
    )
    .await;
    let opened_p50 = percentile(&mut opened, 0.5);
    let opened_max = percentile(&mut opened, 1.0);
    Rows.push([
        format!(
            "one task opened by an annotator every 3 s while a {}-task bulk `/predict` runs, p50",
            BULK / 2
        ),
        format!(
            "{opened_p50:.2} s ({} opened, max {opened_max:.2} s; the bulk request meanwhile {busy_rate:.2} tasks/s)",
            opened.len()
        ),
        format!("{:.2}x the 1.5 s target", opened_p50 / 1.5),
        "< 1.5 s".into(),
    ]);

    // TREC (one 6-way Choices) with 4 few-shot examples of 20 ground-truth annotations.
    let trec_config = format!(
        "<View><Text name=\"text\" value=\"$text\"/><Choices name=\"label\" toName=\"text\" choice=\"single\">{}</Choices></View>",
        TREC_LABELS.iter().map(|l| format!("<Choice value=\"{l}\"/>")).collect::<String>()
    );
    let rows: Vec<(String, String)> = std::fs::read_to_string(trec)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        rows.len() >= GROUND_TRUTH + ONE_AT_A_TIME + BULK,
        "{} TREC rows",
        rows.len()
    );
    let project = 2;
    ground_truth(&db.store, project, &trec_config, &rows[..GROUND_TRUTH]).await;
    let texts = |from: usize, n: usize| -> Vec<Value> {
        rows[from..from + n]
            .iter()
            .enumerate()
            .map(|(i, (text, _))| json!({"id": from + i + 1, "data": {"text": text}}))
            .collect()
    };
    let extra = json!({"label_config": trec_config, "project": format!("{project}.0")});
    let compared = compare(
        engine,
        &client,
        &url,
        &texts(GROUND_TRUTH, ONE_AT_A_TIME),
        &texts(GROUND_TRUTH + ONE_AT_A_TIME, BULK),
        &extra,
    )
    .await;
    let (rate, single) = (compared.bulk, compared.single);
    Rows.push([
        format!(
            "bulk `/predict`, {BULK} TREC tasks ({ROUNDS} requests of {}), {} few-shot examples each ({GROUND_TRUTH} ground truth)",
            BULK / ROUNDS,
            c.ml_backend.few_shot_examples
        ),
        format!("{rate:.2} tasks/s"),
        format!(
            "{:.2}x one at a time ({single:.2} tasks/s, {ONE_AT_A_TIME} single-task requests, alternating with the bulk ones)",
            rate / single
        ),
        "≥ 2x".into(),
    ]);
    Rows.push(forward_row("TREC 4-shot", &compared));

    stop.store(true, Ordering::Relaxed);
    let mut health = health.await.unwrap();
    let h99 = percentile(&mut health, 0.99);
    Rows.push([
        "`/health` p99 during all of the above".into(),
        format!("{h99:.1} ms ({} probes)", health.len()),
        format!("{:.3}x the 1 s Label Studio timeout", h99 / 1000.0),
        "< 20 ms".into(),
    ]);
    db.cleanup().await;
}

/// One task, `/health` and `/setup` under load, a 100-task request under a deadline, TREC
/// agreement.
async fn protocol(config: Config, engine: Engine, trec: PathBuf) {
    let serve = |deadline: f64| {
        let mut c = config.clone();
        c.ml_backend.predict_deadline_seconds = deadline;
        let app = router(
            MlState::new(c)
                .unwrap()
                .with_model(EngineSlot::ready(engine.clone())),
        );
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            base
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    // Rows are printed as they are measured, so a long run shows progress.
    let mut rows = Rows;

    // Baseline: the engine alone generating the TextArea answer's length for one task.
    let config_xml = CANDIDATE;
    let lc = LabelConfig::parse(config_xml).unwrap();
    let messages = vec![
        batchlab_inference::engine::ChatMessage::new(
            "system",
            batchlab_inference::predict::task::SYSTEM,
        ),
        batchlab_inference::engine::ChatMessage::new(
            "user",
            format!(
                "{}\nQuestion: reasoning?",
                batchlab_inference::predict::task::task_body(&lc, &candidate(999), None)
            ),
        ),
    ];
    let mut base_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let params = SamplingParams {
            max_tokens: Some(config.ml_backend.text_max_tokens),
            temperature: 0.0,
            ..Default::default()
        };
        engine
            .chat(ChatRequest {
                messages: messages.clone(),
                params,
            })
            .await
            .unwrap();
        base_times.push(t.elapsed().as_secs_f64());
    }
    let baseline = percentile(&mut base_times, 0.5);

    // 1. One task at a time (an annotator opening tasks), distinct data so nothing is cached.
    let base = serve(100.0).await;
    let mut one = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let a = post(
            &client,
            &format!("{base}/predict"),
            &json!({"tasks": tasks(i..i + 1, 0), "label_config": config_xml}),
        )
        .await;
        assert!(a["results"][0]["result"].is_array(), "{a}");
        one.push(t.elapsed().as_secs_f64());
    }
    let p50 = percentile(&mut one, 0.5);
    rows.push([
        "`/predict`, one task, candidate-evaluation (3 Choices + TextArea), p50".into(),
        format!("{p50:.2} s"),
        format!(
            "{:.2}x a bare {}-token generation ({baseline:.2} s)",
            p50 / baseline,
            config.ml_backend.text_max_tokens
        ),
        "< 1 s".into(),
    ]);

    // 2 + 3. 100 tasks with a 10 s deadline; /health and /setup probed meanwhile.
    let base = serve(10.0).await;
    let body = json!({"tasks": tasks(0..100, 1000), "label_config": config_xml, "project": "1.0"});
    let started = Instant::now();
    let bulk = tokio::spawn({
        let (client, url, body) = (client.clone(), format!("{base}/predict"), body.clone());
        async move { post(&client, &url, &body).await }
    });
    let (mut health, mut setup) = (Vec::new(), Vec::new());
    while !bulk.is_finished() {
        let t = Instant::now();
        client.get(format!("{base}/health")).send().await.unwrap();
        health.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        post(
            &client,
            &format!("{base}/setup"),
            &json!({"project": "1.0", "schema": config_xml}),
        )
        .await;
        setup.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = bulk.await.unwrap();
    let first_s = started.elapsed().as_secs_f64();
    let in_time = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["result"].is_array())
        .count();
    loop {
        let s: Value = client
            .get(format!("{base}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["predictions"]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_s = started.elapsed().as_secs_f64();
    let second = post(&client, &format!("{base}/predict"), &body).await;
    let next = second["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["result"].is_array())
        .count();
    let (h99, s99) = (percentile(&mut health, 0.99), percentile(&mut setup, 0.99));
    rows.push([
        "`/health` p99 while `/predict` runs at full load".into(),
        format!("{h99:.1} ms ({} probes)", health.len()),
        format!("{:.3}x the 1 s Label Studio timeout", h99 / 1000.0),
        "< 20 ms".into(),
    ]);
    rows.push([
        "`/setup` p99 while `/predict` runs at full load".into(),
        format!("{s99:.1} ms ({} probes)", setup.len()),
        format!("{:.3}x the 3 s Label Studio timeout", s99 / 3000.0),
        "< 20 ms".into(),
    ]);
    rows.push([
        "one `/predict` with 100 tasks, 10 s deadline".into(),
        format!("{in_time} answered in {first_s:.1} s; all 100 done after {all_s:.1} s; next request: {next}/100"),
        format!("{:.2} tasks/s, {:.2}x one-at-a-time", 100.0 / all_s, (100.0 / all_s) * p50),
        "answered in time, all 100 by the next request".into(),
    ]);

    // 4. TREC agreement through the code /predict runs, zero-shot and with 20 examples.
    let trec_config = format!(
        "<View><Text name=\"text\" value=\"$text\"/><Choices name=\"label\" toName=\"text\" choice=\"single\">{}</Choices></View>",
        TREC_LABELS.iter().map(|l| format!("<Choice value=\"{l}\"/>")).collect::<String>()
    );
    let tc = LabelConfig::parse(&trec_config).unwrap();
    let data: Vec<(String, String)> = std::fs::read_to_string(&trec)
        .unwrap()
        .lines()
        .take(120)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let examples: Vec<Example> = data[..20]
        .iter()
        .enumerate()
        .map(|(i, (text, label))| Example {
            task_id: i as i64,
            annotation_id: i as i64,
            data: json!({"text": text}),
            result: json!([{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]),
            updated_at_us: 0,
        })
        .collect();
    let options = PredictOptions {
        text_max_tokens: config.ml_backend.text_max_tokens,
        examples: config.ml_backend.few_shot_examples,
    };
    let majority = {
        let gold: Vec<&str> = data[20..].iter().map(|(_, l)| l.as_str()).collect();
        TREC_LABELS
            .iter()
            .map(|l| gold.iter().filter(|g| *g == l).count())
            .max()
            .unwrap() as f64
            / gold.len() as f64
    };
    for (name, set) in [
        ("zero-shot", ExampleSet::default()),
        ("20 ground-truth examples", ExampleSet::new(examples, &tc)),
    ] {
        let t = Instant::now();
        let priors = Priors::default();
        let priors = &priors;
        let futures = data[20..].iter().enumerate().map(|(i, (text, _))| {
            let (engine, tc, set, options) = (engine.clone(), &tc, &set, &options);
            async move {
                let d = json!({"text": text});
                let shots = set.most_similar(tc, &d, Some(1000 + i as i64), options.examples);
                let teaching = Teaching {
                    examples: &shots,
                    ..Teaching::default()
                };
                let p = predict_task(&engine, tc, &d, &teaching, options, priors)
                    .await
                    .unwrap();
                p.result[0].value["choices"][0]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        });
        let predicted: Vec<String> = futures::future::join_all(futures).await;
        let gold: Vec<&str> = data[20..].iter().map(|(_, l)| l.as_str()).collect();
        let accuracy =
            predicted.iter().zip(&gold).filter(|(p, g)| p == *g).count() as f64 / gold.len() as f64;
        let mut f1s = Vec::new();
        for l in TREC_LABELS {
            let tp = predicted
                .iter()
                .zip(&gold)
                .filter(|(p, g)| p.as_str() == l && **g == l)
                .count() as f64;
            let fp = predicted
                .iter()
                .zip(&gold)
                .filter(|(p, g)| p.as_str() == l && **g != l)
                .count() as f64;
            let fn_ = predicted
                .iter()
                .zip(&gold)
                .filter(|(p, g)| p.as_str() != l && **g == l)
                .count() as f64;
            if tp + fp + fn_ > 0.0 {
                f1s.push(2.0 * tp / (2.0 * tp + fp + fn_));
            }
        }
        let macro_f1 = f1s.iter().sum::<f64>() / f1s.len() as f64;
        rows.push([
            format!("TREC, 100 rows, {name}"),
            format!(
                "accuracy {accuracy:.2}, macro-F1 {macro_f1:.2} ({:.1} s)",
                t.elapsed().as_secs_f64()
            ),
            format!(
                "{:.2}x majority-class accuracy ({majority:.2})",
                accuracy / majority
            ),
            "reported".into(),
        ]);
    }
}

/// The table being printed.
struct Rows;

impl Rows {
    fn push(&mut self, [a, b, c, d]: [String; 4]) {
        use std::io::Write;
        println!("| {a} | {b} | {c} | {d} |");
        let _ = std::io::stdout().flush();
    }
}
