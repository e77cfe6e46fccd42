//! The two inner loops of row-wise attention, over keys and values as the cache holds them
//! (f16), so that nothing is widened to f32 first: a query's scores against a run of keys, and
//! a run of values summed with their softmax weights.
//!
//! Each output value has one definition, computed by the AVX-512 code where the packed kernel
//! runs on AVX-512 VNNI ([`avx512_vnni`]), by the AVX2 code where it runs on AVX2 ([`avx2`])
//! and by the portable code elsewhere, with the same bits (the tests
//! compare them):
//! - a score is 16 running sums, lane `l` taking dimensions `l, l + 16, …` with one fused
//!   multiply-add each, folded in halves (lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`, `+ 1`);
//!   dimensions past the last multiple of 16 are then added one fused multiply-add each;
//! - a weighted sum adds `w_j · v_j` to each output value with one fused multiply-add per key,
//!   keys in order (the AVX-512 code takes head widths that are a multiple of 16, as every
//!   supported model's are, the AVX2 code the other multiples of 8 too; the portable code any
//!   other).
//!
//! Neither depends on how many rows or sequences share a call, which is what keeps attention
//! batch-invariant (see `model::attention`).

use half::f16;

use super::cpu_features::{avx2, avx512_vnni};

/// Lanes of one 512-bit register of f32.
const LANES: usize = 16;
/// Lanes of one 256-bit register of f32.
const HALF: usize = 8;

/// `scores[j] = q · keys[j]` for the keys `keys` holds (`[scores.len(), q.len()]`).
pub(crate) fn scores(q: &[f32], keys: &[f16], scores: &mut [f32]) {
    let hd = q.len();
    assert_eq!(keys.len(), scores.len() * hd, "attention scores: key count");
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F; the lengths were checked above.
        unsafe { scores_avx512(q, keys, scores) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C; the lengths were checked above.
        unsafe { scores_avx2(q, keys, scores) };
        return;
    }
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot_portable(q, k);
    }
}

/// `out[d] += weights[j] · values[j][d]` for every key `j` in order, one fused multiply-add
/// each (`values` is `[weights.len(), out.len()]`).
pub(crate) fn weighted_sum(weights: &[f32], values: &[f16], out: &mut [f32]) {
    let hd = out.len();
    assert_eq!(
        values.len(),
        weights.len() * hd,
        "attention values: key count"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() && hd.is_multiple_of(LANES) {
        // SAFETY: the CPU has AVX-512 F; the lengths were checked above.
        unsafe { weighted_sum_avx512(weights, values, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() && hd.is_multiple_of(HALF) {
        // SAFETY: the CPU has AVX2, FMA and F16C; the lengths were checked above.
        unsafe { weighted_sum_avx2(weights, values, out) };
        return;
    }
    for (&w, v) in weights.iter().zip(values.chunks_exact(hd)) {
        for (o, v) in out.iter_mut().zip(v) {
            *o = w.mul_add(v.to_f32(), *o);
        }
    }
}

/// One score in portable code, with the arithmetic the module's docs define.
fn dot_portable(q: &[f32], k: &[f16]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (q, k) in qc.zip(kc) {
        for l in 0..LANES {
            acc[l] = q[l].mul_add(k[l].to_f32(), acc[l]);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    let mut s = acc[0];
    for (q, k) in qr.iter().zip(kr) {
        s = q.mul_add(k.to_f32(), s);
    }
    s
}

/// [`scores`] in AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F, and `keys` holds `scores.len() × q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512(q: &[f32], keys: &[f16], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let full = hd / LANES;
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * hd..(j + 1) * hd];
        // SAFETY: chunk c < full lies inside both rows (hd values each); unaligned loads.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for c in 0..full {
                let kv = _mm512_cvtph_ps(_mm256_loadu_si256(k.as_ptr().add(c * LANES).cast()));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c * LANES)), kv, acc);
            }
            // Lane l plus lane l + 8, then + 4, + 2, + 1: the portable order.
            let x8 = _mm256_add_ps(
                _mm512_castps512_ps256(acc),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
            );
            *s = finish_score(x8, q, k, full * LANES);
        }
    }
}

