//! The inner loops of row-wise attention: keys and values widened from the cache's f16 once
//! for every query that reads them ([`widen`]), a query's scores against a run of keys, the
//! softmax numerators of a row of scores, and a run of values summed with their weights; and,
//! for the few queries of one row (a decode step's query heads), scores and sums read straight
//! from the f16 cache, each key and value converted once for all of them ([`scores_f16`],
//! [`weighted_sum_f16`]: AVX-512 only, the same bits).
//!
//! Each output value has one definition, computed by the AVX-512 code where the packed kernel
//! runs on AVX-512 VNNI ([`avx512_vnni`]), by the AVX2 code where it runs on AVX2 ([`avx2`])
//! and by the portable code elsewhere, with the same bits (the tests
//! compare them):
//! - a score is 16 running sums, lane `l` taking dimensions `l, l + 16, …` with one fused
//!   multiply-add each, folded in halves (lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`, `+ 1`);
//!   dimensions past the last multiple of 16 are then added one fused multiply-add each;
//! - a softmax numerator is `exp(s − max)` by one polynomial ([`exp_nonpositive`]: Cephes'
//!   `expf` reduction and polynomial, fused multiply-adds where it says so), and their sum is
//!   taken in order, one add each (as before the numerators were vectorised: a sum in lanes
//!   is as exact, but rounds differently, and greedy answers on near ties follow it);
//! - a weighted sum adds `w_j · v_j` to each output value with one fused multiply-add per key,
//!   keys in order (the AVX-512 code takes head widths that are a multiple of 16, as every
//!   supported model's are, the AVX2 code the other multiples of 8 too; the portable code any
//!   other).
//!
//! None depends on how many rows or sequences share a call, which is what keeps attention
//! batch-invariant (see `model::attention`). Widening is exact, so the scores and sums are
//! those of the cache's f16 values whichever way they are read.

use half::f16;

use super::cpu_features::{avx2, avx512_vnni};

/// Lanes of one 512-bit register of f32.
const LANES: usize = 16;
/// Lanes of one 256-bit register of f32.
const HALF: usize = 8;

/// `dst[i] = src[i]` as f32 (exact): keys and values widened once for every query that reads
/// them, instead of once per query. F16C eight at a time where the CPU has it (every CPU the
/// packed kernel runs on, AVX-512 ones included: widening is exact, so one vector path serves).
pub(crate) fn widen(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and F16C; the lengths were checked above.
        unsafe { widen_f16c(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// [`widen`] in F16C.
///
/// # Safety
/// The CPU has AVX and F16C, and `src` and `dst` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let full = src.len() / HALF * HALF;
    for i in (0..full).step_by(HALF) {
        // SAFETY: i + 8 <= full <= both lengths; unaligned loads and stores.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast()));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
        }
    }
    for i in full..src.len() {
        dst[i] = src[i].to_f32();
    }
}

/// `scores[j] = q · keys[j]` for the keys `keys` holds (`[scores.len(), q.len()]`).
pub(crate) fn scores(q: &[f32], keys: &[f32], scores: &mut [f32]) {
    let hd = q.len();
    assert_eq!(keys.len(), scores.len() * hd, "attention scores: key count");
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F; the lengths were checked above.
        unsafe {
            match (hd / LANES, hd % LANES) {
                (4, 0) => scores_avx512::<4>(q, keys, scores),
                (8, 0) => scores_avx512::<8>(q, keys, scores),
                (16, 0) => scores_avx512::<16>(q, keys, scores),
                _ => scores_avx512_any(q, keys, scores),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the lengths were checked above.
        unsafe { scores_avx2(q, keys, scores) };
        return;
    }
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot_portable(q, k);
    }
}

/// `out[d] += weights[j] · values[j][d]` for every key `j` in order, one fused multiply-add
/// each (`values` is `[weights.len(), out.len()]`).
pub(crate) fn weighted_sum(weights: &[f32], values: &[f32], out: &mut [f32]) {
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
        // SAFETY: the CPU has AVX2 and FMA; the lengths were checked above.
        unsafe { weighted_sum_avx2(weights, values, out) };
        return;
    }
    for (&w, v) in weights.iter().zip(values.chunks_exact(hd)) {
        for (o, &v) in out.iter_mut().zip(v) {
            *o = w.mul_add(v, *o);
        }
    }
}

