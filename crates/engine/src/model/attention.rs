//! Causal attention over an engine-owned KV cache, computed so that every output row depends
//! only on its own query and the keys and values it may see, summed in a fixed order.
//!
//! A general matrix multiply picks its blocking (and so its summation order) from the matrix
//! shapes, and a vectorised softmax sums a row in lanes whose grouping depends on the row's
//! length; both make a row's result depend on how many other rows and masked columns share the
//! call. Through the Q8_0 rounding of activations such last-bit differences grow to visibly
//! different logits (measured up to 1.1 on SmolLM2). With attention computed row by row here,
//! a request gets the same numbers whether its prompt runs in one chunk or several, alone or in
//! a batch, or partly from a cached prefix: seeded sampling stays reproducible and greedy text
//! stays the same under load.

use candle_core::{Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Contiguous f32 data of a CPU tensor (from its layout's start offset).
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("attention needs contiguous tensors")
    };
    match &*storage {
        Storage::Cpu(cpu) => f(&cpu.as_slice::<f32>()?[start..end]),
        _ => candle_core::bail!("row-wise attention runs on the CPU"),
    }
}

/// Dot product with eight running sums combined in a fixed order.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Attention of `n` new positions (`q`: `[heads, n, head_dim]`, already scaled) after `past`
/// cached ones, over a cache layer (`k`, `v`: `[kv_heads, capacity, head_dim]`, the new
/// positions already written). Query head `h` reads KV head `h / group`. Returns
/// `[heads, n, head_dim]`.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, past: usize, group: usize) -> Result<Tensor> {
    let (heads, n, hd) = q.dims3()?;
    let (_, cap, _) = k.dims3()?;
    if past + n > cap {
        candle_core::bail!("attention past the cache: {past} + {n} > {cap}")
    }
    let out = with_slice(q, |q| {
        with_slice(k, |k| {
            with_slice(v, |v| {
                let mut out = vec![0f32; heads * n * hd];
                out.par_chunks_mut(n * hd).enumerate().for_each(|(h, out_h)| {
                    let base = (h / group) * cap * hd;
                    let mut weights = vec![0f32; past + n];
                    for i in 0..n {
                        let qrow = &q[(h * n + i) * hd..(h * n + i + 1) * hd];
                        let visible = past + i + 1;
                        let mut max = f32::NEG_INFINITY;
                        for (j, w) in weights[..visible].iter_mut().enumerate() {
                            *w = dot(qrow, &k[base + j * hd..base + (j + 1) * hd]);
                            max = max.max(*w);
                        }
                        let mut sum = 0f32;
                        for w in &mut weights[..visible] {
                            *w = (*w - max).exp();
                            sum += *w;
                        }
                        let o = &mut out_h[i * hd..(i + 1) * hd];
                        for (j, w) in weights[..visible].iter().enumerate() {
                            let vrow = &v[base + j * hd..base + (j + 1) * hd];
                            for (od, vd) in o.iter_mut().zip(vrow) {
                                *od += w * vd;
                            }
                        }
                        let inv = 1.0 / sum;
                        for od in o.iter_mut() {
                            *od *= inv;
                        }
                    }
                });
                Ok(out)
            })
        })
    })?;
    Tensor::from_vec(out, (heads, n, hd), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same numbers as the textbook formula (softmax(q·kᵀ + causal mask)·v).
    #[test]
    fn matches_the_definition() {
        let dev = Device::Cpu;
        let (heads, kv, hd, cap, past, n) = (4, 2, 12, 10, 3, 4);
        let q = Tensor::randn(0f32, 1.0, (heads, n, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev).unwrap();
        let got: Vec<Vec<Vec<f32>>> = attend(&q, &k, &v, past, heads / kv).unwrap().to_vec3().unwrap();
        type Rows = Vec<Vec<Vec<f32>>>;
        let (q, k, v): (Rows, Rows, Rows) = (q.to_vec3().unwrap(), k.to_vec3().unwrap(), v.to_vec3().unwrap());
        for h in 0..heads {
            for i in 0..n {
                let kvh = h / (heads / kv);
                let s: Vec<f64> = (0..=past + i)
                    .map(|j| (0..hd).map(|d| q[h][i][d] as f64 * k[kvh][j][d] as f64).sum())
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..hd {
                    let want: f64 = s.iter().enumerate().map(|(j, x)| (x - m).exp() / z * v[kvh][j][d] as f64).sum();
                    assert!((got[h][i][d] as f64 - want).abs() < 1e-5, "h{h} i{i} d{d}");
                }
            }
        }
    }

    /// A row's result does not depend on the rows computed with it.
    #[test]
    fn rows_do_not_depend_on_the_chunk() {
        let dev = Device::Cpu;
        let (heads, hd, cap) = (3, 64, 40);
        let q = Tensor::randn(0f32, 1.0, (heads, 17, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, cap, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, cap, hd), &dev).unwrap();
        let whole: Vec<Vec<Vec<f32>>> = attend(&q, &k, &v, 0, heads).unwrap().to_vec3().unwrap();
        let tail = q.narrow(1, 5, 12).unwrap().contiguous().unwrap();
        let part: Vec<Vec<Vec<f32>>> = attend(&tail, &k, &v, 5, heads).unwrap().to_vec3().unwrap();
        for h in 0..heads {
            for i in 0..12 {
                assert_eq!(whole[h][i + 5], part[h][i]);
            }
        }
    }
}
