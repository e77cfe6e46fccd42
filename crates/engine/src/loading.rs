//! Loading a model: reading the GGUF, building its tokenizer (or the `tokenizer.json` beside
//! it), chat template, end-of-generation tokens and model, one warm-up forward pass, and the
//! [`Scheduler`] that will own it all on the model thread.
//!
//! Everything here runs once, in [`Engine::load`](crate::Engine::load), before the model thread
//! starts; tests call [`load_parts`] to get the pieces without a thread.

use std::collections::HashSet;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::error::load_err;
use crate::kernels::{cpu_features, packed};
use crate::metrics::EngineMetrics;
use crate::model;
use crate::scheduler::{self, Scheduler};
use crate::template::{ChatTemplate, CHATML_TEMPLATE, GEMMA_TEMPLATE};
use crate::tokenizer::{self, GgufTokenizer};
use crate::{EngineConfig, EngineError, RequestLimits};

/// The candle device `name` names (see [`EngineConfig::device`]).
fn select_device(name: &str) -> Result<Device, EngineError> {
    let ordinal = match name.trim() {
        "" | "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EngineError::Load(format!(
                    "unknown device {other:?}: use \"cpu\", \"cuda\" or \"cuda:N\""
                ))
            })?,
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Load(format!(
            "device {name:?} needs a build with CUDA support: cargo build --release --features cuda"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| EngineError::Load(format!("CUDA device {ordinal}: {e}")))
}

/// Everything [`Engine::load`](crate::Engine::load) builds before it starts the model thread.
pub(crate) struct Loaded {
    /// The tokenizer (the engine encodes with it, the model thread decodes).
    pub(crate) tokenizer: Arc<GgufTokenizer>,
    /// The chat template.
    pub(crate) template: ChatTemplate,
    /// The model thread's loop, with the model, ready to run.
    pub(crate) scheduler: Scheduler,
    /// Most tokens of one request (see [`Engine::context_length`](crate::Engine::context_length)).
    pub(crate) context_length: usize,
    /// Weight tensors requantized to Q8_0.
    pub(crate) requantized: usize,
    /// The token that closes an assistant turn.
    pub(crate) end_of_turn: Option<u32>,
    /// Hex SHA-256 of the GGUF file: the model's identity (see
    /// [`Engine::model_sha256`](crate::Engine::model_sha256)).
    pub(crate) model_sha256: String,
}

