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

use std::sync::Mutex;

use candle_core::{Device, Result, Storage, Tensor};

/// Contiguous f32 data of a CPU tensor (from its layout's start offset).
fn cpu_slice<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("attention needs contiguous tensors")
    };
    match storage {
        Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[start..end]),
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

/// One sequence's part of a batched attention call.
pub(crate) struct SegmentKv<'a> {
    /// The sequence's cache layer, `[kv_heads, slots, head_dim]`, new positions written.
    pub(crate) k: &'a Tensor,
    /// Values, same shape.
    pub(crate) v: &'a Tensor,
    /// Position `p` is in slot `p % modulus` (a ring), `usize::MAX` for slot `p`.
    pub(crate) modulus: usize,
    /// Positions cached before this step.
    pub(crate) past: usize,
    /// New positions (rows of the query) this step.
    pub(crate) n: usize,
    /// Sliding window: a query at position `p` sees only keys `p - window + 1 ..= p`.
    pub(crate) window: Option<usize>,
}

/// Causal attention for every segment of a step. `q` is `[heads, total, head_dim]` (scaled),
/// the segments' rows one after another in order; query head `h` reads KV head `h / group`.
/// Returns `[heads, total, head_dim]`. Work items are (segment, head) pairs, run on candle's
/// own CPU thread pool (the one its matmuls use, so no second pool competes for the cores).
pub(crate) fn attend(q: &Tensor, segments: &[SegmentKv<'_>], group: usize) -> Result<Tensor> {
    let (heads, total, hd) = q.dims3()?;
    if segments.iter().map(|s| s.n).sum::<usize>() != total {
        candle_core::bail!("attention segments do not cover the query rows")
    }
    let (q_storage, q_layout) = q.storage_and_layout();
    let q = cpu_slice(&q_storage, q_layout)?;
    let guards: Vec<_> = segments.iter().map(|s| (s.k.storage_and_layout(), s.v.storage_and_layout())).collect();
    let mut kv = Vec::with_capacity(segments.len());
    let mut offsets = Vec::with_capacity(segments.len());
    let mut offset = 0;
    for (s, ((ks, kl), (vs, vl))) in segments.iter().zip(&guards) {
        let cap = s.k.dims3()?.1;
        // Every slot read exists, and a ring holds the window of the first row plus the new rows.
        let fits = if s.modulus == usize::MAX {
            s.past + s.n <= cap
        } else {
            (s.past + s.n <= cap || s.modulus <= cap) && s.window.is_some_and(|w| w + s.n - 1 <= s.modulus)
        };
        if !fits {
            candle_core::bail!("attention past the cache: {} + {} positions in {cap} slots", s.past, s.n)
        }
        kv.push((cpu_slice(ks, kl)?, cpu_slice(vs, vl)?, cap));
        offsets.push(offset);
        offset += s.n;
    }
    let items = segments.len() * heads;
    let results: Vec<Mutex<Vec<f32>>> = (0..items).map(|_| Mutex::new(Vec::new())).collect();
    let work = |item: usize| {
        let (si, h) = (item / heads, item % heads);
        let seg = &segments[si];
        let (k, v, cap) = kv[si];
        let base = (h / group) * cap * hd;
        let mut out = vec![0f32; seg.n * hd];
        let mut weights = vec![0f32; seg.past + seg.n];
        for i in 0..seg.n {
            let row = h * total + offsets[si] + i;
            let qrow = &q[row * hd..(row + 1) * hd];
            let visible = seg.past + i + 1;
            let first = seg.window.map_or(0, |w| visible.saturating_sub(w));
            let weights = &mut weights[..visible - first];
            let mut max = f32::NEG_INFINITY;
            for (j, w) in (first..visible).zip(weights.iter_mut()) {
                let j = j % seg.modulus;
                *w = dot(qrow, &k[base + j * hd..base + (j + 1) * hd]);
                max = max.max(*w);
            }
            let mut sum = 0f32;
            for w in weights.iter_mut() {
                *w = (*w - max).exp();
                sum += *w;
            }
            let o = &mut out[i * hd..(i + 1) * hd];
            for (j, w) in (first..visible).zip(weights.iter()) {
                let j = j % seg.modulus;
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
        *results[item].lock().unwrap_or_else(|e| e.into_inner()) = out;
    };
    candle_core::utils::barrier_pool().execute_chunked(items, |range| range.for_each(work));
    let mut out = vec![0f32; heads * total * hd];
    for (item, slot) in results.into_iter().enumerate() {
        let (si, h) = (item / heads, item % heads);
        let rows = slot.into_inner().unwrap_or_else(|e| e.into_inner());
        let at = (h * total + offsets[si]) * hd;
        out[at..at + rows.len()].copy_from_slice(&rows);
    }
    drop(guards);
    Tensor::from_vec(out, (heads, total, hd), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same numbers as the textbook formula (softmax(q·kᵀ + causal mask)·v), with and
    /// without a sliding window.
    #[test]
    fn matches_the_definition() {
        let dev = Device::Cpu;
        let (heads, kv, hd, cap, past, n) = (4, 2, 12, 10, 3, 4);
        let q = Tensor::randn(0f32, 1.0, (heads, n, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev).unwrap();
        type Rows = Vec<Vec<Vec<f32>>>;
        let (qr, kr, vr): (Rows, Rows, Rows) = (q.to_vec3().unwrap(), k.to_vec3().unwrap(), v.to_vec3().unwrap());
        for window in [None, Some(3), Some(1)] {
            let seg = [SegmentKv { k: &k, v: &v, modulus: usize::MAX, past, n, window }];
            let got: Rows = attend(&q, &seg, heads / kv).unwrap().to_vec3().unwrap();
            for h in 0..heads {
                for i in 0..n {
                    let kvh = h / (heads / kv);
                    let first = window.map_or(0, |w| (past + i + 1).saturating_sub(w));
                    let s: Vec<f64> = (first..=past + i)
                        .map(|j| (0..hd).map(|d| qr[h][i][d] as f64 * kr[kvh][j][d] as f64).sum())
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 =
                            s.iter().enumerate().map(|(j, x)| (x - m).exp() / z * vr[kvh][first + j][d] as f64).sum();
                        assert!((got[h][i][d] as f64 - want).abs() < 1e-5, "window {window:?} h{h} i{i} d{d}");
                    }
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
        let whole: Vec<Vec<Vec<f32>>> =
            attend(&q, &[SegmentKv { k: &k, v: &v, modulus: usize::MAX, past: 0, n: 17, window: None }], heads).unwrap().to_vec3().unwrap();
        let tail = q.narrow(1, 5, 12).unwrap().contiguous().unwrap();
        let part: Vec<Vec<Vec<f32>>> =
            attend(&tail, &[SegmentKv { k: &k, v: &v, modulus: usize::MAX, past: 5, n: 12, window: None }], heads).unwrap().to_vec3().unwrap();
        for h in 0..heads {
            for i in 0..12 {
                assert_eq!(whole[h][i + 5], part[h][i]);
            }
        }
        // Two segments (other sequences) in one call change nothing either.
        let k2 = Tensor::randn(0f32, 1.0, (1, cap, hd), &dev).unwrap();
        let both = Tensor::cat(&[&tail, &q.narrow(1, 0, 3).unwrap()], 1).unwrap().contiguous().unwrap();
        let segs = [SegmentKv { k: &k, v: &v, modulus: usize::MAX, past: 5, n: 12, window: None }, SegmentKv { k: &k2, v: &v, modulus: usize::MAX, past: 0, n: 3, window: None }];
        let mixed: Vec<Vec<Vec<f32>>> = attend(&both, &segs, heads).unwrap().to_vec3().unwrap();
        for h in 0..heads {
            for i in 0..12 {
                assert_eq!(mixed[h][i], part[h][i]);
            }
        }
    }
}
