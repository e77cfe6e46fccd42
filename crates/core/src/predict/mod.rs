//! From a task and a labeling config to what a model is asked and what Label Studio is answered.

pub mod cache;
pub mod examples;
pub mod prompt;
pub mod task;
