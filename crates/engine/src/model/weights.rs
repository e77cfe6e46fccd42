//! Weights from a GGUF file, tensor by tensor. Formats that candle has no SIMD kernel for
//! (Q4_1, Q5_0, Q5_1) are requantized to Q8_0 as they are read, when asked and unless the
//! packed kernel takes them as they are (on CPUs with AVX2 or AVX-512 VNNI): measured, 2.6x faster
//! prompts and 1.3x faster decode on SmolLM2's Q4_1 file under candle's kernels, with answers
//! close to the original (`../shared/reference/candle-engine.md`). Where the packed kernel runs,
//! it takes Q4_K as Q4_1 blocks (see `packed`), and the other k-quant matrices (Gemma 3's Q6_K)
//! become Q8_0 so that it runs them: Gemma 3 270M prompts measured 440 -> ~700 tokens/s.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::kernels::packed::{self, Packed};

/// Formats candle computes with scalar code only.
fn slow(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// Reads tensors by name from an open GGUF.
pub(crate) struct GgufWeights<'a> {
    content: &'a gguf_file::Content,
    reader: &'a mut (dyn ReadSeek + 'a),
    device: Device,
    requantize: bool,
    requantized: usize,
}

/// `Read + Seek` as one object-safe trait.
pub(crate) trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

impl<'a> GgufWeights<'a> {
    /// Reader over `content`'s tensors in `reader`.
    pub(crate) fn new(
        content: &'a gguf_file::Content,
        reader: &'a mut (dyn ReadSeek + 'a),
        device: &Device,
        requantize: bool,
    ) -> Self {
        Self {
            content,
            reader,
            device: device.clone(),
            requantize,
            requantized: 0,
        }
    }

    /// The device tensors are loaded on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// How many tensors were requantized to Q8_0 so far.
    pub(crate) fn requantized(&self) -> usize {
        self.requantized
    }

    /// A quantized tensor (requantized to Q8_0 if its format is slow and requantizing is on);
    /// `None` when the file has no such tensor.
    pub(crate) fn try_qtensor(&mut self, name: &str) -> Result<Option<Arc<QTensor>>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = self.content.tensor(&mut self.reader, name, &self.device)?;
        // Q8_0 blocks hold 32 values along the last dimension.
        let fits = t.shape().dims().last().is_some_and(|d| d % 32 == 0);
        // The packed kernel runs Q4_0/Q4_1/Q5_0/Q5_1/Q4_K as they are, and other k-quant
        // matrices once they are Q8_0 (its 8-bit blocks hold them with finer steps than their own).
        let k_quant = matches!(
            t.dtype(),
            GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
        );
        let repack = k_quant && packed::shape_fits(&t, &self.device);
        let t = if self.requantize
            && fits
            && !packed::fits(&t, &self.device)
            && (slow(t.dtype()) || repack)
        {
            self.requantized += 1;
            QTensor::quantize(&t.dequantize(&self.device)?, GgmlDType::Q8_0)?
        } else {
            t
        };
        Ok(Some(Arc::new(t)))
    }

    /// A quantized tensor that must exist.
    pub(crate) fn qtensor(&mut self, name: &str) -> Result<Arc<QTensor>> {
        self.try_qtensor(name)?
            .ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks tensor {name}")))
    }

    /// A small tensor (norm weights) as f32.
    pub(crate) fn f32(&mut self, name: &str) -> Result<Tensor> {
        self.try_f32(name)?
            .ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks tensor {name}")))
    }

    /// A small tensor as f32; `None` when the file has no such tensor.
    pub(crate) fn try_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = self.content.tensor(&mut self.reader, name, &self.device)?;
        Ok(Some(t.dequantize(&self.device)?.to_dtype(DType::F32)?))
    }
}

