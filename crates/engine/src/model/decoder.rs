//! Decoder-only transformers on candle tensors and candle's quantized matmuls, written for a
//! server: the llama family (SmolLM2, Llama 2/3, Mistral), Qwen2/2.5, Qwen3, Phi-3 and
//! Gemma 3, which differ in a handful of switches read from the GGUF ([`Arch`],
//! [`DecoderConfig`]) and in which tensors the file holds (biases, fused matrices). One forward runs a batch of
//! *segments* (a chunk of one sequence's tokens each, of any length, at any position), so
//! prompts and decode steps of different sequences share every weight read; each segment
//! attends to its own sequence's [`SeqCache`]; logits come back for the positions asked for,
//! not only the last.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::{CacheShape, LocalLayers, SeqCache, KV_DTYPE};
use std::sync::{Arc, Mutex};

use candle_core::quantized::QTensor;

use super::weights::{stack_rows, Embedding, GgufWeights, Linear};
use crate::kernels::activation::{gated, gated_halves, Gate};
use crate::kernels::rowwise;

/// The architectures this code runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    /// `llama` (Llama 2/3.x, SmolLM2, Mistral): SiLU MLP, RoPE on interleaved pairs (GGUF's
    /// permuted Q/K), one RoPE base, Llama 3.1-style frequency factors where the file has them.
    /// No sliding window: llama.cpp runs Mistral 7B v0.1's 4,096-position one as full
    /// attention too (later Mistrals have none).
    Llama,
    /// `qwen2` (Qwen2, Qwen2.5): the llama layout with biases on Q, K and V, RoPE on halves.
    Qwen2,
    /// `qwen3`: RMS norms on each head of Q and K before RoPE (on halves), no biases.
    Qwen3,
    /// `phi3` (Phi-3, Phi-3.5 mini): Q, K and V in one matrix, gate and up in one, RoPE on
    /// halves with LongRoPE factors where the file has them. The sliding window some Phi-3
    /// files declare is ignored, as llama.cpp ignores it.
    Phi3,
    /// `gemma3`: GELU (tanh) MLP, RMS norms on Q and K and after attention and MLP, embeddings
    /// scaled by √hidden, RoPE on halves, local sliding-window layers (RoPE base 10,000) and
    /// every sixth layer global (the GGUF's base).
    Gemma3,
}

impl Arch {
    /// Every architecture this code runs.
    pub(crate) const ALL: [Self; 5] = [
        Self::Llama,
        Self::Qwen2,
        Self::Qwen3,
        Self::Phi3,
        Self::Gemma3,
    ];

    /// The architecture a GGUF names, if this code runs it.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Its `general.architecture` name, also the prefix of its GGUF metadata keys.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma3 => "gemma3",
        }
    }

    /// Whether RoPE rotates interleaved pairs (llama.cpp's "normal" RoPE, for which llama GGUFs
    /// store Q and K permuted) rather than the two halves of a head ("NeoX").
    fn interleaved_rope(self) -> bool {
        self == Self::Llama
    }

    /// Whether each head of Q and K is RMS-normed before RoPE.
    fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }
}

/// Hyper-parameters read from the GGUF.
#[derive(Clone, Debug)]
pub(crate) struct DecoderConfig {
    pub(crate) arch: Arch,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) hidden: usize,
    /// RoPE base of global layers (every layer of a llama model).
    pub(crate) rope_base: f32,
    /// Linear RoPE scaling of global layers (positions are multiplied by it); 1 for none.
    pub(crate) rope_scale: f32,
    /// Multiplies RoPE's cosines and sines (`rope.scaling.attn_factor`, LongRoPE); 1 for none.
    pub(crate) rope_attn_factor: f32,
    /// The context the model was trained with before RoPE scaling
    /// (`rope.scaling.original_context_length`): LongRoPE's short factors serve up to it.
    pub(crate) original_context: Option<usize>,
    pub(crate) rms_eps: f64,
    /// The GGUF's training context.
    pub(crate) context_length: usize,
    /// Local layers: which ones and their window, and their RoPE base.
    pub(crate) sliding: Option<(LocalLayers, f32)>,
}

