//! Calls to Label Studio ride out a transient outage: a stand-in Label Studio on a real socket
//! answers 503 (or is not listening yet) before it answers, and the client retries with backoff
//! until it does; a POST that may have been done already (a 504) is not repeated, and a refusal
//! that no retry can change (404) is answered at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use batchlab_core::labelstudio::client::{LabelStudioClient, LabelStudioError};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A Label Studio stand-in whose routes fail the first `failures` calls with `status`.
fn flaky(failures: usize, status: StatusCode, calls: Arc<AtomicUsize>) -> Router {
    let project = {
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < failures {
                    Err((status, "try again later"))
                } else {
                    Ok(Json(
                        json!({"id": 7, "title": "p", "label_config": "<View/>"}),
                    ))
                }
            }
        }
    };
    let import = move || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                Err((status, "gateway timeout"))
            } else {
                Ok(Json(json!({"task_count": 1})))
            }
        }
    };
    Router::new()
        .route("/api/projects/7/", get(project))
        .route("/api/projects/7/import", post(import))
}

async fn serve(listener: TcpListener, app: Router) {
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

fn client(base: &str) -> LabelStudioClient {
    LabelStudioClient::new(base, "legacy-token", Duration::from_secs(5))
        .unwrap()
        .with_retries(4)
}

#[tokio::test]
async fn a_503_is_retried_until_label_studio_answers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    serve(
        listener,
        flaky(2, StatusCode::SERVICE_UNAVAILABLE, calls.clone()),
    )
    .await;
    let project = client(&base)
        .get_project(7)
        .await
        .expect("answered after two 503s");
    assert_eq!(project.id, 7);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two failures, then the answer"
    );
}

#[tokio::test]
async fn an_unreachable_label_studio_is_retried_until_it_listens() {
    // A port nobody listens on yet: connections are refused, nothing is sent.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let base = format!("http://{addr}");
    let calls = Arc::new(AtomicUsize::new(0));
    let late = {
        let calls = calls.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let listener = TcpListener::bind(addr).await.unwrap();
            serve(listener, flaky(0, StatusCode::OK, calls)).await;
        }
    };
    let ls = client(&base);
    let (project, ()) = tokio::join!(ls.get_project(7), late);
    assert_eq!(project.expect("answered once listening").id, 7);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_post_that_may_have_been_done_is_not_repeated() {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    serve(
        listener,
        flaky(1, StatusCode::GATEWAY_TIMEOUT, calls.clone()),
    )
    .await;
    let tasks: Vec<Value> = vec![json!({"data": {"text": "x"}})];
    let err = client(&base).import_tasks(7, &tasks).await.unwrap_err();
    assert!(
        matches!(err, LabelStudioError::Status { status: 504, .. }),
        "{err}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "an import is never sent twice blindly"
    );
}

#[tokio::test]
async fn a_refusal_no_retry_can_change_is_answered_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    serve(listener, flaky(10, StatusCode::NOT_FOUND, calls.clone())).await;
    let err = client(&base).get_project(7).await.unwrap_err();
    assert!(
        matches!(err, LabelStudioError::Status { status: 404, .. }),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
