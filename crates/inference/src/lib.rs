//! batchlab-inference: what drives a model. The batch runner (queued batches through the
//! engine, line by line, exactly once), predictions for Label Studio tasks (prompts, scoring,
//! calibration, few-shot examples learned from ground truth), and the conversion between
//! OpenAI's requests and results and the engine's own types.
//!
//! Only the binaries that run a model (batchlab-worker, batchlab-ml-backend) depend on this
//! crate; batchlab-api does not, so it links no model code.

pub mod completions;
pub mod embeddings;
pub mod predict;
pub mod runner;

use batchlab_core::config::EngineSettings;

/// The in-process inference engine, for the binaries that load one.
pub use batchlab_engine as engine;

/// The engine's own configuration for the `[engine]` settings (0 means "the engine's default").
pub fn engine_config(settings: &EngineSettings) -> engine::EngineConfig {
    engine::EngineConfig {
        model_path: settings.model_path.clone(),
        model_id: settings.model_id.clone(),
        max_queue: settings.max_queue,
        max_batch: settings.max_batch,
        prefix_cache_bytes: settings.prefix_cache_mb << 20,
        threads: (settings.threads > 0).then_some(settings.threads),
        max_context: (settings.max_context > 0).then_some(settings.max_context),
        requantize: settings.requantize,
        device: settings.device.clone(),
        limits: engine::RequestLimits {
            max_messages: settings.max_messages,
            max_chat_bytes: settings.max_chat_bytes,
            max_candidates: settings.max_candidates,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration's defaults (written out in batchlab-core, which knows no engine) are
    /// the engine's own.
    #[test]
    fn default_settings_give_the_engine_defaults() {
        let config = engine_config(&EngineSettings::default());
        assert_eq!(config.limits, engine::RequestLimits::default());
    }
}
