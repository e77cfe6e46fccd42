//! The gated MLP's `act(gate) × up` in one pass over both, on candle's CPU threads: SiLU
//! (llama family) or GELU with the tanh approximation (Gemma 3).
//!
//! candle computes these one value at a time on one thread (`tanhf`, `expm1f`), then multiplies
//! by `up` in a second pass: on Gemma 3 prompts that was about a tenth of the time while the
//! other threads waited. Both are written as `x · σ(k)`: SiLU with `k = x`, and the tanh GELU,
//! `½x(1 + tanh(u))`, as `x · σ(2u)` (the same function, without `1 + tanh`'s cancellation for
//! negative inputs). With AVX-512 every value goes through the same vector code (the last,
//! partial register under a mask), so a value never depends on where it sits in the batch.

use candle_core::{DType, Device, Result, Tensor};

use super::{cpu_slice, Out};

/// Which activation gates the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// `x · σ(x)`.
    Silu,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
    GeluTanh,
}

/// `√(2/π)`, the tanh GELU's inner scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh GELU's cubic coefficient.
const GELU_CUBIC: f32 = 0.044_715;
/// Values per parallel work item: enough to outweigh handing it to a thread.
const CHUNK: usize = 4096;

/// `act(gate) × up`, element-wise, for two tensors of one shape.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, kind: Gate) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "gated activation: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        )
    }
    if !gate.device().is_cpu() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        let act = match kind {
            Gate::Silu => candle_nn::ops::silu(gate)?,
            Gate::GeluTanh => gate.gelu()?,
        };
        return act * up;
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let mut out = vec![0f32; n];
    {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let g = cpu_slice::<f32>(&gs, gl)?;
        let u = cpu_slice::<f32>(&us, ul)?;
        let chunks = n.div_ceil(CHUNK);
        let dst = Out(out.as_mut_ptr());
        let run = |items: std::ops::Range<usize>| {
            for c in items {
                let at = c * CHUNK;
                let len = CHUNK.min(n - at);
                // SAFETY: chunk c's values lie inside `out` and belong to this item only.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.at(at), len) };
                apply(kind, &g[at..at + len], &u[at..at + len], o);
            }
        };
        crate::kernels::chunked(chunks, run);
    }
    Tensor::from_vec(out, gate.shape(), &Device::Cpu)
}

/// `act(gate) × up` for a `[T, 2n]` tensor holding each row's gate then its up projection:
/// the stacked gate/up matmul's output read where it lies, rather than split into two copies
/// first (those copies cost the model thread about 2% of a 16-sequence decode step on SmolLM2
/// while the other threads waited). The same values as [`gated`] on the two halves.
pub(crate) fn gated_halves(both: &Tensor, kind: Gate) -> Result<Tensor> {
    let (rows, width) = both.dims2()?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("gated activation: {width} columns do not split in halves")
    }
    let n = width / 2;
    if !both.device().is_cpu() || both.dtype() != DType::F32 {
        let half = |at| both.narrow(1, at, n)?.contiguous();
        return gated(&half(0)?, &half(n)?, kind);
    }
    let both = both.contiguous()?;
    let mut out = vec![0f32; rows * n];
    {
        let (bs, bl) = both.storage_and_layout();
        let b = cpu_slice::<f32>(&bs, bl)?;
        let per_item = (CHUNK / n).max(1);
        let items = rows.div_ceil(per_item);
        let dst = Out(out.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            for item in range {
                for r in item * per_item..rows.min((item + 1) * per_item) {
                    let (g, u) = b[r * width..(r + 1) * width].split_at(n);
                    // SAFETY: row r of `out` belongs to this item only.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r * n), n) };
                    apply(kind, g, u, o);
                }
            }
        };
        crate::kernels::chunked(items, run);
    }
    Tensor::from_vec(out, (rows, n), &Device::Cpu)
}

/// `out = act(g) × u` for one chunk, through AVX-512 where the CPU has it.
///
/// The vector code needs AVX-512 F only, but runs where the packed kernel runs on AVX-512 VNNI
/// ([`avx512_vnni`](super::cpu_features::avx512_vnni)), so that a CPU computes a model's
/// numbers one way.
fn apply(kind: Gate, g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_features::avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F (checked); the three slices have one length.
        unsafe { apply_avx512(kind, g, u, out) };
        return;
    }
    // `k` in f64, rounded once: its few f32 roundings would grow |k|-fold through `e⁻ᵏ` (5e-6
    // relative at x = -7.2 for the tanh GELU, where the AVX-512 code's fused multiply-adds keep
    // it near 1e-7·|k|). SiLU's `k` is `x` itself, so its values are unchanged.
    for ((o, &x), &u) in out.iter_mut().zip(g).zip(u) {
        let k = exponent(kind, f64::from(x)) as f32;
        *o = x / (1.0 + (-k).exp()) * u;
    }
}

/// `k` in `x · σ(k)`.
fn exponent(kind: Gate, x: f64) -> f64 {
    match kind {
        Gate::Silu => x,
        Gate::GeluTanh => 2.0 * f64::from(SQRT_2_OVER_PI) * (x + f64::from(GELU_CUBIC) * x * x * x),
    }
}

/// [`apply`] in AVX-512, 16 values a step, the last step under a mask.
///
/// # Safety
/// The CPU has AVX-512 F; `g`, `u` and `out` have one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512(kind: Gate, g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(g.len() == u.len() && g.len() == out.len());
    let one = _mm512_set1_ps(1.0);
    let (scale, cubic) = (
        _mm512_set1_ps(2.0 * SQRT_2_OVER_PI),
        _mm512_set1_ps(GELU_CUBIC),
    );
    let mut i = 0;
    while i < g.len() {
        let left = g.len() - i;
        let mask: __mmask16 = if left >= 16 {
            0xFFFF
        } else {
            (1u16 << left) - 1
        };
        // SAFETY: the mask covers only values inside the slices (the caller's contract).
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            let up = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
            let k = match kind {
                Gate::Silu => x,
                Gate::GeluTanh => {
                    let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
                    _mm512_mul_ps(scale, _mm512_fmadd_ps(cubic, x3, x))
                }
            };
            let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), k));
            let y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), up);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, y);
        }
        i += 16;
    }
}

