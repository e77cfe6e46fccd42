//! Predictions for Label Studio tasks: one task's answer from the model (`task`) and the
//! ground-truth examples that teach it (`examples`).

pub mod examples;
pub mod task;
