//! Optional HTTP basic auth on every route (Label Studio's `BASIC_AUTH` method): when both
//! `basic_auth_user` and `basic_auth_pass` are configured, a request without the right
//! `Authorization: Basic` header gets 401 — `/health` included, as Label Studio expects.
//! Only one of the two configured is refused at start: auth never fails open.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use batchlab_core::config::{ConfigError, MlBackendConfig};

use crate::error::MlError;
use crate::MlState;

/// The credentials basic auth requires: `user:password` as the header carries it, decoded.
pub struct Credentials {
    expected: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

impl Credentials {
    /// Credentials from the configuration; `None` when basic auth is off, an error naming the
    /// missing setting when only one of user and password is set.
    pub fn from_config(ml: &MlBackendConfig) -> Result<Option<Credentials>, ConfigError> {
        Ok(ml.basic_auth()?.map(|(u, p)| Credentials {
            expected: format!("{u}:{p}").into_bytes(),
        }))
    }

    /// Whether an `Authorization` header value carries these credentials. The scheme is
    /// matched without regard to case and surrounding blanks are ignored (RFC 9110 §11.1);
    /// the credentials themselves are compared in constant time.
    pub fn admit(&self, header: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(header) else {
            return false;
        };
        let text = text.trim();
        let Some((scheme, token)) = text.split_once(char::is_whitespace) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
            return false;
        };
        batchlab_core::http::constant_time_eq(&decoded, &self.expected)
    }
}

/// Middleware: passes the request on when basic auth is off or the credentials match.
pub async fn require_basic_auth(
    State(state): State<MlState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(credentials) = state.basic_auth.as_deref() {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !credentials.admit(given) {
            tracing::info!(path = %request.uri().path(), "basic auth failed");
            return batchlab_core::http::refused_before_body(
                request.headers(),
                MlError::Unauthorized.into_response(),
            );
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn config(user: Option<&str>, pass: Option<&str>) -> MlBackendConfig {
        MlBackendConfig {
            basic_auth_user: user.map(str::to_owned),
            basic_auth_pass: pass.map(Into::into),
            ..MlBackendConfig::default()
        }
    }

    #[test]
    fn headers_are_read_as_rfc_9110_says() {
        let c = Credentials::from_config(&config(Some("ml"), Some("pw")))
            .unwrap()
            .unwrap();
        for ok in [
            format!("Basic {}", basic("ml:pw")),
            format!("basic {}", basic("ml:pw")),
            format!("  BASIC   {} ", basic("ml:pw")),
        ] {
            assert!(c.admit(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            format!("Basic {}", basic("ml:pwx")),
            format!("Basic {}", basic("ml:p")),
            format!("Bearer {}", basic("ml:pw")),
            format!("Basic{}", basic("ml:pw")),
            "Basic !!!".to_string(),
            String::new(),
        ] {
            assert!(!c.admit(bad.as_bytes()), "{bad:?}");
        }
        assert!(!c.admit(b"Basic \xff\xfe"));
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn half_configured_credentials_are_refused() {
        assert!(Credentials::from_config(&config(None, None))
            .unwrap()
            .is_none());
        assert!(Credentials::from_config(&config(Some(""), Some(" ")))
            .unwrap()
            .is_none());
        let e = Credentials::from_config(&config(Some("ml"), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BASIC_AUTH_PASS is not"), "{e}");
        let e = Credentials::from_config(&config(None, Some("pw")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BASIC_AUTH_USER is not"), "{e}");
    }
}