/// Calls `$f::<G>(args)` for `G` = `$group` (1 to [`MAX_GROUP`]; larger groups are refused
/// before by [`direct_f16`]): the direct f16 code is specialised per group size.
#[cfg(target_arch = "x86_64")]
macro_rules! by_group {
    ($group:expr, $f:ident($($arg:expr),*)) => {
        match $group {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
}

/// Most query heads [`scores_f16`] and [`weighted_sum_f16`] take at once: the query heads of
/// one KV head (3 for SmolLM2, 4 for Gemma 3 270M).
pub(crate) const MAX_GROUP: usize = 4;

/// Whether [`scores_f16`] and [`weighted_sum_f16`] run here for `group` query heads of width
/// `hd`: AVX-512 (where the packed kernel runs on AVX-512 VNNI), head widths a multiple of 16,
/// at most [`MAX_GROUP`] heads. Elsewhere the keys and values are widened first ([`widen`]).
pub(crate) fn direct_f16(hd: usize, group: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_vnni() && hd > 0 && hd.is_multiple_of(LANES) && (1..=MAX_GROUP).contains(&group)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (hd, group);
        false
    }
}

/// [`scores`] for the `group` queries in `qs` (`[group, hd]`) against keys read straight from
/// the cache's f16 (`[n, hd]`), into `scores` (`[group, n]`): each key converted once for all
/// the queries that read it, where a query row of a decode step would otherwise widen its
/// whole context for a few dot products. The same arithmetic as [`scores`] (conversion is
/// exact), so the same bits. Runs only where [`direct_f16`] says so (panics elsewhere).
pub(crate) fn scores_f16(qs: &[f32], group: usize, keys: &[f16], scores: &mut [f32]) {
    let hd = qs.len() / group.max(1);
    assert!(direct_f16(hd, group), "scores_f16: no direct code here");
    assert!(
        qs.len() == group * hd && keys.len() * group == scores.len() * hd,
        "scores_f16: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `direct_f16` checked AVX-512 F and the width, the lengths were checked above.
    unsafe {
        by_group!(group, scores_f16_avx512(qs, keys, scores))
    }
}

/// [`weighted_sum`] for `group` rows of weights (`[group, n]`) over values read straight from
/// the cache's f16 (`[n, hd]`), added into `out` (`[group, hd]`): each value converted once
/// for all the rows that read it; the same arithmetic as [`weighted_sum`], so the same bits.
/// Runs only where [`direct_f16`] says so (panics elsewhere).
pub(crate) fn weighted_sum_f16(weights: &[f32], group: usize, values: &[f16], out: &mut [f32]) {
    let hd = out.len() / group.max(1);
    assert!(
        direct_f16(hd, group),
        "weighted_sum_f16: no direct code here"
    );
    assert!(
        out.len() == group * hd && values.len() * group == weights.len() * hd,
        "weighted_sum_f16: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `direct_f16` checked AVX-512 F and the width, the lengths were checked above.
    unsafe {
        by_group!(group, weighted_sum_f16_avx512(weights, values, out))
    }
}

/// Replaces each score `s` of a row by its softmax numerator `exp(s − max)` (`max` the row's
/// largest score, NaNs skipped) and returns their sum, both as the module's docs define.
pub(crate) fn softmax_numerators(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { softmax_numerators_avx512(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_numerators_avx2(row) };
    }
    softmax_numerators_portable(row)
}

/// Cephes' `expf` constants: `ln 2` in two parts (the first exact in few bits), `log2 e`, the
/// polynomial's coefficients (highest first), and the input below which `exp` is 0 here.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const EXP_UNDERFLOW: f32 = -87.336_55;

/// `exp(x)` for `x <= 0` (a softmax's shifted scores), within 2 ulp: `x = n·ln 2 + r` with
/// `n` rounded to nearest (ties to even), `exp(r)` by Cephes' polynomial as
/// `((((((c0·r + c1)·r + c2)·r + c3)·r + c4)·r + c5)·r²) + r) + 1` in fused multiply-adds, times
/// `2ⁿ`; 0 below [`EXP_UNDERFLOW`], NaN for NaN. The vector code computes the same steps.
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    if x < EXP_UNDERFLOW {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // n is in -126..=0 here (NaN gives NaN through y).
    y * f32::from_bits((((n as i32) + 127) as u32) << 23)
}

/// [`softmax_numerators`] in portable code.
fn softmax_numerators_portable(row: &mut [f32]) -> f32 {
    let max = row
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    for v in row.iter_mut() {
        *v = exp_nonpositive(*v - max);
    }
    sum_in_order(row)
}

/// `row`'s sum, one add at a time in order.
fn sum_in_order(row: &[f32]) -> f32 {
    row.iter().fold(0.0, |sum, &v| sum + v)
}

/// The vector steps of [`exp_nonpositive`] for one instruction set, as a macro so that the
/// AVX-512 and AVX2 code cannot drift apart (`$x` the shifted scores).
#[cfg(target_arch = "x86_64")]
macro_rules! exp_vector {
    ($x:expr, $set1:ident, $mul:ident, $fmadd:ident, $add:ident, $round:expr,
     $cvt:ident, $slli:ident, $addi:ident, $set1i:ident, $cast:ident, $below:expr) => {{
        let x = $x;
        let n = $round($mul(x, $set1(LOG2E)));
        let r = $fmadd(n, $set1(-LN2_LO), $fmadd(n, $set1(-LN2_HI), x));
        let mut p = $set1(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = $fmadd(p, r, $set1(c));
        }
        let y = $add($fmadd(p, $mul(r, r), r), $set1(1.0));
        let scale = $cast($slli::<23>($addi($cvt(n), $set1i(127))));
        $below(x, $mul(y, scale))
    }};
}

/// [`softmax_numerators`] in AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_numerators_avx512(row: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let full = row.len() / LANES * LANES;
    let p = row.as_mut_ptr();
    // SAFETY: every chunk i..i + 16 lies below `full`; unaligned loads and stores.
    unsafe {
        // _mm512_max_ps returns its second operand when either is NaN: NaNs are skipped.
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(LANES) {
            m = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), m);
        }
        let mut max = _mm512_reduce_max_ps(m);
        for &v in &row[full..] {
            if v > max {
                max = v;
            }
        }
        let shift = _mm512_set1_ps(max);
        for i in (0..full).step_by(LANES) {
            let x = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), shift);
            let e = exp_vector!(
                x,
                _mm512_set1_ps,
                _mm512_mul_ps,
                _mm512_fmadd_ps,
                _mm512_add_ps,
                |v| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                _mm512_cvtps_epi32,
                _mm512_slli_epi32,
                _mm512_add_epi32,
                _mm512_set1_epi32,
                _mm512_castsi512_ps,
                |x, e| _mm512_maskz_mov_ps(
                    !_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_UNDERFLOW)),
                    e
                )
            );
            _mm512_storeu_ps(p.add(i), e);
        }
        for v in &mut row[full..] {
            *v = exp_nonpositive(*v - max);
        }
        sum_in_order(row)
    }
}

