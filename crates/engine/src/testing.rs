//! Model files for tests, shared by the unit tests and the integration tests (hidden from the
//! docs: not part of the engine's API proper).
//!
//! Tests find models in the repository's `models/` directory; a missing file skips a test,
//! saying so, unless `BATCHLAB_REQUIRE_MODELS` is set.

use std::path::PathBuf;

#[cfg(test)]
use candle_core::quantized::gguf_file;

#[cfg(test)]
use crate::tokenizer::GgufTokenizer;

#[cfg(test)]
use std::io::BufReader;

/// `file` under the repository's `models/`: `None` (the test skips, saying so) when it is
/// missing, unless `BATCHLAB_REQUIRE_MODELS` is set, which makes a missing file fail.
pub fn model_file(file: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(file);
    if !path.exists() {
        assert!(
            std::env::var_os("BATCHLAB_REQUIRE_MODELS").is_none(),
            "{} is missing",
            path.display()
        );
        eprintln!("SKIP: model file {} is missing", path.display());
        return None;
    }
    Some(path)
}

/// A model's GGUF metadata and the tokenizer built from it (weights not loaded), read once per
/// test binary; `None` as [`model_file`] says.
#[cfg(test)]
pub(crate) struct TestGguf {
    /// The file.
    pub path: PathBuf,
    /// Its metadata.
    pub content: gguf_file::Content,
    /// The tokenizer its metadata describes.
    pub tokenizer: GgufTokenizer,
}

/// [`TestGguf`] of `file` under `models/`, read on first use and kept for the test binary.
#[cfg(test)]
pub(crate) fn test_gguf(file: &'static str) -> Option<&'static TestGguf> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LOADED: OnceLock<Mutex<HashMap<&'static str, &'static TestGguf>>> = OnceLock::new();
    let path = model_file(file)?;
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    Some(*loaded.entry(file).or_insert_with(|| {
        let mut f = BufReader::new(std::fs::File::open(&path).unwrap());
        let content = gguf_file::Content::read(&mut f).unwrap();
        let tokenizer = GgufTokenizer::from_gguf(&content).unwrap();
        Box::leak(Box::new(TestGguf {
            path,
            content,
            tokenizer,
        }))
    }))
}
