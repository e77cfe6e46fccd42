//! Shutdown of an HTTP service (`batchlab_core::http::serve_with_drain`, what batchlab-api and
//! batchlab-ml-backend run): once told to stop, the listener closes, a request in progress
//! still gets its answer, the service's background work is awaited, and a request that never
//! ends cannot hold the process past the grace period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use batchlab_core::http::serve_with_drain;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// A handler that says it started (`entered`) and answers once `release` has a permit.
#[derive(Clone)]
struct Gate {
    entered: Arc<Notify>,
    release: Arc<Semaphore>,
}

async fn slow(State(gate): State<Gate>) -> &'static str {
    gate.entered.notify_one();
    let _ = gate.release.acquire().await.unwrap();
    "finished"
}

async fn start(
    grace: Duration,
    drain: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    String,
    Gate,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let gate = Gate {
        entered: Arc::new(Notify::new()),
        release: Arc::new(Semaphore::new(0)),
    };
    let app = Router::new()
        .route("/slow", get(slow))
        .with_state(gate.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stopping = CancellationToken::new();
    let served = tokio::spawn(serve_with_drain(
        listener,
        app,
        stopping.clone(),
        grace,
        drain,
    ));
    (addr, gate, stopping, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_is_answered_and_background_work_awaited() {
    let drained = Arc::new(AtomicBool::new(false));
    let drain = {
        let drained = drained.clone();
        async move { drained.store(true, Ordering::SeqCst) }
    };
    let (addr, gate, stopping, served) = start(Duration::from_secs(30), drain).await;
    let in_flight = tokio::spawn({
        let url = format!("http://{addr}/slow");
        async move { reqwest::get(url).await?.text().await }
    });
    gate.entered.notified().await;

    stopping.cancel();
    // The listener closes: a new connection is refused while the old request still runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections");
        tokio::task::yield_now().await;
    }
    assert!(!served.is_finished(), "returned with a request in progress");
    assert!(
        !drained.load(Ordering::SeqCst),
        "drained before the requests ended"
    );

    gate.release.add_permits(1);
    let answer = in_flight
        .await
        .unwrap()
        .expect("the request in progress was answered");
    assert_eq!(answer, "finished");
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("returns once drained")
        .unwrap()
        .unwrap();
    assert!(
        drained.load(Ordering::SeqCst),
        "the background work was awaited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_ends_cannot_hold_the_process_past_the_grace() {
    let (addr, gate, stopping, served) =
        start(Duration::from_millis(300), std::future::pending()).await;
    let _stuck = tokio::spawn(reqwest::get(format!("http://{addr}/slow")));
    gate.entered.notified().await;
    let started = Instant::now();
    stopping.cancel();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("returns after the grace period")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "returned before the grace period ended: {:?}",
        started.elapsed()
    );
}
