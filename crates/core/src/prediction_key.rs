//! Keys of the prediction cache: a prediction is reused exactly when the model version (which
//! covers model, config, prompt template and examples), the labeling config and the task's data
//! are the same. Predictions imported from batch results are keyed without a version
//! ([`IMPORTED`]): whatever made them, they answer for that config and data.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The namespace of predictions imported from batch results.
pub const IMPORTED: &str = "imported";

/// The cache key of a prediction made under `namespace` (a model version, or [`IMPORTED`]) for
/// `label_config` and a task's `data`: hex SHA-256, independent of the data's key order.
pub fn cache_key(namespace: &str, label_config: &str, data: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(namespace.as_bytes());
    hasher.update([0]);
    hasher.update(label_config.as_bytes());
    hasher.update([0]);
    hasher.update(canonical_json(data).as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `value` as JSON text with object keys sorted at every level.
pub fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_ignore_key_order_and_follow_every_part() {
        let a = cache_key(
            "v1",
            "<View/>",
            &json!({"a": 1, "b": {"y": [1, {"q": 2, "p": 3}], "x": "s"}}),
        );
        let b: Value =
            serde_json::from_str(r#"{"b": {"x": "s", "y": [1, {"p": 3, "q": 2}]}, "a": 1}"#)
                .unwrap();
        assert_eq!(a, cache_key("v1", "<View/>", &b));
        assert_eq!(a.len(), 64);
        assert_ne!(a, cache_key("v2", "<View/>", &b));
        assert_ne!(a, cache_key("v1", "<View></View>", &b));
        assert_ne!(a, cache_key("v1", "<View/>", &json!({"a": 2})));
        assert_eq!(
            canonical_json(&json!({"b": 1, "a": [true, null]})),
            r#"{"a":[true,null],"b":1}"#
        );
    }
}
