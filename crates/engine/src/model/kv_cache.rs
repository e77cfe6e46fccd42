//! The KV cache of one sequence, owned by the engine: one preallocated key and value tensor per
//! layer, `[kv_heads, slots, head_dim]`, appended in place (no copy of the cache per token,
//! unlike candle-transformers' `Tensor::cat`). Keys and values are kept in f16, as llama.cpp
//! keeps them by default: half the memory of f32 for running sequences and the prompt cache
//! alike, read back to f32 by the attention.
//!
//! Global layers keep every position (position `p` in slot `p`). Sliding-window layers (Gemma 3's
//! local layers) keep only a ring of recent positions (position `p` in slot `p % ring`), the
//! window plus room for the positions one forward pass adds: their memory stays flat however
//! long the sequence grows. A ring can go back (truncate, fork an earlier prefix) only as far as
//! the positions it still holds.

use candle_core::{DType, Device, Result, Tensor};

/// Shape of a model's cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheShape {
    pub(crate) layers: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Most positions a sequence may hold (the model's usable context).
    pub(crate) max_len: usize,
    /// Sliding-window layers, kept as rings.
    pub(crate) local: Option<LocalLayers>,
}

/// Which layers attend within a sliding window, and how wide it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalLayers {
    /// A query at position `p` sees keys `p - window + 1 ..= p`.
    pub(crate) window: usize,
    /// Layer `i` is global when `(i + 1) % period == 0`, local otherwise.
    pub(crate) period: usize,
}

impl LocalLayers {
    /// The sliding window of layer `layer`, `None` for a global layer.
    pub(crate) fn window_of(&self, layer: usize) -> Option<usize> {
        (!(layer + 1).is_multiple_of(self.period)).then_some(self.window)
    }
}

impl CacheShape {
    /// The sliding window of layer `layer`, `None` for a global layer (or no rings).
    pub(crate) fn window(&self, layer: usize) -> Option<usize> {
        self.local.and_then(|l| l.window_of(layer))
    }
}

/// Keys and values of every processed position of one sequence.
pub(crate) struct SeqCache {
    shape: CacheShape,
    /// Per layer: (keys, values), each `[kv_heads, slots, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    /// Slots of global layers: positions they can hold before growing.
    capacity: usize,
    /// Ring length of local layers (their slots are `min(capacity, ring)`).
    ring: usize,
    len: usize,
    /// Oldest position local layers still hold (older slots were overwritten).
    oldest: usize,
}

/// The element type of cached keys and values.
pub(crate) const KV_DTYPE: DType = DType::F16;

/// Positions allocated at first, and the least a cache grows by.
const MIN_CAPACITY: usize = 64;

/// Room a ring keeps beyond the window at first: positions one forward pass may add without
/// the ring growing, and how far the sequence can go back.
const RING_SLACK: usize = 64;

/// Copies positions `from..to` between two caches of one layer, each slot `p % modulus`, into
/// a tensor that exists (a cache growing, [`SeqCache::reserve`]; forks off the CPU, where
/// [`copied`] builds new tensors in one pass). On the CPU each run of slots goes straight from
/// one cache to the other, a copy per KV head ([`WriteRows`]); the generic path (other devices)
/// copies it out contiguous first, twice the copying and an allocation.
fn copy_positions(
    src: &Tensor,
    src_mod: usize,
    dst: &Tensor,
    dst_mod: usize,
    from: usize,
    to: usize,
) -> Result<()> {
    let direct = writes_in_place(dst, src);
    let mut p = from;
    while p < to {
        let (s, d) = (p % src_mod, p % dst_mod);
        let run = (to - p).min(src_mod - s).min(dst_mod - d);
        if direct {
            let op = WriteRows {
                from: s,
                n: run,
                first: d,
                modulus: dst_mod,
            };
            dst.inplace_op2(src, &op)?;
        } else {
            dst.slice_set(&src.narrow(1, s, run)?.contiguous()?, 1, d)?;
        }
        p += run;
    }
    Ok(())
}

