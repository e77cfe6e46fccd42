//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K weights repacked for a batched integer matrix product
//! on AVX-512 VNNI, on AMX tiles where the CPU has them ([`amx`]), and on AVX2 where it has
//! no AVX-512 ([`avx2`]).
//!
//! candle's Q8_0 kernel computes one (row, column) dot product at a time with a single running
//! sum, so its cost grows with every row a step adds: 16 generated rows took 9x one row's time
//! here, and aggregate decode barely beat one stream. This layout interleaves 16 output rows
//! (weight rows) so that one 512-bit register holds 4 consecutive weights of each of 16 outputs;
//! one `vpdpbusd` against 4 broadcast activation bytes then advances 16 dot products at once,
//! and each weight register is reused for every activation row of a tile.
//!
//! 4-bit weights stay 4-bit (0.625 bytes a weight with their scales, against 1.06 for Q8_0):
//! one-stream decode reads every weight once per token, so it runs at the speed of memory, and
//! requantizing a Q4_1 file to Q8_0 made it 1.7x more to read. A register holds the nibbles
//! of two steps, split with a mask and a shift; the unsigned nibbles are `vpdpbusd`'s unsigned
//! operand and the activations (plain signed bytes) its signed one, and a block's offset `m`
//! (Q4_1's minimum, `-8·d` for Q4_0) is added as `m × dx × Σ activation bytes`. 5-bit weights
//! (Gemma 3's Q5_0) keep their fifth bits as one 64-bit mask per register, added as 16 under
//! the mask (0.69 bytes a weight, where requantizing to Q8_0 read 1.06). Q4_K's 32-value
//! sub-blocks are Q4_1 blocks once their scale and minimum are multiplied out.
//!
//! Every output value is computed the same way whatever else is in the call: the integer sum
//! of a block is exact, and the blocks are added to a row's f32 accumulator in order, one fused
//! multiply-add each. A row's numbers therefore never depend on its batch, and the portable
//! [`Packed::matmul_reference`] gives bit-identical results (the tests check both).

/// The 8 step registers (`[__m512i; 8]`) of 4- or 5-bit block `gb` whose nibble registers
/// start at `wp`: the nibbles split with a mask and a shift, and where `high` is not null the
/// fifth bits added. A macro, so that it inlines into both kernels (a `#[target_feature]`
/// function cannot be forced inline, and returned through memory it cost 12% of decode).
/// Needs AVX-512 F/BW, and an `unsafe` context where `wp` holds the block's 4 registers and
/// `high` (if not null) its 8 masks at `gb · 8`.
#[cfg(target_arch = "x86_64")]
macro_rules! unpack_nibbles {
    ($wp:expr, $high:expr, $gb:expr) => {{
        use std::arch::x86_64::*;
        let (wp, high, gb): (*const u8, *const u64, usize) = ($wp, $high, $gb);
        let low = _mm512_set1_epi8(0x0F);
        let mut w = [_mm512_setzero_si512(); STEPS];
        for k in 0..NIBBLE_REGS {
            let both = _mm512_loadu_si512(wp.add(k * LANES * 4).cast());
            w[k] = _mm512_and_si512(both, low);
            w[k + NIBBLE_REGS] = _mm512_and_si512(_mm512_srli_epi16::<4>(both), low);
        }
        if !high.is_null() {
            let sixteen = _mm512_set1_epi8(16);
            for (s, w) in w.iter_mut().enumerate() {
                let mask = _cvtu64_mask64(high.add(gb * STEPS + s).read_unaligned());
                *w = _mm512_mask_add_epi8(*w, mask, *w, sixteen);
            }
        }
        w
    }};
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

use super::cpu_features::{amx_int8, avx2, avx512_vnni};
use super::{cpu_slice, Out};

/// Blocks ahead of the one being multiplied whose weights (and scales) the vector kernels ask
/// the CPU to fetch (`Packed::prefetch_ahead`): a pass streams every weight from beyond the
/// cores' caches, and at a few rows a call the kernels left that stream idle while they
/// computed. Streaming 120 distinct 1536×576 Q4_1 matrices (2-core AMX machine, AVX-512 VNNI)
/// went 19% faster at 1 row, 31% at 8, 21% at 14 and 7% at 32 with 8 blocks ahead (4 and 16
/// did less or no better).
const PREFETCH_BLOCKS: usize = 8;

/// Rows from which a call with 4-bit codes goes through AMX tiles (see `Packed::tiles_pay`).
const MIN_TILED_4BIT_ROWS: usize = 128;

/// Output rows interleaved in one group: the f32 lanes of a 512-bit register.
const LANES: usize = 16;
/// Values per Q8_0 block.
const BLOCK: usize = 32;
/// 4-byte steps per block (one `vpdpbusd` each).
const STEPS: usize = BLOCK / 4;
/// Bytes of one Q8_0 block in a GGUF: an f16 scale, then 32 signed bytes.
const Q8_0_BYTES: usize = 2 + BLOCK;
/// Bytes of one Q4_0 block: an f16 scale, then 16 bytes of two 4-bit values (`w = d·(q − 8)`).
const Q4_0_BYTES: usize = 2 + BLOCK / 2;
/// Bytes of one Q4_1 block: f16 scale and minimum, then 16 bytes of nibbles (`w = d·q + m`).
const Q4_1_BYTES: usize = 4 + BLOCK / 2;
/// Bytes of one Q5_0 block: an f16 scale, the 32 fifth bits, the nibbles (`w = d·(q − 16)`).
const Q5_0_BYTES: usize = 6 + BLOCK / 2;
/// Bytes of one Q5_1 block: f16 scale and minimum, fifth bits, nibbles (`w = d·q + m`).
const Q5_1_BYTES: usize = 8 + BLOCK / 2;
/// 512-bit registers of nibbles per 4-bit block (each holds two steps).
const NIBBLE_REGS: usize = STEPS / 2;
/// Activation rows that share each loaded weight register (8 measured 5-20% faster than 4 for
/// prompts and 16-sequence decode; 8 accumulators and 8 weight registers fit in 32).
const TILE: usize = 8;
/// Blocks of activations a thread quantizes at a time, when a call has enough of them to share.
const QUANTIZE_ITEM: usize = 64;
/// Activations for Q8_0 weights are stored as `q + OFFSET` (unsigned, as `vpdpbusd` wants its
/// first operand); the kernel subtracts `OFFSET × Σ weights` of the block to get the signed
/// dot product back. For 4-bit weights (the unsigned operand) they are plain signed bytes.
const OFFSET: i32 = 128;

/// The instruction set a packed matmul runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 with FMA and F16C, 8 output columns a register ([`avx2`]).
    Avx2,
    /// AVX-512 F/BW/VNNI, 16 output columns a register.
    Avx512Vnni,
}

