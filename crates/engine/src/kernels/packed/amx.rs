//! The packed product on Intel AMX (Sapphire Rapids and later), for the rows of a call that
//! fill whole tiles of 16: prompts, scored candidates, 16 sequences decoding together.
//!
//! One tile multiply (`tdpbusd` / `tdpbsud`) takes 16 activation rows × one 32-value block of a
//! 16-row weight group: 8,192 multiply-adds, where the AVX-512 VNNI kernel needs 128
//! instructions. The weight layout is already the tile's: a group's block is 8 rows (steps) of
//! 16 lanes × 4 bytes. Each block's integer sums are stored to memory and scaled into the f32
//! accumulators with exactly the VNNI kernel's operations (one `(Σ as f32) × (dw·dx) + acc`
//! per block, in block order, then the 4-bit offset), so a row's bits do not depend on which
//! kernel computed it: the rows of a call that do not fill a tile go through VNNI.
//!
//! Linux hands out the 8 KB tile state only to processes that ask (`arch_prctl`);
//! [`amx_int8`](crate::kernels::cpu_features::amx_int8) asks once, and this kernel runs only
//! where it said yes. Each thread loads the tile configuration before its work and releases it
//! after ([`Tiles`]), so an idle thread carries no tile state through context switches.

use std::arch::asm;
use std::arch::x86_64::*;

use super::{Activations, Codes, Packed, BLOCK, LANES, NIBBLE_REGS, OFFSET, STEPS};

/// Activation rows of one tile.
pub(super) const ROWS: usize = 16;
/// Bytes of one tile row of weights: a step (4 values) of each of the 16 lanes.
const STEP_BYTES: usize = LANES * 4;
/// Bytes of one block of a group's weights, as the tile loads them (8 steps).
const BLOCK_BYTES: usize = STEPS * STEP_BYTES;

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile register.
    colsb: [u16; 16],
    /// Rows of each tile register.
    rows: [u8; 16],
}

