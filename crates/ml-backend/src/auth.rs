//! Optional HTTP basic auth on every route (Label Studio's `BASIC_AUTH` method): when both
//! `basic_auth_user` and `basic_auth_pass` are configured, a request without the right
//! `Authorization: Basic` header gets 401 — `/health` included, as Label Studio expects.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;

use crate::error::MlError;
use crate::MlState;

/// The `Authorization` value that passes, or `None` when basic auth is off.
pub fn expected_header(user: Option<&str>, pass: Option<&str>) -> Option<String> {
    match (user, pass) {
        (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => {
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
        }
        _ => None,
    }
}

/// Middleware: passes the request on when basic auth is off or the credentials match.
pub async fn require_basic_auth(State(state): State<MlState>, request: Request, next: Next) -> Result<Response, MlError> {
    if let Some(expected) = state.basic_auth.as_deref() {
        let given = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if !batchlab_core::http::constant_time_eq(given, expected.as_bytes()) {
            tracing::info!(path = %request.uri().path(), "basic auth failed");
            return Err(MlError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}
