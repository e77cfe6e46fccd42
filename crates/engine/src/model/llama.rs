//! The llama family (SmolLM2, Llama 2/3, Mistral-style) on candle tensors and candle's quantized
//! matmuls, written for a server: one forward runs a batch of *segments* (a chunk of one
//! sequence's tokens each, of any length, at any position), so prompts and decode steps of
//! different sequences share every weight read; each segment attends to its own sequence's
//! [`SeqCache`]; logits come back for the positions asked for, not only the last.

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::cache::{CacheShape, SeqCache};
use super::weights::{Embedding, GgufWeights};

/// Hyper-parameters read from the GGUF.
#[derive(Clone, Debug)]
pub(crate) struct LlamaConfig {
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) hidden: usize,
    pub(crate) rope_base: f32,
    pub(crate) rms_eps: f64,
    /// The GGUF's training context.
    pub(crate) context_length: usize,
}

impl LlamaConfig {
    /// Reads `llama.*` metadata.
    pub(crate) fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("llama.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks llama.{k}")))
        };
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = match ct.metadata.get("llama.rope.dimension_count") {
            Some(v) => v.to_u32()? as usize,
            None => hidden / heads,
        };
        Ok(Self {
            layers: md("block_count")?.to_u32()? as usize,
            heads,
            kv_heads: md("attention.head_count_kv").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(heads),
            head_dim,
            hidden,
            rope_base: md("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0),
            rms_eps: md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            context_length: md("context_length")?.to_u32()? as usize,
        })
    }
}

#[derive(Clone)]
struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// What logits a segment wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// None (a prompt chunk that is not the last).
    Nothing,
    /// The last position's (generation).
    Last,
    /// Every position's (scoring).
    All,
}

/// One sequence's share of a batched forward.
pub(crate) struct Segment<'a> {
    /// The sequence's cache; the tokens are appended to it.
    pub(crate) cache: &'a mut SeqCache,
    /// Tokens to process, at positions `cache.len()..`.
    pub(crate) tokens: &'a [u32],
    /// Logits to return.
    pub(crate) want: Want,
}

/// A loaded llama-family model.
#[derive(Clone)]
pub(crate) struct Llama {
    config: LlamaConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    max_len: usize,
}