impl Isa {
    /// The fastest instruction set this CPU runs the kernel on; `None` where it runs none (the
    /// matrices then stay candle's).
    pub(crate) fn best() -> Option<Self> {
        if avx512_vnni() {
            Some(Self::Avx512Vnni)
        } else if avx2() {
            Some(Self::Avx2)
        } else {
            None
        }
    }

    /// Its name in logs: `avx512-vnni` or `avx2`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU runs `self`.
    #[cfg(test)]
    fn runs_here(self) -> bool {
        match self {
            Self::Avx2 => avx2(),
            Self::Avx512Vnni => avx512_vnni(),
        }
    }
}

/// The weights of a packed matrix, by format.
enum Codes {
    /// Q8_0: `[group][block][step][lane][4]` signed weights `4·step..4·step+4` of the block for
    /// the 16 rows of the group, and `[group][block][lane]` each block's sum of weights.
    Q8 { qs: Vec<i8>, sums: Vec<i16> },
    /// Q4_0 / Q4_1 / Q5_0 / Q5_1: `[group][block][k][lane][4]` bytes whose low nibbles are
    /// the low 4 bits of step `k`'s weights and high nibbles those of step `k + 4`;
    /// `[group][block][lane]` each block's offset `m` (f16 bits): weight = `d·q + m`; for
    /// 5-bit formats `high`, `[group][block][step]` masks of the fifth bit (bit `4·lane + j`
    /// for weight `4·step + j` of the lane), empty for 4-bit ones.
    Q4 {
        qs: Vec<u8>,
        mins: Vec<u16>,
        high: Vec<u64>,
    },
}

/// A `[rows, cols]` weight matrix in the interleaved layout.
pub(crate) struct Packed {
    rows: usize,
    cols: usize,
    blocks: usize,
    codes: Codes,
    /// `[group][block][lane]`: each block's scale (f16 bits, as stored in the GGUF).
    scales: Vec<u16>,
}

/// Activations quantized per row and block: `q + offset` as bytes, an f32 scale per block,
/// and per block `scale × Σ q` (what a 4-bit block's offset `m` multiplies).
struct Activations {
    q: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Packed {
    /// Repacks a Q8_0, Q4_0 or Q4_1 tensor `[rows, cols]`; `None` for other formats, other
    /// ranks, shapes that do not fit the layout (rows a multiple of 16, columns of 32), or a
    /// Q4_0 scale too large for its offset `-8·d` to be an f16.
    pub(crate) fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let &[rows, cols] = t.shape().dims() else {
            return Ok(None);
        };
        if !takes(t.dtype()) || !rows.is_multiple_of(LANES) || !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = t.data()?;
        Ok(match t.dtype() {
            GgmlDType::Q8_0 => Some(Self::from_q8_0_bytes(&data, rows, cols)),
            GgmlDType::Q4K => q4_k_as_q4_1(&data)
                .and_then(|q| Self::from_nibble_bytes(&q, GgmlDType::Q4_1, rows, cols)),
            dtype => Self::from_nibble_bytes(&data, dtype, rows, cols),
        })
    }

