//! The engine's side of `scripts/bench-engine.sh`: one JSON object of measurements on a GGUF.
//!
//! `bench_engine MODEL THREADS [PREFIX_CACHE_MB=128]` measures (each the median of 3 runs, unless said):
//! - prompt tokens/s: a 300-token prompt processed once (no cached prefix);
//! - decode tokens/s, one stream: 64 greedy tokens after a short prompt;
//! - aggregate decode tokens/s with 16 concurrent requests (continuous batching), measured like
//!   one stream (the time of 16 one-token requests subtracted), and the same with the prompts'
//!   time included; these two and one stream are the medians of 5 runs that measure one stream
//!   and then 16, and their ratio is the median of each run's own;
//! - choice scoring: a 5-way field after a 75-token prompt, seconds per field;
//! - peak RSS (VmHWM) of the process (the prompt cache fills up to its budget: every prompt
//!   here is new, so it holds memory without serving anything).

use std::time::Instant;

use batchlab_engine::{
    ChatMessage, ChatRequest, ChoiceQuestion, CompletionRequest, Engine, EngineConfig,
    SamplingParams,
};

/// Runs of the paired one-stream / 16-stream decode measurement (the ratio's median over them).
const RATIO_RUNS: usize = 5;

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A prompt of exactly `n` tokens (`salt` makes it unlike any cached one).
fn prompt_of(engine: &Engine, n: usize, salt: usize) -> String {
    let base = format!("Run {salt}. The history of the city is long and full of surprising turns, markets, rivers and bridges. ");
    let mut text = String::new();
    while engine.count_tokens(&text).unwrap() < n {
        text.push_str(&base);
    }
    let ids = engine.tokenize(&text).unwrap();
    engine.detokenize(&ids[..n], false).unwrap()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .expect("usage: bench_engine MODEL THREADS [PREFIX_CACHE_MB]");
    let threads: usize = args.next().map_or(2, |t| t.parse().expect("THREADS"));
    let prefix_cache_mb: usize = args
        .next()
        .map_or(128, |t| t.parse().expect("PREFIX_CACHE_MB"));
    let t = Instant::now();
    let engine = Engine::load(EngineConfig {
        model_path: model.into(),
        model_id: "bench".into(),
        max_queue: 64,
        max_batch: 16,
        prefix_cache_bytes: prefix_cache_mb << 20,
        threads: Some(threads),
        max_context: None,
        requantize: true,
        device: "cpu".into(),
        limits: Default::default(),
    })
    .expect("load");
    let load_s = t.elapsed().as_secs_f64();
    // Warm-up.
    engine
        .complete(CompletionRequest {
            prompt: "Hello".into(),
            params: greedy(4),
        })
        .await
        .unwrap();

    eprintln!("peak RSS after load and warm-up: {:.0} MB", peak_rss_mb());
    let mut prompt_tps = Vec::new();
    for run in 0..3 {
        let prompt = prompt_of(&engine, 300, run);
        let t = Instant::now();
        let c = engine
            .complete(CompletionRequest {
                prompt,
                params: greedy(1),
            })
            .await
            .unwrap();
        prompt_tps.push(c.prompt_tokens as f64 / t.elapsed().as_secs_f64());
    }

    // Decode, one stream: 65 tokens minus 1 token after prompts of the same length (neither
    // cached). Aggregate decode, measured like one stream: 16 requests for 1 token, then 16
    // others (not cached either) for 65; the generated tokens beyond the first over the extra
    // time. Each run measures both, one right after the other, and gives their ratio: the
    // machine's speed drifts (a shared host), and a ratio of neighbours in time is not moved by
    // a drift between two phases.
    eprintln!("peak RSS after prompts: {:.0} MB", peak_rss_mb());
    let time = |prompt: String, n: usize| {
        let engine = engine.clone();
        async move {
            let t = Instant::now();
            let c = engine
                .complete(CompletionRequest {
                    prompt,
                    params: greedy(n),
                })
                .await
                .unwrap();
            (t.elapsed().as_secs_f64(), c.completion_tokens)
        }
    };
    let together = |salt: usize, n: usize| {
        let engine = engine.clone();
        async move {
            let t = Instant::now();
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        let content =
                            format!("Tell story number {i} (run {salt}) about a lighthouse.");
                        let params = SamplingParams {
                            stop: vec![],
                            ..greedy(n)
                        };
                        engine
                            .chat(ChatRequest {
                                messages: vec![ChatMessage::new("user", content)],
                                params,
                            })
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut tokens = 0;
            for h in handles {
                tokens += h.await.unwrap().completion_tokens;
            }
            (t.elapsed().as_secs_f64(), tokens)
        }
    };
    let mut decode_tps = Vec::new();
    let mut aggregate_tps = Vec::new();
    let mut aggregate_e2e_tps = Vec::new();
    let mut over_one = Vec::new();
    for run in 0..RATIO_RUNS {
        let (one, _) = time(prompt_of(&engine, 20, 1000 + run), 1).await;
        let (many, n) = time(prompt_of(&engine, 20, 2000 + run), 65).await;
        decode_tps.push((n - 1) as f64 / (many - one).max(1e-9));
        let (one, first) = together(1000 + run, 1).await;
        let (many, tokens) = together(2000 + run, 65).await;
        aggregate_tps.push((tokens - first) as f64 / (many - one).max(1e-9));
        aggregate_e2e_tps.push(tokens as f64 / many);
        over_one.push(aggregate_tps[run] / decode_tps[run]);
    }

    eprintln!("peak RSS after aggregate: {:.0} MB", peak_rss_mb());
    let mut scoring_s = Vec::new();
    for run in 0..3 {
        let text = prompt_of(&engine, 60, 100 + run);
        let question = ChoiceQuestion {
            messages: vec![
                ChatMessage::new("system", "You are a helpful assistant."),
                ChatMessage::new("user", format!("{text}\nHow is the tone of this text? positive, negative, neutral, mixed or unclear?")),
            ],
            candidates: ["positive", "negative", "neutral", "mixed", "unclear"].iter().map(|s| s.to_string()).collect(),
        };
        let t = Instant::now();
        let s = engine.score_choices(vec![question]).await.unwrap();
        scoring_s.push(t.elapsed().as_secs_f64());
        assert_eq!(s[0].probs.len(), 5);
        if run == 0 {
            eprintln!("scoring prompt tokens: {}", s[0].prompt_tokens);
        }
    }

    eprintln!("peak RSS after scoring: {:.0} MB", peak_rss_mb());
    println!(
        "{}",
        serde_json::json!({
            "engine": "batchlab",
            "threads": threads,
            "load_s": load_s,
            "prompt_tps": median(prompt_tps),
            "decode_tps": median(decode_tps),
            "aggregate16_tps": median(aggregate_tps),
            "aggregate16_e2e_tps": median(aggregate_e2e_tps),
            "aggregate16_over_one": median(over_one),
            "scoring_s": median(scoring_s),
            "peak_rss_mb": peak_rss_mb(),
        })
    );
}
