//! The configuration reference: every key, its default, the environment variable that sets it
//! and what it does, read from the [`Config`] structs' own doc comments (through their
//! `JsonSchema` derive), so that `batchlab-api config` and the README's table cannot drift from
//! the code.

use schemars::schema_for;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Config, LABEL_STUDIO_ENV};

/// Where the README keeps the generated table; the text between these markers is
/// [`markdown_table`]'s output (a test keeps them equal).
pub const README_START: &str = "<!-- config-reference:start (batchlab-api config) -->";
/// The end of the README's generated table.
pub const README_END: &str = "<!-- config-reference:end -->";

/// One line of the reference: a configuration key, or another variable batchlab reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Setting {
    /// The key as written in TOML, `section.field`; `None` for a variable that is not a key
    /// (read by a library, such as `HF_TOKEN`).
    pub key: Option<String>,
    /// The environment variable that sets it.
    pub env: String,
    /// The built-in default (`null`: unset).
    pub default: Value,
    /// What it does, from the field's doc comment.
    pub doc: String,
}

/// Variables read outside the configuration: by the model download and the object store
/// client (their libraries' standard names) and by logging.
const LIBRARY_ENV: [(&str, &str); 10] = [
    (
        "HF_TOKEN",
        "Hugging Face token sent when fetching an `hf:` model (gated or private repositories).",
    ),
    (
        "HF_HOME",
        "Hugging Face cache directory for `hf:` model downloads (default `~/.cache/huggingface`).",
    ),
    (
        "HF_ENDPOINT",
        "Hugging Face hub to download `hf:` models from (default `https://huggingface.co`).",
    ),
    (
        "AWS_ACCESS_KEY_ID",
        "Object storage key id, with `storage.files_url`.",
    ),
    (
        "AWS_SECRET_ACCESS_KEY",
        "Object storage secret key, with `storage.files_url`.",
    ),
    (
        "AWS_REGION",
        "Object storage region, with `storage.files_url` (or `AWS_DEFAULT_REGION`).",
    ),
    (
        "AWS_DEFAULT_REGION",
        "Object storage region when `AWS_REGION` is unset.",
    ),
    (
        "AWS_ENDPOINT_URL",
        "An S3-compatible service's URL (MinIO, Ceph, R2, ...) instead of AWS.",
    ),
    (
        "AWS_ALLOW_HTTP",
        "`true` lets the object store be reached over plain HTTP.",
    ),
    (
        "RUST_LOG",
        "Log filter (`tracing` env-filter syntax, default `info,sqlx=warn`).",
    ),
];

/// Every configuration key in alphabetical order, then the Label Studio names that alias keys,
/// then the variables read outside the configuration.
pub fn settings() -> Vec<Setting> {
    let schema = serde_json::to_value(schema_for!(Config)).unwrap_or_default();
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let sections = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (section, section_schema) in &sections {
        let Some(fields) = resolve(section_schema, &defs)
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for (field, field_schema) in fields {
            let key = format!("{section}.{field}");
            out.push(Setting {
                env: env_name(&key),
                default: defaults
                    .get(section)
                    .and_then(|s| s.get(field))
                    .cloned()
                    .unwrap_or(Value::Null),
                doc: clean_doc(field_schema),
                key: Some(key),
            });
        }
    }
    // In key order whatever serde_json's `preserve_order` feature (which another crate in a
    // build may turn on) does to the schema's maps.
    out.sort_by(|a, b| a.key.cmp(&b.key));
    for (env, key) in LABEL_STUDIO_ENV {
        let of = out.iter().find(|s| s.key.as_deref() == Some(key)).cloned();
        if let Some(of) = of {
            out.push(Setting {
                env: env.to_string(),
                doc: format!("Label Studio's name for `{key}`; `{}` wins.", of.env),
                ..of
            });
        }
    }
    out.extend(LIBRARY_ENV.iter().map(|(env, doc)| Setting {
        key: None,
        env: env.to_string(),
        default: Value::Null,
        doc: doc.to_string(),
    }));
    out
}

