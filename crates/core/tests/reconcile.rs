//! `Curation::reconcile` against a stand-in Label Studio, on SQLite and PostgreSQL: every kind of
//! difference webhooks lost while batchlab was down can leave is repaired through synthesized
//! events, over several pages on both sides, and a second run finds nothing; a dry run changes
//! nothing; a deletion is synthesized only once Label Studio confirms the object gone; a Label
//! Studio ignoring the id filter is an error, not an endless walk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use batchlab_core::config::CurationConfig;
use batchlab_core::curation::reconcile::{ReconcileOptions, SideCounts};
use batchlab_core::curation::{Curation, CurationError};
use batchlab_core::labelstudio::client::{LabelStudioClient, LabelStudioError};
use batchlab_core::labelstudio::instance::Instance;
use batchlab_core::store::Store;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const PROJECT: i64 = 7;
const CONFIG: &str = r#"<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>"#;

fn ts(second: u32) -> String {
    format!("2026-11-27T20:48:{second:02}.000000Z")
}

fn choice(v: &str) -> Value {
    json!([{"from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": [v]}}])
}

fn task(id: i64, updated: u32) -> Value {
    json!({"id": id, "data": {"text": format!("text {id}")}, "meta": {}, "project": PROJECT,
           "created_at": ts(0), "updated_at": ts(updated)})
}

fn annotation(id: i64, task: i64, label: &str, ground_truth: bool, updated: u32) -> Value {
    json!({"id": id, "task": task, "project": PROJECT, "result": choice(label), "ground_truth": ground_truth,
           "was_cancelled": false, "completed_by": {"id": 1, "email": "a@b"}, "created_ago": "0 minutes",
           "created_at": ts(1), "updated_at": ts(updated)})
}

fn project_object() -> Value {
    json!({"id": PROJECT, "title": "p", "label_config": CONFIG, "updated_at": ts(0)})
}

/// Label Studio's project, task-list and look-up routes over an in-memory project.
#[derive(Default)]
struct FakeLs {
    /// Tasks by id, each with its `annotations`.
    tasks: Mutex<BTreeMap<i64, Value>>,
    /// Tasks and annotations that exist but the listing leaves out (created while it was read).
    unlisted_tasks: Mutex<HashSet<i64>>,
    unlisted_annotations: Mutex<HashSet<i64>>,
    /// Answer every listing with its first page, whatever the filter.
    ignore_filter: Mutex<bool>,
    listings: Mutex<usize>,
}

impl FakeLs {
    fn put(&self, t: Value, annotations: Vec<Value>) {
        let mut t = t;
        t["annotations"] = Value::Array(annotations);
        t["predictions"] = json!([]);
        t["drafts"] = json!([]);
        self.tasks
            .lock()
            .unwrap()
            .insert(t["id"].as_i64().unwrap(), t);
    }

    fn annotation_ids(&self) -> HashSet<i64> {
        self.tasks
            .lock()
            .unwrap()
            .values()
            .flat_map(|t| t["annotations"].as_array().unwrap().clone())
            .map(|a| a["id"].as_i64().unwrap())
            .collect()
    }
}

async fn project() -> Json<Value> {
    Json(project_object())
}

/// `GET /api/tasks/?project&fields=all&query&page_size`: the `filter:tasks:id` `greater` filter
/// ordered by `tasks:id`, first page only (keyset paging).
async fn list_tasks(
    State(ls): State<Arc<FakeLs>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    *ls.listings.lock().unwrap() += 1;
    assert_eq!(q.get("project").map(String::as_str), Some("7"), "{q:?}");
    assert_eq!(q.get("fields").map(String::as_str), Some("all"), "{q:?}");
    assert_eq!(
        q.get("resolve_uri").map(String::as_str),
        Some("false"),
        "{q:?}"
    );
    let query: Value = serde_json::from_str(q.get("query").expect("a query")).unwrap();
    let item = &query["filters"]["items"][0];
    assert_eq!(item["filter"], "filter:tasks:id", "{query}");
    assert_eq!(item["operator"], "greater", "{query}");
    assert_eq!(query["ordering"], json!(["tasks:id"]), "{query}");
    let after = if *ls.ignore_filter.lock().unwrap() {
        i64::MIN
    } else {
        item["value"].as_i64().unwrap()
    };
    let size: usize = q["page_size"].parse().unwrap();
    let unlisted = ls.unlisted_tasks.lock().unwrap().clone();
    let hidden = ls.unlisted_annotations.lock().unwrap().clone();
    let tasks: Vec<Value> = ls
        .tasks
        .lock()
        .unwrap()
        .range(after.saturating_add(1)..)
        .filter(|(id, _)| !unlisted.contains(id))
        .take(size)
        .map(|(_, t)| {
            let mut t = t.clone();
            t["annotations"]
                .as_array_mut()
                .unwrap()
                .retain(|a| !hidden.contains(&a["id"].as_i64().unwrap()));
            t
        })
        .collect();
    Json(json!({"tasks": tasks, "total": tasks.len(), "total_annotations": 0, "total_predictions": 0}))
        .into_response()
}