/// The rows of several quantized matrices stacked into one (`[Σ rows, cols]`), so that one
/// matmul serves them all: Q, K and V, or the MLP's gate and up projections, as fused files
/// (Phi-3) store them. Measured on SmolLM2 with 16 streams: 4% more tokens/s (fewer kernel
/// calls, each activation quantized once). `None` unless they share a format and a width that
/// the packed kernel runs, whose output columns are computed each on its own, so that every
/// column keeps its bits (a dense GEMM may block its columns by the matrix's width).
pub(crate) fn stack_rows(parts: &[&Arc<QTensor>]) -> Result<Option<Arc<QTensor>>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (dtype, device) = (first.dtype(), first.device());
    let cols = |t: &QTensor| t.shape().dims2().map(|(_, c)| c).ok();
    if parts.iter().any(|t| {
        t.dtype() != dtype
            || cols(t).is_none()
            || cols(t) != cols(first)
            || !packed::fits(t, &device)
    }) {
        return Ok(None);
    }
    let mut rows = 0;
    let mut bytes = Vec::new();
    for t in parts {
        rows += t.shape().dims2()?.0;
        bytes.extend_from_slice(&t.data()?);
    }
    let cols = cols(first).unwrap_or_default();
    let stacked = ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &device)?;
    Ok(Some(Arc::new(stacked)))
}

/// Token embedding lookup straight from the quantized table: rows are dequantized as they are
/// looked up, so a tied output projection and the lookup share one copy of the weights
/// instead of keeping a second, f32 one (113 MB for SmolLM2, 671 MB for Gemma 3 270M).
#[derive(Clone)]
pub(crate) struct Embedding {
    table: Linear,
    hidden: usize,
}

impl Embedding {
    /// Lookup over `table` (`[vocab, hidden]`), possibly the output projection too.
    pub(crate) fn new(table: Linear, hidden: usize) -> Result<Self> {
        if let Kernel::Candle { weights, .. } = &table.kernel {
            if !hidden.is_multiple_of(weights.dtype().block_size()) {
                candle_core::bail!("embedding width {hidden} is not a multiple of its block size")
            }
        }
        Ok(Self { table, hidden })
    }

    /// Whether the table is in the packed kernel's layout (looked up without candle).
    pub(crate) fn is_packed(&self) -> bool {
        self.table.is_packed()
    }

    /// `[ids.len(), hidden]` f32 rows.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let weights = match &self.table.kernel {
            Kernel::Packed(p) => return p.lookup(ids, device),
            Kernel::Candle { weights, .. } => weights,
        };
        let dtype = weights.dtype();
        let row_bytes = self.hidden / dtype.block_size() * dtype.type_size();
        let data = weights.data()?;
        let vocab = data.len() / row_bytes;
        let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}")
            }
            bytes.extend_from_slice(&data[id * row_bytes..(id + 1) * row_bytes]);
        }
        let rows =
            ggml_file::qtensor_from_ggml(dtype, &bytes, vec![ids.len(), self.hidden], device)?;
        rows.dequantize(device)
    }
}

/// How a [`Linear`] multiplies.
#[derive(Clone)]
enum Kernel {
    /// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or Q4_K weights in the interleaved layout of [`Packed`]
    /// (CPUs with AVX-512 VNNI or AVX2).
    Packed(Arc<Packed>),
    /// candle's quantized matmul over the weights as stored.
    Candle {
        quantized: QMatMul,
        weights: Arc<QTensor>,
    },
}

/// A weight matrix used as `x · Wᵀ`.
/// - Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K weights on CPUs with AVX-512 VNNI or AVX2: every
///   row through [`Packed`] (AMX tiles for whole tiles of 16 rows where the CPU has them)
///   (activations quantized to 8 bits per block of 32, as llama.cpp does; one weight load
///   serves several rows). Measured on SmolLM2 with AVX-512 VNNI: prompts 1.7-1.9x and choice
///   scoring ~3x faster than the dequantized f32 GEMM below.
/// - Other weights (k-quants but Q4_K when requantizing is off, anything on CPUs without AVX2):
///   generated tokens (a few rows a step) through candle's quantized matmul; prompt and scored
///   tokens through the weights dequantized for the call and candle's f32 GEMM, measured
///   2.5-4x faster than candle's quantized kernel from a few dozen rows on 576-wide matrices.
///
/// Which way a row goes depends only on its own segment, never on what else is in the batch;
/// every kernel gives a row the same bits whatever the other rows (for the f32 GEMM one row
/// alone is computed as two, since its single-row path sums in another order): so batching
/// and chunking never change a request's numbers.
#[derive(Clone)]
pub(crate) struct Linear {
    kernel: Kernel,
}

