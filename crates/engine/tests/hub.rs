//! Loading a model named `hf:<owner>/<repo>/<file>`: the real hub client against a local HTTP
//! server that serves the default GGUF the way the Hugging Face hub does (ranged GETs under
//! `/<repo>/resolve/<revision>/<file>` with `ETag`, `X-Repo-Commit` and `Content-Range`), found
//! through `HF_ENDPOINT` and cached under `HF_HOME`. Nothing here reaches a real hub.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use batchlab_engine::hub::resolve_model;
use batchlab_engine::{ChatMessage, ChatRequest, Engine, EngineConfig, SamplingParams};

fn model_path() -> PathBuf {
    std::env::var("BATCHLAB_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

#[derive(Clone)]
struct Hub {
    body: Arc<Vec<u8>>,
    requests: Arc<AtomicUsize>,
    /// Requests that came without `Authorization: Bearer <HF_TOKEN>`.
    unauthorized: Arc<AtomicUsize>,
}

/// `GET /<owner>/<repo>/resolve/<revision>/<file>` with an optional `Range: bytes=a-b`.
async fn resolve(State(hub): State<Hub>, Path(path): Path<String>, headers: HeaderMap) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some("Bearer hf_test")
    {
        hub.unauthorized.fetch_add(1, Ordering::SeqCst);
    }
    if path != "test-owner/smol/resolve/main/model.gguf" {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("not found"))
            .unwrap();
    }
    let size = hub.body.len();
    let (start, end) = headers
        .get(header::RANGE)
        .and_then(|r| {
            r.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .and_then(|(a, b)| {
            Some((
                a.parse::<usize>().ok()?,
                b.parse::<usize>().ok()?.min(size - 1),
            ))
        })
        .unwrap_or((0, size - 1));
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::ETAG, "\"5eb1ce0fe7\"")
        .header("x-repo-commit", "0123456789abcdef0123456789abcdef01234567")
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
        .body(Body::from(hub.body[start..=end].to_vec()))
        .unwrap()
}

#[tokio::test]
async fn a_hub_model_is_downloaded_once_into_hf_home_and_loads() {
    let model = model_path();
    let body = std::fs::read(&model).unwrap_or_else(|e| {
        panic!(
            "model {}: {e} (run scripts/fetch-model.sh)",
            model.display()
        )
    });
    let hub = Hub {
        body: Arc::new(body),
        requests: Arc::default(),
        unauthorized: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/{*path}", axum::routing::get(resolve))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let home = tempfile::tempdir().unwrap();
    // The only test of this binary: the process environment is its own.
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", home.path());
    // A gated or private repository needs the token; hf-hub itself reads only its token file.
    std::env::set_var("HF_TOKEN", "hf_test");

    let path = resolve_model(std::path::Path::new("hf:test-owner/smol/model.gguf"))
        .await
        .unwrap();
    assert!(
        path.starts_with(home.path()),
        "{} is not under HF_HOME",
        path.display()
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), hub.body.len());
    let served = hub.requests.load(Ordering::SeqCst);
    assert!(served >= 2, "a metadata request and the download: {served}");
    assert_eq!(
        hub.unauthorized.load(Ordering::SeqCst),
        0,
        "every request carries HF_TOKEN"
    );

    // Cached: the second time asks nothing.
    assert_eq!(
        resolve_model(std::path::Path::new("hf:test-owner/smol/model.gguf"))
            .await
            .unwrap(),
        path
    );
    assert_eq!(hub.requests.load(Ordering::SeqCst), served);

    // A file the hub does not have fails by name; a local path is left alone.
    let err = resolve_model(std::path::Path::new("hf:test-owner/smol/missing.gguf"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.gguf") && err.contains("test-owner/smol"),
        "{err}"
    );
    assert_eq!(resolve_model(&model).await.unwrap(), model);

    // What came down is the model.
    let config = EngineConfig {
        model_path: path,
        model_id: "smol".into(),
        max_queue: 4,
        max_batch: 4,
        prefix_cache_bytes: 0,
        threads: None,
        max_context: Some(256),
        requantize: true,
        device: "cpu".into(),
        limits: Default::default(),
    };
    let engine = Engine::load(config).unwrap();
    // Its identity is the file's SHA-256, as the hub lists it.
    use sha2::Digest;
    assert_eq!(
        engine.model_sha256(),
        format!("{:x}", sha2::Sha256::digest(hub.body.as_slice()))
    );
    let params = SamplingParams {
        max_tokens: Some(2),
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let c = engine
        .chat(ChatRequest {
            messages: vec![ChatMessage::new("user", "Hi")],
            params,
        })
        .await
        .unwrap();
    assert!(c.completion_tokens >= 1);
    // The engine counts what it generated, for a worker's heartbeat to report.
    assert!(engine.generated_tokens() >= c.completion_tokens as u64);
}
