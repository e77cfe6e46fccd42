//! The engine's one error type, [`EngineError`], and the helpers that turn load and candle
//! failures into it.

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded (missing file, unsupported architecture or tokenizer...).
    #[error("cannot load model: {0}")]
    Load(String),
    /// The chat template failed to render.
    #[error("chat template error: {0}")]
    Template(String),
    /// The request is not valid (empty messages, prompt too long, bad parameters...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request queue is full.
    #[error("engine overloaded: request queue is full")]
    Overloaded,
    /// The model thread is gone.
    #[error("engine stopped")]
    Stopped,
    /// candle failed during a forward pass.
    #[error("inference error: {0}")]
    Inference(String),
}

pub(crate) fn load_err(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{context}: {e}"))
}

/// A candle failure during a forward pass or sampling, as an [`EngineError::Inference`].
pub(crate) fn inference(e: candle_core::Error) -> EngineError {
    EngineError::Inference(e.to_string())
}