/// The variable that sets `key`: `BATCHLAB_<SECTION>__<FIELD>`.
pub fn env_name(key: &str) -> String {
    format!("BATCHLAB_{}", key.replace('.', "__").to_uppercase())
}

/// The schema `s` stands for: itself, or the definition its `$ref` names.
fn resolve<'a>(s: &'a Value, defs: &'a Map<String, Value>) -> Option<&'a Value> {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => defs.get(r.rsplit('/').next()?),
        None => Some(s),
    }
}

/// A field's doc comment on one line, rustdoc's intra-doc link brackets removed.
fn clean_doc(field: &Value) -> String {
    let doc = field
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    doc.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("[`", "`")
        .replace("`]", "`")
}

/// The reference as a Markdown table, the README's configuration section.
pub fn markdown_table(settings: &[Setting]) -> String {
    let mut out = String::from(
        "| key | environment variable | default | what it does |\n|---|---|---|---|\n",
    );
    for s in settings {
        let key = s
            .key
            .as_deref()
            .map_or_else(|| "—".to_string(), |k| format!("`{k}`"));
        let default = match &s.default {
            Value::Null => "unset".to_string(),
            v => format!("`{v}`"),
        };
        out.push_str(&format!(
            "| {key} | `{}` | {default} | {} |\n",
            s.env,
            s.doc.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_its_variable_default_and_doc() {
        let all = settings();
        let port = all
            .iter()
            .find(|s| s.key.as_deref() == Some("api.port"))
            .expect("api.port is listed");
        assert_eq!(port.env, "BATCHLAB_API__PORT");
        assert_eq!(port.default, serde_json::json!(4080));
        assert!(port.doc.contains("Port"), "{port:?}");
        let undocumented: Vec<_> = all.iter().filter(|s| s.doc.is_empty()).collect();
        assert!(
            undocumented.is_empty(),
            "fields without doc comments: {undocumented:?}"
        );
        let alias = all.iter().find(|s| s.env == "LABEL_STUDIO_URL").unwrap();
        assert_eq!(alias.key.as_deref(), Some("label_studio.url"));
        // As many keys as the defaults have leaves: nothing is missed by the schema walk.
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let leaves: usize = defaults
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_object().unwrap().len())
            .sum();
        let keys = all
            .iter()
            .filter(|s| s.env.starts_with("BATCHLAB_"))
            .count();
        // Optional keys that are unset are skipped when serialized; the schema still has them.
        assert!(keys >= leaves, "{keys} keys, {leaves} defaults");
    }

    #[test]
    fn every_key_loads_from_its_variable() {
        // A variable the reference names must really set its key: load the configuration with
        // each `BATCHLAB_*` variable set to its own default and compare.
        figment::Jail::expect_with(|jail| {
            for s in settings().iter().filter(|s| s.env.starts_with("BATCHLAB_")) {
                let value = match &s.default {
                    Value::Null => continue,
                    Value::String(v) if v.is_empty() => continue,
                    Value::String(v) => v.clone(),
                    Value::Array(items) => format!(
                        "[{}]",
                        items
                            .iter()
                            .map(Value::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    v => v.to_string(),
                };
                jail.set_env(&s.env, value);
            }
            let loaded = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(loaded, Config::default());
            Ok(())
        });
    }

    #[test]
    fn the_readme_table_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let table = markdown_table(&settings());
        let (Some(start), Some(end)) = (readme.find(README_START), readme.find(README_END)) else {
            panic!("README.md has no {README_START} … {README_END} section");
        };
        let current = &readme[start + README_START.len()..end];
        if current.trim() != table.trim() {
            if std::env::var_os("BATCHLAB_BLESS").is_some() {
                let updated = format!(
                    "{}{README_START}\n{table}{}",
                    &readme[..start],
                    &readme[end..]
                );
                std::fs::write(&path, updated).unwrap();
            }
            let first = current
                .trim()
                .lines()
                .zip(table.trim().lines())
                .find(|(a, b)| a != b);
            panic!(
                "README.md's configuration table differs from `batchlab-api config` (first \
                 difference, README then generated: {first:?}); rerun this test with \
                 BATCHLAB_BLESS=1 to rewrite it"
            );
        }
    }
}
