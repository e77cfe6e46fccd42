//! ARCHITECTURE.md stays true: every repository path it names in backticks exists, so a move
//! that forgets the map fails here.

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