/// The tiles the kernel uses, two sets so that one block's product runs while the previous
/// block's sums are scaled: `tmm0`/`tmm3` the 16×16 integer sums, `tmm1`/`tmm4` 16 activation
/// rows of one block (32 bytes each), `tmm2`/`tmm5` one block of weights (8 steps of 16 lanes
/// × 4 bytes).
const CONFIG: TileConfig = {
    // (bytes per row, rows) of one set: sums, activations, weights.
    let set = [
        ((LANES * 4) as u16, ROWS as u8),
        (BLOCK as u16, ROWS as u8),
        (STEP_BYTES as u16, STEPS as u8),
    ];
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 6 {
        (colsb[t], rows[t]) = set[t % 3];
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
};

/// This thread's tiles, configured for the kernel while the value lives.
pub(super) struct Tiles(());

impl Tiles {
    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// [`amx_int8`](crate::kernels::cpu_features::amx_int8) returned true.
    pub(super) unsafe fn configure() -> Self {
        static CFG: TileConfig = CONFIG;
        // SAFETY: the CPU has AMX and the process holds the tile state (the caller's
        // contract); the operand is a valid palette-1 configuration.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &raw const CFG, options(nostack, readonly, preserves_flags))
        };
        Self(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured (`configure`), so the CPU has AMX.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// Per-thread room for a group's weights as the tiles load them: Q8_0's starting sums
/// (`−OFFSET × Σ w` per block and lane) or the unpacked bytes of 4-bit codes.
#[derive(Default)]
pub(super) struct Scratch(Vec<i32>);

/// One block's 16×16 integer sums, as `tilestored` writes them.
#[repr(C, align(64))]
struct Sums([i32; ROWS * LANES]);

/// Output columns `16g..16g+16` of activation rows `0..rows` (a multiple of [`ROWS`]).
///
/// # Safety
/// [`amx_int8`](crate::kernels::cpu_features::amx_int8) returned true and this thread holds
/// [`Tiles`]; `rows ≤ m` of `acts`, and `out` holds the `[m, p.rows]` output.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn group(
    p: &Packed,
    g: usize,
    acts: &Activations,
    rows: usize,
    out: *mut f32,
    scratch: &mut Scratch,
) {
    let blocks = p.blocks;
    // The group's weights in tile form: Q8_0's bytes are already; 4-bit codes are unpacked to
    // one byte each (the unsigned operand of `tdpbsud`).
    let (weights, q4): (*const u8, bool) = match &p.codes {
        Codes::Q8 { qs, sums } => {
            scratch.0.clear();
            scratch.0.extend(
                (0..blocks * LANES).map(|i| -OFFSET * i32::from(sums[g * blocks * LANES + i])),
            );
            (qs[g * blocks * BLOCK_BYTES..].as_ptr().cast(), false)
        }
        Codes::Q4 { qs, high, .. } => {
            scratch.0.resize(blocks * BLOCK_BYTES / 4, 0);
            let high = if high.is_empty() {
                std::ptr::null()
            } else {
                high.as_ptr()
            };
            for b in 0..blocks {
                // SAFETY: block b's nibble registers (and fifth bits) lie inside the group's
                // codes, its 8 unpacked steps inside the scratch; unaligned accesses.
                unsafe {
                    let w = unpack_nibbles!(
                        qs.as_ptr().add((g * blocks + b) * BLOCK_BYTES / 2),
                        high,
                        g * blocks + b
                    );
                    let dst = scratch.0.as_mut_ptr().cast::<u8>().add(b * BLOCK_BYTES);
                    for (s, w) in w.iter().enumerate() {
                        _mm512_storeu_si512(dst.add(s * STEP_BYTES).cast(), *w);
                    }
                }
            }
            (scratch.0.as_ptr().cast(), true)
        }
    };
    // SAFETY: forwarded from the caller; `weights` and `init` as `sums` needs them.
    unsafe {
        if q4 {
            sums::<true>(p, g, acts, rows, out, weights, scratch.0.as_ptr());
        } else {
            sums::<false>(p, g, acts, rows, out, weights, scratch.0.as_ptr());
        }
    }
}

/// [`group`]'s products and their scaling, for 4-bit codes (`Q4`) or Q8_0: `weights` are the
/// group's blocks in tile form, `init` Q8_0's starting sums (16 a block).
///
/// # Safety
/// As [`group`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn sums<const Q4: bool>(
    p: &Packed,
    g: usize,
    acts: &Activations,
    rows: usize,
    out: *mut f32,
    weights: *const u8,
    init: *const i32,
) {
    let blocks = p.blocks;
    let row_bytes = blocks * BLOCK;
    let mut sums = Sums([0; ROWS * LANES]);
    for row0 in (0..rows).step_by(ROWS) {
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let a = acts.q[row0 * row_bytes..].as_ptr();
        // SAFETY: block 0 of the tiles (see `product`).
        unsafe { product(Q4, 0, a, row_bytes, weights, init) };
        for b in 0..blocks {
            // SAFETY (tiles): block b + 1's product starts before block b's sums are scaled
            // (the two alternate between tile sets), so the tile unit and the vector units
            // work at once; `sums` takes block b's sums.
            unsafe {
                if b + 1 < blocks {
                    product(Q4, b + 1, a, row_bytes, weights, init);
                }
                store(b, &mut sums);
            }
            let gb = g * blocks + b;
            // SAFETY: the block's scales (and offsets) lie inside the packed arrays, the
            // activation scales of rows row0..row0+16 inside `acts`.
            unsafe {
                let dw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.scales.as_ptr().add(gb * LANES).cast()));
                let mw = match &p.codes {
                    Codes::Q4 { mins, .. } => {
                        _mm512_cvtph_ps(_mm256_loadu_si256(mins.as_ptr().add(gb * LANES).cast()))
                    }
                    Codes::Q8 { .. } => _mm512_setzero_ps(),
                };
                let d = acts.d.as_ptr().add(row0 * blocks + b);
                let s = acts.s.as_ptr().add(row0 * blocks + b);
                let c = sums.0.as_ptr();
                for (r, acc) in acc.iter_mut().enumerate() {
                    let isum = _mm512_load_si512(c.add(r * LANES).cast());
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*d.add(r * blocks)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                    if Q4 {
                        *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*s.add(r * blocks)), *acc);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: (row0 + r, 16g..16g+16) lies inside the `[m, p.rows]` output.
            unsafe { _mm512_storeu_ps(out.add((row0 + r) * p.rows + g * LANES), *acc) };
        }
    }
}