/// A new cache tensor of `slots` slots (position `p` in slot `p % dst_mod`) holding positions
/// `from..to` of `src` (position `p` in slot `p % src_mod`), its other slots zero. On the CPU it
/// is built in one pass, each byte written once, copied or zeroed: scoring forks a question's
/// cache for every candidate and every question's rest, and zeroing each new tensor before
/// copying into it (`memset` + `memmove`) was about 6% of all samples of a bulk
/// candidate-evaluation `/predict` (perf), on the model thread while the others waited.
fn copied(
    src: &Tensor,
    src_mod: usize,
    slots: usize,
    dst_mod: usize,
    from: usize,
    to: usize,
) -> Result<Tensor> {
    let (heads, src_slots, width) = src.dims3()?;
    if !(src.device().is_cpu() && src.dtype() == KV_DTYPE && src.is_contiguous()) {
        let dst = Tensor::zeros((heads, slots, width), KV_DTYPE, src.device())?;
        copy_positions(src, src_mod, &dst, dst_mod, from, to)?;
        return Ok(dst);
    }
    let (storage, layout) = src.storage_and_layout();
    let data = crate::kernels::cpu_slice::<half::f16>(&storage, layout)?;
    let zero = half::f16::ZERO;
    // The runs of positions, in order of the slots they land in (the same for every head):
    // (slot in the copy, slot in the source, positions).
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut p = from;
    while p < to {
        let (s, d) = (p % src_mod, p % dst_mod);
        let run = (to - p).min(src_mod - s).min(dst_mod - d);
        if s + run > src_slots || d + run > slots {
            candle_core::bail!("positions {p}..{} are past a cache's slots", p + run)
        }
        runs.push((d, s, run));
        p += run;
    }
    runs.sort_unstable();
    if runs.windows(2).any(|w| w[1].0 < w[0].0 + w[0].2) {
        candle_core::bail!("two runs of positions share a slot")
    }
    let mut out: Vec<half::f16> = Vec::with_capacity(heads * slots * width);
    for h in 0..heads {
        let head = &data[h * src_slots * width..(h + 1) * src_slots * width];
        let mut next = 0;
        for &(d, s, run) in &runs {
            out.resize(out.len() + (d - next) * width, zero);
            out.extend_from_slice(&head[s * width..(s + run) * width]);
            next = d + run;
        }
        out.resize(out.len() + (slots - next) * width, zero);
    }
    Tensor::from_vec(out, (heads, slots, width), src.device())
}

/// Whether [`WriteRows`] can copy `src`'s rows straight into the cache tensor `dst`: both
/// contiguous, of the cache's type, on the CPU (elsewhere the generic tensor ops copy them).
fn writes_in_place(dst: &Tensor, src: &Tensor) -> bool {
    dst.device().is_cpu()
        && src.dtype() == KV_DTYPE
        && dst.dtype() == KV_DTYPE
        && src.is_contiguous()
        && dst.is_contiguous()
}

/// Copies positions `from..from + n` of a `[kv_heads, T, head_dim]` tensor into a layer's
/// cache tensor at positions `first..`, position `p` in slot `p % modulus` ([`SeqCache::write`]).
struct WriteRows {
    from: usize,
    n: usize,
    first: usize,
    modulus: usize,
}