    /// Repacks GGUF Q8_0 blocks of a row-major `[rows, cols]` matrix.
    fn from_q8_0_bytes(data: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        assert_eq!(
            data.len(),
            rows * blocks * Q8_0_BYTES,
            "Q8_0 data of the wrong size"
        );
        let mut qs = vec![0i8; rows * cols];
        let mut scales = vec![0u16; rows * blocks];
        let mut sums = vec![0i16; rows * blocks];
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..blocks {
                let src = &data[(r * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                let gb = g * blocks + b;
                scales[gb * LANES + lane] = u16::from_le_bytes([src[0], src[1]]);
                let q = &src[2..];
                sums[gb * LANES + lane] = q.iter().map(|&v| i16::from(v as i8)).sum();
                for s in 0..STEPS {
                    let dst = ((gb * STEPS + s) * LANES + lane) * 4;
                    for j in 0..4 {
                        qs[dst + j] = q[s * 4 + j] as i8;
                    }
                }
            }
        }
        Self {
            rows,
            cols,
            blocks,
            codes: Codes::Q8 { qs, sums },
            scales,
        }
    }

    /// Repacks GGUF Q4_0, Q4_1, Q5_0 or Q5_1 blocks of a row-major `[rows, cols]` matrix;
    /// `None` where an offset `-8·d` or `-16·d` is too large for an f16.
    fn from_nibble_bytes(data: &[u8], dtype: GgmlDType, rows: usize, cols: usize) -> Option<Self> {
        // Block size, whether it stores a minimum, the fifth bits' place, the implicit offset.
        let (size, with_min, high_at, zero) = match dtype {
            GgmlDType::Q4_0 => (Q4_0_BYTES, false, None, 8.0),
            GgmlDType::Q4_1 => (Q4_1_BYTES, true, None, 0.0),
            GgmlDType::Q5_0 => (Q5_0_BYTES, false, Some(2), 16.0),
            GgmlDType::Q5_1 => (Q5_1_BYTES, true, Some(4), 0.0),
            _ => return None,
        };
        let blocks = cols / BLOCK;
        assert_eq!(
            data.len(),
            rows * blocks * size,
            "{dtype:?} data of the wrong size"
        );
        let mut qs = vec![0u8; rows * cols / 2];
        let mut scales = vec![0u16; rows * blocks];
        let mut mins = vec![0u16; rows * blocks];
        let mut high = vec![
            0u64;
            if high_at.is_some() {
                rows * blocks * STEPS
            } else {
                0
            }
        ];
        for r in 0..rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..blocks {
                let src = &data[(r * blocks + b) * size..][..size];
                let gb = g * blocks + b;
                let d = u16::from_le_bytes([src[0], src[1]]);
                scales[gb * LANES + lane] = d;
                mins[gb * LANES + lane] = if with_min {
                    u16::from_le_bytes([src[2], src[3]])
                } else {
                    // -8·d and -16·d are exact in f16 (powers of two) unless they overflow.
                    let m = f16::from_f32(-zero * f16::from_bits(d).to_f32());
                    if !m.is_finite() {
                        return None;
                    }
                    m.to_bits()
                };
                // GGUF: byte i holds value i (low nibble) and value i + 16 (high nibble); bit i
                // of the little-endian u32 before them is value i's fifth bit.
                let nibbles = &src[size - BLOCK / 2..];
                let value = |i: usize| {
                    if i < 16 {
                        nibbles[i] & 0x0F
                    } else {
                        nibbles[i - 16] >> 4
                    }
                };
                for k in 0..NIBBLE_REGS {
                    let dst = ((gb * NIBBLE_REGS + k) * LANES + lane) * 4;
                    for j in 0..4 {
                        qs[dst + j] = value(k * 4 + j) | (value((k + NIBBLE_REGS) * 4 + j) << 4);
                    }
                }
                if let Some(at) = high_at {
                    let bits = u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]]);
                    for i in 0..BLOCK {
                        let bit = u64::from(bits >> i & 1);
                        high[gb * STEPS + i / 4] |= bit << (lane * 4 + i % 4);
                    }
                }
            }
        }
        Some(Self {
            rows,
            cols,
            blocks,
            codes: Codes::Q4 { qs, mins, high },
            scales,
        })
    }

    /// Weight `(r, b·32 + i)` as its integer code: `(q, m)` with weight = `d·q + m` for 4-bit
    /// formats, `(q, 0)` for Q8_0.
    fn code(&self, gb: usize, lane: usize, i: usize) -> i32 {
        let (s, j) = (i / 4, i % 4);
        match &self.codes {
            Codes::Q8 { qs, .. } => i32::from(qs[((gb * STEPS + s) * LANES + lane) * 4 + j]),
            Codes::Q4 { qs, high, .. } => {
                let byte = qs[((gb * NIBBLE_REGS + s % NIBBLE_REGS) * LANES + lane) * 4 + j];
                let low = i32::from(if s < NIBBLE_REGS {
                    byte & 0x0F
                } else {
                    byte >> 4
                });
                let fifth = high
                    .get(gb * STEPS + s)
                    .map_or(0, |m| (m >> (lane * 4 + j) & 1) as i32);
                low | fifth << 4
            }
        }
    }

    /// Row `r` dequantized into `dst` (`cols` values): the same f32 arithmetic as candle's
    /// dequantization (`q × d`, or `q × d + m`).
    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let (g, lane) = (r / LANES, r % LANES);
        for b in 0..self.blocks {
            let gb = g * self.blocks + b;
            let d = f16::from_bits(self.scales[gb * LANES + lane]).to_f32();
            let m = match &self.codes {
                Codes::Q8 { .. } => None,
                Codes::Q4 { mins, .. } => Some(f16::from_bits(mins[gb * LANES + lane]).to_f32()),
            };
            for i in 0..BLOCK {
                let q = self.code(gb, lane, i) as f32;
                dst[b * BLOCK + i] = match m {
                    None => q * d,
                    Some(m) => q * d + m,
                };
            }
        }
    }

    /// The rows `ids` dequantized, `[ids.len(), cols]` (embedding lookup).
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows)
            }
            self.dequantize_row(id, &mut out[i * self.cols..(i + 1) * self.cols]);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), device)
    }

    /// The whole matrix in f32, `[rows, cols]`, dequantized on candle's CPU threads (tests
    /// compare it with candle's own dequantization of the GGUF tensor).
    #[cfg(test)]
    pub(crate) fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        let ptr = Out(out.as_mut_ptr());
        let cols = self.cols;
        crate::kernels::chunked(self.rows / LANES, |groups| {
            for r in groups.start * LANES..groups.end * LANES {
                // SAFETY: row r lies inside `out` and belongs to this work item only.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr.at(r * cols), cols) };
                self.dequantize_row(r, dst);
            }
        });
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// Quantizes `m` rows of `x` to 8 bits per block of 32 (scale = max |x| / 127, values
    /// rounded to nearest, ties to even), stored with the offset this format's kernel wants.
    /// Many rows' blocks are shared out to candle's CPU threads (on a 16-sequence decode step
    /// this ran on the model thread alone, about 4% of the step, while the others waited);
    /// each block comes out the same either way.
    fn quantize(&self, x: &[f32], m: usize) -> Activations {
        let offset = match self.codes {
            Codes::Q8 { .. } => OFFSET,
            Codes::Q4 { .. } => 0,
        };
        let mut q = vec![0u8; m * self.cols];
        let mut d = vec![0f32; m * self.blocks];
        let mut s = vec![0f32; m * self.blocks];
        let blocks = |x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32]| {
            for (((block, qb), d), s) in x
                .chunks_exact(BLOCK)
                .zip(q.chunks_exact_mut(BLOCK))
                .zip(d.iter_mut())
                .zip(s.iter_mut())
            {
                #[cfg(target_arch = "x86_64")]
                let (scale, sum) = if avx512_vnni() {
                    // SAFETY: the CPU has the features; both blocks hold 32 values.
                    unsafe { quantize_block_avx512(block, qb, offset) }
                } else if avx2() {
                    // SAFETY: the CPU has the features; both blocks hold 32 values.
                    unsafe { quantize_block_avx2(block, qb, offset) }
                } else {
                    quantize_block(block, qb, offset)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let (scale, sum) = quantize_block(block, qb, offset);
                *d = scale;
                *s = scale * sum as f32;
            }
        };
        if d.len() < 2 * QUANTIZE_ITEM {
            blocks(x, &mut q, &mut d, &mut s);
        } else {
            // One lock per work item, each taken once by the thread that runs it.
            let items: Vec<_> = x
                .chunks(QUANTIZE_ITEM * BLOCK)
                .zip(q.chunks_mut(QUANTIZE_ITEM * BLOCK))
                .zip(d.chunks_mut(QUANTIZE_ITEM))
                .zip(s.chunks_mut(QUANTIZE_ITEM))
                .map(|(((x, q), d), s)| std::sync::Mutex::new((x, q, d, s)))
                .collect();
            crate::kernels::chunked(items.len(), |range| {
                for item in &items[range] {
                    let mut guard = item.lock().unwrap_or_else(|e| e.into_inner());
                    let (x, q, d, s) = &mut *guard;
                    blocks(x, q, d, s);
                }
            });
        }
        Activations { q, d, s }
    }

    /// `x · Wᵀ` for `x` `[m, cols]`: `[m, rows]`, on candle's CPU threads, through AMX tiles
    /// where the CPU has them (see [`amx_int8`]) and they pay ([`Self::tiles_pay`]).
    pub(crate) fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let Some(isa) = Isa::best() else {
            candle_core::bail!("packed matmul on a CPU without AVX2")
        };
        let tiles = amx_int8() && self.tiles_pay(x.dim(0)?);
        Ok(self.matmul_with(x, isa, tiles)?.0)
    }

    /// Whether a call of `m` rows goes faster with AMX tiles than with AVX-512 VNNI alone
    /// (both give the same bits). Q8_0 weights: from one whole tile. 4-bit codes are first
    /// unpacked to bytes for the tiles, once per call and group, and each block's 16×16 sums
    /// go through memory to be scaled: `scripts/bench-kernels.sh` (release build, three runs,
    /// a 2-core AMX machine) measured tiles 20-37% slower than VNNI alone at 16 rows of
    /// SmolLM2's Q4_1 matrices, up to 18% slower at 32-64, and within ±7% from 96; Q8_0 tiles
    /// even at 16 rows and 18-21% faster at 128.
    fn tiles_pay(&self, m: usize) -> bool {
        match self.codes {
            Codes::Q8 { .. } => m >= amx::ROWS,
            Codes::Q4 { .. } => m >= MIN_TILED_4BIT_ROWS,
        }
    }

    /// [`Self::matmul`] on `isa`, with whole tiles of 16 rows through AMX if `amx` (and the
    /// rest, or everything, through AVX-512 VNNI). All give the same bits. `isa` runs on this
    /// CPU, and `amx` is true only where [`amx_int8`] is and `isa` is AVX-512 VNNI. Also
    /// answers how many rows went through AMX tiles (what the tests check, so that an AMX test
    /// cannot pass on the VNNI path).
    fn matmul_with(&self, x: &Tensor, isa: Isa, amx: bool) -> Result<(Tensor, usize)> {
        let (m, cols) = x.dims2()?;
        if cols != self.cols {
            candle_core::bail!(
                "packed matmul: input width {cols}, weights take {}",
                self.cols
            )
        }
        // The activations are read where they lie, and the output is not zeroed first: every
        // value is written by its group below (on a 16-sequence decode step, the copy and the
        // zeroing cost the model thread about 2% while the other threads waited).
        let x = x.contiguous()?;
        let acts = {
            let (storage, layout) = x.storage_and_layout();
            self.quantize(cpu_slice::<f32>(&storage, layout)?, m)
        };
        let mut out: Vec<f32> = Vec::with_capacity(m * self.rows);
        let ptr = Out(out.as_mut_ptr());
        let vector = isa == Isa::Avx512Vnni;
        #[cfg(target_arch = "x86_64")]
        let tiled = if amx && vector {
            m / amx::ROWS * amx::ROWS
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let tiled = 0;
        crate::kernels::chunked(self.rows / LANES, |groups| {
            #[cfg(target_arch = "x86_64")]
            if vector {
                let mut scratch = amx::Scratch::default();
                // SAFETY: `tiled` > 0 only where `amx` is `cpu_features::amx_int8()`.
                let _tiles = (tiled > 0).then(|| unsafe { amx::Tiles::configure() });
                for g in groups {
                    // Group g writes only its own 16 columns of each output row.
                    // SAFETY: the CPU has the features (`avx512_vnni`, and `amx_int8` with the
                    // tiles configured above for `tiled` > 0); `out` is `[m, rows]`.
                    unsafe {
                        if tiled > 0 {
                            amx::group(self, g, &acts, tiled, ptr.at(0), &mut scratch);
                        }
                        self.group_avx512(g, &acts, tiled, m, ptr.at(0));
                    }
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                for g in groups {
                    // SAFETY: the caller chose an `isa` this CPU runs; `out` is `[m, rows]`, of
                    // which group g writes only its own 16 columns.
                    unsafe { self.group_avx2(g, &acts, m, ptr.at(0)) };
                }
                return;
            }
            for g in groups {
                self.group_reference(g, &acts, m, ptr.at(0));
            }
        });
        // SAFETY: the groups 0..rows/16 each wrote their 16 columns of all m rows above, so
        // every one of the m × rows values is initialised (a panic there never gets here).
        unsafe { out.set_len(m * self.rows) };
        Ok((Tensor::from_vec(out, (m, self.rows), x.device())?, tiled))
    }

    /// [`Self::matmul`] in portable code, one lane at a time with the same arithmetic: the
    /// reference the vector kernel is tested against.
    #[cfg(test)]
    fn matmul_reference(&self, x: &Tensor) -> Result<Tensor> {
        let (m, _) = x.dims2()?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let acts = self.quantize(&xs, m);
        let mut out = vec![0f32; m * self.rows];
        for g in 0..self.rows / LANES {
            self.group_reference(g, &acts, m, out.as_mut_ptr());
        }
        Tensor::from_vec(out, (m, self.rows), x.device())
    }

    /// What the vector kernels read, as pointers: the weight bytes; per block and lane the
    /// Q8_0 weight sums (i16) or the 4-bit offsets (f16); the registers of 16 lanes a block
    /// takes; the fifth-bit masks of 5-bit formats (null for the others).
    fn raw_parts(&self) -> (*const u8, *const u16, usize, *const u64) {
        match &self.codes {
            Codes::Q8 { qs, sums } => (
                qs.as_ptr().cast(),
                sums.as_ptr().cast(),
                STEPS,
                std::ptr::null(),
            ),
            Codes::Q4 { qs, mins, high } => (
                qs.as_ptr(),
                mins.as_ptr(),
                NIBBLE_REGS,
                if high.is_empty() {
                    std::ptr::null()
                } else {
                    high.as_ptr()
                },
            ),
        }
    }

    /// Asks the CPU to fetch block `gb + PREFETCH_BLOCKS`'s weights, scales, offsets (or
    /// sums) and fifth bits into L1, `parts` being [`Self::raw_parts`]: what the vector kernels
    /// call once per block, so that the next blocks' weights arrive while this one is
    /// multiplied.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_ahead(&self, parts: (*const u8, *const u16, usize, *const u64), gb: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (codes, extra, regs, high) = parts;
        let ahead = gb + PREFETCH_BLOCKS;
        // Past the end of the arrays these are hints the CPU drops: the addresses come from
        // `wrapping_add` and are never dereferenced.
        let lines = codes.wrapping_add(ahead * regs * LANES * 4);
        // SAFETY: a prefetch never faults and reads nothing the program sees (SSE, which every
        // x86-64 CPU has).
        unsafe {
            for line in 0..regs {
                _mm_prefetch::<_MM_HINT_T0>(lines.wrapping_add(line * 64).cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(self.scales.as_ptr().wrapping_add(ahead * LANES).cast());
            _mm_prefetch::<_MM_HINT_T0>(extra.wrapping_add(ahead * LANES).cast());
            if !high.is_null() {
                _mm_prefetch::<_MM_HINT_T0>(high.wrapping_add(ahead * STEPS).cast());
            }
        }
    }

    /// Output columns `16g..16g+16` of every row, one lane at a time.
    fn group_reference(&self, g: usize, acts: &Activations, m: usize, out: *mut f32) {
        for row in 0..m {
            for lane in 0..LANES {
                let mut acc = 0f32;
                for b in 0..self.blocks {
                    let gb = g * self.blocks + b;
                    let at = row * self.blocks + b;
                    let xq = &acts.q[at * BLOCK..][..BLOCK];
                    let dw = f16::from_bits(self.scales[gb * LANES + lane]).to_f32();
                    match &self.codes {
                        Codes::Q8 { sums, .. } => {
                            // The bytes are `q + OFFSET` here.
                            let isum: i32 = (0..BLOCK)
                                .map(|i| self.code(gb, lane, i) * i32::from(xq[i]))
                                .sum();
                            let isum = isum - OFFSET * i32::from(sums[gb * LANES + lane]);
                            acc = (isum as f32).mul_add(dw * acts.d[at], acc);
                        }
                        Codes::Q4 { mins, .. } => {
                            // The bytes are signed activations here; the codes are unsigned.
                            let isum: i32 = (0..BLOCK)
                                .map(|i| self.code(gb, lane, i) * i32::from(xq[i] as i8))
                                .sum();
                            let mw = f16::from_bits(mins[gb * LANES + lane]).to_f32();
                            acc = (isum as f32).mul_add(dw * acts.d[at], acc);
                            acc = mw.mul_add(acts.s[at], acc);
                        }
                    }
                }
                // SAFETY: (row, 16g + lane) lies inside the `[m, rows]` output.
                unsafe { *out.add(row * self.rows + g * LANES + lane) = acc };
            }
        }
    }

    /// Output columns `16g..16g+16` of rows `from..m`, [`TILE`] rows per pass over the weights.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI, and `out` holds `m × rows` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn group_avx512(
        &self,
        g: usize,
        acts: &Activations,
        from: usize,
        m: usize,
        out: *mut f32,
    ) {
        let q4 = matches!(self.codes, Codes::Q4 { .. });
        let mut row = from;
        // One flat match: a const-generic helper per format measured ~10% slower decode.
        while row < m {
            // SAFETY: forwarded from the caller.
            unsafe {
                match (q4, m - row) {
                    (false, 1) => self.tile::<1, false>(g, acts, row, out),
                    (false, 2) => self.tile::<2, false>(g, acts, row, out),
                    (false, 3) => self.tile::<3, false>(g, acts, row, out),
                    (false, 4) => self.tile::<4, false>(g, acts, row, out),
                    (false, 5) => self.tile::<5, false>(g, acts, row, out),
                    (false, 6) => self.tile::<6, false>(g, acts, row, out),
                    (false, 7) => self.tile::<7, false>(g, acts, row, out),
                    (false, _) => self.tile::<TILE, false>(g, acts, row, out),
                    (true, 1) => self.tile::<1, true>(g, acts, row, out),
                    (true, 2) => self.tile::<2, true>(g, acts, row, out),
                    (true, 3) => self.tile::<3, true>(g, acts, row, out),
                    (true, 4) => self.tile::<4, true>(g, acts, row, out),
                    (true, 5) => self.tile::<5, true>(g, acts, row, out),
                    (true, 6) => self.tile::<6, true>(g, acts, row, out),
                    (true, 7) => self.tile::<7, true>(g, acts, row, out),
                    (true, _) => self.tile::<TILE, true>(g, acts, row, out),
                }
            }
            row += TILE;
        }
    }

    /// Rows `row0..row0 + R` of group `g`: Q8_0 weights (`Q4` false: offset activations, the
    /// correction `OFFSET × Σ w` subtracted), or 4-bit ones (`Q4` true: nibbles unpacked in
    /// registers as the unsigned operand, each block's offset `m` added with a second FMA).
    ///
    /// # Safety
    /// As [`Self::group_avx512`], with `row0 + R ≤ m`, and `Q4` true exactly for 4-bit codes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const Q4: bool>(
        &self,
        g: usize,
        acts: &Activations,
        row0: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let (codes, extra, regs, high) = self.raw_parts();
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..self.blocks {
            let gb = g * self.blocks + b;
            // SAFETY: every offset below stays inside the packed arrays (`gb` < groups × blocks,
            // `regs` registers a block) and the activations (`row0 + r` < m); unaligned loads.
            unsafe {
                let wp = codes.add(gb * regs * LANES * 4);
                self.prefetch_ahead((codes, extra, regs, high), gb);
                let mut w = [_mm512_setzero_si512(); STEPS];
                if Q4 {
                    w = unpack_nibbles!(wp, high, gb);
                } else {
                    for (s, w) in w.iter_mut().enumerate() {
                        *w = _mm512_loadu_si512(wp.add(s * LANES * 4).cast());
                    }
                }
                let extra = _mm256_loadu_si256(extra.add(gb * LANES).cast());
                let (corr, mw) = if Q4 {
                    (_mm512_setzero_si512(), _mm512_cvtph_ps(extra))
                } else {
                    (
                        _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(extra)),
                        _mm512_setzero_ps(),
                    )
                };
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(
                    self.scales.as_ptr().add(gb * LANES).cast(),
                ));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = (row0 + r) * self.blocks + b;
                    let xp = acts.q.as_ptr().add(at * BLOCK);
                    // Two running integer sums (exact, so their order does not matter).
                    let mut even = _mm512_setzero_si512();
                    let mut odd = _mm512_setzero_si512();
                    for s in (0..STEPS).step_by(2) {
                        let a0 = _mm512_set1_epi32(xp.add(s * 4).cast::<i32>().read_unaligned());
                        let a1 =
                            _mm512_set1_epi32(xp.add(s * 4 + 4).cast::<i32>().read_unaligned());
                        // The unsigned operand first: offset activations, or nibbles.
                        if Q4 {
                            even = _mm512_dpbusd_epi32(even, w[s], a0);
                            odd = _mm512_dpbusd_epi32(odd, w[s + 1], a1);
                        } else {
                            even = _mm512_dpbusd_epi32(even, a0, w[s]);
                            odd = _mm512_dpbusd_epi32(odd, a1, w[s + 1]);
                        }
                    }
                    let mut isum = _mm512_add_epi32(even, odd);
                    if !Q4 {
                        isum = _mm512_sub_epi32(isum, corr);
                    }
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*acts.d.get_unchecked(at)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                    if Q4 {
                        *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts.s.get_unchecked(at)), *acc);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: (row0 + r, 16g..16g+16) lies inside the `[m, rows]` output.
            unsafe { _mm512_storeu_ps(out.add((row0 + r) * self.rows + g * LANES), *acc) };
        }
    }
}

