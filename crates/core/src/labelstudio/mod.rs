//! Label Studio: labeling-config parsing, the task / annotation / prediction / webhook types,
//! and the REST client batchlab uses to set projects up and import tasks.

pub mod client;
pub mod setup;
pub mod version;
