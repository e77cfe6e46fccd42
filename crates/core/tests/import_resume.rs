//! An import into Label Studio that fails half-way is run again without duplicating a task:
//! the store's record of imported lines on SQLite and PostgreSQL alike, and
//! `Curation::import_batch` against a stand-in Label Studio that refuses a chunk (500) or
//! creates a chunk's tasks and never answers (the lost-answer case).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use batchlab_core::blob::BlobStore;
use batchlab_core::config::CurationConfig;
use batchlab_core::curation::Curation;
use batchlab_core::labelstudio::client::LabelStudioClient;
use batchlab_core::labelstudio::instance::Instance;
use batchlab_core::store::{ImportedLine, NewBatch, Store, StoreError};
use batchlab_core::testing::TestDb;
use serde_json::{json, Value};
use tokio::net::TcpListener;

// ------------------------------------------------------------------------------------------
// the store

fn line(custom_id: &str, task_id: Option<i64>) -> ImportedLine {
    ImportedLine {
        custom_id: custom_id.into(),
        task_id,
    }
}

async fn import_lines_are_marked_then_recorded_once(store: Store) {
    assert_eq!(
        store.imported_lines("default", 7, "batch_a").await.unwrap(),
        vec![]
    );

    store
        .mark_import_sent("default", 7, "batch_a", &["c1", "c2", "c3"])
        .await
        .unwrap();
    store
        .record_imported_tasks("default", 7, "batch_a", &[("c1", 11), ("c2", 12)])
        .await
        .unwrap();
    assert_eq!(
        store.imported_lines("default", 7, "batch_a").await.unwrap(),
        vec![line("c1", Some(11)), line("c2", Some(12)), line("c3", None)]
    );

    // Marking again leaves recorded tasks alone; a recorded task is never replaced; a task can be
    // recorded without a mark (found in Label Studio).
    store
        .mark_import_sent("default", 7, "batch_a", &["c1", "c3", "c4"])
        .await
        .unwrap();
    store
        .record_imported_tasks("default", 7, "batch_a", &[("c1", 99), ("c5", 15)])
        .await
        .unwrap();
    assert_eq!(
        store.imported_lines("default", 7, "batch_a").await.unwrap(),
        vec![
            line("c1", Some(11)),
            line("c2", Some(12)),
            line("c3", None),
            line("c4", None),
            line("c5", Some(15)),
        ]
    );

    // Another project, another batch: their own records.
    assert_eq!(
        store.imported_lines("default", 8, "batch_a").await.unwrap(),
        vec![]
    );
    assert_eq!(
        store.imported_lines("default", 7, "batch_b").await.unwrap(),
        vec![]
    );
    store
        .record_imported_tasks("default", 8, "batch_a", &[("c1", 21)])
        .await
        .unwrap();
    assert_eq!(
        store.imported_lines("default", 8, "batch_a").await.unwrap(),
        vec![line("c1", Some(21))]
    );
    assert_eq!(
        store
            .imported_lines("default", 7, "batch_a")
            .await
            .unwrap()
            .len(),
        5
    );
}

async fn large_chunks_of_import_lines_are_written(store: Store) {
    // More rows than one statement carries.
    let ids: Vec<String> = (0..1234).map(|i| format!("line-{i:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    store
        .mark_import_sent("default", 3, "batch_big", &refs)
        .await
        .unwrap();
    let tasks: Vec<(&str, i64)> = refs
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, 1000 + i as i64))
        .collect();
    store
        .record_imported_tasks("default", 3, "batch_big", &tasks)
        .await
        .unwrap();
    let lines = store
        .imported_lines("default", 3, "batch_big")
        .await
        .unwrap();
    assert_eq!(lines.len(), 1234);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| l.custom_id == ids[i] && l.task_id == Some(1000 + i as i64)));
}

async fn import_lines_with_nul_are_refused_alike(store: Store) {
    let err = store
        .mark_import_sent("default", 7, "batch_a", &["ok", "bad\0id"])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err}");
    assert!(err.to_string().contains("custom_id"), "{err}");
    assert!(store
        .record_imported_tasks("default", 7, "batch\0", &[("ok", 1)])
        .await
        .is_err());
    assert_eq!(
        store.imported_lines("default", 7, "batch_a").await.unwrap(),
        vec![]
    );
    assert_eq!(
        store.imported_lines("default", 7, "batch\0").await.unwrap(),
        vec![]
    );
}

batchlab_core::on_both_backends!(
    import_lines_are_marked_then_recorded_once,
    large_chunks_of_import_lines_are_written,
    import_lines_with_nul_are_refused_alike,
);

// ------------------------------------------------------------------------------------------
// import_batch against a stand-in Label Studio

const PROJECT: i64 = 7;
const CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="spam"/><Choice value="ham"/></Choices></View>"#;
/// The client gives up on an answer after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Answer 500 without creating anything.
    Refuse,
    /// Create the tasks, then answer only after the client gave up.
    LoseAnswer,
}