/// One block of activations as `q + offset` bytes; returns its scale and `Σ q`. Lane-wise
/// maxima (not `f32::max`, whose NaN rule keeps the compiler from vectorising).
fn quantize_block(block: &[f32], q: &mut [u8], offset: i32) -> (f32, i32) {
    let amax = block
        .iter()
        .fold(0f32, |a, v| if v.abs() > a { v.abs() } else { a });
    let scale = amax / 127.0;
    let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    let mut sum = 0;
    for (dst, v) in q.iter_mut().zip(block) {
        let i = ((v * inv).round_ties_even() as i32).clamp(-127, 127);
        sum += i;
        *dst = (i + offset) as u8;
    }
    (scale, sum)
}

/// [`quantize_block`] in AVX-512, with the same operations (so the same bytes, scale and sum).
///
/// # Safety
/// The CPU has AVX-512 F/BW; `block` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(block: &[f32], q: &mut [u8], offset: i32) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(block.len() == BLOCK && q.len() == BLOCK);
    // SAFETY: 32 values in, 32 bytes out (the caller's contract); unaligned accesses.
    unsafe {
        let lo = _mm512_loadu_ps(block.as_ptr());
        let hi = _mm512_loadu_ps(block.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
        let (min, max, off) = (
            _mm512_set1_epi32(-127),
            _mm512_set1_epi32(127),
            _mm512_set1_epi32(offset),
        );
        let mut sum = _mm512_setzero_si512();
        for (half, dst) in [lo, hi].into_iter().zip([0, 16]) {
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(half, inv),
            );
            let i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(r), min), max);
            sum = _mm512_add_epi32(sum, i);
            _mm_storeu_si128(
                q.as_mut_ptr().add(dst).cast(),
                _mm512_cvtepi32_epi8(_mm512_add_epi32(i, off)),
            );
        }
        (scale, _mm512_reduce_add_epi32(sum))
    }
}

