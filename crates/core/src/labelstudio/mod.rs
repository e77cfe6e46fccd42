//! Label Studio: labeling-config parsing, the task / annotation / prediction / webhook types,
//! and the REST client batchlab uses to set projects up and import tasks.

/// Answers against a config: reading answers into values, values into regions, validation.
pub mod answer;
/// The REST client: projects, imports, ML backends, webhooks, tasks and annotations.
pub mod client;
/// Labeling-config parsing: the objects, the predictable controls and what batchlab skips.
pub mod config;
/// Webhook actions and tolerant readers of the objects events carry.
pub mod event;
/// Which Label Studio an id belongs to: state is keyed by (instance, id).
pub mod instance;
/// Result regions and the per-control values read out of annotations and predictions.
pub mod region;
/// One command that connects a Label Studio project to batchlab, safe to run twice.
pub mod setup;
/// The `model_version` batchlab reports to Label Studio.
pub mod version;