/// [`softmax_numerators`] in AVX2.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx2(row: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let max = row
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let full = row.len() / HALF * HALF;
    let p = row.as_mut_ptr();
    // SAFETY: every chunk i..i + 8 lies below `full`; unaligned loads and stores.
    unsafe {
        let shift = _mm256_set1_ps(max);
        for i in (0..full).step_by(HALF) {
            let at = p.add(i);
            let x = _mm256_sub_ps(_mm256_loadu_ps(at), shift);
            let e = exp_vector!(
                x,
                _mm256_set1_ps,
                _mm256_mul_ps,
                _mm256_fmadd_ps,
                _mm256_add_ps,
                |v| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                _mm256_cvtps_epi32,
                _mm256_slli_epi32,
                _mm256_add_epi32,
                _mm256_set1_epi32,
                _mm256_castsi256_ps,
                |x, e| _mm256_andnot_ps(
                    _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_UNDERFLOW)),
                    e
                )
            );
            _mm256_storeu_ps(at, e);
        }
        for v in &mut row[full..] {
            *v = exp_nonpositive(*v - max);
        }
        sum_in_order(row)
    }
}

/// One score in portable code, with the arithmetic the module's docs define.
fn dot_portable(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (q, k) in qc.zip(kc) {
        for l in 0..LANES {
            acc[l] = q[l].mul_add(k[l], acc[l]);
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
        s = q.mul_add(*k, s);
    }
    s
}

/// [`scores`] in AVX-512 for head widths of `C` registers: the query held in registers, two
/// keys a turn (independent chains).
///
/// # Safety
/// The CPU has AVX-512 F, `q.len() == 16 C`, and `keys` holds `scores.len() × q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512<const C: usize>(q: &[f32], keys: &[f32], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = C * LANES;
    // SAFETY: register c < C lies inside q (16 C values) and inside each key row.
    unsafe {
        let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(c * LANES)));
        let dot = |k: *const f32| {
            let mut acc = _mm512_setzero_ps();
            for (c, qv) in qv.iter().enumerate() {
                acc = _mm512_fmadd_ps(*qv, _mm512_loadu_ps(k.add(c * LANES)), acc);
            }
            // Lane l plus lane l + 8, then + 4, + 2, + 1: the portable order.
            fold8(_mm256_add_ps(
                _mm512_castps512_ps256(acc),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
            ))
        };
        let mut pairs = scores.chunks_exact_mut(2);
        let mut k = keys.as_ptr();
        for pair in &mut pairs {
            pair[0] = dot(k);
            pair[1] = dot(k.add(hd));
            k = k.add(2 * hd);
        }
        if let [last] = pairs.into_remainder() {
            *last = dot(k);
        }
    }
}