impl DecoderConfig {
    /// Reads `<arch>.*` metadata.
    pub(crate) fn from_gguf(arch: Arch, ct: &gguf_file::Content) -> Result<Self> {
        let prefix = arch.name();
        let get = |k: &str| ct.metadata.get(&format!("{prefix}.{k}"));
        let md = |k: &str| {
            get(k).ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks {prefix}.{k}")))
        };
        let opt_u32 = |k: &str| get(k).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
        let opt_f32 = |k: &str| get(k).and_then(|v| v.to_f32().ok());
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = opt_u32("attention.key_length")
            .or_else(|| opt_u32("rope.dimension_count"))
            .unwrap_or(hidden / heads);
        let sliding = match arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => None,
            // llama.cpp's values for Gemma 3 where the GGUF has none.
            Arch::Gemma3 => Some((
                LocalLayers {
                    window: opt_u32("attention.sliding_window").unwrap_or(512),
                    period: opt_u32("attention.sliding_window_pattern")
                        .filter(|&p| p > 0)
                        .unwrap_or(6),
                },
                opt_f32("rope.freq_base_swa").unwrap_or(10_000.0),
            )),
        };
        Ok(Self {
            arch,
            layers: md("block_count")?.to_u32()? as usize,
            heads,
            kv_heads: opt_u32("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            hidden,
            rope_base: opt_f32("rope.freq_base").unwrap_or(10_000.0),
            rope_scale: opt_f32("rope.scaling.factor")
                .filter(|f| *f > 0.0)
                .map_or(1.0, |f| 1.0 / f),
            rope_attn_factor: opt_f32("rope.scaling.attn_factor")
                .filter(|f| *f > 0.0)
                .unwrap_or(1.0),
            original_context: opt_u32("rope.scaling.original_context_length"),
            rms_eps: md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            context_length: md("context_length")?.to_u32()? as usize,
            sliding,
        })
    }

    /// The sliding window of layer `i`, `None` for a global layer.
    fn window(&self, i: usize) -> Option<usize> {
        self.sliding.and_then(|(l, _)| l.window_of(i))
    }
}

/// The query, key and value projections of a layer.
#[derive(Clone)]
enum Qkv {
    /// Three matrices, each with an optional bias (Qwen2's).
    Separate {
        q: (Linear, Option<Tensor>),
        k: (Linear, Option<Tensor>),
        v: (Linear, Option<Tensor>),
    },
    /// One matrix whose output rows are the queries', then the keys', then the values', with
    /// their biases one after another: Phi-3's as stored, the others' stacked at load where
    /// the packed kernel runs them (one matmul instead of three; see `weights::stack_rows`).
    Fused(Linear, Option<Tensor>),
}

/// The gate and up projections of a gated MLP.
#[derive(Clone)]
enum GateUp {
    /// Two matrices.
    Separate { gate: Linear, up: Linear },
    /// One matrix: the gate's rows, then the up projection's (Phi-3's as stored, the others'
    /// stacked at load where the packed kernel runs them).
    Fused(Linear),
}

#[derive(Clone)]
struct Layer {
    attn_norm: Tensor,
    qkv: Qkv,
    /// Per-head RMS norms of queries and keys (Qwen3, Gemma 3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    wo: Linear,
    /// RMS norm of the attention output before the residual add (Gemma 3).
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate_up: GateUp,
    w_down: Linear,
    /// RMS norm of the MLP output before the residual add (Gemma 3).
    post_ffn_norm: Option<Tensor>,
    /// Sliding window (local layers).
    window: Option<usize>,
    /// Index of this layer's RoPE tables in [`Decoder::rope`].
    rope: usize,
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
    /// No logits: the sum over the segment's positions of the final (normalized) hidden state,
    /// `[1, hidden]` (embeddings: the caller averages the sums of a text's chunks).
    Pooled,
}

/// One sequence's share of a batched forward.
pub(crate) struct Segment<'a> {
    /// The sequence's cache; the tokens are appended to it.
    pub(crate) cache: &'a mut SeqCache,
    /// Tokens to process, at positions `cache.len()..`.
    pub(crate) tokens: &'a [u32],
    /// Logits to return.
    pub(crate) want: Want,
    /// Prompt (or scored) tokens, computed with f32 activations; false for a generated token,
    /// computed with the quantized matmul (see [`Linear`]).
    pub(crate) prompt: bool,
}

/// A loaded model.
#[derive(Clone)]
pub(crate) struct Decoder {
    config: DecoderConfig,
    embedding: Embedding,
    /// Multiplies the looked-up embeddings (Gemma: √hidden).
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    /// RoPE frequencies: global, then local if any.
    rope: Vec<Rope>,
    device: Device,
    max_len: usize,
    /// The most rows a part of a split pass may have (see [`Decoder::forward`]); 0 where
    /// passes are never split.
    part_rows: usize,
}