impl candle_core::InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "kv-cache-write-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_layout: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        src_layout: &candle_core::Layout,
    ) -> Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) = (
            dst_layout.contiguous_offsets(),
            src_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("the cache and the rows written to it must be contiguous")
        };
        let (candle_core::CpuStorage::F16(dst), candle_core::CpuStorage::F16(src)) = (dst, src)
        else {
            candle_core::bail!("the cache and the rows written to it must be f16")
        };
        let (dst, src) = (&mut dst[d0..d1], &src[s0..s1]);
        let (heads, slots, width) = dst_layout.shape().dims3()?;
        let (src_heads, rows, src_width) = src_layout.shape().dims3()?;
        if (src_heads, src_width) != (heads, width) || self.from + self.n > rows {
            candle_core::bail!(
                "rows {}..{} of [{src_heads}, {rows}, {src_width}] do not fit a cache of \
                 [{heads}, {slots}, {width}]",
                self.from,
                self.from + self.n
            )
        }
        let mut p = 0;
        while p < self.n {
            let slot = (self.first + p) % self.modulus;
            let run = (self.n - p).min(self.modulus - slot);
            if slot + run > slots {
                candle_core::bail!("position {} is past the cache's {slots} slots", slot + run)
            }
            for h in 0..heads {
                let at = (h * rows + self.from + p) * width;
                let to = (h * slots + slot) * width;
                dst[to..to + run * width].copy_from_slice(&src[at..at + run * width]);
            }
            p += run;
        }
        Ok(())
    }
}

impl SeqCache {
    /// An empty cache with room for `hint` positions before it must grow.
    pub(crate) fn new(shape: CacheShape, hint: usize, device: &Device) -> Result<Self> {
        let capacity = hint.clamp(MIN_CAPACITY.min(shape.max_len), shape.max_len);
        let ring = shape.local.map_or(usize::MAX, |l| l.window + RING_SLACK);
        Self::empty(shape, capacity, ring, device)
    }

