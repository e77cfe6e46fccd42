//! Runs a batch input file straight through the engine, with no API, queue or database: the
//! baseline `scripts/bench-batch.sh` compares the whole batch path against.
//!
//! Usage: `engine_direct MODEL.gguf REQUESTS.jsonl [CONCURRENCY]`; prints one JSON object.

use std::collections::HashSet;
use std::time::Instant;

use batchlab_inference::completions::parse_request_line;
use batchlab_inference::engine::{Engine, EngineConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model, input) = match (args.get(1), args.get(2)) {
        (Some(m), Some(i)) => (m.clone(), i.clone()),
        _ => return Err("usage: engine_direct MODEL.gguf REQUESTS.jsonl [CONCURRENCY]".into()),
    };
    let concurrency: usize = args.get(3).map(|c| c.parse()).transpose()?.unwrap_or(4);
    let engine = Engine::load(EngineConfig {
        model_path: model.into(),
        model_id: "bench".into(),
        max_queue: 1024,
        max_batch: 16,
        prefix_cache_bytes: 64 << 20,
        threads: None,
        max_context: None,
        requantize: true,
        device: "cpu".into(),
        limits: Default::default(),
    })?;
    let mut seen = HashSet::new();
    let mut calls = Vec::new();
    for line in std::fs::read_to_string(&input)?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        calls.push(
            parse_request_line(line, "/v1/chat/completions", &mut seen, &Default::default())
                .map_err(|e| e.message)?
                .request,
        );
    }
    let started = Instant::now();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for call in calls {
        let (engine, permit) = (engine.clone(), permits.clone().acquire_owned().await?);
        tasks.spawn(async move {
            let _permit = permit;
            call.run(&engine).await
        });
    }
    let (mut requests, mut tokens) = (0usize, 0usize);
    while let Some(done) = tasks.join_next().await {
        tokens += done??.output_tokens;
        requests += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"requests": requests, "seconds": seconds, "completion_tokens": tokens})
    );
    Ok(())
}