impl Decoder {
    /// Builds the model from GGUF weights, with RoPE tables for `max_len` positions.
    pub(crate) fn load(
        config: DecoderConfig,
        w: &mut GgufWeights<'_>,
        max_len: usize,
    ) -> Result<Self> {
        let device = w.device().clone();
        // Frequency factors divide the global RoPE frequencies: Llama 3.1's, or LongRoPE's
        // (Phi-3 128k), long ones past the original context and short ones within it, as
        // llama.cpp chooses by the context it serves.
        let long = config.original_context.is_some_and(|o| max_len > o);
        let factors = match w.try_f32("rope_freqs.weight")? {
            Some(t) => Some(t),
            None if long => w.try_f32("rope_factors_long.weight")?,
            None => w.try_f32("rope_factors_short.weight")?,
        };
        let factors = match factors {
            Some(t) => Some(t.to_vec1::<f32>()?),
            None => None,
        };
        let mut rope = vec![Rope::new(
            config.head_dim,
            config.rope_base,
            config.rope_scale,
            factors.as_deref(),
            config.rope_attn_factor,
            &device,
        )?];
        if let Some((_, base)) = config.sliding {
            rope.push(Rope::new(config.head_dim, base, 1.0, None, 1.0, &device)?);
        }
        let gemma = config.arch == Arch::Gemma3;
        let token_embd = Linear::new(w.qtensor("token_embd.weight")?)?;
        let output = match w.try_qtensor("output.weight")? {
            Some(t) => Linear::new(t)?,
            // Tied embeddings: the output projection and the lookup share one quantized tensor.
            None => token_embd.clone(),
        };
        let embedding = Embedding::new(token_embd, config.hidden)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let window = config.window(i);
            let norm = |w: &mut GgufWeights<'_>, n: &str, wanted: bool| {
                if wanted {
                    w.f32(&p(n)).map(Some)
                } else {
                    Ok(None)
                }
            };
            let qkv = match w.try_qtensor(&p("attn_qkv"))? {
                Some(fused) => Qkv::Fused(Linear::new(fused)?, None),
                None => {
                    let mut proj = |n: &str| -> Result<(Arc<QTensor>, Option<Tensor>)> {
                        let bias = w.try_f32(&format!("blk.{i}.{n}.bias"))?;
                        Ok((w.qtensor(&p(n))?, bias))
                    };
                    let (q, k, v) = (proj("attn_q")?, proj("attn_k")?, proj("attn_v")?);
                    // Stacked only where all three have a bias or none has.
                    let bias = match (&q.1, &k.1, &v.1) {
                        (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                        _ => None,
                    };
                    let same_biases =
                        bias.is_some() || (q.1.is_none() && k.1.is_none() && v.1.is_none());
                    match stack_rows(&[&q.0, &k.0, &v.0])?.filter(|_| same_biases) {
                        Some(fused) => Qkv::Fused(Linear::new(fused)?, bias),
                        None => {
                            let linear = |(t, b): (Arc<QTensor>, Option<Tensor>)| {
                                Ok::<_, candle_core::Error>((Linear::new(t)?, b))
                            };
                            Qkv::Separate {
                                q: linear(q)?,
                                k: linear(k)?,
                                v: linear(v)?,
                            }
                        }
                    }
                }
            };
            let gate_up = match w.try_qtensor(&p("ffn_gate"))? {
                Some(gate) => {
                    let up = w.qtensor(&p("ffn_up"))?;
                    match stack_rows(&[&gate, &up])? {
                        Some(fused) => GateUp::Fused(Linear::new(fused)?),
                        None => GateUp::Separate {
                            gate: Linear::new(gate)?,
                            up: Linear::new(up)?,
                        },
                    }
                }
                None if config.arch == Arch::Phi3 => {
                    GateUp::Fused(Linear::new(w.qtensor(&p("ffn_up"))?)?)
                }
                None => candle_core::bail!("GGUF lacks tensor {}", p("ffn_gate")),
            };
            let qk_norm = config.arch.qk_norm();
            layers.push(Layer {
                attn_norm: w.f32(&p("attn_norm"))?,
                qkv,
                q_norm: norm(w, "attn_q_norm", qk_norm)?,
                k_norm: norm(w, "attn_k_norm", qk_norm)?,
                wo: Linear::new(w.qtensor(&p("attn_output"))?)?,
                post_attn_norm: norm(w, "post_attention_norm", gemma)?,
                ffn_norm: w.f32(&p("ffn_norm"))?,
                gate_up,
                w_down: Linear::new(w.qtensor(&p("ffn_down"))?)?,
                post_ffn_norm: norm(w, "post_ffw_norm", gemma)?,
                window,
                rope: usize::from(window.is_some()),
            });
        }
        let norm = w.f32("output_norm.weight")?;
        // llama.cpp scales by √hidden in f32.
        let embed_scale = gemma.then(|| (config.hidden as f32).sqrt() as f64);
        // A part runs on a thread of candle's pool, or on the model thread while it holds the
        // pool: none of its work may go to the pool again. Only where every matrix and the
        // embedding table go through batchlab's kernels, and no part has enough rows for
        // candle's elementwise code to share out: its unary and binary operations do from
        // `CANDLE_PARALLEL_ELEMENTS` elements (in a pass, the q/k/v biases and the rotary
        // frequencies; its casts, copies and scaling never do), bounded here by the widest
        // activation row, a margin over both.
        let packed = embedding.is_packed()
            && output.is_packed()
            && layers.iter().all(|l| {
                l.qkv.is_packed()
                    && l.wo.is_packed()
                    && l.gate_up.is_packed()
                    && l.w_down.is_packed()
            });
        let widest = config
            .hidden
            .max((config.heads + 2 * config.kv_heads) * config.head_dim)
            .max(1);
        let part_rows = if packed && device.is_cpu() {
            (CANDLE_PARALLEL_ELEMENTS - 1) / widest
        } else {
            0
        };
        Ok(Self {
            config,
            embedding,
            embed_scale,
            layers,
            norm,
            output,
            rope,
            device,
            max_len,
            part_rows,
        })
    }

    /// The cache shape sequences of this model need.
    pub(crate) fn cache_shape(&self) -> CacheShape {
        CacheShape {
            layers: self.config.layers,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
            max_len: self.max_len,
            // Rings need the row-wise attention; other devices keep every position.
            local: self
                .config
                .sliding
                .filter(|_| self.device.is_cpu())
                .map(|(l, _)| l),
        }
    }

    /// Width of the hidden state (the length of an embedding).
    pub(crate) fn hidden_size(&self) -> usize {
        self.config.hidden
    }

    /// The device the weights live on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Runs every segment's tokens through the model in one pass, appends their keys and
    /// values to their caches, and returns per segment the logits it asked for
    /// (`[n, vocab]`, f32; `None` for [`Want::Nothing`]; pooled hidden states, `[1, hidden]`,
    /// for [`Want::Pooled`]).
    ///
    /// On the CPU, with at most [`MAX_SPLIT_WAYS`] kernel threads and batchlab's kernels
    /// running every matrix, a pass whose segments divide into one part per kernel thread of
    /// about equal rows ([`split_points`]) runs as that many passes side by side, each with
    /// its kernels on its own thread: a whole part per thread wastes less than sharing every
    /// kernel out and waiting at each of the hundreds of steps of a pass (the model thread's
    /// own work between them leaves the others idle; +13% bulk predictions on two cores).
    /// Parts stay under [`CANDLE_PARALLEL_ELEMENTS`] per row width, so that candle's own
    /// operations in them never share work out. Rows are computed independently and attention
    /// runs per segment: the same bits either way.
    pub(crate) fn forward(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Tensor>>> {
        let threads = crate::kernels::threads();
        let ways = if self.part_rows > 0 && threads <= MAX_SPLIT_WAYS {
            threads
        } else {
            1
        };
        let rows: Vec<usize> = segments.iter().map(|s| s.tokens.len()).collect();
        match split_points(&rows, ways, MIN_PART_ROWS..=self.part_rows) {
            Some(cuts) => self.forward_split(segments, &cuts),
            None => self.forward_together(segments),
        }
    }

    /// [`Self::forward`] as the parts `segments[..cuts[0]]`, `segments[cuts[0]..cuts[1]]`, ...,
    /// side by side on the kernel threads (`kernels::side_by_side`; this thread runs the
    /// first part, and every `threads`-th after it when there are more parts than threads).
    fn forward_split(
        &self,
        segments: &mut [Segment<'_>],
        cuts: &[usize],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut slots: Vec<Mutex<Part<'_, '_>>> = Vec::with_capacity(cuts.len() + 1);
        let mut rest = segments;
        let mut at = 0;
        for &cut in cuts {
            let (part, after) = rest.split_at_mut(cut - at);
            slots.push(Mutex::new((part, None)));
            rest = after;
            at = cut;
        }
        slots.push(Mutex::new((rest, None)));
        let threads = crate::kernels::threads();
        crate::kernels::side_by_side(|t| {
            for slot in slots.iter().skip((t + 1) % threads).step_by(threads) {
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                let (segments, out) = &mut *slot;
                *out = Some(self.forward_together(segments));
            }
        });
        let mut out = Vec::new();
        for slot in slots {
            match slot.into_inner().unwrap_or_else(|e| e.into_inner()).1 {
                Some(part) => out.extend(part?),
                None => candle_core::bail!("a part of a split forward pass did not run"),
            }
        }
        Ok(out)
    }

    /// [`Self::forward`] as one pass over every segment, its kernels shared out to the kernel
    /// threads (or on this thread alone, inside `kernels::side_by_side`).
    fn forward_together(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Option<Tensor>>> {
        let cfg = &self.config;
        let total: usize = segments.iter().map(|s| s.tokens.len()).sum();
        if total == 0 || segments.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("every segment needs at least one token")
        }
        for s in segments.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
        }
        // Prompt segments' rows first: the matmuls take them as one block (see `Linear`).
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&i| !segments[i].prompt);
        let dense_rows: usize = segments
            .iter()
            .filter(|s| s.prompt)
            .map(|s| s.tokens.len())
            .sum();
        let segments_in_order = || order.iter().map(|&i| &segments[i]);
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for s in segments_in_order() {
            let start = s.cache.len();
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        if positions.iter().any(|&p| p as usize >= self.max_len) {
            candle_core::bail!("position past the context of {} tokens", self.max_len)
        }
        let positions = Tensor::new(positions.as_slice(), &self.device)?
            .to_dtype(DType::F32)?
            .reshape((total, 1))?;
        let rope = self
            .rope
            .iter()
            .map(|r| r.at(&positions))
            .collect::<Result<Vec<_>>>()?;
        let eps = cfg.rms_eps as f32;

        let mut x = self.embedding.lookup(&ids, &self.device)?; // [T, hidden]
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let group = cfg.heads / cfg.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rowwise::rms_norm(&x, &layer.attn_norm, eps)?;
            let (q, k, v) = layer.qkv.forward(&h, dense_rows, cfg)?;
            // [T, heads*hd] -> [1, heads, T, hd], per-head norms, then RoPE.
            let to_heads = |t: Tensor, n: usize, norm: Option<&Tensor>| -> Result<Tensor> {
                let t = t
                    .reshape((total, n, cfg.head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?;
                match norm {
                    Some(w) => rowwise::rms_norm(&t, w, eps),
                    None => Ok(t),
                }
            };
            let (cos, sin) = &rope[layer.rope];
            let rotate = |t: &Tensor| rowwise::rope(t, cos, sin, cfg.arch.interleaved_rope());
            let q = rotate(&to_heads(q, cfg.heads, layer.q_norm.as_ref())?)?.squeeze(0)?;
            let k = rotate(&to_heads(k, cfg.kv_heads, layer.k_norm.as_ref())?)?.squeeze(0)?;
            let v = to_heads(v, cfg.kv_heads, None)?.squeeze(0)?;
            let q = (q * scale)?;

            // Converted to the cache's type once for every segment.
            let (k16, v16) = (k.to_dtype(KV_DTYPE)?, v.to_dtype(KV_DTYPE)?);
            let mut offset = 0;
            for s in segments_in_order() {
                let n = s.tokens.len();
                s.cache.write(li, &k16, &v16, offset, n)?;
                offset += n;
            }
            let o = if self.device.is_cpu() {
                let kv: Vec<super::attention::SegmentKv<'_>> = segments_in_order()
                    .map(|s| {
                        let (k, v, modulus) = s.cache.layer(li);
                        super::attention::SegmentKv {
                            k,
                            v,
                            modulus,
                            past: s.cache.len(),
                            n: s.tokens.len(),
                            window: layer.window,
                        }
                    })
                    .collect();
                super::attention::attend(&q.contiguous()?, &kv, group)?
            } else {
                let mut outs = Vec::with_capacity(segments.len());
                let mut offset = 0;
                for s in segments_in_order() {
                    let n = s.tokens.len();
                    let qs = q.narrow(1, offset, n)?.contiguous()?;
                    outs.push(self.attend_matmul(&qs, s.cache, li, n, layer.window)?);
                    offset += n;
                }
                Tensor::cat(&outs, 1)?
            };
            let o = o
                .transpose(0, 1)?
                .contiguous()?
                .reshape((total, cfg.heads * cfg.head_dim))?;
            let mut o = layer.wo.forward(&o, dense_rows)?;
            if let Some(w) = &layer.post_attn_norm {
                o = rowwise::rms_norm(&o, w, eps)?;
            }
            x = rowwise::add(&x, &o)?;

            let h = rowwise::rms_norm(&x, &layer.ffn_norm, eps)?;
            let kind = match cfg.arch {
                Arch::Gemma3 => Gate::GeluTanh,
                Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => Gate::Silu,
            };
            let act = layer.gate_up.activated(&h, dense_rows, kind)?;
            let mut f = layer.w_down.forward(&act, dense_rows)?;
            if let Some(w) = &layer.post_ffn_norm {
                f = rowwise::rms_norm(&f, w, eps)?;
            }
            x = rowwise::add(&x, &f)?;
        }
        // Logits only for the rows asked for; pooled hidden states for the segments that want
        // them, in the order of `order`.
        let mut rows = Vec::new();
        let mut pooled = Vec::new();
        let mut offset = 0u32;
        for s in segments_in_order() {
            let n = s.tokens.len() as u32;
            match s.want {
                Want::Nothing => {}
                Want::Last => rows.push(offset + n - 1),
                Want::All => rows.extend(offset..offset + n),
                Want::Pooled => {
                    let h = x.narrow(0, offset as usize, n as usize)?;
                    let h = rowwise::rms_norm(&h, &self.norm, eps)?;
                    pooled.push(h.to_dtype(DType::F32)?.sum_keepdim(0)?);
                }
            }
            offset += n;
        }
        let mut pooled = pooled.into_iter();
        let logits = if rows.is_empty() {
            None
        } else {
            let idx = Tensor::new(rows.as_slice(), &self.device)?;
            let h = x.index_select(&idx, 0)?;
            let h = rowwise::rms_norm(&h, &self.norm, eps)?;
            Some(self.output.forward_quantized(&h)?.to_dtype(DType::F32)?)
        };
        let mut out = vec![None; segments.len()];
        let mut at = 0;
        for &i in &order {
            let s = &segments[i];
            let n = match s.want {
                Want::Nothing => 0,
                Want::Last => 1,
                Want::All => s.tokens.len(),
                Want::Pooled => {
                    out[i] = pooled.next();
                    0
                }
            };
            if let (Some(l), true) = (&logits, n > 0) {
                out[i] = Some(l.narrow(0, at, n)?);
            }
            at += n;
        }
        for s in segments.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        Ok(out)
    }
}

/// Rows each part of a split forward pass needs at least (see [`Decoder::forward`]): below
/// that, every thread reading all the weights for a handful of rows costs more than sharing
/// one pass's kernels out. With 4 rather than 8, the decode steps of 8 to 15 sequences that
/// bulk predictions run between scoring passes split too: +4 to +11% bulk candidate-evaluation
/// tasks/s, 5 alternating pairs on two Zen 4 cores.
const MIN_PART_ROWS: usize = 4;

/// The most kernel threads with which passes are split: measured to pay on two (each part
/// reads every weight, so with many threads the parts would multiply the memory traffic that
/// shared kernels read once; unmeasured there, such machines keep sharing every kernel out).
const MAX_SPLIT_WAYS: usize = 2;

/// Elements from which candle's CPU elementwise operations share their work out to its pool
/// (`PAR_ELEMWISE_MIN` in candle-core 0.11): a split pass's parts stay under it, see
/// `split_parts_stay_off_candles_pool`.
const CANDLE_PARALLEL_ELEMENTS: usize = 64 * 1024;

/// How much larger than an even share (`total / ways`) a split pass's largest part may be: a
/// part runs on one thread, so the pass lasts as long as its largest part, while sharing every
/// kernel out instead loses about this much to waiting.
const MAX_PART_IMBALANCE: f64 = 1.25;

/// Where to cut segments of `rows` rows (in order) into `ways` contiguous parts of about equal
/// rows, for a pass whose parts run side by side: the first segment of every part after the
/// first; `None` when that would not pay or may not be (fewer than two ways, fewer segments
/// than ways, a part's rows outside `part_rows`, or the largest part over
/// [`MAX_PART_IMBALANCE`] even shares).
fn split_points(
    rows: &[usize],
    ways: usize,
    part_rows: std::ops::RangeInclusive<usize>,
) -> Option<Vec<usize>> {
    if ways < 2 || rows.len() < ways {
        return None;
    }
    let total: usize = rows.iter().sum();
    let mut cuts = Vec::with_capacity(ways - 1);
    let mut before = 0; // rows before segment i
    let mut i = 0;
    for k in 1..ways {
        let target = total * k / ways;
        // The cut whose rows before it come closest to the target, leaving each later part a
        // segment at least.
        while i + 1 < rows.len() - (ways - 1 - k)
            && (before + rows[i]).abs_diff(target) <= before.abs_diff(target)
        {
            before += rows[i];
            i += 1;
        }
        if i == 0 || cuts.last() == Some(&i) {
            before += rows[i];
            i += 1;
        }
        cuts.push(i);
    }
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(cuts.iter().copied())
        .chain(std::iter::once(rows.len()))
        .collect();
    let parts: Vec<usize> = bounds
        .windows(2)
        .map(|w| rows[w[0]..w[1]].iter().sum())
        .collect();
    let largest = parts.iter().copied().max().unwrap_or(0);
    let even = total as f64 / ways as f64;
    (parts.iter().all(|p| part_rows.contains(p)) && largest as f64 <= even * MAX_PART_IMBALANCE)
        .then_some(cuts)
}

/// One part of a split forward pass: its segments, and what running them gave.
type Part<'s, 'a> = (&'s mut [Segment<'a>], Option<Result<Vec<Option<Tensor>>>>);

