//! batchlab's own model code: architectures written on candle tensors and quantized matmuls,
//! with the KV cache owned by the engine ([`kv_cache`]) so that sequences of different lengths
//! batch together, any position's logits come back, and one prompt's cache serves several
//! continuations. The CPU kernels it calls live apart, in [`crate::kernels`].

pub(crate) mod attention;
pub(crate) mod decoder;
pub(crate) mod kv_cache;
pub(crate) mod prefix;
pub(crate) mod weights;

use candle_core::quantized::gguf_file;
use candle_core::Device;

pub(crate) use decoder::{Segment, Want};
pub(crate) use kv_cache::SeqCache;

use crate::error::load_err;
use crate::EngineError;
use weights::{GgufWeights, ReadSeek};

/// The loaded model.
pub(crate) type Model = decoder::Decoder;

/// What [`load`] built.
pub(crate) struct LoadedModel {
    pub(crate) model: Model,
    /// Tensors requantized to Q8_0.
    pub(crate) requantized: usize,
    /// The GGUF's training context.
    pub(crate) gguf_context: usize,
}

/// Builds the model the GGUF describes, with room for `max_context` positions at most
/// (the GGUF's own context when `None`).
pub(crate) fn load(
    content: &gguf_file::Content,
    reader: &mut dyn ReadSeek,
    device: &Device,
    requantize: bool,
    max_context: Option<usize>,
) -> Result<LoadedModel, EngineError> {
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| EngineError::Load("GGUF has no general.architecture".into()))?;
    let Some(arch) = decoder::Arch::from_name(&arch) else {
        let supported = decoder::Arch::ALL.map(decoder::Arch::name);
        return Err(EngineError::Load(format!(
            "unsupported architecture {arch:?} (supported: {supported:?})"
        )));
    };
    let config = decoder::DecoderConfig::from_gguf(arch, content)
        .map_err(|e| load_err("reading the model's hyper-parameters", e))?;
    let gguf_context = config.context_length;
    let max_len = max_context.map_or(gguf_context, |m| m.min(gguf_context));
    let mut weights = GgufWeights::new(content, reader, device, requantize);
    let model = decoder::Decoder::load(config, &mut weights, max_len)
        .map_err(|e| load_err("cannot build the model", e))?;
    Ok(LoadedModel {
        model,
        requantized: weights.requantized(),
        gguf_context,
    })
}

#[cfg(test)]
mod tests {
    use super::decoder::Arch;

    /// Every architecture is found by its own GGUF name, and other names are refused.
    #[test]
    fn architectures_are_found_by_their_gguf_names() {
        for arch in Arch::ALL {
            assert_eq!(Arch::from_name(arch.name()), Some(arch));
        }
        let names = Arch::ALL.map(Arch::name);
        assert_eq!(names, ["llama", "qwen2", "qwen3", "phi3", "gemma3"]);
        for other in ["mamba", "qwen2moe", "phi2", "gemma2", "LLAMA", ""] {
            assert_eq!(Arch::from_name(other), None, "{other}");
        }
    }
}