async fn get_task(State(ls): State<Arc<FakeLs>>, Path(id): Path<i64>) -> Response {
    match ls.tasks.lock().unwrap().get(&id) {
        Some(t) => Json(t.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response(),
    }
}

async fn get_annotation(State(ls): State<Arc<FakeLs>>, Path(id): Path<i64>) -> Response {
    if ls.annotation_ids().contains(&id) {
        Json(json!({"id": id})).into_response()
    } else {
        (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response()
    }
}

async fn fake_label_studio() -> (Arc<FakeLs>, LabelStudioClient) {
    let ls = Arc::new(FakeLs::default());
    let app = Router::new()
        .route("/api/projects/7/", get(project))
        .route("/api/tasks/", get(list_tasks))
        .route("/api/tasks/{id}/", get(get_task))
        .route("/api/annotations/{id}/", get(get_annotation))
        .with_state(ls.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = LabelStudioClient::new(&base, "legacy-token", Duration::from_secs(10))
        .unwrap()
        .with_retries(0);
    (ls, client)
}

fn curation(store: Store) -> (Curation, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let curation = Curation::new(
        store,
        CurationConfig {
            training_dir: dir.path().into(),
            milestones: vec![],
            accuracy_every: 0,
            ..Default::default()
        },
        Instance::default(),
    );
    (curation, dir)
}

/// What batchlab heard before it went down, delivered as Label Studio sent it and applied.
async fn deliver(curation: &Curation, bodies: &[Value]) {
    for b in bodies {
        curation
            .ingest(&serde_json::to_vec(b).unwrap())
            .await
            .unwrap();
    }
    while curation.process_pending().await.unwrap() > 0 {}
}

fn created(a: &Value, t: &Value) -> Value {
    json!({"action": "ANNOTATION_CREATED", "annotation": a, "task": t, "project": project_object()})
}

fn options(page_size: usize) -> ReconcileOptions {
    ReconcileOptions {
        page_size,
        ..ReconcileOptions::default()
    }
}

fn counts(tasks: i64, annotations: i64, ground_truth: i64) -> SideCounts {
    SideCounts {
        tasks,
        annotations,
        ground_truth,
    }
}

async fn every_kind_of_difference_is_repaired_and_a_second_run_finds_none(store: Store) {
    let (curation, _dir) = curation(store.clone());
    let (ls, client) = fake_label_studio().await;

    // What batchlab heard: tasks 1-5; a10 (starred) on 1, a20 on 2, a30 on 3, a40 on 4, a50 on 5.
    let mut heard = vec![
        json!({"action": "TASKS_CREATED", "project": project_object(),
        "tasks": (1..=5).map(|i| task(i, 0)).collect::<Vec<_>>()}),
    ];
    for (id, t) in [(10, 1), (20, 2), (30, 3), (40, 4), (50, 5)] {
        heard.push(created(&annotation(id, t, "a", id == 10, 1), &task(t, 1)));
    }
    deliver(&curation, &heard).await;

    // What Label Studio holds now: task 4 deleted (a40 with it); tasks 6, 7 new; a11 on 1 took
    // the star from a10 (which keeps its time); a20 changed; a30 deleted; a60 new on 6, a70
    // (skipped) new on 7; task 5's data edited.
    ls.put(
        task(1, 5),
        vec![
            annotation(10, 1, "a", false, 1),
            annotation(11, 1, "b", true, 5),
        ],
    );
    ls.put(task(2, 6), vec![annotation(20, 2, "b", false, 6)]);
    ls.put(task(3, 7), vec![]);
    let mut edited = task(5, 8);
    edited["data"]["text"] = json!("edited");
    ls.put(edited, vec![annotation(50, 5, "a", false, 1)]);
    ls.put(task(6, 9), vec![annotation(60, 6, "a", false, 9)]);
    let mut skipped = annotation(70, 7, "a", false, 9);
    skipped["was_cancelled"] = json!(true);
    skipped["result"] = json!([]);
    ls.put(task(7, 9), vec![skipped]);

    // A dry run reports and stores nothing.
    let events_before = store
        .webhook_event_counts(Some(("default", PROJECT)))
        .await
        .unwrap();
    let dry = curation
        .reconcile(
            &client,
            PROJECT,
            &ReconcileOptions {
                dry_run: true,
                ..options(2)
            },
        )
        .await
        .unwrap();
    assert!(
        !dry.agree && dry.events.is_empty() && dry.after.is_none(),
        "{dry:?}"
    );
    assert_eq!(
        store
            .webhook_event_counts(Some(("default", PROJECT)))
            .await
            .unwrap(),
        events_before
    );

    // Pages of two tasks: the walk merges several windows on both sides.
    let report = curation
        .reconcile(&client, PROJECT, &options(2))
        .await
        .unwrap();
    assert_eq!(report.before, dry.before);
    let before = &report.before;
    assert_eq!(before.label_studio, counts(6, 6, 1), "{report:#?}");
    assert_eq!(before.batchlab, counts(5, 5, 1), "{report:#?}");
    let d = &before.differences;
    assert!(!d.project_config_differs, "{d:?}");
    assert_eq!(
        (d.tasks_missing, d.tasks_changed, d.tasks_deleted),
        (2, 1, 1),
        "{d:?}"
    );
    assert_eq!(
        (
            d.annotations_missing,
            d.annotations_outdated,
            d.annotations_deleted
        ),
        (3, 2, 1),
        "a11, a60, a70 missing; a10 (star taken), a20 outdated; a30 deleted: {d:?}"
    );
    assert_eq!(
        (d.annotations_newer_in_batchlab, d.still_in_label_studio),
        (0, 0)
    );
    let events: BTreeMap<&str, u64> = report
        .events
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(events["ANNOTATION_CREATED"], 3, "{events:?}");
    assert_eq!(events["ANNOTATION_UPDATED"], 2, "{events:?}");
    assert_eq!(events["ANNOTATIONS_DELETED"], 1, "{events:?}");
    assert_eq!(events["TASKS_DELETED"], 1, "{events:?}");
    assert!(events["TASKS_CREATED"] >= 2, "one per window: {events:?}");
    assert_eq!(report.events_stored, events.values().sum::<u64>());
    let applied = report.applied.as_ref().unwrap();
    assert_eq!(
        (applied.pending, applied.failed, applied.timed_out),
        (0, 0, false)
    );
    let after = report.after.as_ref().unwrap();
    assert!(report.agree, "{report:#?}");
    assert_eq!(after.batchlab, counts(6, 6, 1));
    assert_eq!(after.label_studio, after.batchlab);
    let status = curation.status(PROJECT).await.unwrap();
    assert_eq!(
        (
            status.counts.tasks,
            status.counts.annotations,
            status.counts.cancelled,
            status.counts.ground_truth
        ),
        (6, 6, 1, 1)
    );
    assert_eq!(status.counts, report.batchlab_status_counts);

    // The stored state is Label Studio's, item by item.
    let stored = store
        .annotations_in_range("default", PROJECT, i64::MIN, i64::MAX)
        .await
        .unwrap();
    let by_id: HashMap<i64, _> = stored.iter().map(|a| (a.id, a)).collect();
    let mut ids: Vec<i64> = by_id.keys().copied().collect();
    ids.sort();
    assert_eq!(ids, [10, 11, 20, 50, 60, 70]);
    assert!(!by_id[&10].ground_truth && by_id[&11].ground_truth);
    assert_eq!(
        serde_json::from_str::<Value>(&by_id[&20].result).unwrap(),
        choice("b")
    );
    let tasks = store.tasks_page("default", PROJECT, 0, 100).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        [1, 2, 3, 5, 6, 7]
    );
    assert_eq!(
        serde_json::from_str::<Value>(&tasks[3].data).unwrap(),
        json!({"text": "edited"})
    );

    // Everything synthesized was applied by the run itself.
    assert!(store
        .pending_webhook_events(10, usize::MAX)
        .await
        .unwrap()
        .is_empty());

    // Nothing left to do: nothing synthesized, whatever the page size.
    for page_size in [1, 2, 100] {
        let again = curation
            .reconcile(&client, PROJECT, &options(page_size))
            .await
            .unwrap();
        assert!(again.agree, "{again:#?}");
        assert!(again.events.is_empty(), "{again:#?}");
        assert!(again.before.differences.is_empty());
    }
}

async fn a_deletion_waits_for_label_studio_to_confirm_it(store: Store) {
    let (curation, _dir) = curation(store.clone());
    let (ls, client) = fake_label_studio().await;
    let heard = vec![
        json!({"action": "TASKS_CREATED", "project": project_object(),
            "tasks": [task(1, 0), task(2, 0)]}),
        created(&annotation(10, 1, "a", false, 1), &task(1, 1)),
        created(&annotation(11, 1, "a", false, 1), &task(1, 1)),
    ];
    deliver(&curation, &heard).await;
    ls.put(
        task(1, 1),
        vec![
            annotation(10, 1, "a", false, 1),
            annotation(11, 1, "a", false, 1),
        ],
    );
    ls.put(task(2, 0), vec![]);
    // Both exist, but the listing was read before they showed up in it.
    ls.unlisted_tasks.lock().unwrap().insert(2);
    ls.unlisted_annotations.lock().unwrap().insert(11);

    let report = curation
        .reconcile(&client, PROJECT, &options(100))
        .await
        .unwrap();
    let d = &report.before.differences;
    assert_eq!(
        (
            d.still_in_label_studio,
            d.tasks_deleted,
            d.annotations_deleted
        ),
        (2, 0, 0),
        "{d:?}"
    );
    assert!(report.events.is_empty(), "{:?}", report.events);
    assert!(!report.agree, "the listing and batchlab still differ");
    let status = curation.status(PROJECT).await.unwrap();
    assert_eq!((status.counts.tasks, status.counts.annotations), (2, 2));
}

async fn a_project_batchlab_never_heard_of_is_learned_whole(store: Store) {
    let (curation, _dir) = curation(store.clone());
    let (ls, client) = fake_label_studio().await;
    ls.put(task(1, 1), vec![annotation(10, 1, "a", true, 1)]);
    ls.put(task(2, 1), vec![annotation(20, 2, "zzz", false, 1)]);
    let report = curation
        .reconcile(&client, PROJECT, &options(100))
        .await
        .unwrap();
    assert!(report.before.differences.project_config_differs);
    assert_eq!(report.events.get("PROJECT_UPDATED"), Some(&1));
    assert!(report.agree, "{report:#?}");
    // Validated against the config it learned: the label outside it is flagged, not dropped.
    let status = curation.status(PROJECT).await.unwrap();
    assert_eq!(status.title, "p");
    assert_eq!(
        (
            status.counts.annotations,
            status.counts.valid,
            status.counts.invalid,
            status.counts.ground_truth
        ),
        (2, 1, 1, 1)
    );
}

async fn a_label_studio_ignoring_the_id_filter_is_an_error(store: Store) {
    let (curation, _dir) = curation(store.clone());
    let (ls, client) = fake_label_studio().await;
    for i in 1..=4 {
        ls.put(task(i, 1), vec![]);
    }
    *ls.ignore_filter.lock().unwrap() = true;
    let err = curation
        .reconcile(&client, PROJECT, &options(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            CurationError::LabelStudio(LabelStudioError::Decode(m)) if m.contains("filter was ignored")
        ),
        "{err}"
    );
    assert!(*ls.listings.lock().unwrap() <= 2);
}

batchlab_core::on_both_backends!(
    every_kind_of_difference_is_repaired_and_a_second_run_finds_none,
    a_deletion_waits_for_label_studio_to_confirm_it,
    a_project_batchlab_never_heard_of_is_learned_whole,
    a_label_studio_ignoring_the_id_filter_is_an_error,
);
