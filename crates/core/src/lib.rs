//! batchlab-core: everything batchlab's three binaries share — configuration, the database
//! store, the blob store for file bodies, OpenAI wire types, the batch runner and the engine.

pub mod blob;
pub mod config;
pub mod curation;
pub mod http;
pub mod labelstudio;
pub mod openai;
pub mod predict;
pub mod runner;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod testing;

/// The in-process inference engine (its own crate so model code builds apart from the rest).
pub use batchlab_engine as engine;
