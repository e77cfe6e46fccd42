//! Row-wise kernels of the decoder: RMS normalisation, rotary position embeddings and the
//! residual sums, with the same arithmetic as candle's (so the same bits), shared out through
//! [`super::chunked`] like every other kernel, so that they also run on one thread alone in a
//! part of a split pass (see `Decoder::forward`). `candle_nn`'s CPU norm and RoPE hand their
//! work to rayon's pool whenever a pass has more than a few rows: a second pool beside
//! candle's barrier pool, and each call put the model thread to sleep and woke it again
//! (thousands of context switches a second during bulk prediction on two cores).

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

use super::cpu_slice;

/// Rows a work item takes: enough that sharing the work out costs less than the work.
const ROWS_PER_ITEM: usize = 32;

/// Runs `f(first_row, rows_in, rows_out)` over `src`'s rows of `width` values, items of
/// [`ROWS_PER_ITEM`] rows at a time, writing the matching rows of the returned buffer.
fn by_rows(src: &[f32], width: usize, f: impl Fn(usize, &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    let item = ROWS_PER_ITEM * width;
    let items: Vec<Mutex<&mut [f32]>> = dst.chunks_mut(item).map(Mutex::new).collect();
    super::chunked(items.len(), |range| {
        for i in range {
            let mut out = items[i].lock().unwrap_or_else(|e| e.into_inner());
            let at = i * item;
            f(i * ROWS_PER_ITEM, &src[at..at + out.len()], &mut out);
        }
    });
    drop(items);
    dst
}

/// RMS normalisation of every row (last dimension) of `x`, scaled by `alpha`: `x / sqrt(mean
/// x² + eps) · alpha`, as `candle_nn::ops::rms_norm` computes it. Other than contiguous f32 on
/// the CPU, `candle_nn`'s runs.
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || alpha.dtype() != DType::F32 {
        return candle_nn::ops::rms_norm(x, alpha, eps);
    }
    if alpha.dims1()? != n {
        candle_core::bail!("rms norm: rows of {n}, weights of {:?}", alpha.shape())
    }
    let x = x.contiguous()?;
    let alpha = alpha.contiguous()?;
    let out = {
        let (xs, xl) = x.storage_and_layout();
        let (als, all) = alpha.storage_and_layout();
        let (src, alpha) = (cpu_slice::<f32>(&xs, xl)?, cpu_slice::<f32>(&als, all)?);
        by_rows(src, n, |_, src, dst| {
            for (src, dst) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                // In order, one term at a time: candle_nn's sum, and so its bits.
                let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
                let m = (sum2 / n as f32 + eps).sqrt();
                for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
                    *d = *s / m * *a;
                }
            }
        })
    };
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// `a + b`, element by element, for tensors of one shape (the residual connections), on the
/// kernels' threads: candle's elementwise code shares large sums out to its pool whatever
/// thread calls it. Other than f32 on the CPU, candle's runs.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return a + b;
    }
    if a.shape() != b.shape() {
        candle_core::bail!("add: shapes {:?} and {:?}", a.shape(), b.shape())
    }
    let width = a.dims().last().copied().unwrap_or(1).max(1);
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let out = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (xa, xb) = (cpu_slice::<f32>(&sa, la)?, cpu_slice::<f32>(&sb, lb)?);
        by_rows(xa, width, |first, src, dst| {
            let at = first * width;
            for ((d, x), y) in dst.iter_mut().zip(src).zip(&xb[at..at + src.len()]) {
                *d = x + y;
            }
        })
    };
    Tensor::from_vec(out, a.shape(), &Device::Cpu)
}

/// Rotary embedding of `x` (`[1, heads, T, d]`) at the cosines and sines `cos`, `sin`
/// (`[T, d / 2]`): rotating each row's halves (`interleaved` false, as
/// `candle_nn::rotary_emb::rope`) or its adjacent pairs (true, as `rope_i`). Other than f32
/// on the CPU, `candle_nn`'s runs.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || b != 1 {
        return if interleaved {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
        };
    }
    if cos.dims2()? != (t, d / 2) || sin.dims2()? != (t, d / 2) || d % 2 != 0 {
        candle_core::bail!(
            "rope: rows of {d} at {t} positions, cosines {:?}, sines {:?}",
            cos.shape(),
            sin.shape()
        )
    }
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let out = {
        let (xs, xl) = x.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let src = cpu_slice::<f32>(&xs, xl)?;
        let (cos, sin) = (cpu_slice::<f32>(&cs, cl)?, cpu_slice::<f32>(&ss, sl)?);
        let half = d / 2;
        by_rows(src, d, |first, src, dst| {
            for (r, (src, dst)) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)).enumerate() {
                // Row `first + r` of head-major rows: position (first + r) mod t.
                let at = (first + r) % t * half;
                let (cos, sin) = (&cos[at..at + half], &sin[at..at + half]);
                for i in 0..half {
                    let (i1, i2) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    dst[i1] = src[i1] * cos[i] - src[i2] * sin[i];
                    dst[i2] = src[i1] * sin[i] + src[i2] * cos[i];
                }
            }
        })
    };
    Tensor::from_vec(out, (b, h, t, d), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], salt: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + salt) * 7919 % 2003) as f32 / 2003.0 - 0.5) * (1.0 + (i % 7) as f32))
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The same bits as candle_nn's RMS norm, for a few rows (candle's serial path) and many
    /// (its rayon path; here shared out in items, one of them partial).
    #[test]
    fn rms_norm_matches_candle_nn_bit_for_bit() {
        for dims in [&[1, 576][..], &[5, 64], &[77, 576], &[1, 9, 70, 64]] {
            let x = tensor(dims, dims.len());
            let alpha = tensor(&[dims[dims.len() - 1]], 3);
            let ours = rms_norm(&x, &alpha, 1e-5).unwrap();
            let theirs = candle_nn::ops::rms_norm(&x, &alpha, 1e-5).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert_eq!(values(&ours), values(&theirs), "{dims:?}");
        }
    }

    /// The same sums as candle's, in any shape, over whole items and a partial one.
    #[test]
    fn add_matches_candle() {
        for dims in [&[1, 576][..], &[77, 576], &[3, 5]] {
            let (a, b) = (tensor(dims, 1), tensor(dims, 2));
            let ours = add(&a, &b).unwrap();
            assert_eq!(ours.dims(), dims);
            assert_eq!(values(&ours), values(&(&a + &b).unwrap()), "{dims:?}");
        }
        assert!(add(&tensor(&[2, 3], 0), &tensor(&[3, 2], 0)).is_err());
    }

    /// The same bits as candle_nn's rotary embeddings, both layouts, one position (candle's
    /// serial path) and many (its rayon path).
    #[test]
    fn rope_matches_candle_nn_bit_for_bit() {
        for (h, t) in [(9, 1), (3, 5), (9, 70)] {
            let x = tensor(&[1, h, t, 64], t);
            let cos = tensor(&[t, 32], 1).cos().unwrap();
            let sin = tensor(&[t, 32], 2).sin().unwrap();
            for interleaved in [false, true] {
                let ours = rope(&x, &cos, &sin, interleaved).unwrap();
                let theirs = if interleaved {
                    candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
                } else {
                    candle_nn::rotary_emb::rope(&x, &cos, &sin)
                }
                .unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                assert_eq!(values(&ours), values(&theirs), "{h}x{t} {interleaved}");
            }
        }
    }
}