/// A score from its 16 running sums already folded once (`x8`, lane `l` plus lane `l + 8`):
/// `+ 4`, `+ 2`, `+ 1`, then dimensions `from..` one fused multiply-add each, as the portable
/// code does (shared by the AVX-512 and AVX2 code).
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn finish_score(x8: std::arch::x86_64::__m256, q: &[f32], k: &[f16], from: usize) -> f32 {
    use std::arch::x86_64::*;
    let x4 = _mm_add_ps(_mm256_castps256_ps128(x8), _mm256_extractf128_ps::<1>(x8));
    let x2 = _mm_add_ps(x4, _mm_movehl_ps(x4, x4));
    let x1 = _mm_add_ss(x2, _mm_shuffle_ps::<0b01>(x2, x2));
    let mut sum = _mm_cvtss_f32(x1);
    for d in from..q.len() {
        sum = q[d].mul_add(k[d].to_f32(), sum);
    }
    sum
}

/// [`scores`] in AVX2: the 16 running sums in two registers (lanes 0-7 and 8-15), folded as
/// the portable code folds them.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and `keys` holds `scores.len() × q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(q: &[f32], keys: &[f16], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let full = hd / LANES;
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * hd..(j + 1) * hd];
        // SAFETY: chunk c < full lies inside both rows (hd values each); unaligned loads.
        unsafe {
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..full {
                let (kp, qp) = (k.as_ptr().add(c * LANES), q.as_ptr().add(c * LANES));
                let klo = _mm256_cvtph_ps(_mm_loadu_si128(kp.cast()));
                let khi = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(HALF).cast()));
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(qp), klo, lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(HALF)), khi, hi);
            }
            // Lane l plus lane l + 8, then + 4, + 2, + 1: the portable order.
            let x8 = _mm256_add_ps(lo, hi);
            *s = finish_score(x8, q, k, full * LANES);
        }
    }
}