/// [`quantize_block`] in AVX2, with the same operations (so the same bytes, scale and sum).
///
/// # Safety
/// The CPU has AVX2; `block` and `q` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(block: &[f32], q: &mut [u8], offset: i32) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(block.len() == BLOCK && q.len() == BLOCK);
    // SAFETY: 32 values in, 32 bytes out (the caller's contract); unaligned accesses.
    unsafe {
        let x: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(block.as_ptr().add(k * 8)));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(x[0], abs), _mm256_and_ps(x[1], abs)),
            _mm256_max_ps(_mm256_and_ps(x[2], abs), _mm256_and_ps(x[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
        let (min, max) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x[k], inv),
            );
            _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), min), max)
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b1110>(sum));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<0b01>(sum)));
        // Values in ±127 narrow without saturating; the packs interleave 128-bit lanes, and
        // the permutation puts the 4-byte groups back in order. The offset is added as bytes
        // (mod 256, as `(i + offset) as u8` is).
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let bytes = _mm256_add_epi8(bytes, _mm256_set1_epi8(offset as u8 as i8));
        _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
        (scale, sum)
    }
}

/// Whether the packed kernel takes weights of this format.
pub(crate) fn takes(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q4K
    )
}

/// Bytes of one Q4_K super-block: f16 `d` and `dmin`, 12 bytes of 6-bit sub-block scales and
/// minima, 128 bytes of nibbles, for 256 values.
const Q4_K_BYTES: usize = 4 + 12 + 128;

