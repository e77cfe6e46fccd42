//! Models from a Hugging Face hub: a model is named either by a local path or by
//! `hf:<owner>/<repo>/<file>[@<revision>]`, downloaded once into the standard cache
//! (`HF_HOME`, default `~/.cache/huggingface`) from `HF_ENDPOINT` (default
//! `https://huggingface.co`) with `HF_TOKEN` when set (gated and private repositories), so
//! mirrors, shared caches and tokens work as with Python tools.

use std::path::{Path, PathBuf};

use hf_hub::api::tokio::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::EngineError;

/// A model file in a hub repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    /// `owner/repo`.
    pub repo: String,
    /// The file's path in the repository.
    pub file: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubFile {
    /// Reads `hf:<owner>/<repo>/<file>[@<revision>]`; `None` for anything else (a local path).
    pub fn parse(spec: &str) -> Option<Result<HubFile, EngineError>> {
        let rest = spec.strip_prefix("hf:")?;
        let (path, revision) = match rest.rsplit_once('@') {
            Some((path, rev)) if !rev.is_empty() && !rev.contains('/') => (path, rev),
            _ => (rest, "main"),
        };
        let mut parts = path.trim_start_matches('/').splitn(3, '/');
        let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            return Some(Err(EngineError::Load(format!(
                "{spec:?} names no file: write hf:<owner>/<repo>/<file>[@<revision>]"
            ))));
        };
        if owner.is_empty() || name.is_empty() || file.is_empty() {
            return Some(Err(EngineError::Load(format!(
                "{spec:?} names no file: write hf:<owner>/<repo>/<file>[@<revision>]"
            ))));
        }
        Some(Ok(HubFile {
            repo: format!("{owner}/{name}"),
            file: file.to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The local copy of the file: from the cache, or downloaded into it first.
    pub async fn fetch(&self) -> Result<PathBuf, EngineError> {
        let mut builder = ApiBuilder::from_env();
        // `HF_TOKEN` wins over the token file, as in huggingface_hub; hf-hub reads only the file.
        if let Some(token) = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            builder = builder.with_token(Some(token.trim().to_string()));
        }
        let api = builder
            .with_progress(false)
            .build()
            .map_err(|e| EngineError::Load(format!("hub client: {e}")))?;
        let repo = Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone());
        tracing::info!(repo = %self.repo, file = %self.file, revision = %self.revision, "fetching model from the hub");
        api.repo(repo).get(&self.file).await.map_err(|e| {
            EngineError::Load(format!(
                "downloading {} from {}@{}: {e}",
                self.file, self.repo, self.revision
            ))
        })
    }
}

/// The local path of the model `spec` names: `spec` itself, or the hub file fetched.
pub async fn resolve_model(spec: &Path) -> Result<PathBuf, EngineError> {
    match spec.to_str().and_then(HubFile::parse) {
        None => Ok(spec.to_path_buf()),
        Some(file) => file?.fetch().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_repo_file_and_revision() {
        let f = HubFile::parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2.q4_1.gguf")
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.repo.as_str(), f.file.as_str(), f.revision.as_str()),
            (
                "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                "smollm2.q4_1.gguf",
                "main"
            )
        );
        let f = HubFile::parse("hf:o/r/sub/dir/m.gguf@v1.0")
            .unwrap()
            .unwrap();
        assert_eq!(
            (f.file.as_str(), f.revision.as_str()),
            ("sub/dir/m.gguf", "v1.0")
        );
        assert!(HubFile::parse("models/m.gguf").is_none());
        assert!(HubFile::parse("hf:owner/repo").unwrap().is_err());
        assert!(HubFile::parse("hf:owner//m.gguf").unwrap().is_err());
    }
}
