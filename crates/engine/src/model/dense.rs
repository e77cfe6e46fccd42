//! Prompt rows times a weight matrix in f32, on candle's CPU pool.
//!
//! candle's own f32 matmul hands the GEMM to rayon's threads while candle's barrier pool (which
//! runs the attention and the quantized kernels) still spins its worker after the last
//! operation: on 2 cores, three threads then shared two (measured: the GEMM ran mostly on one
//! core's worth of time). Here the output columns are cut into fixed chunks that the barrier
//! pool's threads take one at a time, each chunk one single-threaded GEMM over weights
//! dequantized for that chunk only (a few hundred KB, still in cache when the GEMM reads them,
//! and no f32 copy of the whole matrix).
//!
//! A chunk's GEMM sums every output in an order set by its own shape, which never depends on how
//! many rows the call has, as long as neither is too small (see [`MIN_ROWS`]; chunks are at
//! least [`CHUNK`] wide); so, as before, a row gets the same bits whatever else is in the batch
//! (tested here and by the engine's batching tests).

use std::ops::Range;

use candle_core::{Result, Tensor};

/// Output columns (weight rows) per work item.
const CHUNK: usize = 128;

/// Fewest rows a GEMM is given (fewer are repeated up to it). gemm picks another summation
/// order for a small enough `rows × columns` (measured: one row of any width, up to 4 rows of a
/// 64-wide chunk), which would make a short prompt's numbers depend on its batch.
const MIN_ROWS: usize = 8;

/// Raw pointer that worker threads write disjoint columns of.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every work item writes only its own columns.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`, which is `Sync`).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `x · Wᵀ` for `x` `[m, k]` and a `[n, k]` matrix `W` whose rows `fill(range, dst)` writes
/// in f32 (row-major, `range.len() × k` values): `[m, n]`.
pub(crate) fn matmul_t(x: &Tensor, n: usize, fill: &(dyn Fn(Range<usize>, &mut [f32]) + Sync)) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let mut xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let rows = m.max(MIN_ROWS);
    for r in m..rows {
        xs.extend_from_within((r % m) * k..(r % m + 1) * k);
    }
    let mut out = vec![0f32; rows * n];
    let ptr = Out(out.as_mut_ptr());
    let xs = &xs;
    // Chunks of CHUNK columns, the last one taking the rest (never a narrow one).
    let chunks = (n / CHUNK).max(1);
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        let mut w = vec![0f32; (2 * CHUNK).max(n) * k];
        for c in range {
            let cols = c * CHUNK..if c + 1 == chunks { n } else { (c + 1) * CHUNK };
            let width = cols.len();
            fill(cols.clone(), &mut w[..width * k]);
            // SAFETY: `xs` is `[rows, k]` and `w` `[width, k]`, both row-major and alive for the
            // call; the destination is columns `cols` of the `[rows, n]` output, which no other
            // work item writes.
            unsafe {
                gemm::gemm(
                    rows,
                    width,
                    k,
                    ptr.at(cols.start),
                    1,
                    n as isize,
                    false,
                    xs.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            };
        }
    });
    out.truncate(m * n);
    Tensor::from_vec(out, (m, n), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn matrix(rows: usize, cols: usize, salt: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| (((i + salt) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0).collect()
    }

    #[test]
    fn matches_candle_and_a_row_never_depends_on_its_batch() {
        for (n, k) in [(300, 96), (64, 576), (192, 576), (576, 1536), (1536, 576)] {
            let w = matrix(n, k, 1);
            let fill = |r: Range<usize>, dst: &mut [f32]| dst.copy_from_slice(&w[r.start * k..r.end * k]);
            let x = Tensor::from_vec(matrix(40, k, 2), (40, k), &Device::Cpu).unwrap();
            let ours = matmul_t(&x, n, &fill).unwrap().to_vec2::<f32>().unwrap();
            let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let theirs = x.matmul(&wt.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
            for m in 1..=12 {
                for start in [0, 40 - m] {
                    let part = matmul_t(&x.narrow(0, start, m).unwrap(), n, &fill).unwrap().to_vec2::<f32>().unwrap();
                    assert_eq!(part[..], ours[start..start + m], "n {n}, k {k}: rows {start}..{} alone", start + m);
                }
            }
        }
    }
}
