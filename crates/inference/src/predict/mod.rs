//! Predictions for Label Studio tasks: one task's answer from the model (`task`) and the
//! ground-truth examples that teach it (`examples`), and classifiers learned from annotations
//! (`learn`).

pub mod examples;
pub mod learn;
pub mod task;