/// [`scores`] in AVX-512 for any head width.
///
/// # Safety
/// The CPU has AVX-512 F, and `keys` holds `scores.len() × q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512_any(q: &[f32], keys: &[f32], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let full = hd / LANES;
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * hd..(j + 1) * hd];
        // SAFETY: chunk c < full lies inside both rows (hd values each); unaligned loads.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for c in 0..full {
                let kv = _mm512_loadu_ps(k.as_ptr().add(c * LANES));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c * LANES)), kv, acc);
            }
            let x8 = _mm256_add_ps(
                _mm512_castps512_ps256(acc),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
            );
            *s = finish_score(x8, q, k, full * LANES);
        }
    }
}

/// The last three folds of 16 running sums already folded once (`x8`, lane `l` plus lane
/// `l + 8`): `+ 4`, `+ 2`, `+ 1`.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn fold8(x8: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let x4 = _mm_add_ps(_mm256_castps256_ps128(x8), _mm256_extractf128_ps::<1>(x8));
    let x2 = _mm_add_ps(x4, _mm_movehl_ps(x4, x4));
    let x1 = _mm_add_ss(x2, _mm_shuffle_ps::<0b01>(x2, x2));
    _mm_cvtss_f32(x1)
}

/// A score from its 16 running sums already folded once (`x8`): the other folds, then
/// dimensions `from..` one fused multiply-add each, as the portable code does (shared by the
/// AVX-512 and AVX2 code).
///
/// # Safety
/// The CPU has AVX and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn finish_score(x8: std::arch::x86_64::__m256, q: &[f32], k: &[f32], from: usize) -> f32 {
    // SAFETY: the CPU has AVX.
    let mut sum = unsafe { fold8(x8) };
    for d in from..q.len() {
        sum = q[d].mul_add(k[d], sum);
    }
    sum
}

/// [`scores`] in AVX2: the 16 running sums in two registers (lanes 0-7 and 8-15), folded as
/// the portable code folds them.
///
/// # Safety
/// The CPU has AVX2 and FMA, and `keys` holds `scores.len() × q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: &[f32], scores: &mut [f32]) {
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
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(qp), _mm256_loadu_ps(kp), lo);
                hi = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(HALF)),
                    _mm256_loadu_ps(kp.add(HALF)),
                    hi,
                );
            }
            // Lane l plus lane l + 8, then + 4, + 2, + 1: the portable order.
            let x8 = _mm256_add_ps(lo, hi);
            *s = finish_score(x8, q, k, full * LANES);
        }
    }
}

