//! The HTTP layers every batchlab service wraps its routes in — request ids, tracing spans,
//! request metrics, panics answered as JSON — kept in one place so `batchlab-api` and
//! `batchlab-ml-backend` observe requests the same way.

use std::future::IntoFuture;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Counts requests as `<prefix>_http_requests_total` and times them as
/// `<prefix>_http_request_duration_seconds`, labelled by method, matched route and status.
async fn record_metrics(prefix: &'static str, request: Request, next: Next) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("path", path), ("status", status)];
    metrics::counter!(format!("{prefix}_http_requests_total"), &labels).increment(1);
    metrics::histogram!(format!("{prefix}_http_request_duration_seconds"), &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A panicking handler answers 500 with a generic JSON error; the panic itself is logged by
/// the tracing layer, never sent to the client.
fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    let body = crate::openai::ErrorBody::server_error();
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

/// Wraps `router` (fallbacks already set) in the layers every batchlab HTTP service uses:
/// an `x-request-id` set when missing and echoed back, one `request` tracing span per request
/// carrying that id, request metrics named `<metric_prefix>_http_*`, and panics answered as JSON.
pub fn observe_layers(router: Router, metric_prefix: &'static str) -> Router {
    router
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| record_metrics(metric_prefix, req, next)))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get("x-request-id").and_then(|v: &HeaderValue| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// `response` to a request refused before its body was read, marked `Connection: close` when
/// the request declared a body. The server closes such a connection after answering (the rest
/// of the body is never read); without the header a client keeps the connection for its next
/// request and may find it closed under it.
pub fn refused_before_body(headers: &axum::http::HeaderMap, mut response: Response) -> Response {
    let declares_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    if declares_body {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Compares two byte strings in time that depends only on their lengths, so a secret cannot be
/// guessed byte by byte from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /metrics` of every service: the process's Prometheus text (every name prefixed
/// `batchlab_`).
pub async fn metrics() -> impl IntoResponse {
    let body = crate::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serves `app` on `listener` until SIGTERM/SIGINT (or until `stopping` is cancelled), then
/// drains: the listener closes, requests in progress finish, and `drain` — the service's
/// background work, told to stop through the same `stopping` token — completes, all within
/// `grace` of the signal. Whatever still runs after `grace` is abandoned with a warning, so a
/// stuck request cannot keep the process from exiting before its supervisor's SIGKILL.
pub async fn serve_with_drain(
    listener: tokio::net::TcpListener,
    app: Router,
    stopping: tokio_util::sync::CancellationToken,
    grace: std::time::Duration,
    drain: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::spawn({
        let stopping = stopping.clone();
        async move {
            tokio::select! {
                _ = crate::telemetry::shutdown_signal() => stopping.cancel(),
                _ = stopping.cancelled() => {}
            }
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(stopping.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => {
            // The server failed on its own: stop the background work too.
            stopping.cancel();
            Some(served)
        }
        _ = stopping.cancelled() => None,
    };
    let started = Instant::now();
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "draining: finishing requests and background work in progress"
    );
    let finished = async {
        let served = match served {
            Some(served) => served,
            None => server.await,
        };
        drain.await;
        served
    };
    match tokio::time::timeout(grace, finished).await {
        Ok(served) => {
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "drained; exiting"
            );
            served
        }
        Err(_) => {
            tracing::warn!(
                grace_seconds = grace.as_secs_f64(),
                "work still in progress after the shutdown grace period; exiting anyway"
            );
            Ok(())
        }
    }
}

/// Why a service's own health check failed (`batchlab-… healthcheck`).
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// Nothing answered at the service's address within the time allowed.
    #[error("{url} did not answer")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What the HTTP client saw.
        #[source]
        source: reqwest::Error,
    },
    /// The service answered, but not 200 (still loading its model, or a dependency down).
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL asked.
        url: String,
        /// The status it answered.
        status: reqwest::StatusCode,
        /// The start of its body, which says why.
        body: String,
    },
}

/// The health URL of a service bound to `host:port`, asked from the same machine: a wildcard
/// bind (`0.0.0.0`, `::`) is reached on loopback.
pub fn local_health_url(host: &str, port: u16) -> String {
    let host = match host.trim_matches(|c| c == '[' || c == ']') {
        "0.0.0.0" | "" => "127.0.0.1".to_string(),
        "::" => "[::1]".to_string(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    };
    format!("http://{host}:{port}/health")
}

/// What a container's health check runs (the runtime image has no curl): `GET /health` on the
/// service's own address, with its basic auth when it has one; Ok on 200 within five seconds.
pub async fn healthcheck(
    host: &str,
    port: u16,
    basic_auth: Option<(&str, &str)>,
) -> Result<(), HealthcheckError> {
    let url = local_health_url(host, port);
    let unreachable = |source| HealthcheckError::Unreachable {
        url: url.clone(),
        source,
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(unreachable)?;
    let mut request = client.get(&url);
    if let Some((user, pass)) = basic_auth {
        request = request.basic_auth(user, Some(pass));
    }
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(HealthcheckError::Status {
        url,
        status,
        body: body.chars().take(300).collect(),
    })
}