impl Linear {
    /// Wraps `weights` (`[out, in]`), repacked when the packed kernel can take them (the
    /// original is then dropped: one copy of the weights either way).
    pub(crate) fn new(weights: Arc<QTensor>) -> Result<Self> {
        let device = weights.device();
        let kernel = match packed::pack(&weights, &device)? {
            Some(p) => Kernel::Packed(Arc::new(p)),
            None => Kernel::Candle {
                quantized: QMatMul::from_arc(weights.clone())?,
                weights,
            },
        };
        Ok(Self { kernel })
    }

    /// Whether batchlab's packed kernel runs this matrix (candle's kernels otherwise).
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self.kernel, Kernel::Packed(_))
    }

    /// `x · Wᵀ` for `x` `[rows, in]` through the quantized kernel only.
    pub(crate) fn forward_quantized(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Packed(p) => p.matmul(x),
            Kernel::Candle { quantized, .. } => quantized.forward(x),
        }
    }

    /// `x · Wᵀ` for `x` `[rows, in]`: the first `dense_rows` rows (prompt rows) through the f32
    /// GEMM where the weights have no packed kernel, the others through the quantized kernel.
    pub(crate) fn forward(&self, x: &Tensor, dense_rows: usize) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let dense_rows = dense_rows.min(rows);
        let w = match &self.kernel {
            _ if dense_rows == 0 => return self.forward_quantized(x),
            Kernel::Packed(_)
            | Kernel::Candle {
                quantized: QMatMul::Tensor(_) | QMatMul::TensorF16(_),
                ..
            } => return self.forward_quantized(x),
            Kernel::Candle { weights, .. } => weights.dequantize(x.device())?,
        };
        let dense = x.narrow(0, 0, dense_rows)?;
        let dense = if dense_rows == 1 {
            Tensor::cat(&[&dense, &dense], 0)?
                .matmul(&w.t()?)?
                .narrow(0, 0, 1)?
        } else {
            dense.matmul(&w.t()?)?
        };
        if dense_rows == rows {
            return Ok(dense);
        }
        let rest = self.forward_quantized(&x.narrow(0, dense_rows, rows - dense_rows)?)?;
        Tensor::cat(&[&dense, &rest], 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantized(rows: usize, dtype: GgmlDType, seed: f64) -> Arc<QTensor> {
        let t = Tensor::randn(seed as f32, 1.0, (rows, 64), &Device::Cpu).unwrap();
        Arc::new(QTensor::quantize(&t, dtype).unwrap())
    }

    /// One matmul over stacked matrices gives every output column the same bits as the
    /// matrices one by one (prompt rows and generated rows alike), and matrices of different
    /// formats are not stacked.
    #[test]
    fn stacked_rows_give_the_same_columns() {
        if !crate::packed_kernel() {
            let parts = [
                quantized(48, GgmlDType::Q8_0, 0.0),
                quantized(16, GgmlDType::Q8_0, 0.5),
            ];
            assert!(
                stack_rows(&[&parts[0], &parts[1]]).unwrap().is_none(),
                "stacked without the packed kernel"
            );
            eprintln!("no packed kernel on this CPU: checked that nothing is stacked");
            return;
        }
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let parts = [quantized(48, dtype, 0.0), quantized(16, dtype, 0.5)];
            let stacked = stack_rows(&[&parts[0], &parts[1]]).unwrap().unwrap();
            assert_eq!(stacked.shape().dims2().unwrap(), (64, 64));
            let x = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
            for dense_rows in [0, 3, 5] {
                let one = Linear::new(stacked.clone())
                    .unwrap()
                    .forward(&x, dense_rows)
                    .unwrap();
                let apart: Vec<Tensor> = parts
                    .iter()
                    .map(|p| {
                        Linear::new(p.clone())
                            .unwrap()
                            .forward(&x, dense_rows)
                            .unwrap()
                    })
                    .collect();
                let apart = Tensor::cat(&apart, 1).unwrap();
                assert_eq!(
                    one.to_vec2::<f32>().unwrap(),
                    apart.to_vec2::<f32>().unwrap(),
                    "{dtype:?}, {dense_rows} prompt rows"
                );
            }
        }
        let mixed = [
            quantized(32, GgmlDType::Q8_0, 0.0),
            quantized(32, GgmlDType::Q4_0, 0.0),
        ];
        assert!(stack_rows(&[&mixed[0], &mixed[1]]).unwrap().is_none());
    }
}