/// `eˣ` for 16 values (Cephes' `expf`: `x = n·ln 2 + r`, a degree-7 polynomial in `r`, then
/// `× 2ⁿ`), within about 2 ulp; inputs clamped to ±88, where it stays finite and non-zero.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const C: [f32; 6] = [
        1.987_569_2e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-88.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // r = x − n·ln 2, with ln 2 split in two for precision.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(C[0]);
    for c in &C[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let p = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs across the range an MLP sees, and past it.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) / 128.0).collect();
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0, 200.0, -200.0, 1e6, -1e6,
        ]);
        v
    }

    #[test]
    fn activations_match_their_definitions() {
        super::super::cpu_features::check_required_kernel();
        eprintln!(
            "activation path: {}",
            if cfg!(target_arch = "x86_64") && super::super::cpu_features::avx512_vnni() {
                "AVX-512"
            } else {
                "scalar (k in f64)"
            }
        );
        let x = inputs();
        let up: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for kind in [Gate::Silu, Gate::GeluTanh] {
            let g = Tensor::new(x.as_slice(), &Device::Cpu).unwrap();
            let u = Tensor::new(up.as_slice(), &Device::Cpu).unwrap();
            let ours = gated(&g, &u, kind).unwrap().to_vec1::<f32>().unwrap();
            for ((&x, &u), &y) in x.iter().zip(&up).zip(&ours) {
                let (x64, u64) = (f64::from(x), f64::from(u));
                let want = match kind {
                    Gate::Silu => x64 / (1.0 + (-x64).exp()),
                    Gate::GeluTanh => {
                        let inner = f64::from(SQRT_2_OVER_PI)
                            * (x64 + f64::from(GELU_CUBIC) * x64 * x64 * x64);
                        let textbook = 0.5 * x64 * (1.0 + inner.tanh());
                        // ½(1 + tanh u) = σ(2u); f64's `1 + tanh` cancels to 0 below about -9.
                        let logistic = x64 / (1.0 + (-2.0 * inner).exp());
                        assert!(
                            (textbook - logistic).abs() <= 1e-15 * x64.abs().max(1.0),
                            "{x}"
                        );
                        logistic
                    }
                } * u64;
                // An f32 `k` carries a relative error of ~1e-7, which `e⁻ᵏ` turns into ~1e-7·|k|.
                let k = exponent(kind, x64).abs();
                let err = (f64::from(y) - want).abs();
                assert!(
                    err <= (4e-7 + 1.2e-7 * k) * want.abs() + 1e-30,
                    "{kind:?}({x}) × {u} = {y}, want {want}"
                );
            }
        }
    }

    /// The stacked `[gate | up]` rows give [`gated`]'s bits on the two halves, for row widths
    /// that do and do not fill whole registers and work items.
    #[test]
    fn stacked_halves_match_the_separate_halves() {
        super::super::cpu_features::check_required_kernel();
        let x = inputs();
        for (rows, n) in [(1, 7), (5, 40), (16, 1536), (3, CHUNK + 3)] {
            let g: Vec<f32> = (0..rows * n).map(|i| x[i % x.len()]).collect();
            let u: Vec<f32> = (0..rows * n).map(|i| 0.5 + (i % 11) as f32 * 0.3).collect();
            let gate = Tensor::from_vec(g, (rows, n), &Device::Cpu).unwrap();
            let up = Tensor::from_vec(u, (rows, n), &Device::Cpu).unwrap();
            let both = Tensor::cat(&[&gate, &up], 1).unwrap();
            for kind in [Gate::Silu, Gate::GeluTanh] {
                let bits = |t: Tensor| -> Vec<u32> {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(
                    bits(gated_halves(&both, kind).unwrap()),
                    bits(gated(&gate, &up, kind).unwrap()),
                    "{rows} rows of {n}, {kind:?}"
                );
            }
        }
    }

    #[test]
    fn a_value_does_not_depend_on_its_place() {
        let x = inputs();
        let up = vec![1f32; x.len()];
        let all = gated(
            &Tensor::new(x.as_slice(), &Device::Cpu).unwrap(),
            &Tensor::new(up.as_slice(), &Device::Cpu).unwrap(),
            Gate::GeluTanh,
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        // Each value alone (a masked tail of one) and shifted by 5 places.
        for (i, want) in all.iter().enumerate().step_by(97) {
            let one = gated(
                &Tensor::new(&x[i..=i], &Device::Cpu).unwrap(),
                &Tensor::new(&up[i..=i], &Device::Cpu).unwrap(),
                Gate::GeluTanh,
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            assert_eq!(one[0].to_bits(), want.to_bits(), "value {i}");
        }
        let shifted = gated(
            &Tensor::new(&x[5..], &Device::Cpu).unwrap(),
            &Tensor::new(&up[5..], &Device::Cpu).unwrap(),
            Gate::GeluTanh,
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(shifted, all[5..]);
    }

    #[test]
    fn a_non_contiguous_gate_is_read_as_laid_out() {
        let g = Tensor::new(&[[1f32, -2.0], [3.0, -4.0]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let u = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let ours = gated(&g, &u, Gate::Silu).unwrap().to_vec2::<f32>().unwrap();
        let theirs = candle_nn::ops::silu(&g).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
