//! The `model_version` batchlab's ML backend reports to Label Studio.
//!
//! Label Studio re-predicts a task when its prediction's `model_version` differs from the one
//! `/setup` answers, and never otherwise; so the version must be stable for one model and one
//! labeling config (across processes and restarts), and change when either changes. Hence a
//! fixed hash (FNV-1a) of the config, never Rust's randomly seeded `DefaultHasher`.

/// 64-bit FNV-1a of `bytes`: stable across processes, platforms and Rust versions.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// `batchlab-<model id>-<8 hex digits of the labeling config's hash>`, for example
/// `batchlab-SmolLM2-135M-Instruct-1a2b3c4d`.
pub fn model_version(model_id: &str, label_config: &str) -> String {
    let h = fnv1a64(label_config.as_bytes());
    format!("batchlab-{model_id}-{:08x}", (h ^ (h >> 32)) as u32)
}

/// The version of predictions made for `label_config` by the model file whose SHA-256 is
/// `model_sha256` (when known), with a project's prompt `template` and ground-truth example set
/// (`examples`: its fingerprint, 0 for none): the plain [`model_version`] when there is none of
/// them, so it changes exactly when one of them does — a new GGUF under the same name included.
pub fn prediction_version(
    model_id: &str,
    model_sha256: Option<&str>,
    label_config: &str,
    template: Option<&str>,
    examples: u32,
) -> String {
    let mut key = label_config.to_string();
    if let Some(sha) = model_sha256 {
        key.push_str("\u{0}model:");
        key.push_str(sha);
    }
    if let Some(t) = template {
        key.push_str("\u{0}template:");
        key.push_str(t);
    }
    if examples != 0 {
        key.push_str(&format!("\u{0}examples:{examples:08x}"));
    }
    model_version(model_id, &key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn versions_follow_model_and_config() {
        let a = model_version("SmolLM2-135M-Instruct", "<View/>");
        assert_eq!(a, model_version("SmolLM2-135M-Instruct", "<View/>"));
        assert!(
            a.starts_with("batchlab-SmolLM2-135M-Instruct-")
                && a.len() == "batchlab-SmolLM2-135M-Instruct-".len() + 8,
            "{a}"
        );
        assert_ne!(a, model_version("SmolLM2-135M-Instruct", "<View></View>"));
        assert_ne!(a, model_version("other", "<View/>"));
    }

    #[test]
    fn prediction_versions_follow_template_and_examples() {
        let plain = model_version("m", "<View/>");
        assert_eq!(prediction_version("m", None, "<View/>", None, 0), plain);
        let t = prediction_version("m", None, "<View/>", Some("Q: {text}"), 0);
        let e = prediction_version("m", None, "<View/>", None, 7);
        assert!(t != plain && e != plain && t != e);
        assert_ne!(e, prediction_version("m", None, "<View/>", None, 8));
        // Another model file under the same name is another version.
        let a = prediction_version("m", Some("aa11"), "<View/>", None, 0);
        let b = prediction_version("m", Some("bb22"), "<View/>", None, 0);
        assert!(a != b && a != plain && b != plain);
        assert!(a.starts_with("batchlab-m-"), "{a}");
    }
}
