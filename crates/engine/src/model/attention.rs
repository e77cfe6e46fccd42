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

use candle_core::{Device, Result, Tensor};
use half::f16;

use crate::kernels;
use crate::kernels::cpu_slice;

/// One sequence's part of a batched attention call.
pub(crate) struct SegmentKv<'a> {
    /// The sequence's cache layer, `[kv_heads, slots, head_dim]` in f16, new positions written.
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

/// Query rows of one work item at most: a long prompt chunk is split so that both cores get
/// work even when one sequence runs alone.
const ROWS_PER_ITEM: usize = 32;

thread_local! {
    /// Each thread's keys and values of the work item it runs, widened to f32 (reused).
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Floats of widened keys a thread keeps between work items (1 MiB); larger buffers (long
/// contexts) are freed after use.
const KEEP_WIDENED: usize = 256 * 1024;

/// The runs of slots that positions `from..to` occupy in a cache where position `p` is in slot
/// `p % modulus`: `(first slot, positions)`, in order of position (two runs where the ring
/// wraps).
fn runs(modulus: usize, from: usize, to: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut p = from;
    std::iter::from_fn(move || {
        (p < to).then(|| {
            let slot = p % modulus;
            let run = (to - p).min(modulus - slot);
            p += run;
            (slot, run)
        })
    })
}

/// A query row's output: its weighted sum of values divided by the sum of its softmax
/// numerators (one multiply by the inverse each, as both paths of [`attend`] do it).
fn normalize(out: &mut [f32], sum: f32) {
    let inv = 1.0 / sum;
    for o in out {
        *o *= inv;
    }
}

/// Causal attention for every segment of a step. `q` is `[heads, total, head_dim]` (f32,
/// scaled), the segments' rows one after another in order; query head `h` reads KV head
/// `h / group`. Returns `[heads, total, head_dim]`. Work items are (segment, KV head, up to
/// [`ROWS_PER_ITEM`] rows): each widens the keys and values its rows see from the f16 cache
/// to f32 once (a thread's buffer, bounded by the context) for all its rows and the query heads
/// that share them, runs [`kernels::attention`]'s loops over them, and runs on candle's own CPU
/// thread pool (the one its matmuls use, so no second pool competes for the cores). An item of
/// one row reads the f16 cache directly instead where the CPU has the code for it
/// ([`kernels::attention::direct_f16`]; same bits): widening its whole context cost about as
/// much as its dot products, and decode steps are all such items.
pub(crate) fn attend(q: &Tensor, segments: &[SegmentKv<'_>], group: usize) -> Result<Tensor> {
    let (heads, total, hd) = q.dims3()?;
    if segments.iter().map(|s| s.n).sum::<usize>() != total {
        candle_core::bail!("attention segments do not cover the query rows")
    }
    let kv_heads = heads / group;
    let (q_storage, q_layout) = q.storage_and_layout();
    let q = cpu_slice::<f32>(&q_storage, q_layout)?;
    let guards: Vec<_> = segments
        .iter()
        .map(|s| (s.k.storage_and_layout(), s.v.storage_and_layout()))
        .collect();
    let mut kv = Vec::with_capacity(segments.len());
    let mut offsets = Vec::with_capacity(segments.len());
    let mut items = Vec::new(); // (segment, kv head, first row, rows)
    let mut offset = 0;
    for (si, (s, ((ks, kl), (vs, vl)))) in segments.iter().zip(&guards).enumerate() {
        let cap = s.k.dims3()?.1;
        // Every slot read exists, and a ring holds the window of the first row plus the new rows.
        let fits = if s.modulus == usize::MAX {
            s.past + s.n <= cap
        } else {
            (s.past + s.n <= cap || s.modulus <= cap)
                && s.window.is_some_and(|w| w + s.n - 1 <= s.modulus)
        };
        if !fits {
            candle_core::bail!(
                "attention past the cache: {} + {} positions in {cap} slots",
                s.past,
                s.n
            )
        }
        kv.push((cpu_slice::<f16>(ks, kl)?, cpu_slice::<f16>(vs, vl)?, cap));
        offsets.push(offset);
        offset += s.n;
        for kvh in 0..kv_heads {
            for r0 in (0..s.n).step_by(ROWS_PER_ITEM) {
                items.push((si, kvh, r0, (s.n - r0).min(ROWS_PER_ITEM)));
            }
        }
    }
    let results: Vec<Mutex<Vec<f32>>> = items.iter().map(|_| Mutex::new(Vec::new())).collect();
    let work = |item: usize| {
        let (si, kvh, r0, rows) = items[item];
        let seg = &segments[si];
        let (k, v, cap) = kv[si];
        let base = kvh * cap * hd;
        let (k, v) = (&k[base..base + cap * hd], &v[base..base + cap * hd]);
        // The positions any of the item's rows sees, widened to f32 once for all its rows and
        // query heads (from the first row's window start to the last row).
        let lo = seg
            .window
            .map_or(0, |w| (seg.past + r0 + 1).saturating_sub(w));
        let hi = seg.past + r0 + rows;
        // One row (a decode step's, a short candidate's) reads its keys and values straight
        // from the cache where the CPU has the code for it: widening its whole context would
        // cost about as much as the few dot products it serves.
        if rows == 1 && kernels::attention::direct_f16(hd, group) {
            let mut slots = runs(seg.modulus, lo, hi);
            if let (Some((slot, n)), None) = (slots.next(), slots.next()) {
                let (from, to) = (slot * hd, (slot + n) * hd);
                let mut qs = Vec::with_capacity(group * hd);
                for g in 0..group {
                    let row = (kvh * group + g) * total + offsets[si] + r0;
                    qs.extend_from_slice(&q[row * hd..(row + 1) * hd]);
                }
                let mut weights = vec![0f32; group * n];
                kernels::attention::scores_f16(&qs, group, &k[from..to], &mut weights);
                let sums: Vec<f32> = weights
                    .chunks_exact_mut(n)
                    .map(kernels::attention::softmax_numerators)
                    .collect();
                let mut out = vec![0f32; group * hd];
                kernels::attention::weighted_sum_f16(&weights, group, &v[from..to], &mut out);
                for (o, sum) in out.chunks_exact_mut(hd).zip(sums) {
                    normalize(o, sum);
                }
                *results[item].lock().unwrap_or_else(|e| e.into_inner()) = out;
                return;
            }
        }
        WIDENED.with_borrow_mut(|(keys, values)| {
            keys.resize((hi - lo) * hd, 0.0);
            values.resize((hi - lo) * hd, 0.0);
            let mut at = 0;
            for (slot, n) in runs(seg.modulus, lo, hi) {
                let (from, to) = (slot * hd, (slot + n) * hd);
                kernels::attention::widen(&k[from..to], &mut keys[at..at + n * hd]);
                kernels::attention::widen(&v[from..to], &mut values[at..at + n * hd]);
                at += n * hd;
            }
            // [group heads][rows][hd]
            let mut out = vec![0f32; group * rows * hd];
            let mut weights = Vec::new();
            for g in 0..group {
                let h = kvh * group + g;
                for i in r0..r0 + rows {
                    let row = h * total + offsets[si] + i;
                    let qrow = &q[row * hd..(row + 1) * hd];
                    let visible = seg.past + i + 1;
                    let first = seg.window.map_or(0, |w| visible.saturating_sub(w));
                    let (from, to) = ((first - lo) * hd, (visible - lo) * hd);
                    weights.clear();
                    weights.resize(visible - first, 0f32);
                    kernels::attention::scores(qrow, &keys[from..to], &mut weights);
                    let sum = kernels::attention::softmax_numerators(&mut weights);
                    let o = &mut out[(g * rows + i - r0) * hd..][..hd];
                    kernels::attention::weighted_sum(&weights, &values[from..to], o);
                    normalize(o, sum);
                }
            }
            // Long contexts leave large buffers: give them back rather than keep them per thread.
            if keys.capacity() > KEEP_WIDENED {
                *keys = Vec::new();
                *values = Vec::new();
            }
            *results[item].lock().unwrap_or_else(|e| e.into_inner()) = out;
        });
    };
    crate::kernels::chunked(items.len(), |range| range.for_each(work));
    let mut out = vec![0f32; heads * total * hd];
    for (&(si, kvh, r0, rows), slot) in items.iter().zip(results) {
        let part = slot.into_inner().unwrap_or_else(|e| e.into_inner());
        for g in 0..group {
            let h = kvh * group + g;
            let at = (h * total + offsets[si] + r0) * hd;
            out[at..at + rows * hd].copy_from_slice(&part[g * rows * hd..(g + 1) * rows * hd]);
        }
    }
    drop(guards);
    Tensor::from_vec(out, (heads, total, hd), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The same numbers as the textbook formula (softmax(q·kᵀ + causal mask)·v) over the keys
    /// and values as the f16 cache holds them, with and without a sliding window, and on a
    /// ring that wrapped (position `p` in slot `p % 10`).
    #[test]
    fn matches_the_definition() {
        let dev = Device::Cpu;
        let (heads, kv, hd, cap, n) = (4, 2, 12, 10, 4);
        let q = Tensor::randn(0f32, 1.0, (heads, n, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        type Rows = Vec<Vec<Vec<f32>>>;
        let wide = |t: &Tensor| -> Rows { t.to_dtype(DType::F32).unwrap().to_vec3().unwrap() };
        let (qr, kr, vr): (Rows, Rows, Rows) = (q.to_vec3().unwrap(), wide(&k), wide(&v));
        let cases = [
            (3, None, usize::MAX),
            (3, Some(3), usize::MAX),
            (3, Some(1), usize::MAX),
            (12, Some(3), cap),
        ];
        for (past, window, modulus) in cases {
            let seg = [SegmentKv {
                k: &k,
                v: &v,
                modulus,
                past,
                n,
                window,
            }];
            let got: Rows = attend(&q, &seg, heads / kv).unwrap().to_vec3().unwrap();
            for h in 0..heads {
                for i in 0..n {
                    let kvh = h / (heads / kv);
                    let first = window.map_or(0, |w| (past + i + 1).saturating_sub(w));
                    let s: Vec<f64> = (first..=past + i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| qr[h][i][d] as f64 * kr[kvh][j % modulus][d] as f64)
                                .sum()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = s
                            .iter()
                            .enumerate()
                            .map(|(j, x)| {
                                (x - m).exp() / z * vr[kvh][(first + j) % modulus][d] as f64
                            })
                            .sum();
                        assert!(
                            (got[h][i][d] as f64 - want).abs() < 1e-5,
                            "past {past} window {window:?} h{h} i{i} d{d}"
                        );
                    }
                }
            }
        }
    }

    /// A row alone in its work item (a decode step) reads the cache directly where the CPU
    /// has the code for it, and gets the bits it gets inside a prompt's chunk (widened): for
    /// query-head groups of 3 and 4, with and without a sliding window. Says which path ran.
    #[test]
    fn one_row_gets_the_bits_of_its_chunk() {
        crate::kernels::cpu_features::check_required_kernel();
        let dev = Device::Cpu;
        for (heads, kv_heads, window) in [(3, 1, None), (8, 2, None), (3, 1, Some(7))] {
            let (hd, cap, n) = (64, 48, 40);
            let group = heads / kv_heads;
            eprintln!(
                "one row, group {group}: {}",
                if kernels::attention::direct_f16(hd, group) {
                    "direct f16 code"
                } else {
                    "widened (no direct code on this CPU)"
                }
            );
            let cache = |seed: f32| {
                Tensor::randn(seed, 1.0, (kv_heads, cap, hd), &dev)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap()
            };
            let (k, v) = (cache(0.0), cache(0.5));
            let q = Tensor::randn(0f32, 1.0, (heads, n, hd), &dev).unwrap();
            let seg = |past, n| SegmentKv {
                k: &k,
                v: &v,
                modulus: usize::MAX,
                past,
                n,
                window,
            };
            let whole: Vec<Vec<Vec<f32>>> =
                attend(&q, &[seg(0, n)], group).unwrap().to_vec3().unwrap();
            for i in [0, 1, 6, 7, 31, 32, 39] {
                let row = q.narrow(1, i, 1).unwrap().contiguous().unwrap();
                let one: Vec<Vec<Vec<f32>>> = attend(&row, &[seg(i, 1)], group)
                    .unwrap()
                    .to_vec3()
                    .unwrap();
                for h in 0..heads {
                    let (a, b): (Vec<u32>, Vec<u32>) = (
                        whole[h][i].iter().map(|x| x.to_bits()).collect(),
                        one[h][0].iter().map(|x| x.to_bits()).collect(),
                    );
                    assert_eq!(a, b, "heads {heads}, window {window:?}, row {i}, head {h}");
                }
            }
        }
    }

    /// A row's result does not depend on the rows computed with it: a prompt split in chunks
    /// (and in work items of [`ROWS_PER_ITEM`] rows), or sharing a call with other sequences.
    #[test]
    fn rows_do_not_depend_on_the_chunk() {
        let dev = Device::Cpu;
        let (heads, hd, cap, n) = (3, 64, 90, 70);
        let kv = |seed: f32| {
            Tensor::randn(seed, 1.0, (1, cap, hd), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let q = Tensor::randn(0f32, 1.0, (heads, n, hd), &dev).unwrap();
        let (k, v) = (kv(0.0), kv(0.5));
        let seg = |k, past, n| SegmentKv {
            k,
            v: &v,
            modulus: usize::MAX,
            past,
            n,
            window: None,
        };
        let whole: Vec<Vec<Vec<f32>>> = attend(&q, &[seg(&k, 0, n)], heads)
            .unwrap()
            .to_vec3()
            .unwrap();
        let tail = q.narrow(1, 5, n - 5).unwrap().contiguous().unwrap();
        let part: Vec<Vec<Vec<f32>>> = attend(&tail, &[seg(&k, 5, n - 5)], heads)
            .unwrap()
            .to_vec3()
            .unwrap();
        for h in 0..heads {
            for i in 0..n - 5 {
                assert_eq!(whole[h][i + 5], part[h][i], "h{h} i{i}");
            }
        }
        // Two segments (other sequences) in one call change nothing either.
        let k2 = kv(1.0);
        let both = Tensor::cat(&[&tail, &q.narrow(1, 0, 3).unwrap()], 1)
            .unwrap()
            .contiguous()
            .unwrap();
        let mixed: Vec<Vec<Vec<f32>>> = attend(&both, &[seg(&k, 5, n - 5), seg(&k2, 0, 3)], heads)
            .unwrap()
            .to_vec3()
            .unwrap();
        for h in 0..heads {
            for i in 0..n - 5 {
                assert_eq!(mixed[h][i], part[h][i]);
            }
        }
    }
}
