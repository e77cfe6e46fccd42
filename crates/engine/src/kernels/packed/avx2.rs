//! The packed product on AVX2 (with FMA and F16C): the x86-64-v3 machines without AVX-512,
//! such as AMD Zen 2 and Zen 3 servers.
//!
//! candle's kernels compute one (row, column) dot product at a time, a row of the batch at a
//! time, so every row of a step read all the weights again; this kernel reads a block of a
//! group's weights once for a tile of up to [`TILE`] activation rows, as the AVX-512 one does.
//! A 256-bit register holds 8 of a group's 16 lanes, so each group runs as two halves of 8
//! output columns. AVX2 has no `vpdpbusd`; `vpmaddubsw` (unsigned × signed bytes, pairs
//! summed into i16) and `vpmaddwd` against ones (pairs of i16 into i32) take its place:
//! - 4- and 5-bit weights are the unsigned operand and the activations (at most 127 in size)
//!   the signed one, so a pair sums at most 2 × 15 × 127 (2 × 31 × 127 for 5 bits): the pairs
//!   of all 8 steps of a block fit an i16 before they widen to i32 (of 4 steps for 5 bits);
//! - Q8_0 weights are signed, so the activations' sign moves onto them (`|w|` unsigned,
//!   `a·sign(w)` signed: at most 2 × 128 × 127 a pair, which never saturates, but each step
//!   widens on its own), and the
//!   activations' offset (they are stored as `q + 128` for the VNNI kernel) is taken off with
//!   one `xor` first, so no correction is needed.
//!
//! The integer sum of a block is exact, and the f32 steps after it are the other kernels',
//! lane by lane (`(Σ as f32) × (dw·dx) + acc`, then `m × s + acc`), so a row's bits are the
//! same as on every other path.

use std::arch::x86_64::*;

use super::{Activations, Codes, Packed, BLOCK, LANES, NIBBLE_REGS, STEPS};

/// Output columns of one 256-bit register: half a group.
const HALF: usize = 8;
/// Activation rows that share each unpacked block of weights. There are 16 registers and a
/// block's weights take 8, so more accumulators spill: 8 rows measured no faster than 4 on an
/// AMD EPYC (Zen 3) for prompts, scoring and 16-sequence decode.
pub(super) const TILE: usize = 4;