/// Hex SHA-256 of the file at `path`, read in 1 MiB pieces (what Hugging Face lists for a file,
/// so the identity can be checked against the hub).
pub(crate) fn file_sha256(path: &std::path::Path) -> Result<String, EngineError> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| load_err(&format!("cannot open {}", path.display()), e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| load_err(&format!("cannot read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Reads the GGUF and builds tokenizer, template and model (no thread).
pub(crate) fn load_parts(config: &EngineConfig) -> Result<Loaded, EngineError> {
    let start = Instant::now();
    let device = select_device(&config.device)?;
    if let Some(n) = config.threads.filter(|&n| n > 0) {
        // candle reads these once, when its thread pools are first used (see EngineConfig).
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let path = &config.model_path;
    let file = std::fs::File::open(path)
        .map_err(|e| load_err(&format!("cannot open {}", path.display()), e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        load_err(
            &format!("{} is not a readable GGUF file", path.display()),
            e,
        )
    })?;

    let tokenizer = Arc::new(load_tokenizer(path, &content)?);
    let model_sha256 = file_sha256(path)?;

    let template = chat_template(path, &content, &tokenizer, config.limits)?;

    let mut eos = HashSet::new();
    eos.extend(tokenizer.eos_id);
    if let Some(v) = content.metadata.get("tokenizer.ggml.eot_token_id") {
        if let Ok(id) = v.to_u32() {
            eos.insert(id);
        }
    }
    for t in tokenizer::END_OF_GENERATION {
        eos.extend(tokenizer.control_id(t));
    }
    // The token that closes an assistant turn: the chat format's own marker when it has one,
    // else the GGUF's end-of-turn or end-of-sequence token.
    let end_of_turn = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"]
        .iter()
        .find_map(|t| tokenizer.control_id(t))
        .or_else(|| {
            content
                .metadata
                .get("tokenizer.ggml.eot_token_id")
                .and_then(|v| v.to_u32().ok())
        })
        .or(tokenizer.eos_id);

    let max_context = config.max_context.filter(|&m| m > 0);
    let model::LoadedModel {
        model,
        requantized,
        gguf_context: gguf_ctx,
    } = model::load(
        &content,
        &mut reader,
        &device,
        config.requantize,
        max_context,
    )?;
    let context_length = max_context.map_or(gguf_ctx, |m| m.min(gguf_ctx));
    if context_length < 2 {
        return Err(EngineError::Load(format!(
            "context length {context_length} is too small"
        )));
    }
    warm_up(&model, &tokenizer)?;
    tracing::info!(
        model_id = %config.model_id,
        path = %path.display(),
        sha256 = %model_sha256,
        vocab = tokenizer.vocab_size(),
        control_tokens = tokenizer.control_tokens().len(),
        context_length,
        gguf_context_length = gguf_ctx,
        requantized_to_q8_0 = requantized,
        device = %config.device,
        packed_kernel = if device.is_cpu() {
            packed::Isa::best().map_or("none", packed::Isa::name)
        } else {
            "none"
        },
        amx_tiles = device.is_cpu() && cpu_features::amx_int8(),
        load_ms = start.elapsed().as_millis() as u64,
        "model loaded"
    );

    let model_shape = model.cache_shape();
    let scheduler = Scheduler {
        model,
        tokenizer: tokenizer.clone(),
        eos,
        context_length,
        prefill_chunk: scheduler::PREFILL_CHUNK,
        max_batch: config.max_batch.max(1),
        metrics: Arc::new(EngineMetrics::new(&config.model_id)),
        prefix: model::prefix::PrefixCache::new(&model_shape, config.prefix_cache_bytes),
    };
    Ok(Loaded {
        tokenizer,
        template,
        scheduler,
        context_length,
        requantized,
        end_of_turn,
        model_sha256,
    })
}

/// The model's chat template: the GGUF's `tokenizer.chat_template`, or Gemma's turn format or
/// ChatML when it has none; `path` only names the file in the warning.
pub(crate) fn chat_template(
    path: &std::path::Path,
    content: &gguf_file::Content,
    tokenizer: &GgufTokenizer,
    limits: RequestLimits,
) -> Result<ChatTemplate, EngineError> {
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_str(i))
            .unwrap_or_default()
            .to_string()
    };
    let bos_token = token_text(tokenizer.bos_id);
    let eos_token = token_text(tokenizer.eos_id);
    let template_src = match content.metadata.get("tokenizer.chat_template") {
        Some(v) => v
            .to_string()
            .map_err(|e| load_err("tokenizer.chat_template", e))?
            .clone(),
        None => {
            // Gemma's vocabulary has its own turn markers; everything else gets ChatML.
            let (name, template) = if tokenizer.control_id("<start_of_turn>").is_some() {
                ("Gemma's turn format", GEMMA_TEMPLATE)
            } else {
                ("ChatML", CHATML_TEMPLATE)
            };
            tracing::warn!(model = %path.display(), "GGUF has no tokenizer.chat_template; using {name}");
            template.to_string()
        }
    };
    ChatTemplate::new(&template_src, bos_token, eos_token, limits)
}

/// The tokenizer: a `tokenizer.json` beside the model file overrides the one the GGUF's
/// metadata describes (for tokenizers the engine cannot build from metadata, or fixes to them).
fn load_tokenizer(
    model_path: &std::path::Path,
    content: &gguf_file::Content,
) -> Result<GgufTokenizer, EngineError> {
    let beside = model_path.with_file_name("tokenizer.json");
    if !beside.is_file() {
        return GgufTokenizer::from_gguf(content);
    }
    let vocab_size = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(usize::MAX, |t| t.len());
    tracing::info!(path = %beside.display(), "tokenizer.json beside the model overrides the GGUF's tokenizer");
    GgufTokenizer::from_tokenizer_json(&beside, content, vocab_size)
}

/// One forward pass before the engine reports itself loaded: it touches every weight, sizes
/// candle's thread pools, and proves the model runs, so that readiness means "answers now".
fn warm_up(model: &model::Model, tokenizer: &GgufTokenizer) -> Result<(), EngineError> {
    let token = tokenizer.bos_id.or(tokenizer.eos_id).unwrap_or(0);
    let mut cache = model::SeqCache::new(model.cache_shape(), 1, model.device())
        .map_err(|e| load_err("warm-up", e))?;
    let mut segment = [model::Segment {
        cache: &mut cache,
        tokens: &[token],
        want: model::Want::Last,
        prompt: false,
    }];
    model
        .forward(&mut segment)
        .map_err(|e| load_err("warm-up forward pass", e))?;
    Ok(())
}

#[cfg(test)]
mod tokenizer_json_tests {
    use crate::loading::load_parts;
    use crate::EngineConfig;

    /// A `tokenizer.json` beside the model replaces the GGUF's tokenizer: the same tokenizer
    /// with a lower-casing normalizer added encodes "HELLO" as "hello".
    #[test]
    fn tokenizer_json_beside_the_model_overrides_the_gguf() {
        let Some(model) = crate::testing::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
            return;
        };
        let config = |path: std::path::PathBuf| EngineConfig {
            model_path: path,
            model_id: "t".into(),
            max_queue: 1,
            max_batch: 1,
            prefix_cache_bytes: 0,
            threads: Some(2),
            max_context: Some(64),
            requantize: true,
            device: "cpu".into(),
            limits: Default::default(),
        };
        let gguf = load_parts(&config(model.clone())).unwrap().tokenizer;
        let dir = tempfile::tempdir().unwrap();
        let linked = dir.path().join("model.gguf");
        std::os::unix::fs::symlink(model.canonicalize().unwrap(), &linked).unwrap();
        let json_path = dir.path().join("tokenizer.json");
        gguf.save_json(&json_path).unwrap();
        // The GGUF's own tokenizer written out and read back: the same ids.
        let same = load_parts(&config(linked.clone())).unwrap().tokenizer;
        assert_eq!(
            same.encode_plain("Year 2024, <|im_start|> ok").unwrap(),
            gguf.encode_plain("Year 2024, <|im_start|> ok").unwrap()
        );
        assert_eq!(same.control_id("<|im_end|>"), gguf.control_id("<|im_end|>"));
        // With a lower-casing normalizer, the override shows.
        let mut doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
        doc["normalizer"] = serde_json::json!({"type": "Lowercase"});
        std::fs::write(&json_path, doc.to_string()).unwrap();
        let changed = load_parts(&config(linked)).unwrap().tokenizer;
        assert_ne!(
            gguf.encode_plain("HELLO").unwrap(),
            gguf.encode_plain("hello").unwrap()
        );
        assert_eq!(
            changed.encode_plain("HELLO").unwrap(),
            gguf.encode_plain("hello").unwrap()
        );
    }
}