/// Starting sums of 4-bit codes' products: zero.
static ZERO_SUMS: [i32; LANES] = [0; LANES];

/// One block's product into tile `$c` from `$a` (activations) and `$w` (weights) with `$op`,
/// onto the 16 starting sums at `$init` (loaded for every row: stride 0).
macro_rules! tile_product {
    ($op:literal, $c:literal, $a:literal, $w:literal, $init:expr, $a_ptr:expr, $row_bytes:expr, $w_ptr:expr) => {
        asm!(
            concat!("tileloadd ", $c, ", [{init} + {zero} * 1]"),
            concat!("tileloadd ", $a, ", [{a} + {sa} * 1]"),
            concat!("tileloadd ", $w, ", [{w} + {sw} * 1]"),
            concat!($op, " ", $c, ", ", $a, ", ", $w),
            init = in(reg) $init, zero = in(reg) 0usize, a = in(reg) $a_ptr, sa = in(reg) $row_bytes,
            w = in(reg) $w_ptr, sw = in(reg) STEP_BYTES, options(nostack, preserves_flags, readonly)
        )
    };
}

/// Starts block `b`'s product in `tmm0` (even blocks, from `tmm1`, `tmm2`) or `tmm3` (odd,
/// from `tmm4`, `tmm5`): the 16 activation rows at `a` (`row_bytes` apart) times the group's
/// weights, onto Q8_0's starting sums (`init`, 16 per block; `tdpbusd`: unsigned offset
/// activations, signed weights) or zero for 4-bit codes (`tdpbsud`: signed activations,
/// unsigned codes).
///
/// # Safety
/// This thread holds [`Tiles`]; `a` has 16 rows of `b + 1` blocks, `weights` and `init` block b.
#[inline(always)]
unsafe fn product(
    q4: bool,
    b: usize,
    a: *const u8,
    row_bytes: usize,
    weights: *const u8,
    init: *const i32,
) {
    // SAFETY: the caller's contract; the activation tile reads 16 rows of 32 bytes from block
    // b, the weight tile 512 bytes, the starting sums 64 bytes at stride 0.
    unsafe {
        let a = a.add(b * BLOCK);
        let w = weights.add(b * BLOCK_BYTES);
        let init = if q4 {
            ZERO_SUMS.as_ptr()
        } else {
            init.add(b * LANES)
        };
        match (q4, b % 2) {
            (false, 0) => tile_product!("tdpbusd", "tmm0", "tmm1", "tmm2", init, a, row_bytes, w),
            (false, _) => tile_product!("tdpbusd", "tmm3", "tmm4", "tmm5", init, a, row_bytes, w),
            (true, 0) => tile_product!("tdpbsud", "tmm0", "tmm1", "tmm2", init, a, row_bytes, w),
            (true, _) => tile_product!("tdpbsud", "tmm3", "tmm4", "tmm5", init, a, row_bytes, w),
        }
    }
}

/// Stores block `b`'s 16×16 sums (from `tmm0` or `tmm3`, as [`product`] left them).
///
/// # Safety
/// This thread holds [`Tiles`] and started block b's product.
#[inline(always)]
unsafe fn store(b: usize, sums: &mut Sums) {
    let c = sums.0.as_mut_ptr();
    // SAFETY: the caller's contract; the store writes the 1 KB of `sums`.
    unsafe {
        if b.is_multiple_of(2) {
            asm!("tilestored [{c} + {s} * 1], tmm0", c = in(reg) c, s = in(reg) STEP_BYTES, options(nostack, preserves_flags));
        } else {
            asm!("tilestored [{c} + {s} * 1], tmm3", c = in(reg) c, s = in(reg) STEP_BYTES, options(nostack, preserves_flags));
        }
    }
}