impl Llama {
    /// Builds the model from GGUF weights, with RoPE tables for `max_len` positions.
    pub(crate) fn load(config: LlamaConfig, w: &mut GgufWeights<'_>, max_len: usize) -> Result<Self> {
        let device = w.device().clone();
        let token_embd = w.qtensor("token_embd.weight")?;
        let output = match w.try_qtensor("output.weight")? {
            Some(t) => QMatMul::from_arc(t)?,
            // Tied embeddings: the output projection and the lookup share one quantized tensor.
            None => QMatMul::from_arc(token_embd.clone())?,
        };
        let embedding = Embedding::new(token_embd, config.hidden)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: w.f32(&p("attn_norm"))?,
                wq: QMatMul::from_arc(w.qtensor(&p("attn_q"))?)?,
                wk: QMatMul::from_arc(w.qtensor(&p("attn_k"))?)?,
                wv: QMatMul::from_arc(w.qtensor(&p("attn_v"))?)?,
                wo: QMatMul::from_arc(w.qtensor(&p("attn_output"))?)?,
                ffn_norm: w.f32(&p("ffn_norm"))?,
                w_gate: QMatMul::from_arc(w.qtensor(&p("ffn_gate"))?)?,
                w_up: QMatMul::from_arc(w.qtensor(&p("ffn_up"))?)?,
                w_down: QMatMul::from_arc(w.qtensor(&p("ffn_down"))?)?,
            });
        }
        let norm = w.f32("output_norm.weight")?;
        let (cos, sin) = rope_tables(config.head_dim, config.rope_base, max_len, &device)?;
        Ok(Self { config, embedding, layers, norm, output, cos, sin, device, max_len })
    }

    /// The cache shape sequences of this model need.
    pub(crate) fn cache_shape(&self) -> CacheShape {
        CacheShape {
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
            max_len: self.max_len,
        }
    }

    /// The device the weights live on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Runs every segment's tokens through the model in one pass, appends their keys and
    /// values to their caches, and returns per segment the logits it asked for
    /// (`[n, vocab]`, f32; `None` for [`Want::Nothing`]).
    pub(crate) fn forward(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Tensor>>> {
        let cfg = &self.config;
        let total: usize = segments.iter().map(|s| s.tokens.len()).sum();
        if total == 0 || segments.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("every segment needs at least one token")
        }
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for s in segments.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
            let start = s.cache.len();
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        if positions.iter().any(|&p| p as usize >= self.max_len) {
            candle_core::bail!("position past the context of {} tokens", self.max_len)
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;

        let mut x = self.embedding.lookup(&ids, &self.device)?; // [T, hidden]
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let group = cfg.heads / cfg.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            let q = layer.wq.forward(&h)?;
            let k = layer.wk.forward(&h)?;
            let v = layer.wv.forward(&h)?;
            // [T, heads*hd] -> [1, heads, T, hd] for RoPE (interleaved pairs, as GGUF llama stores Q/K).
            let to_heads = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((total, n, cfg.head_dim))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)
            };
            let q = candle_nn::rotary_emb::rope_i(&to_heads(q, cfg.heads)?, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_i(&to_heads(k, cfg.kv_heads)?, &cos, &sin)?.squeeze(0)?;
            let v = to_heads(v, cfg.kv_heads)?.squeeze(0)?;
            let q = (q * scale)?;

            let mut offset = 0;
            for s in segments.iter() {
                let n = s.tokens.len();
                let ks = k.narrow(1, offset, n)?.contiguous()?;
                let vs = v.narrow(1, offset, n)?.contiguous()?;
                s.cache.write(li, &ks, &vs)?;
                offset += n;
            }
            let o = if self.device.is_cpu() {
                let kv: Vec<super::attention::SegmentKv<'_>> = segments
                    .iter()
                    .map(|s| {
                        let (k, v) = s.cache.layer(li);
                        super::attention::SegmentKv { k, v, past: s.cache.len(), n: s.tokens.len() }
                    })
                    .collect();
                super::attention::attend(&q.contiguous()?, &kv, group)?
            } else {
                let mut outs = Vec::with_capacity(segments.len());
                let mut offset = 0;
                for s in segments.iter() {
                    let n = s.tokens.len();
                    let qs = q.narrow(1, offset, n)?.contiguous()?;
                    outs.push(self.attend_matmul(&qs, s.cache, li, s.cache.len(), n)?);
                    offset += n;
                }
                Tensor::cat(&outs, 1)?
            };
            let o = o.transpose(0, 1)?.contiguous()?.reshape((total, cfg.heads * cfg.head_dim))?;
            x = (x + layer.wo.forward(&o)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        for s in segments.iter_mut() {
            s.cache.advance(s.tokens.len());
        }

        // Logits only for the rows asked for.
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for s in segments.iter() {
            let n = s.tokens.len() as u32;
            match s.want {
                Want::Nothing => {}
                Want::Last => rows.push(offset + n - 1),
                Want::All => rows.extend(offset..offset + n),
            }
            offset += n;
        }
        let logits = if rows.is_empty() {
            None
        } else {
            let idx = Tensor::new(rows.as_slice(), &self.device)?;
            let h = x.index_select(&idx, 0)?;
            let h = candle_nn::ops::rms_norm(&h, &self.norm, cfg.rms_eps as f32)?;
            Some(self.output.forward(&h)?.to_dtype(DType::F32)?)
        };
        let mut out = Vec::with_capacity(segments.len());
        let mut at = 0;
        for s in segments.iter() {
            let n = match s.want {
                Want::Nothing => 0,
                Want::Last => 1,
                Want::All => s.tokens.len(),
            };
            out.push(match (&logits, n) {
                (Some(l), n) if n > 0 => Some(l.narrow(0, at, n)?),
                _ => None,
            });
            at += n;
        }
        Ok(out)
    }
}

impl Llama {
    /// Attention by batched matrix products (devices other than the CPU): fast, but a row's
    /// last bits depend on the shapes it is computed with (see `attention`).
    fn attend_matmul(&self, qs: &Tensor, cache: &SeqCache, li: usize, past: usize, n: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let group = cfg.heads / cfg.kv_heads;
        let (kc, vc) = cache.view(li, n)?; // [kv, past+n, hd]
        // Heads sharing a KV head are stacked as rows: [kv, group*n, hd].
        let qs = qs.reshape((cfg.kv_heads, group * n, cfg.head_dim))?;
        let mut att = qs.matmul(&kc.t()?)?;
        if n > 1 {
            let mask = causal_mask(n, past, &self.device)?;
            att = att
                .reshape((cfg.kv_heads, group, n, past + n))?
                .broadcast_add(&mask)?
                .reshape((cfg.kv_heads, group * n, past + n))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&vc)?.reshape((cfg.heads, n, cfg.head_dim))
    }
}

/// `[n, past + n]` additive mask: query `i` (at position `past + i`) sees keys `0..=past + i`.
fn causal_mask(n: usize, past: usize, device: &Device) -> Result<Tensor> {
    let cols = past + n;
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..cols).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(data, (n, cols), device)
}

/// RoPE cosine and sine tables, `[max_len, head_dim / 2]`.
pub(crate) fn rope_tables(head_dim: usize, base: f32, max_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32)).collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
    let pos = Tensor::arange(0u32, max_len as u32, device)?.to_dtype(DType::F32)?.reshape((max_len, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