    fn empty(shape: CacheShape, capacity: usize, ring: usize, device: &Device) -> Result<Self> {
        let layers = (0..shape.layers)
            .map(|li| {
                let slots = Self::slots(&shape, li, capacity, ring);
                let z = || Tensor::zeros((shape.kv_heads, slots, shape.head_dim), KV_DTYPE, device);
                Ok((z()?, z()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shape,
            layers,
            capacity,
            ring,
            len: 0,
            oldest: 0,
        })
    }

    /// Slots of layer `li` in a cache of `capacity` positions whose rings are `ring` long.
    fn slots(shape: &CacheShape, li: usize, capacity: usize, ring: usize) -> usize {
        if shape.window(li).is_some() {
            capacity.min(ring)
        } else {
            capacity
        }
    }

    /// A cache of `capacity` positions and `ring`-long rings holding this one's positions
    /// `oldest..len` (each layer from the oldest position it keeps), its layers built with
    /// [`copied`] on the kernel threads (a fork happens between forward passes, when the other
    /// cores would only wait).
    fn copy_into(&self, capacity: usize, ring: usize, oldest: usize, len: usize) -> Result<Self> {
        let layer = |li: usize| -> Result<(Tensor, Tensor)> {
            let (k, v) = &self.layers[li];
            let local = self.shape.window(li).is_some();
            let src_mod = self.modulus(li);
            let dst_mod = if local { ring } else { usize::MAX };
            let from = if local { oldest } else { 0 };
            let slots = Self::slots(&self.shape, li, capacity, ring);
            Ok((
                copied(k, src_mod, slots, dst_mod, from, len)?,
                copied(v, src_mod, slots, dst_mod, from, len)?,
            ))
        };
        /// One layer's copy, once a kernel thread has built it.
        type Built = std::sync::Mutex<Option<Result<(Tensor, Tensor)>>>;
        let built: Vec<Built> = self.layers.iter().map(|_| Default::default()).collect();
        crate::kernels::chunked(built.len(), |range| {
            for li in range {
                *built[li].lock().unwrap_or_else(|e| e.into_inner()) = Some(layer(li));
            }
        });
        let layers = built
            .into_iter()
            .map(|slot| {
                slot.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| candle_core::bail!("a cache layer was not copied"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shape: self.shape,
            layers,
            capacity,
            ring,
            len,
            oldest,
        })
    }

    /// Positions processed so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slot modulus of layer `layer`: the ring for a local layer, none (`usize::MAX`) else.
    fn modulus(&self, layer: usize) -> usize {
        if self.shape.window(layer).is_some() {
            self.ring
        } else {
            usize::MAX
        }
    }

    /// Makes room for `extra` more positions (global layers double, capped at the context;
    /// rings grow to hold the window and `extra` new positions at once).
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need > self.shape.max_len {
            candle_core::bail!(
                "sequence of {need} positions exceeds the context of {}",
                self.shape.max_len
            )
        }
        let capacity = if need <= self.capacity {
            self.capacity
        } else {
            need.max(self.capacity * 2).min(self.shape.max_len)
        };
        let ring = match self.shape.local {
            Some(l) => self.ring.max(l.window + extra),
            None => self.ring,
        };
        if capacity == self.capacity && ring == self.ring {
            return Ok(());
        }
        for li in 0..self.layers.len() {
            let local = self.shape.window(li).is_some();
            let slots = if local { capacity.min(ring) } else { capacity };
            let (old_mod, new_mod) = if local {
                (self.ring, ring)
            } else {
                (usize::MAX, usize::MAX)
            };
            let from = if local { self.oldest } else { 0 };
            let (k, v) = &mut self.layers[li];
            for t in [k, v] {
                if t.dims3()?.1 == slots && old_mod == new_mod {
                    continue;
                }
                let bigger = Tensor::zeros(
                    (self.shape.kv_heads, slots, self.shape.head_dim),
                    KV_DTYPE,
                    t.device(),
                )?;
                copy_positions(t, old_mod, &bigger, new_mod, from, self.len)?;
                *t = bigger;
            }
        }
        self.capacity = capacity;
        self.ring = ring;
        Ok(())
    }

    /// Writes positions `from..from + n` of `k` and `v` (`[kv_heads, T, head_dim]`, any float
    /// type; a forward pass's keys and values of every sequence in it) as this sequence's next
    /// `n` positions of layer `layer`. [`SeqCache::advance`] moves the end once every layer is
    /// written. CPU tensors of the cache's type are copied straight into the slots, without
    /// the intermediate tensors of the generic path (a decode step writes every sequence of
    /// the batch in every layer, so those small copies added up on the model thread).
    pub(crate) fn write(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        from: usize,
        n: usize,
    ) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        let m = self.modulus(layer);
        if writes_in_place(kc, k) && writes_in_place(vc, v) {
            let op = WriteRows {
                from,
                n,
                first: self.len,
                modulus: m,
            };
            kc.inplace_op2(k, &op)?;
            return vc.inplace_op2(v, &op);
        }
        let (k, v) = (
            k.narrow(1, from, n)?.to_dtype(KV_DTYPE)?,
            v.narrow(1, from, n)?.to_dtype(KV_DTYPE)?,
        );
        let mut p = 0;
        while p < n {
            let slot = (self.len + p) % m;
            let run = (n - p).min(m - slot);
            kc.slice_set(&k.narrow(1, p, run)?.contiguous()?, 1, slot)?;
            vc.slice_set(&v.narrow(1, p, run)?.contiguous()?, 1, slot)?;
            p += run;
        }
        Ok(())
    }

    /// Keys and values of global layer `layer` for the first `len + n` positions (views, no
    /// copy), for attention by matrix products; local layers are rings and have no such view.
    pub(crate) fn view(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        if self.shape.window(layer).is_some() {
            candle_core::bail!("layer {layer} keeps a ring of positions, not a prefix")
        }
        let (kc, vc) = &self.layers[layer];
        Ok((
            kc.narrow(1, 0, self.len + n)?,
            vc.narrow(1, 0, self.len + n)?,
        ))
    }

    /// The key and value tensors of layer `layer`, `[kv_heads, slots, head_dim]`, and the slot
    /// modulus (position `p` is in slot `p % modulus`; `usize::MAX` for a global layer).
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor, usize) {
        let (k, v) = &self.layers[layer];
        (k, v, self.modulus(layer))
    }