/// Q4_K super-blocks rewritten as Q4_1 blocks: each 32-value sub-block's value is
/// `d·sc·q − dmin·m`, so it is a Q4_1 block with scale `d·sc` and minimum `−dmin·m` (both
/// rounded to f16, a relative 2⁻¹¹: far finer than requantizing to Q8_0, at 0.625 bytes a
/// weight instead of 1.06). `None` if a scale does not fit an f16.
fn q4_k_as_q4_1(data: &[u8]) -> Option<Vec<u8>> {
    if !data.len().is_multiple_of(Q4_K_BYTES) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / Q4_K_BYTES * 8 * Q4_1_BYTES);
    for sb in data.chunks_exact(Q4_K_BYTES) {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let (scales, qs) = (&sb[4..16], &sb[16..]);
        for j in 0..8 {
            // llama.cpp's `get_scale_min_k4`: 6-bit scale and minimum of sub-block j.
            let (sc, m) = if j < 4 {
                (scales[j] & 63, scales[j + 4] & 63)
            } else {
                (
                    (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
                    (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                )
            };
            let (scale, min) = (
                f16::from_f32(d * f32::from(sc)),
                f16::from_f32(-(dmin * f32::from(m))),
            );
            if !scale.is_finite() || !min.is_finite() {
                return None;
            }
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend_from_slice(&min.to_le_bytes());
            // Sub-blocks 2k and 2k + 1 are the low and high nibbles of bytes 32k..32k+32.
            let (bytes, shift) = (&qs[j / 2 * 32..][..32], if j % 2 == 0 { 0 } else { 4 });
            let value = |l: usize| (bytes[l] >> shift) & 0x0F;
            out.extend((0..16).map(|i| value(i) | value(i + 16) << 4));
        }
    }
    Some(out)
}

/// Whether `t` on `device` will be packed: this CPU runs the kernel, and `t` is a matrix in a
/// format and shape it takes. (Such 4-bit weights are then kept 4-bit, not requantized.)
pub(crate) fn fits(t: &QTensor, device: &Device) -> bool {
    takes(t.dtype()) && shape_fits(t, device)
}

/// Whether `t` on `device` would be packed if it were in a format the kernel takes.
pub(crate) fn shape_fits(t: &QTensor, device: &Device) -> bool {
    device.is_cpu()
        && Isa::best().is_some()
        && matches!(t.shape().dims(), &[rows, cols] if rows.is_multiple_of(LANES) && cols.is_multiple_of(BLOCK))
}

/// The packed form of `t` when this CPU runs the packed kernel and `t` fits it.
pub(crate) fn pack(t: &QTensor, device: &Device) -> Result<Option<Packed>> {
    if !device.is_cpu() || Isa::best().is_none() {
        return Ok(None);
    }
    Packed::from_qtensor(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu_features::{
        amx_int8 as amx_available, avx512_vnni as available, check_required_kernel,
    };

    /// Every format the kernel takes.
    const FORMATS: [GgmlDType; 6] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
    ];

    /// A `[rows, cols]` tensor of varied values in `dtype`, and its f32 original.
    fn weights(rows: usize, cols: usize, dtype: GgmlDType) -> (QTensor, Tensor) {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 5) as f32)
                    + (i / 64 % 3) as f32 * 0.3
            })
            .collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        (QTensor::quantize(&t, dtype).unwrap(), t)
    }

    fn activations(m: usize, cols: usize, salt: usize) -> Tensor {
        let v: Vec<f32> = (0..m * cols)
            .map(|i| (((i + salt) * 104729 % 2039) as f32 / 2039.0 - 0.5) * 3.0)
            .collect();
        Tensor::from_vec(v, (m, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn vector_and_portable_quantization_agree() {
        check_required_kernel();
        if !avx2() {
            eprintln!("no AVX2: the vector quantization is not checked");
            return;
        }
        let x = activations(1, 32 * 40, 9)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut x = x.clone();
        x[40..72].fill(0.0); // an all-zero block
        x[100] = 1e-30; // tiny values
        for offset in [OFFSET, 0] {
            for block in x.chunks_exact(BLOCK) {
                let (mut a, mut b) = ([0u8; BLOCK], [0u8; BLOCK]);
                let (da, sa) = quantize_block(block, &mut a, offset);
                // SAFETY: checked `avx2()`; 32 values each.
                let (db, sb) = unsafe { quantize_block_avx2(block, &mut b, offset) };
                assert_eq!((da.to_bits(), sa, a), (db.to_bits(), sb, b), "AVX2");
                if available() {
                    // SAFETY: checked `available()`; 32 values each.
                    let (db, sb) = unsafe { quantize_block_avx512(block, &mut b, offset) };
                    assert_eq!((da.to_bits(), sa, a), (db.to_bits(), sb, b), "AVX-512");
                }
            }
        }
    }

    #[test]
    fn dequantize_and_lookup_match_candle() {
        for dtype in FORMATS {
            let (q, _) = weights(48, 256, dtype);
            let p = Packed::from_qtensor(&q).unwrap().unwrap();
            let ours = p
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            if dtype == GgmlDType::Q4K {
                // Sub-block scales and minima rounded to f16 (a relative 2⁻¹¹ each).
                for (block, (a, b)) in ours.chunks(BLOCK).zip(theirs.chunks(BLOCK)).enumerate() {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= amax * 2e-3,
                            "Q4_K block {block}: {x} vs {y}"
                        );
                    }
                }
            } else {
                assert_eq!(ours, theirs, "{dtype:?}");
            }
            let rows = p
                .lookup(&[5, 47, 0], &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(rows[1], ours[47 * 256..48 * 256]);
            assert!(p.lookup(&[48], &Device::Cpu).is_err());
        }
    }

    #[test]
    fn shapes_and_formats_that_do_not_fit_are_not_packed() {
        let (q, _) = weights(24, 64, GgmlDType::Q8_0);
        assert!(Packed::from_qtensor(&q).unwrap().is_none());
        let (q, _) = weights(24, 64, GgmlDType::Q4_1);
        assert!(Packed::from_qtensor(&q).unwrap().is_none());
        // 16-value sub-blocks do not fit 32-value blocks.
        let f = QTensor::quantize(
            &Tensor::zeros((32, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q6K,
        )
        .unwrap();
        assert!(Packed::from_qtensor(&f).unwrap().is_none());
    }

    /// Weights at the ends of their codes' range against activations all at ±127 give each
    /// block's largest integer sums, which the vector kernels must carry without overflow (the
    /// AVX2 kernel adds several steps in 16 bits before it widens them).
    #[test]
    fn the_largest_block_sums_do_not_overflow() {
        check_required_kernel();
        let (rows, cols) = (32, 256);
        // All but the first value of each block at the block's largest: codes 15 (31 for 5
        // bits, 127 for Q8_0) nearly everywhere, and the first at the other end.
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| if i % BLOCK == 0 { -1.0 } else { 1.0 } * (1 + i / cols % 3) as f32)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        // Rows of +1, of -1, of each weight's sign and its opposite, and +1 again: a whole
        // AVX2 tile and a tail.
        let x: Vec<f32> = (0..5 * cols)
            .map(|i| {
                let sign = if i % BLOCK == 0 { -1.0 } else { 1.0 };
                match i / cols {
                    1 => -1.0,
                    2 => sign,
                    3 => -sign,
                    _ => 1.0,
                }
            })
            .collect();
        let x = Tensor::from_vec(x, (5, cols), &Device::Cpu).unwrap();
        for dtype in FORMATS {
            let p = Packed::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let reference = p.matmul_reference(&x).unwrap().to_vec2::<f32>().unwrap();
            // The integer sums are as large as the format allows: about 31 of 32 codes at its
            // largest, against 127 (weights are ±1..3, so their dot products are ±31..93 ×
            // the block count).
            let largest = reference.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
            assert!(
                largest > 0.9 * 93.0 * (cols / BLOCK) as f32,
                "{dtype:?}: {largest}"
            );
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                if isa.runs_here() {
                    let (out, _) = p.matmul_with(&x, isa, false).unwrap();
                    assert_eq!(
                        out.to_vec2::<f32>().unwrap(),
                        reference,
                        "{dtype:?} {isa:?}"
                    );
                }
            }
        }
    }

    /// `scripts/bench-kernels.sh`: the packed kernel's throughput on SmolLM2-shaped matrices,
    /// on every path this CPU runs (AVX2; AVX-512 VNNI; AMX tiles with VNNI for the rows after
    /// the last whole tile), each checked for the same bits as the AVX-512 VNNI path (or AVX2
    /// where that is the best). Prints a table; not a timed test: no speed is asserted.
    #[test]
    #[ignore = "a benchmark: scripts/bench-kernels.sh"]
    fn kernel_throughput() {
        check_required_kernel();
        let amx = amx_available();
        let mut paths: Vec<(&str, Isa, bool)> = Vec::new();
        for (name, isa) in [("AVX2", Isa::Avx2), ("AVX-512 VNNI", Isa::Avx512Vnni)] {
            if isa.runs_here() {
                paths.push((name, isa, false));
            }
        }
        if amx {
            paths.push(("AMX + VNNI", Isa::Avx512Vnni, true));
        }
        assert!(!paths.is_empty(), "this CPU runs no packed kernel path");
        let baseline = paths.iter().rposition(|p| !p.2).unwrap();
        // A table's header: its first column, then a column per path.
        let header = |first: &str, unit: &str| {
            let cells: Vec<String> = paths.iter().map(|p| format!("{} {unit}", p.0)).collect();
            println!("| {first} | rows | {} |", cells.join(" | "));
            println!("|---|---|{}", "---|".repeat(paths.len()));
        };
        header("matrix", "µs (GMAC/s)");
        let shapes = [
            ("gate/up 1536×576", 1536, 576, GgmlDType::Q4_1),
            ("down 576×1536", 576, 1536, GgmlDType::Q4_1),
            ("q/o 576×576", 576, 576, GgmlDType::Q4_1),
            ("vocab slice 4096×576", 4096, 576, GgmlDType::Q8_0),
        ];
        for (name, rows, cols, dtype) in shapes {
            let (q, _) = weights(rows, cols, dtype);
            let p = Packed::from_qtensor(&q).unwrap().unwrap();
            for m in [1, 8, 16, 24, 32, 64, 96, 128] {
                let x = activations(m, cols, m);
                let mut cells = Vec::new();
                let mut outputs = Vec::new();
                for &(_, isa, tiles) in &paths {
                    let mut best = f64::MAX;
                    let mut out = None;
                    for _ in 0..7 {
                        let reps = (2_000_000_000 / (m * rows * cols)).clamp(3, 200);
                        let started = std::time::Instant::now();
                        for _ in 0..reps {
                            out = Some(p.matmul_with(&x, isa, tiles).unwrap().0);
                        }
                        best = best.min(started.elapsed().as_secs_f64() / reps as f64);
                    }
                    let gmac = (m * rows * cols) as f64 / best / 1e9;
                    cells.push(format!("{:.1} ({gmac:.0})", best * 1e6));
                    outputs.push(out.unwrap().to_vec2::<f32>().unwrap());
                }
                for (i, out) in outputs.iter().enumerate() {
                    assert_eq!(
                        out, &outputs[baseline],
                        "{name}, {m} rows: {} vs {}",
                        paths[i].0, paths[baseline].0
                    );
                }
                println!("| {name} {dtype:?} | {m} | {} |", cells.join(" | "));
            }
        }
        // A forward pass reads every weight once, from beyond the cores' own caches: the same
        // product over 120 distinct matrices (66 MB), in GB/s of weights read.
        let (rows, cols) = (1536, 576);
        let matrices: Vec<Packed> = (0..120)
            .map(|k| {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i + k) * 7919 % 1013) as f32 / 1013.0 - 0.5)
                    .collect();
                let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
                Packed::from_qtensor(&q).unwrap().unwrap()
            })
            .collect();
        let bytes = (rows * cols / 2 + rows * cols / BLOCK * 4) as f64;
        println!();
        header(
            "weights streamed: 120 × 1536×576 Q4_1 (66 MB)",
            "µs a matrix (GB/s)",
        );
        for m in [1, 4, 8, 16, 32] {
            let x = activations(m, cols, m);
            let cells: Vec<String> = paths
                .iter()
                .map(|&(_, isa, tiles)| {
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let started = std::time::Instant::now();
                        for p in &matrices {
                            std::hint::black_box(p.matmul_with(&x, isa, tiles).unwrap());
                        }
                        best = best.min(started.elapsed().as_secs_f64() / matrices.len() as f64);
                    }
                    format!("{:.1} ({:.1})", best * 1e6, bytes / best / 1e9)
                })
                .collect();
            println!("| gate/up shape | {m} | {} |", cells.join(" | "));
        }
    }

    #[test]
    fn matmul_is_close_to_f32_and_a_row_never_depends_on_its_batch() {
        check_required_kernel();
        eprintln!(
            "AMX path: {}",
            if amx_available() {
                "checked (32 of 43 rows through tiles, each format)"
            } else {
                "not checked: this CPU or process has no AMX tiles"
            }
        );
        for dtype in FORMATS {
            let (q, _) = weights(64, 256, dtype);
            // Against the weights as stored (the kernel's only error is the activations').
            let w = q.dequantize(&Device::Cpu).unwrap();
            let p = Packed::from_qtensor(&q).unwrap().unwrap();
            // Two AMX tiles of 16 rows, then a VNNI tile of 8 and a tail of 3.
            let x = activations(43, 256, 3);
            let exact = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            let reference = p.matmul_reference(&x).unwrap().to_vec2::<f32>().unwrap();
            let scale = exact.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
            for (e, r) in exact.iter().flatten().zip(reference.iter().flatten()) {
                assert!((e - r).abs() < 0.01 * scale, "{dtype:?}: {e} vs {r}");
            }
            // Each vector kernel this CPU runs gives the reference's bits, for all rows at once
            // (AVX2; AVX-512 VNNI alone; AMX tiles with VNNI for the rest) and, below, for
            // every row alone.
            let mut paths = 0;
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                if !isa.runs_here() {
                    eprintln!("{isa:?} path: not checked, this CPU lacks it");
                    continue;
                }
                paths += 1;
                // 43, 42 and 41 rows end in tails of 3, 2 and 1 rows on either tile size.
                for m in [43, 42, 41] {
                    let x = x.narrow(0, 0, m).unwrap();
                    let (out, tiled) = p.matmul_with(&x, isa, false).unwrap();
                    assert_eq!(tiled, 0, "{dtype:?}: {isa:?} alone uses no tile");
                    assert_eq!(
                        out.to_vec2::<f32>().unwrap(),
                        reference[..m],
                        "{dtype:?} {isa:?}, {m} rows"
                    );
                }
            }
            if paths == 0 {
                continue;
            }
            if amx_available() {
                let (tiles, tiled) = p.matmul_with(&x, Isa::Avx512Vnni, true).unwrap();
                assert_eq!(
                    tiled, 32,
                    "{dtype:?}: two whole tiles of 16 rows through AMX"
                );
                assert_eq!(tiles.to_vec2::<f32>().unwrap(), reference, "{dtype:?} AMX");
            }
            assert_eq!(
                p.matmul(&x).unwrap().to_vec2::<f32>().unwrap(),
                reference,
                "{dtype:?} as the engine calls it"
            );
            for (i, want) in reference.iter().enumerate() {
                let one = p
                    .matmul(&x.narrow(0, i, 1).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                assert_eq!(&one[0], want, "{dtype:?} row {i} alone");
            }
        }
    }
}