impl Packed {
    /// Output columns `16g..16g+16` of rows `0..m`, [`TILE`] rows per pass over the weights.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and `out` holds `m × rows` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2(&self, g: usize, acts: &Activations, m: usize, out: *mut f32) {
        // Steps whose pairs add up in i16 before widening (see the module's docs).
        let widen = match &self.codes {
            Codes::Q8 { .. } => 1,
            Codes::Q4 { high, .. } if high.is_empty() => 8,
            Codes::Q4 { .. } => 4,
        };
        let mut row = 0;
        while row < m {
            // SAFETY: forwarded from the caller; each arm's rows end at or before `m`, and
            // its format is this matrix's.
            unsafe {
                match (widen, m - row) {
                    (1, 1) => self.tile_avx2::<1, false, 1>(g, acts, row, out),
                    (1, 2) => self.tile_avx2::<2, false, 1>(g, acts, row, out),
                    (1, 3) => self.tile_avx2::<3, false, 1>(g, acts, row, out),
                    (1, _) => self.tile_avx2::<TILE, false, 1>(g, acts, row, out),
                    (4, 1) => self.tile_avx2::<1, true, 4>(g, acts, row, out),
                    (4, 2) => self.tile_avx2::<2, true, 4>(g, acts, row, out),
                    (4, 3) => self.tile_avx2::<3, true, 4>(g, acts, row, out),
                    (4, _) => self.tile_avx2::<TILE, true, 4>(g, acts, row, out),
                    (_, 1) => self.tile_avx2::<1, true, 8>(g, acts, row, out),
                    (_, 2) => self.tile_avx2::<2, true, 8>(g, acts, row, out),
                    (_, 3) => self.tile_avx2::<3, true, 8>(g, acts, row, out),
                    (_, _) => self.tile_avx2::<TILE, true, 8>(g, acts, row, out),
                }
            }
            row += TILE;
        }
    }

    /// Rows `row0..row0 + R` of group `g`, one half (8 output columns) at a time: Q8_0
    /// weights (`Q4` false) or 4-/5-bit ones (`Q4` true, each block's offset `m` added with a
    /// second FMA). The pairs of `WIDEN` steps add up in i16 before they widen to i32.
    ///
    /// # Safety
    /// As [`Self::group_avx2`], with `row0 + R ≤ m`, `Q4` true exactly for 4-bit codes, and
    /// `WIDEN` 1 for Q8_0, 4 for 5-bit codes, 8 for 4-bit ones (so that no i16 overflows).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const R: usize, const Q4: bool, const WIDEN: usize>(
        &self,
        g: usize,
        acts: &Activations,
        row0: usize,
        out: *mut f32,
    ) {
        // `mins`: per block and lane the 4-bit offsets (f16); Q8_0's weight sums go unused.
        let (codes, mins, regs, high) = self.raw_parts();
        let ones = _mm256_set1_epi16(1);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..self.blocks {
                let gb = g * self.blocks + b;
                // SAFETY: every offset below stays inside the packed arrays (`gb` < groups ×
                // blocks, `regs` registers of 16 lanes a block, this half's 8 lanes of each)
                // and the activations (`row0 + r` < m); unaligned accesses.
                unsafe {
                    if half == 0 {
                        self.prefetch_ahead((codes, mins, regs, high), gb);
                    }
                    let wp = codes.add((gb * regs * LANES + half * HALF) * 4);
                    let w = if Q4 {
                        unpack_nibbles(wp, high, gb, half)
                    } else {
                        let mut w = [_mm256_setzero_si256(); STEPS];
                        for (s, w) in w.iter_mut().enumerate() {
                            *w = _mm256_loadu_si256(wp.add(s * LANES * 4).cast());
                        }
                        w
                    };
                    let at = gb * LANES + half * HALF;
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(self.scales.as_ptr().add(at).cast()));
                    let mw = if Q4 {
                        _mm256_cvtph_ps(_mm_loadu_si128(mins.add(at).cast()))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let at = (row0 + r) * self.blocks + b;
                        let xp = acts.q.as_ptr().add(at * BLOCK);
                        let mut isum = _mm256_setzero_si256();
                        let mut pairs = _mm256_setzero_si256();
                        for (s, w) in w.iter().enumerate() {
                            let a = _mm256_set1_epi32(xp.add(s * 4).cast::<i32>().read_unaligned());
                            let p = if Q4 {
                                _mm256_maddubs_epi16(*w, a)
                            } else {
                                let a = _mm256_xor_si256(a, _mm256_set1_epi8(i8::MIN));
                                _mm256_maddubs_epi16(_mm256_abs_epi8(*w), _mm256_sign_epi8(a, *w))
                            };
                            pairs = if s % WIDEN == 0 {
                                p
                            } else {
                                _mm256_add_epi16(pairs, p)
                            };
                            if s % WIDEN == WIDEN - 1 {
                                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                            }
                        }
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*acts.d.get_unchecked(at)));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
                        if Q4 {
                            *acc = _mm256_fmadd_ps(
                                mw,
                                _mm256_set1_ps(*acts.s.get_unchecked(at)),
                                *acc,
                            );
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: (row0 + r, 16g + 8·half ..+8) lies inside the `[m, rows]` output.
                unsafe {
                    _mm256_storeu_ps(
                        out.add((row0 + r) * self.rows + g * LANES + half * HALF),
                        *acc,
                    )
                };
            }
        }
    }
}

/// The 8 step registers of half `half` (lanes `8·half..8·half+8`) of 4- or 5-bit block `gb`,
/// whose nibble registers start at `wp` (already at this half): nibbles split with a mask and
/// a shift, and where `high` is not null the fifth bits added as 16.
///
/// # Safety
/// AVX2; `wp` holds the block's 4 nibble registers (16 lanes × 4 bytes apart), and `high` (if
/// not null) the block's 8 masks at `gb · 8`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_nibbles(
    wp: *const u8,
    high: *const u64,
    gb: usize,
    half: usize,
) -> [__m256i; STEPS] {
    let low = _mm256_set1_epi8(0x0F);
    let mut w = [_mm256_setzero_si256(); STEPS];
    // SAFETY: forwarded from the caller; unaligned loads.
    unsafe {
        for k in 0..NIBBLE_REGS {
            let both = _mm256_loadu_si256(wp.add(k * LANES * 4).cast());
            w[k] = _mm256_and_si256(both, low);
            w[k + NIBBLE_REGS] = _mm256_and_si256(_mm256_srli_epi16::<4>(both), low);
        }
        if !high.is_null() {
            // Byte i of a register takes bit i of this half's 32 mask bits: each byte gets
            // the mask byte i / 8, keeps bit i % 8, and becomes 16 where it was set.
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
            let sixteen = _mm256_set1_epi8(16);
            for (s, w) in w.iter_mut().enumerate() {
                let bits = (high.add(gb * STEPS + s).read_unaligned() >> (32 * half)) as u32;
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                *w = _mm256_add_epi8(*w, _mm256_and_si256(set, sixteen));
            }
        }
    }
    w
}