/// [`scores_f16`] in AVX-512 for `G` queries: per key, each register of 16 dimensions
/// converted once and multiplied into every query's running sums, folded as [`scores`] folds.
///
/// # Safety
/// The CPU has AVX-512 F, `qs` is `[G, hd]` with `hd` a multiple of 16, `keys` `[n, hd]` and
/// `scores` `[G, n]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_f16_avx512<const G: usize>(qs: &[f32], keys: &[f16], scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = qs.len() / G;
    let n = scores.len() / G;
    for j in 0..n {
        // SAFETY: key j's registers lie inside `keys` (n × hd values) and each query's inside
        // `qs`; unaligned loads.
        unsafe {
            let k = keys.as_ptr().add(j * hd);
            let mut acc = [_mm512_setzero_ps(); G];
            for c in 0..hd / LANES {
                let kc = _mm512_cvtph_ps(_mm256_loadu_si256(k.add(c * LANES).cast()));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let q = _mm512_loadu_ps(qs.as_ptr().add(g * hd + c * LANES));
                    *acc = _mm512_fmadd_ps(q, kc, *acc);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                // Lane l plus lane l + 8, then + 4, + 2, + 1: the portable order.
                scores[g * n + j] = fold8(_mm256_add_ps(
                    _mm512_castps512_ps256(*acc),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*acc))),
                ));
            }
        }
    }
}

/// [`weighted_sum_f16`] in AVX-512 for `G` rows: 4 registers of output values of every row at
/// a time (then any last ones one at a time), each value register converted once per key for
/// all the rows, keys in order.
///
/// # Safety
/// The CPU has AVX-512 F, `out` is `[G, hd]` with `hd` a multiple of 16, `values` `[n, hd]`
/// and `weights` `[G, n]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_f16_avx512<const G: usize>(
    weights: &[f32],
    values: &[f16],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    /// Registers `c..c + N` of every row's output values: load, add every key in order, store.
    ///
    /// # Safety
    /// As the caller's, with `(c + N) × 16 ≤ hd`.
    #[inline(always)]
    unsafe fn chains<const G: usize, const N: usize>(
        weights: &[f32],
        values: &[f16],
        out: &mut [f32],
        c: usize,
    ) {
        let hd = out.len() / G;
        let n = weights.len() / G;
        // SAFETY: registers c..c + N lie inside each row of `out` and of `values`; the weights'
        // rows hold n values each; unaligned loads and stores.
        unsafe {
            let o = out.as_mut_ptr();
            let mut acc: [[__m512; N]; G] = std::array::from_fn(|g| {
                std::array::from_fn(|r| _mm512_loadu_ps(o.add(g * hd + (c + r) * LANES)))
            });
            for j in 0..n {
                let row = values.as_ptr().add(j * hd + c * LANES);
                let v: [__m512; N] = std::array::from_fn(|r| {
                    _mm512_cvtph_ps(_mm256_loadu_si256(row.add(r * LANES).cast()))
                });
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weights.get_unchecked(g * n + j));
                    for (acc, v) in acc.iter_mut().zip(&v) {
                        *acc = _mm512_fmadd_ps(w, *v, *acc);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(g * hd + (c + r) * LANES), *acc);
                }
            }
        }
    }
    let registers = out.len() / G / LANES;
    let mut c = 0;
    // SAFETY: each call's registers lie below `registers`; the rest is the caller's contract.
    unsafe {
        while c + 4 <= registers {
            chains::<G, 4>(weights, values, out, c);
            c += 4;
        }
        while c < registers {
            chains::<G, 1>(weights, values, out, c);
            c += 1;
        }
    }
}