impl Qkv {
    /// Whether the packed kernel runs every matrix of it.
    fn is_packed(&self) -> bool {
        match self {
            Self::Separate { q, k, v } => q.0.is_packed() && k.0.is_packed() && v.0.is_packed(),
            Self::Fused(w, _) => w.is_packed(),
        }
    }

    /// Queries, keys and values of `h` (`[T, hidden]`), each `[T, heads · head_dim]`.
    fn forward(
        &self,
        h: &Tensor,
        dense_rows: usize,
        cfg: &DecoderConfig,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Separate { q, k, v } => {
                let project = |(w, bias): &(Linear, Option<Tensor>)| -> Result<Tensor> {
                    let t = w.forward(h, dense_rows)?;
                    match bias {
                        Some(b) => t.broadcast_add(b),
                        None => Ok(t),
                    }
                };
                Ok((project(q)?, project(k)?, project(v)?))
            }
            Self::Fused(w, bias) => {
                let mut all = w.forward(h, dense_rows)?;
                if let Some(b) = bias {
                    all = all.broadcast_add(b)?;
                }
                let (nq, nkv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
                Ok((
                    all.narrow(1, 0, nq)?.contiguous()?,
                    all.narrow(1, nq, nkv)?.contiguous()?,
                    all.narrow(1, nq + nkv, nkv)?.contiguous()?,
                ))
            }
        }
    }
}