/// Label Studio's project, import and task-list routes over an in-memory task list.
#[derive(Default)]
struct FakeLs {
    tasks: Mutex<Vec<Value>>,
    next_id: AtomicUsize,
    imports: AtomicUsize,
    /// The 1-based import request that fails, and how.
    fault: Mutex<Option<(usize, Fault)>>,
}

impl FakeLs {
    fn create(&self, data: Value, meta: Value) -> i64 {
        let id = 100 + self.next_id.fetch_add(1, Ordering::SeqCst) as i64;
        self.tasks
            .lock()
            .unwrap()
            .push(json!({"id": id, "data": data, "meta": meta}));
        id
    }

    /// How many tasks hold each custom_id.
    fn custom_id_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for t in self.tasks.lock().unwrap().iter() {
            let c = t["data"]["custom_id"].as_str().unwrap().to_string();
            *counts.entry(c).or_default() += 1;
        }
        counts
    }
}

async fn project() -> Json<Value> {
    Json(json!({"id": PROJECT, "title": "p", "label_config": CONFIG}))
}

async fn import(State(ls): State<Arc<FakeLs>>, Json(tasks): Json<Vec<Value>>) -> Response {
    let n = ls.imports.fetch_add(1, Ordering::SeqCst) + 1;
    let fault = match *ls.fault.lock().unwrap() {
        Some((at, f)) if at == n => Some(f),
        _ => None,
    };
    if fault == Some(Fault::Refuse) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "Server Error (500)").into_response();
    }
    let mut ids = Vec::new();
    let mut predictions = 0;
    for t in &tasks {
        ids.push(ls.create(
            t["data"].clone(),
            t.get("meta").cloned().unwrap_or(json!({})),
        ));
        predictions += t
            .get("predictions")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
    }
    if fault == Some(Fault::LoseAnswer) {
        tokio::time::sleep(CLIENT_TIMEOUT * 3).await;
    }
    (
        StatusCode::CREATED,
        Json(json!({"task_count": ids.len(), "prediction_count": predictions, "task_ids": ids})),
    )
        .into_response()
}

/// `GET /api/tasks/?project&query&page&page_size`: the `filter:tasks:data.custom_id` `in_list`
/// filter, paged as Label Studio pages (404 past the last page).
async fn list_tasks(
    State(ls): State<Arc<FakeLs>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    assert_eq!(q.get("project").map(String::as_str), Some("7"), "{q:?}");
    let query: Value = serde_json::from_str(q.get("query").expect("a query")).unwrap();
    let item = &query["filters"]["items"][0];
    assert_eq!(item["filter"], "filter:tasks:data.custom_id", "{query}");
    assert_eq!(item["operator"], "in_list", "{query}");
    let wanted: Vec<&str> = item["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let matching: Vec<Value> = ls
        .tasks
        .lock()
        .unwrap()
        .iter()
        .filter(|t| wanted.contains(&t["data"]["custom_id"].as_str().unwrap()))
        .cloned()
        .collect();
    let page: usize = q.get("page").map_or(1, |p| p.parse().unwrap());
    let size: usize = q.get("page_size").map_or(100, |p| p.parse().unwrap());
    let start = (page - 1) * size;
    if page > 1 && start >= matching.len() {
        return (StatusCode::NOT_FOUND, "Invalid page.").into_response();
    }
    let tasks: Vec<Value> = matching.iter().skip(start).take(size).cloned().collect();
    Json(json!({"tasks": tasks, "total": matching.len()})).into_response()
}

async fn fake_label_studio() -> (Arc<FakeLs>, LabelStudioClient) {
    let ls = Arc::new(FakeLs::default());
    let app = Router::new()
        .route("/api/projects/7/", get(project))
        .route("/api/projects/7/import", post(import))
        .route("/api/tasks/", get(list_tasks))
        .with_state(ls.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = LabelStudioClient::new(&base, "legacy-token", CLIENT_TIMEOUT)
        .unwrap()
        .with_retries(0);
    (ls, client)
}

/// A finished batch of `n` lines `l0..`, each answered `spam`, in a fresh store and blob store.
struct Fixture {
    _db_dir: tempfile::TempDir,
    db: TestDb,
    blobs: BlobStore,
    curation: Curation,
    batch: batchlab_core::store::BatchRecord,
}

async fn fixture(n: usize) -> Fixture {
    let db = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path().join("files")).unwrap();
    let mut input = blobs.writer("file-in").await.unwrap();
    let mut output = blobs.writer("file-out").await.unwrap();
    for i in 0..n {
        let request = json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"metadata": {"text": format!("text {i}")}}});
        input
            .write(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        let answer = json!({"custom_id": format!("l{i}"), "response": {"status_code": 200,
            "body": {"choices": [{"message": {"role": "assistant", "content": "spam"}}]}}});
        output
            .write(format!("{answer}\n").as_bytes())
            .await
            .unwrap();
    }
    input.finish().await.unwrap();
    output.finish().await.unwrap();
    let batch = db
        .store
        .insert_batch(&NewBatch {
            id: "batch_resume".into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-in".into(),
            completion_window: "24h".into(),
            window_seconds: 86_400,
            metadata: None,
            total: n as i64,
        })
        .await
        .unwrap();
    let curation = Curation::new(
        db.store.clone(),
        CurationConfig::default(),
        Instance::default(),
    );
    Fixture {
        _db_dir: dir,
        db,
        blobs,
        curation,
        batch,
    }
}

