//! The engine slot: loading starts with the service and runs in the background, so `/health`
//! and `/setup` answer from the first second; requests that need the model wait for it.

use std::sync::Arc;
use std::time::Instant;

use batchlab_core::config::EngineSettings;
use batchlab_inference::engine::Engine;
use tokio::sync::watch;

use crate::error::MlError;

/// Where the model is.
#[derive(Clone, Debug)]
pub enum ModelState {
    /// Loading has not finished.
    Loading,
    /// Ready to answer.
    Ready(Engine),
    /// Loading failed; the reason, for error messages.
    Failed(Arc<str>),
}

/// The engine slot shared by every handler.
#[derive(Clone, Debug)]
pub struct EngineSlot {
    state: watch::Receiver<ModelState>,
}

impl EngineSlot {
    /// Starts loading the model of `settings` (fetched first when it names a hub file) in the
    /// background.
    pub fn load(settings: &EngineSettings) -> EngineSlot {
        let (tx, rx) = watch::channel(ModelState::Loading);
        let mut config = batchlab_inference::engine_config(settings);
        tokio::spawn(async move {
            let started = Instant::now();
            let loaded =
                match batchlab_inference::engine::hub::resolve_model(&config.model_path).await {
                    Ok(path) => {
                        config.model_path = path;
                        tokio::task::spawn_blocking(move || Engine::load(config))
                            .await
                            .unwrap_or_else(|e| {
                                Err(batchlab_inference::engine::EngineError::Load(e.to_string()))
                            })
                    }
                    Err(e) => Err(e),
                };
            let state = match loaded {
                Ok(engine) => {
                    tracing::info!(
                        model = engine.model_id(),
                        seconds = started.elapsed().as_secs_f64(),
                        "model loaded"
                    );
                    ModelState::Ready(engine)
                }
                Err(e) => {
                    tracing::error!(error = %e, "model failed to load");
                    ModelState::Failed(Arc::from(e.to_string()))
                }
            };
            let _ = tx.send(state);
        });
        EngineSlot { state: rx }
    }

    /// A slot that never loads anything (tests of the protocol without a model).
    pub fn unavailable(reason: &str) -> EngineSlot {
        let (_tx, rx) = watch::channel(ModelState::Failed(Arc::from(reason)));
        EngineSlot { state: rx }
    }

    /// A slot holding an engine already loaded.
    pub fn ready(engine: Engine) -> EngineSlot {
        let (_tx, rx) = watch::channel(ModelState::Ready(engine));
        EngineSlot { state: rx }
    }

    /// The state now.
    pub fn now(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// The engine, once loading has ended; a model that failed to load is the 503 the OpenAI
    /// routes answer, naming why.
    pub async fn engine(&self) -> Result<Engine, MlError> {
        match self.wait().await {
            ModelState::Ready(engine) => Ok(engine),
            ModelState::Failed(reason) => Err(MlError::Unavailable(format!(
                "the model is not loaded: {reason}"
            ))),
            ModelState::Loading => Err(MlError::Unavailable("the model is loading".into())),
        }
    }

    /// Waits until loading has ended (either way) and returns the outcome.
    pub async fn wait(&self) -> ModelState {
        let mut rx = self.state.clone();
        let outcome = match rx.wait_for(|s| !matches!(s, ModelState::Loading)).await {
            Ok(state) => state.clone(),
            Err(_) => ModelState::Failed(Arc::from("the model loader stopped")),
        };
        outcome
    }
}
