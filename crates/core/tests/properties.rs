//! Property-based tests of the readers that take input straight from the network: the
//! labeling-config compiler and the webhook envelope reader. Arbitrary input never panics;
//! valid input, seeded from what a real Label Studio 1.23 sent (`tests/fixtures`), reads back
//! what was written.

use batchlab_core::labelstudio::config::{LabelConfig, LabelConfigError, MAX_DEPTH};
use batchlab_core::labelstudio::event;
use proptest::prelude::*;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/label-studio-1.23"
);

/// The labeling configs and webhook bodies Label Studio sent, as the seeds of the generators.
fn fixture_bodies() -> Vec<Value> {
    let mut bodies: Vec<Value> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            serde_json::from_slice::<Value>(&std::fs::read(&p).unwrap()).unwrap()["body"].clone()
        })
        .filter(|b| !b.is_null())
        .collect();
    bodies.sort_by_key(|b| b.to_string());
    assert!(bodies.len() > 20, "fixtures at {FIXTURES}");
    bodies
}

fn fixture_configs() -> Vec<String> {
    let mut configs: Vec<String> = fixture_bodies()
        .iter()
        .filter_map(|b| {
            b.get("schema")
                .or_else(|| b.pointer("/project/label_config"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    configs.sort();
    configs.dedup();
    assert!(!configs.is_empty());
    configs
}

/// A config from parts: a nesting of layout tags, objects and controls with generated names
/// and options.
fn config_of(depth: usize, objects: &[String], choices: &[Vec<String>]) -> String {
    let mut body = String::new();
    for (i, name) in objects.iter().enumerate() {
        body.push_str(&format!("<Text name=\"{name}\" value=\"${name}\"/>"));
        if let Some(options) = choices.get(i) {
            let opts: String = options
                .iter()
                .map(|o| format!("<Choice value=\"{o}\"/>"))
                .collect();
            body.push_str(&format!(
                "<Choices name=\"c_{name}\" toName=\"{name}\">{opts}</Choices>"
            ));
        }
    }
    format!(
        "{}{body}{}",
        "<View>".repeat(depth),
        "</View>".repeat(depth)
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any text, and any mutation of a real config, parses or is refused: never a panic.
    #[test]
    fn the_config_compiler_never_panics(text in ".{0,400}", seed in 0usize..64, cut in 0usize..4000, insert in ".{0,40}") {
        let _ = LabelConfig::parse(&text);
        let configs = fixture_configs();
        let base = &configs[seed % configs.len()];
        let mut at = cut.min(base.len());
        while !base.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{insert}{}", &base[..at], &base[at..]);
        let _ = LabelConfig::parse(&mutated);
        let truncated = &base[..at];
        let _ = LabelConfig::parse(truncated);
    }

    /// A valid config reads back the objects and the options written into it, at any depth up
    /// to the limit; one level more is refused naming the limit.
    #[test]
    fn valid_configs_round_trip(
        depth in 1usize..MAX_DEPTH,
        names in proptest::collection::btree_set("[a-z][a-z0-9_]{0,8}", 1..5),
        options in proptest::collection::vec(proptest::collection::btree_set("[A-Za-z0-9 ]{1,12}", 1..8), 1..5),
    ) {
        let names: Vec<String> = names.into_iter().collect();
        let options: Vec<Vec<String>> = options.into_iter().map(|o| o.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).collect();
        prop_assume!(options.iter().all(|o| !o.is_empty()));
        let xml = config_of(depth, &names, &options);
        let config = LabelConfig::parse(&xml).unwrap();
        prop_assert_eq!(config.objects.iter().map(|o| o.name.clone()).collect::<Vec<_>>(), names.clone());
        for (i, name) in names.iter().enumerate() {
            if let Some(opts) = options.get(i) {
                let control = config.control(&format!("c_{name}")).unwrap();
                let mut got = control.options().to_vec();
                let mut want = opts.clone();
                got.sort();
                want.sort();
                want.dedup();
                got.dedup();
                prop_assert_eq!(got, want);
            }
        }
        let too_deep = config_of(MAX_DEPTH, &names, &options);
        prop_assert_eq!(LabelConfig::parse(&too_deep).unwrap_err(), LabelConfigError::TooDeep { limit: MAX_DEPTH });
    }

    /// Any bytes given as a webhook body are read or refused, never a panic; the delivery key
    /// is the body's alone.
    #[test]
    fn the_envelope_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), seed in 0usize..64, cut in 0usize..3000) {
        let _ = event::envelope(&bytes);
        let bodies = fixture_bodies();
        let text = bodies[seed % bodies.len()].to_string();
        let _ = event::envelope(&text.as_bytes()[..cut.min(text.len())]);
    }

    /// A valid envelope reads back its action and project; the same body gives the same key
    /// and another body another key.
    #[test]
    fn valid_envelopes_round_trip(action in "[A-Z_]{1,24}", project in proptest::option::of(1i64..1_000_000), seed in 0usize..64) {
        let bodies = fixture_bodies();
        let mut body = bodies[seed % bodies.len()].clone();
        body["action"] = json!(action);
        match project {
            Some(p) => body["project"] = json!({"id": p}),
            None => {
                if let Some(map) = body.as_object_mut() {
                    map.remove("project");
                }
            }
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        let (envelope, value) = event::envelope(&bytes).unwrap();
        prop_assert_eq!(&envelope.action, &action);
        prop_assert_eq!(value, body.clone());
        if project.is_some() {
            prop_assert_eq!(envelope.project_id, project);
        }
        let (again, _) = event::envelope(&bytes).unwrap();
        prop_assert_eq!(&again.delivery_key, &envelope.delivery_key);
        body["extra"] = json!(1);
        let (other, _) = event::envelope(&serde_json::to_vec(&body).unwrap()).unwrap();
        prop_assert_ne!(other.delivery_key, envelope.delivery_key);
    }
}
