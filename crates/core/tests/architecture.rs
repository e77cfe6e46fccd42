//! ARCHITECTURE.md stays true: every repository path it names in backticks exists, so a move
//! that forgets the map fails here. And the LICENSE file is the license the crates declare.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The backticked spans of `text` that name a repository path: they start at a top-level
/// folder of the repository or are a top-level file (`SECURITY.md`).
fn named_paths(text: &str, root: &Path) -> Vec<String> {
    let top: Vec<String> = std::fs::read_dir(root)
        .expect("the repository root")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.') && name != "target" && name != "models")
        .collect();
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| !span.contains(' '))
        .filter(|span| {
            let first = span.split('/').next().unwrap_or_default();
            top.iter().any(|t| t == first) || span.ends_with(".md")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_path_in_the_architecture_map_exists() {
    let root = repo();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let paths = named_paths(&text, &root);
    assert!(
        paths.len() >= 40,
        "the map names the files of both data paths; found only {paths:?}"
    );
    let missing: Vec<&String> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn a_moved_file_is_caught() {
    let root = repo();
    let paths = named_paths(
        "see `crates/core/src/no_such_file.rs` and `config.rs`",
        &root,
    );
    assert_eq!(paths, vec!["crates/core/src/no_such_file.rs".to_string()]);
    assert!(!root.join(&paths[0]).exists());
}

/// The LICENSE file is the license `Cargo.toml` declares for every crate.
#[test]
fn the_license_file_matches_the_declared_license() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let declared = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("license = "))
        .expect("Cargo.toml declares a license")
        .trim_matches('"');
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("a LICENSE file");
    let heading: Vec<&str> = license.split_whitespace().take(4).collect();
    match declared {
        "Apache-2.0" => assert_eq!(heading, ["Apache", "License", "Version", "2.0,"]),
        other => panic!("no check for the license {other:?}: add one"),
    }
}