impl Fixture {
    async fn import(
        &self,
        client: &LabelStudioClient,
    ) -> Result<batchlab_core::curation::import::ImportReport, batchlab_core::curation::CurationError>
    {
        self.curation
            .import_batch(client, &self.blobs, PROJECT, &self.batch, "file-out", 2)
            .await
    }
}

fn each_once(counts: &HashMap<String, usize>, n: usize) -> bool {
    counts.len() == n && (0..n).all(|i| counts.get(&format!("l{i}")) == Some(&1))
}

#[tokio::test]
async fn an_import_refused_half_way_resumes_without_duplicates() {
    let (ls, client) = fake_label_studio().await;
    let f = fixture(7).await;
    *ls.fault.lock().unwrap() = Some((2, Fault::Refuse));
    let err = f.import(&client).await.unwrap_err();
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(ls.tasks.lock().unwrap().len(), 2, "the first chunk only");

    *ls.fault.lock().unwrap() = None;
    let report = f.import(&client).await.unwrap();
    assert_eq!(
        (report.tasks, report.already_imported, report.recovered),
        (5, 2, 0),
        "{report:?}"
    );
    assert!(
        each_once(&ls.custom_id_counts(), 7),
        "{:?}",
        ls.custom_id_counts()
    );
    let ids: Vec<i64> = ls
        .tasks
        .lock()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(report.task_ids, ids, "every line's task, in output order");
    assert_eq!(report.predictions, 5, "{report:?}");

    // A third run creates nothing and sends nothing.
    let imports = ls.imports.load(Ordering::SeqCst);
    let again = f.import(&client).await.unwrap();
    assert_eq!((again.tasks, again.already_imported), (0, 7), "{again:?}");
    assert_eq!(again.task_ids, ids);
    assert_eq!(
        ls.imports.load(Ordering::SeqCst),
        imports,
        "no import request"
    );
    let stored =
        f.db.store
            .predictions_in_range("default", PROJECT, i64::MIN, i64::MAX)
            .await
            .unwrap();
    assert_eq!(stored.len(), 7, "one stored prediction per task");
    f.db.cleanup().await;
}

#[tokio::test]
async fn a_chunk_whose_answer_was_lost_is_found_not_sent_again() {
    let (ls, client) = fake_label_studio().await;
    let f = fixture(7).await;
    // A task of another batch with one of this batch's custom_ids: never taken for this batch's.
    let foreign = ls.create(
        json!({"text": "text 2", "custom_id": "l2"}),
        json!({"batchlab_batch_id": "batch_other"}),
    );
    *ls.fault.lock().unwrap() = Some((2, Fault::LoseAnswer));
    let err = f.import(&client).await.unwrap_err();
    assert!(err.to_string().contains("no answer"), "{err}");
    assert_eq!(
        ls.tasks.lock().unwrap().len(),
        5,
        "the foreign task and two chunks"
    );

    *ls.fault.lock().unwrap() = None;
    let report = f.import(&client).await.unwrap();
    assert_eq!(
        (report.tasks, report.already_imported, report.recovered),
        (3, 4, 2),
        "{report:?}"
    );
    let ours: Vec<i64> = ls
        .tasks
        .lock()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .filter(|id| *id != foreign)
        .collect();
    assert_eq!(
        report.task_ids, ours,
        "every line's task once, in output order"
    );
    let mut counts = ls.custom_id_counts();
    assert_eq!(
        counts.remove("l2"),
        Some(2),
        "the foreign task and this batch's"
    );
    counts.insert("l2".into(), 1);
    assert!(each_once(&counts, 7), "{counts:?}");
    assert_eq!(ls.tasks.lock().unwrap().len(), 8);

    // The found tasks' predictions are stored like the others.
    let stored =
        f.db.store
            .predictions_in_range("default", PROJECT, i64::MIN, i64::MAX)
            .await
            .unwrap();
    let mut predicted: Vec<i64> = stored.iter().map(|p| p.task_id).collect();
    predicted.sort();
    assert_eq!(predicted, ours);

    let again = f.import(&client).await.unwrap();
    assert_eq!(
        (again.tasks, again.already_imported, again.recovered),
        (0, 7, 0)
    );
    assert_eq!(ls.tasks.lock().unwrap().len(), 8);
    f.db.cleanup().await;
}