/// `weighted_sum`'s vector code for one instruction set (`$lanes` f32 a register, `$widen`
/// turning a pointer `$p` to `$lanes` f16 values into a register): 4 registers of output
/// values at a time (four independent chains of fused multiply-adds, so that a key costs the
/// adds' throughput rather than one add's latency), then any last registers one at a time;
/// every key added in order. One definition, so that the instruction sets cannot drift apart.
#[cfg(target_arch = "x86_64")]
macro_rules! weighted_sum_vector {
    (
        $(#[$doc:meta])*
        $name:ident, $features:literal, $lanes:expr, $vec:ty,
        load: $load:ident, set1: $set1:ident, fmadd: $fmadd:ident, store: $store:ident,
        widen: |$p:ident| $widen:expr
    ) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name(weights: &[f32], values: &[f16], out: &mut [f32]) {
            use std::arch::x86_64::*;
            const W: usize = $lanes;
            let hd = out.len();
            /// Registers `c..c + N` of output values: load, add every key in order, store.
            ///
            /// # Safety
            /// As the caller's, with `(c + N) × W ≤ out.len()`.
            #[inline(always)]
            unsafe fn chains<const N: usize>(
                weights: &[f32],
                values: &[f16],
                out: &mut [f32],
                c: usize,
            ) {
                let hd = out.len();
                // SAFETY: registers c..c + N lie inside `out` and each value row (hd values).
                unsafe {
                    let o = out.as_mut_ptr().add(c * W);
                    let mut acc: [$vec; N] = std::array::from_fn(|k| $load(o.add(k * W)));
                    for (j, &w) in weights.iter().enumerate() {
                        let w = $set1(w);
                        let row = values.as_ptr().add(j * hd + c * W);
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let $p = row.add(k * W);
                            *acc = $fmadd(w, $widen, *acc);
                        }
                    }
                    for (k, acc) in acc.iter().enumerate() {
                        $store(o.add(k * W), *acc);
                    }
                }
            }
            let registers = hd / W;
            let mut c = 0;
            // SAFETY: each call's registers lie below `registers`; the rest is the caller's
            // contract.
            unsafe {
                while c + 4 <= registers {
                    chains::<4>(weights, values, out, c);
                    c += 4;
                }
                while c < registers {
                    chains::<1>(weights, values, out, c);
                    c += 1;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
weighted_sum_vector!(
    /// [`weighted_sum`] in AVX-512, for head widths that are a multiple of 16.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, `out.len()` is a multiple of 16 and `values` holds
    /// `weights.len() × out.len()` values.
    weighted_sum_avx512, "avx512f", LANES, __m512,
    load: _mm512_loadu_ps, set1: _mm512_set1_ps, fmadd: _mm512_fmadd_ps, store: _mm512_storeu_ps,
    widen: |p| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
);

#[cfg(target_arch = "x86_64")]
weighted_sum_vector!(
    /// [`weighted_sum`] in AVX2, for head widths that are a multiple of 8.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, `out.len()` is a multiple of 8 and `values` holds
    /// `weights.len() × out.len()` values.
    weighted_sum_avx2, "avx2,fma,f16c", HALF, __m256,
    load: _mm256_loadu_ps, set1: _mm256_set1_ps, fmadd: _mm256_fmadd_ps, store: _mm256_storeu_ps,
    widen: |p| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
);

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator: values of both signs and several magnitudes.
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 8.0
            })
            .collect()
    }

    /// The vector code gives the portable code's bits, for head widths that are and are not
    /// multiples of 16; says which path ran.
    #[test]
    fn vector_and_portable_code_agree_bit_for_bit() {
        super::super::cpu_features::check_required_kernel();
        for hd in [12, 16, 64, 72, 96, 128, 256] {
            let n = 37;
            let q = data(hd, 1);
            let keys: Vec<f16> = data(n * hd, 2).iter().map(|&x| f16::from_f32(x)).collect();
            let mut got = vec![0f32; n];
            scores(&q, &keys, &mut got);
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // The AVX2 code, also where AVX-512 is what `scores` runs.
                let mut twin = vec![0f32; n];
                // SAFETY: the CPU has AVX2, FMA and F16C; `keys` holds n × hd values.
                unsafe { scores_avx2(&q, &keys, &mut twin) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&twin), bits(&got), "AVX2 scores, hd {hd}");
            }
            for (j, &s) in got.iter().enumerate() {
                let want = dot_portable(&q, &keys[j * hd..(j + 1) * hd]);
                assert_eq!(s.to_bits(), want.to_bits(), "hd {hd} key {j}");
                let exact: f64 = (0..hd)
                    .map(|d| q[d] as f64 * keys[j * hd + d].to_f64())
                    .sum();
                assert!(
                    (s as f64 - exact).abs() < 1e-3 * (1.0 + exact.abs()),
                    "hd {hd}"
                );
            }
            let weights = data(n, 3);
            let mut out = data(hd, 4);
            let mut want = out.clone();
            weighted_sum(&weights, &keys, &mut out);
            for (j, &w) in weights.iter().enumerate() {
                for (d, o) in want.iter_mut().enumerate() {
                    *o = w.mul_add(keys[j * hd + d].to_f32(), *o);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "hd {hd}");
            #[cfg(target_arch = "x86_64")]
            if avx2() && hd.is_multiple_of(HALF) {
                let mut twin = data(hd, 4);
                // SAFETY: the CPU has AVX2, FMA and F16C; hd is a multiple of 8 and `keys`
                // holds n × hd values.
                unsafe { weighted_sum_avx2(&weights, &keys, &mut twin) };
                assert_eq!(bits(&twin), bits(&want), "AVX2 weighted sum, hd {hd}");
            }
        }
    }
}
