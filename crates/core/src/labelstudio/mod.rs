//! Label Studio: labeling-config parsing, the task / annotation / prediction / webhook types,
//! and the REST client batchlab uses to set projects up and import tasks.

/// Labeling-config parsing: the objects, the predictable controls and what batchlab skips.
pub mod config;
/// Result regions and the per-control values read out of annotations and predictions.
pub mod region;
/// Webhook actions and tolerant readers of the objects events carry.
pub mod webhook;
