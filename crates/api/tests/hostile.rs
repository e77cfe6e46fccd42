//! Hostile input against batchlab-api over a real socket, with every credential set: each bad
//! request costs one 4xx answer in OpenAI's error shape, and the service keeps answering
//! `/health` throughout. The time bounds are generous (a loaded 2-core CI machine); they catch
//! a request that stalls the service, not a slow one, and the measured worst case is printed.

mod common;

use std::time::{Duration, Instant};

use common::{assert_openai_error, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY: &str = "api-key-1";
const SECRET: &str = "hook-secret-1";

/// How long a test waits for a condition that comes in milliseconds here (the processor, a
/// closed connection noticed) before it fails.
const WAIT_FOR: Duration = Duration::from_secs(15);

/// An answer to a hostile request must come within this (it comes in milliseconds here).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// `/health` must answer within this between hostile requests (milliseconds here).
const HEALTH_WITHIN: Duration = Duration::from_secs(1);

async fn start(configure: impl FnOnce(&mut batchlab_core::config::Config)) -> Server {
    common::start(|c| {
        c.api.api_key = Some(KEY.into());
        c.label_studio.webhook_secret = Some(SECRET.into());
        configure(c);
    })
    .await
}

/// `/health` answers 200 within [`HEALTH_WITHIN`]; answers how long it took.
async fn health_ok(s: &Server) -> Duration {
    let started = Instant::now();
    let r = tokio::time::timeout(HEALTH_WITHIN, s.client.get(s.url("/health")).send())
        .await
        .expect("/health stalled")
        .unwrap();
    assert_eq!(r.status(), 200);
    started.elapsed()
}

/// Route × credential → status: no key, wrong key, the right key in the spellings RFC 9110
/// allows (scheme in any case, extra blanks), and schemes that are not Bearer.
#[tokio::test]
async fn the_api_key_table() {
    let s = start(|_| {}).await;
    let routes = [
        "/v1/files",
        "/v1/batches",
        "/v1/label-studio/projects/1",
        "/v1/files/file-nope",
    ];
    let credentials: [(Option<String>, bool); 9] = [
        (None, false),
        (Some(format!("Bearer {KEY}x")), false),
        (Some(format!("Bearer {}", &KEY[..KEY.len() - 1])), false),
        (Some(format!("Basic {KEY}")), false),
        (Some(KEY.to_string()), false),
        (Some(format!("Bearer {KEY}")), true),
        (Some(format!("bearer {KEY}")), true),
        (Some(format!("BEARER   {KEY}  ")), true),
        (Some(format!("Bearer\t{KEY}")), true),
    ];
    for route in routes {
        for (header, admitted) in &credentials {
            let mut request = s.client.get(s.url(route));
            if let Some(h) = header {
                request = request.header("authorization", h);
            }
            let r = request.send().await.unwrap();
            if *admitted {
                assert_ne!(r.status(), StatusCode::UNAUTHORIZED, "{route} {header:?}");
            } else {
                let body = assert_openai_error(r, StatusCode::UNAUTHORIZED).await;
                assert_eq!(
                    body["error"]["code"], "invalid_api_key",
                    "{route} {header:?}"
                );
            }
        }
    }
    // The webhook takes its secret, not the key; /health and /metrics take nothing.
    let hook = s
        .client
        .post(s.url("/v1/webhooks/label-studio"))
        .header("authorization", format!("Bearer {KEY}"))
        .body("{}")
        .send();
    assert_eq!(
        assert_openai_error(hook.await.unwrap(), StatusCode::UNAUTHORIZED).await["error"]["code"],
        "invalid_webhook_secret"
    );
    assert_eq!(
        s.client
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    health_ok(&s).await;
}

/// A request refused before its body is read (wrong key, wrong webhook secret) is answered with
/// `Connection: close`. The server does not read the rest of such a body and closes the
/// connection after answering; without the header a client puts the connection back in its
/// pool, and its next request on it could find it closed ("Server disconnected without sending
/// a response": seen in CI with the official `openai` client, which sends the next request at
/// once). A refused request without a body keeps its connection.
#[tokio::test]
async fn a_refused_request_with_a_body_closes_its_connection() {
    let s = start(|_| {}).await;
    let body = vec![b'x'; 256 << 10];
    let refused = [
        s.client
            .post(s.url("/v1/files"))
            .header("authorization", "Bearer wrong")
            .header("content-type", "application/octet-stream")
            .body(body.clone()),
        s.client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("content-type", "application/json")
            .body(body.clone()),
    ];
    for request in refused {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{}",
            r.url()
        );
    }
    let r = s.client.get(s.url("/v1/files")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers().get("connection"), None);
    health_ok(&s).await;
}

/// A body that sends one chunk and then never ends.
fn endless_body() -> reqwest::Body {
    let first = futures::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"action\": \""))
    });
    reqwest::Body::wrap_stream(futures::StreamExt::chain(first, futures::stream::pending()))
}