/// `weighted_sum`'s vector code for one instruction set (`$lanes` f32 a register): 4 registers of output
/// values at a time (four independent chains of fused multiply-adds, so that a key costs the
/// adds' throughput rather than one add's latency), then any last registers one at a time;
/// every key added in order. One definition, so that the instruction sets cannot drift apart.
#[cfg(target_arch = "x86_64")]
macro_rules! weighted_sum_vector {
    (
        $(#[$doc:meta])*
        $name:ident, $features:literal, $lanes:expr, $vec:ty,
        load: $load:ident, set1: $set1:ident, fmadd: $fmadd:ident, store: $store:ident
    ) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name(weights: &[f32], values: &[f32], out: &mut [f32]) {
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
                values: &[f32],
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
                            *acc = $fmadd(w, $load(row.add(k * W)), *acc);
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
    load: _mm512_loadu_ps, set1: _mm512_set1_ps, fmadd: _mm512_fmadd_ps, store: _mm512_storeu_ps
);

#[cfg(target_arch = "x86_64")]
weighted_sum_vector!(
    /// [`weighted_sum`] in AVX2, for head widths that are a multiple of 8.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, `out.len()` is a multiple of 8 and `values` holds
    /// `weights.len() × out.len()` values.
    weighted_sum_avx2, "avx2,fma", HALF, __m256,
    load: _mm256_loadu_ps, set1: _mm256_set1_ps, fmadd: _mm256_fmadd_ps, store: _mm256_storeu_ps
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

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The vector code gives the portable code's bits, for head widths that are and are not
    /// multiples of 16 (and the 4, 8 and 16 registers the AVX-512 scores run specialised);
    /// says which path ran.
    #[test]
    fn vector_and_portable_code_agree_bit_for_bit() {
        super::super::cpu_features::check_required_kernel();
        for hd in [12, 16, 64, 72, 96, 128, 256] {
            for n in [1, 36, 37] {
                let q = data(hd, 1);
                let half: Vec<f16> = data(n * hd, 2).iter().map(|&x| f16::from_f32(x)).collect();
                let mut keys = vec![0f32; n * hd];
                widen(&half, &mut keys);
                assert!(
                    keys.iter().zip(&half).all(|(k, h)| *k == h.to_f32()),
                    "widen"
                );
                let mut got = vec![0f32; n];
                scores(&q, &keys, &mut got);
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // The AVX2 code, also where AVX-512 is what `scores` runs.
                    let mut twin = vec![0f32; n];
                    // SAFETY: the CPU has AVX2 and FMA; `keys` holds n × hd values.
                    unsafe { scores_avx2(&q, &keys, &mut twin) };
                    assert_eq!(bits(&twin), bits(&got), "AVX2 scores, hd {hd}");
                }
                #[cfg(target_arch = "x86_64")]
                if avx512_vnni() {
                    let mut twin = vec![0f32; n];
                    // SAFETY: the CPU has AVX-512 F; `keys` holds n × hd values.
                    unsafe { scores_avx512_any(&q, &keys, &mut twin) };
                    assert_eq!(bits(&twin), bits(&got), "AVX-512 scores, hd {hd}");
                }
                for (j, &s) in got.iter().enumerate() {
                    let want = dot_portable(&q, &keys[j * hd..(j + 1) * hd]);
                    assert_eq!(s.to_bits(), want.to_bits(), "hd {hd} key {j}");
                    let exact: f64 = (0..hd).map(|d| q[d] as f64 * keys[j * hd + d] as f64).sum();
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
                        *o = w.mul_add(keys[j * hd + d], *o);
                    }
                }
                assert_eq!(bits(&out), bits(&want), "hd {hd}");
                #[cfg(target_arch = "x86_64")]
                if avx2() && hd.is_multiple_of(HALF) {
                    let mut twin = data(hd, 4);
                    // SAFETY: the CPU has AVX2 and FMA; hd is a multiple of 8 and `keys`
                    // holds n × hd values.
                    unsafe { weighted_sum_avx2(&weights, &keys, &mut twin) };
                    assert_eq!(bits(&twin), bits(&want), "AVX2 weighted sum, hd {hd}");
                }
            }
        }
        eprintln!(
            "attention kernels ran: {}",
            super::super::cpu_features::describe()
        );
    }

    /// The direct f16 code gives the bits of widening first and running [`scores`] and
    /// [`weighted_sum`] per query, for every group size it takes and head widths of 1 to 16
    /// registers; says whether it ran.
    #[test]
    fn direct_f16_code_matches_widening_bit_for_bit() {
        super::super::cpu_features::check_required_kernel();
        if !direct_f16(64, 3) {
            eprintln!("direct f16 attention: not on this CPU (no AVX-512), not checked");
            return;
        }
        eprintln!("direct f16 attention: AVX-512 code checked");
        for hd in [16, 48, 64, 128, 256] {
            for group in 1..=MAX_GROUP {
                for n in [1, 17, 37] {
                    let qs = data(group * hd, 6);
                    let half = |seed| -> Vec<f16> {
                        data(n * hd, seed)
                            .iter()
                            .map(|&x| f16::from_f32(x))
                            .collect()
                    };
                    let (keys, values) = (half(7), half(8));
                    let (mut wide_k, mut wide_v) = (vec![0f32; n * hd], vec![0f32; n * hd]);
                    widen(&keys, &mut wide_k);
                    widen(&values, &mut wide_v);
                    let mut got = vec![0f32; group * n];
                    scores_f16(&qs, group, &keys, &mut got);
                    let weights = data(group * n, 9);
                    let start = data(group * hd, 10);
                    let mut sums = start.clone();
                    weighted_sum_f16(&weights, group, &values, &mut sums);
                    for g in 0..group {
                        let mut want = vec![0f32; n];
                        scores(&qs[g * hd..(g + 1) * hd], &wide_k, &mut want);
                        assert_eq!(
                            bits(&got[g * n..(g + 1) * n]),
                            bits(&want),
                            "scores, hd {hd}, group {group}, n {n}, query {g}"
                        );
                        let mut out = start[g * hd..(g + 1) * hd].to_vec();
                        weighted_sum(&weights[g * n..(g + 1) * n], &wide_v, &mut out);
                        assert_eq!(
                            bits(&sums[g * hd..(g + 1) * hd]),
                            bits(&out),
                            "weighted sum, hd {hd}, group {group}, n {n}, row {g}"
                        );
                    }
                }
            }
        }
    }

    /// Softmax numerators: every instruction set's code gives the portable code's bits (rows
    /// shorter and longer than 16, a row whose largest score repeats, scores far below the
    /// largest), each numerator within 2 ulp-ish of `exp` in f64 (0 where that underflows
    /// f32), the largest exactly 1, and the sum is the numerators' sum in order.
    #[test]
    fn softmax_numerators_agree_and_match_exp() {
        for n in [1, 7, 16, 17, 100, 131] {
            let mut row: Vec<f32> = data(n, 5).iter().map(|x| x * 12.0).collect();
            if n > 2 {
                row[1] = -1000.0;
                row[2] = row.iter().copied().fold(f32::MIN, f32::max);
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut portable = row.clone();
            let sum = softmax_numerators_portable(&mut portable);
            for (e, s) in portable.iter().zip(&row) {
                let want = ((*s - max) as f64).exp();
                if want < 1e-37 {
                    assert!(*e < 1e-37, "{s}: {e}");
                } else {
                    assert!(
                        ((*e as f64) - want).abs() <= 2.5e-7 * want,
                        "{s}: {e} vs {want}"
                    );
                }
                if *s == max {
                    assert_eq!(*e, 1.0);
                }
            }
            let in_order = portable.iter().fold(0f32, |a, &e| a + e);
            assert_eq!(sum.to_bits(), in_order.to_bits());
            let mut got = row.clone();
            let got_sum = softmax_numerators(&mut got);
            assert_eq!(bits(&got), bits(&portable), "numerators, n {n}");
            assert_eq!(got_sum.to_bits(), sum.to_bits(), "sum, n {n}");
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                let mut twin = row.clone();
                // SAFETY: the CPU has AVX2 and FMA.
                let twin_sum = unsafe { softmax_numerators_avx2(&mut twin) };
                assert_eq!(bits(&twin), bits(&portable), "AVX2 numerators, n {n}");
                assert_eq!(twin_sum.to_bits(), sum.to_bits(), "AVX2 sum, n {n}");
            }
        }
    }

    /// The polynomial `exp` over its whole domain: within 2 ulp of `exp` in f64 where the
    /// result is normal, 0 below the cut-off, exact at 0.
    #[test]
    fn exp_polynomial_is_accurate() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        let mut x = 0f32;
        while x > EXP_UNDERFLOW {
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).to_bits();
            let ulp = f32::from_bits(ulp + 1) as f64 - want as f32 as f64;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.0137;
        }
    }
}