    /// Marks `n` more positions as processed.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        if self.shape.local.is_some() {
            self.oldest = self.oldest.max(self.len.saturating_sub(self.ring));
        }
    }

    /// Whether the sequence can continue from position `len` (at most its length): local
    /// layers still hold the window before it.
    pub(crate) fn can_resume_at(&self, len: usize) -> bool {
        match self.shape.local {
            Some(l) => len.min(self.len).saturating_sub(l.window - 1) >= self.oldest,
            None => true,
        }
    }

    /// A copy of this cache that continues independently (prefix sharing: one prompt's
    /// cache serves several continuations), with room for `extra` more positions.
    pub(crate) fn fork(&self, extra: usize) -> Result<Self> {
        self.fork_prefix(self.len, extra)
    }

    /// A copy of the first `len` positions (at most all of them), with room for `extra` more;
    /// fails when [`SeqCache::can_resume_at`] `len` does not hold.
    pub(crate) fn fork_prefix(&self, len: usize, extra: usize) -> Result<Self> {
        let len = len.min(self.len);
        if !self.can_resume_at(len) {
            candle_core::bail!(
                "cannot copy the first {len} positions: the sliding-window layers moved past them"
            )
        }
        let ring = self
            .shape
            .local
            .map_or(usize::MAX, |l| l.window + RING_SLACK.max(extra));
        let capacity =
            (len + extra).clamp(MIN_CAPACITY.min(self.shape.max_len), self.shape.max_len);
        let oldest = if self.shape.local.is_some() {
            self.oldest.max(len.saturating_sub(ring))
        } else {
            0
        };
        self.copy_into(capacity, ring, oldest, len)
    }

    /// This cache without room beyond its positions. The prompt cache keeps caches this way:
    /// it only ever copies from them, so spare room would hold memory for nothing.
    pub(crate) fn compact(self) -> Result<Self> {
        let capacity = self.len.max(1);
        if self.capacity <= capacity {
            return Ok(self);
        }
        self.copy_into(capacity, self.ring, self.oldest, self.len)
    }

    /// Bytes of keys and values this cache holds, spare room included.
    pub(crate) fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Bytes of keys and values per position (as global layers keep them; an upper bound).
    pub(crate) fn bytes_per_position(shape: &CacheShape) -> usize {
        shape.layers * shape.kv_heads * shape.head_dim * 2 * KV_DTYPE.size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(local: Option<LocalLayers>) -> CacheShape {
        CacheShape {
            layers: 2,
            kv_heads: 1,
            head_dim: 2,
            max_len: 200,
            local,
        }
    }

    fn rows(from: f32, n: usize) -> Tensor {
        let data: Vec<f32> = (0..n * 2).map(|i| from + i as f32).collect();
        Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
    }

    /// Key of position `p` in layer `layer`, read through the slot mapping.
    fn key_at(c: &SeqCache, layer: usize, p: usize) -> Vec<f32> {
        let (k, _, m) = c.layer(layer);
        k.squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[p % m]
            .clone()
    }

    fn append(c: &mut SeqCache, from: usize, n: usize) {
        c.reserve(n).unwrap();
        for layer in 0..2 {
            let (k, v) = (rows(from as f32 * 2.0, n), rows(-(from as f32), n));
            c.write(layer, &k, &v, 0, n).unwrap();
        }
        c.advance(n);
    }

    /// A copy built in one pass ([`copied`]) holds exactly what zeroing a new tensor and
    /// copying the positions into it gives, on global layers and on rings that wrap (in the
    /// source, the copy, or both), with several KV heads.
    #[test]
    fn one_pass_copies_equal_zeroing_then_copying() {
        let (heads, width) = (3, 4);
        let src = |slots: usize| {
            let data: Vec<f32> = (0..heads * slots * width).map(|i| i as f32 + 1.0).collect();
            Tensor::from_vec(data, (heads, slots, width), &Device::Cpu)
                .unwrap()
                .to_dtype(KV_DTYPE)
                .unwrap()
        };
        // (source slots, source modulus, copy's slots, copy's modulus, positions from..to)
        let cases = [
            (10, usize::MAX, 16, usize::MAX, 0, 10),
            (10, usize::MAX, 7, usize::MAX, 0, 7),
            (7, 7, 9, 9, 3, 10),
            (7, 7, 5, 5, 6, 11),
            (9, 9, 9, 9, 4, 13),
            (6, 6, 12, 12, 20, 26),
        ];
        for (src_slots, src_mod, slots, dst_mod, from, to) in cases {
            let t = src(src_slots);
            let expected = Tensor::zeros((heads, slots, width), KV_DTYPE, &Device::Cpu).unwrap();
            copy_positions(&t, src_mod, &expected, dst_mod, from, to).unwrap();
            let got = copied(&t, src_mod, slots, dst_mod, from, to).unwrap();
            let as_f32 = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let expected = as_f32(&expected);
            assert!(expected.iter().any(|&x| x != 0.0));
            assert_eq!(
                as_f32(&got),
                expected,
                "{src_slots} slots (mod {src_mod}) into {slots} (mod {dst_mod}), {from}..{to}"
            );
        }
    }

    #[test]
    fn appends_grow_and_forks_are_independent() {
        let mut c = SeqCache::new(shape(None), 1, &Device::Cpu).unwrap();
        for step in 0..100 {
            append(&mut c, step, 1);
        }
        assert_eq!(c.len(), 100);
        let (k, _) = c.view(0, 0).unwrap();
        let k: Vec<Vec<f32>> = k
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(k[0], vec![0.0, 1.0]);
        assert_eq!(k[99], vec![198.0, 199.0]);

        let mut f = c.fork(5).unwrap();
        f.reserve(1).unwrap();
        f.write(0, &rows(1000.0, 1), &rows(1000.0, 1), 0, 1)
            .unwrap();
        f.advance(1);
        assert_eq!((c.len(), f.len()), (100, 101));
        // Writing into the fork left the original alone (its slot 100 is still zero).
        c.reserve(1).unwrap();
        let (k, _) = c.view(0, 1).unwrap();
        let k: Vec<Vec<f32>> = k
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(k[100], vec![0.0, 0.0]);
        let mut c = c.fork_prefix(10, 0).unwrap();
        assert_eq!(c.len(), 10);
        assert!(c.reserve(1000).is_err());
    }

    /// A batch's rows written straight into the slots (f16 on the CPU) land where the generic
    /// path puts them, bit for bit: each sequence's own rows of a wider batch tensor, across a
    /// ring's wrap and in a global layer.
    #[test]
    fn rows_copied_in_place_match_the_generic_write() {
        let local = Some(LocalLayers {
            window: 4,
            period: 2,
        });
        let (mut direct, mut generic) = (
            SeqCache::new(shape(local), 1, &Device::Cpu).unwrap(),
            SeqCache::new(shape(local), 1, &Device::Cpu).unwrap(),
        );
        // Passes of three sequences' rows, this one's in the middle: 1, then 7, then 50 at once
        // (past the ring's first length), then single steps around the ring.
        let mut pos = 0;
        for (step, n) in [1, 7, 50, 1, 1, 1, 30, 1].into_iter().enumerate() {
            let before = 2 + step;
            let wide = before + n + 3;
            let (k, v) = (rows(step as f32 * 100.0, wide), rows(-(step as f32), wide));
            let (k16, v16) = (k.to_dtype(KV_DTYPE).unwrap(), v.to_dtype(KV_DTYPE).unwrap());
            for c in [&mut direct, &mut generic] {
                c.reserve(n).unwrap();
            }
            for layer in 0..2 {
                direct.write(layer, &k16, &v16, before, n).unwrap();
                generic.write(layer, &k, &v, before, n).unwrap();
            }
            direct.advance(n);
            generic.advance(n);
            pos += n;
            for layer in 0..2 {
                let (m, g) = (direct.layer(layer), generic.layer(layer));
                for (a, b) in [(m.0, g.0), (m.1, g.1)] {
                    let bits = |t: &Tensor| {
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<half::f16>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(a), bits(b), "layer {layer} after {pos} positions");
                }
            }
            // The newest position holds this pass's last row.
            let last = step as f32 * 100.0 + ((before + n - 1) * 2) as f32;
            assert_eq!(key_at(&direct, 0, pos - 1), vec![last, last + 1.0]);
        }
    }

    /// Layer 0 is local (window 4), layer 1 global: the ring holds the window and its slack,
    /// wraps around, grows for a long write, and refuses to go back past what it holds.
    #[test]
    fn sliding_window_layers_keep_a_ring() {
        let local = Some(LocalLayers {
            window: 4,
            period: 2,
        });
        let mut c = SeqCache::new(shape(local), 150, &Device::Cpu).unwrap();
        let ring = 4 + RING_SLACK;
        assert_eq!(c.layer(0).0.dims3().unwrap().1, ring);
        assert_eq!(c.layer(1).0.dims3().unwrap().1, 150);
        for p in 0..100 {
            append(&mut c, p, 1);
        }
        // Every position the window needs reads back right; the global layer has them all.
        for p in 96..100 {
            assert_eq!(key_at(&c, 0, p), vec![p as f32 * 2.0, p as f32 * 2.0 + 1.0]);
        }
        assert_eq!(key_at(&c, 1, 3), vec![6.0, 7.0]);
        assert!(c.can_resume_at(90));
        assert!(!c.can_resume_at(100 - ring));
        // A write of 80 positions at once grows the ring so that it wraps nothing it needs.
        append(&mut c, 100, 80);
        assert!(c.layer(0).0.dims3().unwrap().1 >= 84);
        for p in 96..180 {
            assert_eq!(
                key_at(&c, 0, p)[0],
                (if p < 100 { p * 2 } else { 200 + (p - 100) * 2 }) as f32,
                "p{p}"
            );
        }
        // Forking a recent prefix works; a prefix the ring moved past is refused.
        let f = c.fork_prefix(170, 3).unwrap();
        assert_eq!(f.len(), 170);
        assert_eq!(key_at(&f, 0, 169), key_at(&c, 0, 169));
        assert_eq!(key_at(&f, 1, 0), key_at(&c, 1, 0));
        assert!(c.fork_prefix(20, 3).is_err());
    }

    /// A compacted cache holds its positions and no more; a ring that wrapped stays a ring.
    #[test]
    fn compact_drops_spare_room_and_keeps_every_position() {
        for (local, n) in [
            (None, 30),
            (
                Some(LocalLayers {
                    window: 4,
                    period: 2,
                }),
                30,
            ),
            (
                Some(LocalLayers {
                    window: 4,
                    period: 2,
                }),
                150,
            ),
        ] {
            let mut c = SeqCache::new(shape(local), 190, &Device::Cpu).unwrap();
            for p in 0..n {
                append(&mut c, p, 1);
            }
            let before = c.bytes();
            let oldest = c.oldest;
            let want: Vec<Vec<f32>> = (oldest..n)
                .map(|p| key_at(&c, 1, p))
                .chain((n - 4..n).map(|p| key_at(&c, 0, p)))
                .collect();
            let c = c.compact().unwrap();
            assert!(c.bytes() < before, "{local:?} {n}");
            assert!(c.bytes() <= n * SeqCache::bytes_per_position(&shape(local)));
            assert_eq!(c.len(), n);
            let got: Vec<Vec<f32>> = (oldest..n)
                .map(|p| key_at(&c, 1, p))
                .chain((n - 4..n).map(|p| key_at(&c, 0, p)))
                .collect();
            assert_eq!(got, want);
            assert!(c.can_resume_at(n));
        }
    }
}