/// The secret is checked before the body is read: a wrong secret is answered while the body
/// is still arriving (before, the API read up to 64 MiB first, and here would wait forever).
#[tokio::test]
async fn a_wrong_secret_is_refused_before_the_body_is_read() {
    let s = start(|_| {}).await;
    for secret in [None, Some("wrong")] {
        let mut request = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("content-type", "application/json");
        if let Some(secret) = secret {
            request = request.header("X-Batchlab-Secret", secret);
        }
        let r = tokio::time::timeout(ANSWER_WITHIN, request.body(endless_body()).send())
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        assert_eq!(
            assert_openai_error(r, StatusCode::UNAUTHORIZED).await["error"]["code"],
            "invalid_webhook_secret"
        );
    }
    health_ok(&s).await;
}

/// Concurrent deliveries are bounded: past `api.max_concurrent_webhooks` bodies being read,
/// the next one is answered 503 with `Retry-After`, and once a place is free deliveries go in.
#[tokio::test]
async fn concurrent_webhook_bodies_are_bounded() {
    let s = start(|c| c.api.max_concurrent_webhooks = 1).await;
    let holder = s
        .client
        .post(s.url("/v1/webhooks/label-studio"))
        .header("X-Batchlab-Secret", SECRET)
        .body(endless_body())
        .send();
    let holder = tokio::spawn(holder);
    // Wait until the first delivery holds the only place.
    let mut refused = None;
    let deadline = Instant::now() + WAIT_FOR;
    while Instant::now() < deadline {
        let r = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("X-Batchlab-Secret", SECRET)
            .body(r#"{"action": "X"}"#)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(r);
            break;
        }
        tokio::task::yield_now().await;
    }
    let r = refused.expect("a second concurrent delivery was refused");
    assert_eq!(
        r.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("2".into())
    );
    assert_eq!(
        assert_openai_error(r, StatusCode::SERVICE_UNAVAILABLE).await["error"]["code"],
        "busy"
    );
    holder.abort();
    // The aborted delivery's place comes back once the server notices the closed connection.
    let mut accepted = false;
    let deadline = Instant::now() + WAIT_FOR;
    while Instant::now() < deadline {
        let r = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("X-Batchlab-Secret", SECRET)
            .body(r#"{"action": "Y"}"#)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted, "the place was never released");
    health_ok(&s).await;
}

/// Malformed, oversized and absurd webhook bodies: each a 4xx in OpenAI's shape, quickly, and
/// `/health` answers between them.
#[tokio::test]
async fn hostile_webhook_bodies_cost_one_error_each() {
    let s = start(|_| {}).await;
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        "{{\"action\": \"PROJECT_UPDATED\", \"x\": {}1{}}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    let cases: Vec<(&str, Vec<u8>, StatusCode)> = vec![
        ("empty", Vec::new(), StatusCode::BAD_REQUEST),
        ("not JSON", b"{nope".to_vec(), StatusCode::BAD_REQUEST),
        (
            "not UTF-8",
            b"{\"action\": \"\xff\xfe\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "array 100,000 deep",
            deep_json.into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "object 50,000 deep",
            deep_object.into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "NUL",
            b"{\"action\": \"A\x00\"}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "70 MB",
            {
                let mut b = b"{\"action\": \"TASKS_CREATED\", \"pad\": \"".to_vec();
                b.resize(70 << 20, b'a');
                b.extend_from_slice(b"\"}");
                b
            },
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    let mut worst_health = Duration::ZERO;
    for (name, body, status) in cases {
        let started = Instant::now();
        let send = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("X-Batchlab-Secret", SECRET)
            .body(body)
            .send();
        let r = tokio::time::timeout(ANSWER_WITHIN, send)
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer"))
            .unwrap();
        let answered = started.elapsed();
        assert_eq!(r.status(), status, "{name}");
        assert_openai_error(r, status).await;
        worst_health = worst_health.max(health_ok(&s).await);
        eprintln!("{name}: answered {status} in {answered:?}");
    }
    eprintln!("worst /health between hostile webhook bodies: {worst_health:?}");
}

/// A labeling config nested 20,000 deep in a PROJECT_UPDATED once crashed batchlab-api's event
/// processor on every restart. Now it is stored, the processor goes on, later events apply.
#[tokio::test]
async fn a_deeply_nested_config_does_not_stop_webhook_processing() {
    let s = start(|_| {}).await;
    let deep = format!(
        "{}<Text name=\"t\" value=\"$text\"/>{}",
        "<View>".repeat(20_000),
        "</View>".repeat(20_000)
    );
    let events = [
        json!({"action": "PROJECT_UPDATED", "project": {"id": 4, "title": "deep", "label_config": deep}}),
        json!({"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": [{"id": 1, "project": 4, "data": {"text": "x"}}]}),
    ];
    for event in &events {
        let r = s
            .client
            .post(s.url("/v1/webhooks/label-studio"))
            .header("X-Batchlab-Secret", SECRET)
            .json(event)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut status = Value::Null;
    let deadline = Instant::now() + WAIT_FOR;
    while Instant::now() < deadline {
        let r = s
            .client
            .get(s.url("/v1/label-studio/projects/4"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            status = r.json().await.unwrap();
            // Both events applied: the later one's task is there and nothing waits.
            if status["counts"]["tasks"] == 1 && status["webhook_events"]["pending"] == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status["counts"]["tasks"], 1, "{status}");
    assert_eq!(status["webhook_events"]["pending"], 0, "{status}");
    health_ok(&s).await;
}
