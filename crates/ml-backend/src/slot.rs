//! The engine slot: loading starts with the service and runs in the background, so the service
//! answers from the first second: `/health` and `/setup` with 503 until the model is loaded
//! (the `model_version` names the model file's hash), the OpenAI routes by waiting for it.

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

/// Ends the loading of an [`EngineSlot::pending`] slot.
#[derive(Debug)]
pub struct Loader {
    tx: watch::Sender<ModelState>,
}

impl Loader {
    /// The outcome of loading: the slot is ready, or failed with the reason.
    pub fn finish(self, loaded: Result<Engine, batchlab_inference::engine::EngineError>) {
        let state = match loaded {
            Ok(engine) => ModelState::Ready(engine),
            Err(e) => {
                tracing::error!(error = %e, "model failed to load");
                ModelState::Failed(Arc::from(e.to_string()))
            }
        };
        let _ = self.tx.send(state);
    }
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
        let (slot, loader) = EngineSlot::pending();
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
            if let Ok(engine) = &loaded {
                tracing::info!(
                    model = engine.model_id(),
                    sha256 = engine.model_sha256(),
                    seconds = started.elapsed().as_secs_f64(),
                    "model loaded"
                );
            }
            loader.finish(loaded);
        });
        slot
    }

    /// A slot still loading, and the [`Loader`] that ends its loading: what [`EngineSlot::load`]
    /// runs on, and how a test holds a service in its loading state.
    pub fn pending() -> (EngineSlot, Loader) {
        let (tx, rx) = watch::channel(ModelState::Loading);
        (EngineSlot { state: rx }, Loader { tx })
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

    /// Refuses while the model is still loading (503, as `/health` answers then): a
    /// `model_version` answered now could not name the model file, and nothing can be predicted.
    pub fn refuse_while_loading(&self) -> Result<(), MlError> {
        match &*self.state.borrow() {
            ModelState::Loading => Err(MlError::Unavailable(
                "the model is loading; retry when /health answers 200".into(),
            )),
            ModelState::Ready(_) | ModelState::Failed(_) => Ok(()),
        }
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
