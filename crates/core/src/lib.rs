//! batchlab-core: what batchlab's binaries share and no model needs: configuration, the
//! database store, the blob store for file bodies, OpenAI and Label Studio types, curation
//! (webhook events, milestone exports, accuracy), retention (deleting expired files and old
//! webhook events), shared HTTP layers and telemetry.
//!
//! Driving a model lives in `batchlab-inference`; this crate does not depend on the engine, so
//! batchlab-api links no model code.

pub mod backoff;
pub mod blob;
pub mod config;
pub mod curation;
pub mod error;
pub mod http;
pub mod labelstudio;
pub mod openai;
pub mod prediction_key;
pub mod prompt;
pub mod retention;
pub mod secret;
pub mod store;
pub mod telemetry;
/// Fresh databases for tests; compiled only with the `testing` feature (dev-dependencies).
#[cfg(feature = "testing")]
pub mod testing;
