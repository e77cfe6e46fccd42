//! Secrets that never reach a log line: [`Secret`] shows as `"***"` in `Debug` (so a config or
//! a request spec can be logged whole), and [`redact_url`] hides the password of a database or
//! storage URL in messages and errors.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A credential (API key, password, shared secret). It reads and serializes as the plain text
/// (configuration files, Label Studio's REST API need it), but its `Debug` is `"***"`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// `url` with the password of its user info (`scheme://user:password@host`) and the values of
/// password-like query parameters replaced by `***`; anything else unchanged.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.find("://") {
        Some(scheme_end) => {
            let authority_start = scheme_end + 3;
            let rest = &base[authority_start..];
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                    let hidden = if userinfo.contains(':') {
                        format!("{user}:***")
                    } else {
                        user.to_owned()
                    };
                    format!(
                        "{}{hidden}@{host}{}",
                        &base[..authority_start],
                        &rest[authority_end..]
                    )
                }
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "key"]
        .iter()
        .any(|s| key.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_debug_as_stars_and_serialize_as_text() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(\"***\")");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2\"");
        assert_eq!(
            serde_json::from_str::<Secret>("\"x\"").unwrap().expose(),
            "x"
        );
        assert_eq!(&*s, "hunter2");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://bl:hunter2@db:5432/bl"),
            "postgres://bl:***@db:5432/bl"
        );
        assert_eq!(
            redact_url("postgres://bl:p%40ss@word@db/bl"),
            "postgres://bl:***@db/bl"
        );
        assert_eq!(redact_url("postgres://bl@db/bl"), "postgres://bl@db/bl");
        assert_eq!(
            redact_url("postgres://db/bl?user=x&password=hunter2"),
            "postgres://db/bl?user=x&password=***"
        );
        assert_eq!(
            redact_url("sqlite://data/batchlab.db?mode=rwc"),
            "sqlite://data/batchlab.db?mode=rwc"
        );
        assert_eq!(redact_url("s3://bucket/prefix"), "s3://bucket/prefix");
        assert!(!redact_url("postgres://u:hunter2@h/d?sslpassword=hunter2").contains("hunter2"));
    }
}