impl GateUp {
    /// Whether the packed kernel runs every matrix of it.
    fn is_packed(&self) -> bool {
        match self {
            Self::Separate { gate, up } => gate.is_packed() && up.is_packed(),
            Self::Fused(w) => w.is_packed(),
        }
    }

    /// `act(gate(h)) × up(h)`: the MLP's input to its down projection.
    fn activated(&self, h: &Tensor, dense_rows: usize, kind: Gate) -> Result<Tensor> {
        match self {
            Self::Separate { gate, up } => gated(
                &gate.forward(h, dense_rows)?,
                &up.forward(h, dense_rows)?,
                kind,
            ),
            Self::Fused(w) => gated_halves(&w.forward(h, dense_rows)?, kind),
        }
    }
}

impl Decoder {
    /// Attention by batched matrix products (devices other than the CPU): fast, but a row's
    /// last bits depend on the shapes it is computed with (see `attention`).
    fn attend_matmul(
        &self,
        qs: &Tensor,
        cache: &SeqCache,
        li: usize,
        n: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let past = cache.len();
        let group = cfg.heads / cfg.kv_heads;
        let (kc, vc) = cache.view(li, n)?; // [kv, past+n, hd], f16
        let (kc, vc) = (kc.to_dtype(qs.dtype())?, vc.to_dtype(qs.dtype())?);
        // Heads sharing a KV head are stacked as rows: [kv, group*n, hd].
        let qs = qs.reshape((cfg.kv_heads, group * n, cfg.head_dim))?;
        let mut att = qs.matmul(&kc.t()?)?;
        if n > 1 || window.is_some_and(|w| past + 1 > w) {
            let mask = causal_mask(n, past, window, &self.device)?;
            att = att
                .reshape((cfg.kv_heads, group, n, past + n))?
                .broadcast_add(&mask)?
                .reshape((cfg.kv_heads, group * n, past + n))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&vc)?.reshape((cfg.heads, n, cfg.head_dim))
    }
}

/// `[n, past + n]` additive mask: query `i` (at position `past + i`) sees keys `0..=past + i`,
/// and within a sliding window only the last `window` of them.
fn causal_mask(n: usize, past: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let cols = past + n;
    let data: Vec<f32> = (0..n)
        .flat_map(|i| {
            let first = window.map_or(0, |w| (past + i + 1).saturating_sub(w));
            (0..cols).map(move |j| {
                if j >= first && j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (n, cols), device)
}

/// One RoPE variant's frequencies. Cosines and sines are computed per forward pass for the
/// positions it holds, not kept as tables for the whole context: those cost 67 MB for Gemma 3's
/// 32k context and as much for Llama 3.2's 128k, while a step's few hundred rows cost
/// microseconds. Each value is the same f32 arithmetic a table would hold.
#[derive(Clone)]
struct Rope {
    /// `[1, head_dim / 2]`: frequency `i` is `scale · base^(-2i/head_dim) / factors[i]`.
    inv: Tensor,
    /// Multiplies the cosines and sines (LongRoPE's attention factor); 1 for none.
    attn_factor: f32,
}

impl Rope {
    fn new(
        head_dim: usize,
        base: f32,
        scale: f32,
        factors: Option<&[f32]>,
        attn_factor: f32,
        device: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                scale
                    / base.powf(2.0 * i as f32 / head_dim as f32)
                    / factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0)
            })
            .collect();
        Ok(Self {
            inv: Tensor::from_vec(inv, (1, head_dim / 2), device)?,
            attn_factor,
        })
    }

    /// Cosines and sines, `[T, head_dim / 2]`, at `positions` (`[T, 1]`, f32).
    fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions.broadcast_mul(&self.inv)?;
        if self.attn_factor == 1.0 {
            return Ok((freqs.cos()?, freqs.sin()?));
        }
        let f = self.attn_factor as f64;
        Ok(((freqs.cos()? * f)?, (freqs.sin()? * f)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::tests::scheduler;

    /// Parts are contiguous, of about equal rows, each with a segment and rows in the range
    /// given; passes that would not split well, or may not, are left whole.
    #[test]
    fn split_points_cut_even_parts_or_none() {
        assert_eq!(split_points(&[1; 16], 2, 8..=1000), Some(vec![8]));
        assert_eq!(split_points(&[20, 26, 26, 26], 2, 8..=1000), Some(vec![2]));
        assert_eq!(split_points(&[10; 9], 3, 8..=1000), Some(vec![3, 6]));
        assert_eq!(split_points(&[30, 1, 1, 30], 2, 8..=1000), Some(vec![2]));
        assert_eq!(
            split_points(&[40, 40, 40, 1], 3, 1..=1000),
            Some(vec![1, 2])
        );
        // A large segment: the best cut leaves one part far over an even share.
        assert_eq!(split_points(&[60, 5, 5], 2, 8..=1000), None);
        assert_eq!(split_points(&[1, 1, 100, 100], 3, 1..=1000), None);
        // Too few rows for a part, too few segments, or one way.
        assert_eq!(split_points(&[4, 4], 2, 8..=1000), None);
        assert_eq!(split_points(&[100], 2, 8..=1000), None);
        assert_eq!(split_points(&[50, 50], 1, 8..=1000), None);
        // A part over the most rows a part may have.
        assert_eq!(split_points(&[60, 60], 2, 8..=59), None);
        assert_eq!(split_points(&[60, 60], 2, 8..=60), Some(vec![1]));
        // Every part keeps a segment, whatever the rows.
        for ways in 2..5 {
            for n in ways..12 {
                let rows: Vec<usize> = (0..n).map(|i| 1 + (i * 7) % 5).collect();
                if let Some(cuts) = split_points(&rows, ways, 1..=1000) {
                    assert_eq!(cuts.len(), ways - 1, "{rows:?}");
                    assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{rows:?} {cuts:?}");
                    assert!(cuts[0] > 0 && cuts[ways - 2] < n, "{rows:?} {cuts:?}");
                }
            }
        }
    }

    /// A pass split into parts side by side gives every segment the same logits, bit for
    /// bit, and leaves the same caches (a next pass on them agrees too) as the pass whole.
    #[test]
    fn split_passes_give_the_same_bits() {
        let Some((w, tok)) = scheduler(true) else {
            return;
        };
        let model = &w.model;
        // SmolLM2's matrices all go through the packed kernel where it runs: its passes split,
        // in parts of at most 65535 / 960 rows (its widest row, the stacked queries, keys and
        // values: (9 + 2·3) heads of 64); elsewhere they never do.
        let expected = if crate::kernels::packed_kernel() {
            68
        } else {
            0
        };
        assert_eq!(model.part_rows, expected);
        let prompts: Vec<Vec<u32>> = [
            "The quick brown fox jumps over the lazy dog.",
            "Question: which label fits? Answer with one of: yes, no.",
            "A",
            "Candidate 12, Staff Engineer at Globex, ten years of compilers.",
            "Write a short poem about the sea.",
        ]
        .iter()
        .map(|p| tok.encode_plain(p).unwrap())
        .collect();
        let wants = [Want::All, Want::Last, Want::Last, Want::Nothing, Want::All];
        let run = |cuts: Option<&[usize]>| {
            let mut caches: Vec<SeqCache> = prompts
                .iter()
                .map(|p| SeqCache::new(model.cache_shape(), p.len() + 1, model.device()).unwrap())
                .collect();
            let mut segments: Vec<Segment<'_>> = caches
                .iter_mut()
                .zip(&prompts)
                .zip(wants)
                .map(|((cache, tokens), want)| Segment {
                    cache,
                    tokens,
                    want,
                    prompt: true,
                })
                .collect();
            let first = match cuts {
                Some(cuts) => model.forward_split(&mut segments, cuts),
                None => model.forward_together(&mut segments),
            }
            .unwrap();
            let next = [42u32];
            let mut segments: Vec<Segment<'_>> = caches
                .iter_mut()
                .map(|cache| Segment {
                    cache,
                    tokens: &next,
                    want: Want::Last,
                    prompt: false,
                })
                .collect();
            let second = model.forward_together(&mut segments).unwrap();
            first
                .into_iter()
                .chain(second)
                .map(|l| l.map(|l| l.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect::<Vec<_>>()
        };
        let whole = run(None);
        assert!(whole[0].is_some() && whole[3].is_none());
        for cuts in [&[1][..], &[3], &[2, 4], &[1, 2, 3, 4]] {
            assert_eq!(run(Some(cuts)), whole, "cut at {cuts:?}");
        }
    }

    /// A part of a split pass may use candle's elementwise code on just under
    /// [`CANDLE_PARALLEL_ELEMENTS`] elements while the model thread holds candle's pool: candle
    /// must still run that on the calling thread (were its threshold lowered, this would hang,
    /// and the watchdog ends the test process with a message instead).
    #[test]
    fn split_parts_stay_off_candles_pool() {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(60));
            if !watch.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("candle shared elementwise work out below CANDLE_PARALLEL_ELEMENTS");
                std::process::abort();
            }
        });
        let n = CANDLE_PARALLEL_ELEMENTS - 1;
        let a = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let sums = std::sync::Mutex::new(Vec::new());
        crate::kernels::side_by_side(|_| {
            let s = (&a + &a).unwrap().affine(0.5, 0.0).unwrap().cos().unwrap();
            let total = s.sum_all().unwrap().to_scalar::<f32>().unwrap();
            sums.lock().unwrap().push(total);
        });
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let sums = sums.into_inner().unwrap();
        assert_eq!(sums.len(), crate::kernels::threads());
        assert!(
            sums.iter()
                .all(|&t| (t - n as f32 * 1f32.cos()).abs() < 1.0),
            "{sums:?}"
        );
    }
}
