//! The KV cache of one sequence, owned by the engine: one preallocated key and value tensor per
//! layer, `[kv_heads, capacity, head_dim]`, appended in place (no copy of the cache per token,
//! unlike candle-transformers' `Tensor::cat`). Reads are views of the first `len` positions.

use candle_core::{DType, Device, Result, Tensor};

/// Shape of a model's cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheShape {
    pub(crate) layers: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Most positions a sequence may hold (the model's usable context).
    pub(crate) max_len: usize,
}

/// Keys and values of every processed position of one sequence.
pub(crate) struct SeqCache {
    shape: CacheShape,
    /// Per layer: (keys, values), each `[kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    len: usize,
}

/// Positions allocated at first, and the least a cache grows by.
const MIN_CAPACITY: usize = 64;

impl SeqCache {
    /// An empty cache with room for `hint` positions before it must grow.
    pub(crate) fn new(shape: CacheShape, hint: usize, device: &Device) -> Result<Self> {
        let capacity = hint.clamp(MIN_CAPACITY.min(shape.max_len), shape.max_len);
        let layers = (0..shape.layers)
            .map(|_| {
                let z = || Tensor::zeros((shape.kv_heads, capacity, shape.head_dim), DType::F32, device);
                Ok((z()?, z()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { shape, layers, capacity, len: 0 })
    }

    /// Positions processed so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Makes room for `extra` more positions (doubling, capped at the context).
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        if need > self.shape.max_len {
            candle_core::bail!("sequence of {need} positions exceeds the context of {}", self.shape.max_len)
        }
        let capacity = need.max(self.capacity * 2).min(self.shape.max_len);
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let bigger = Tensor::zeros((self.shape.kv_heads, capacity, self.shape.head_dim), DType::F32, t.device())?;
                if self.len > 0 {
                    bigger.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *t = bigger;
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k` and `v` (`[kv_heads, n, head_dim]`, contiguous) of layer `layer` at the
    /// current end. [`SeqCache::advance`] moves the end once every layer is written.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(k, 1, self.len)?;
        vc.slice_set(v, 1, self.len)
    }

    /// Keys and values of layer `layer` for the first `len + n` positions (views, no copy).
    pub(crate) fn view(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let (kc, vc) = &self.layers[layer];
        Ok((kc.narrow(1, 0, self.len + n)?, vc.narrow(1, 0, self.len + n)?))
    }

    /// The whole key and value tensors of layer `layer`, `[kv_heads, capacity, head_dim]`.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Marks `n` more positions as processed.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position from `len` on (a rejected continuation, for example).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A copy of this cache that continues independently (prefix sharing: one prompt's
    /// cache serves several continuations), with room for `extra` more positions.
    pub(crate) fn fork(&self, extra: usize) -> Result<Self> {
        self.fork_prefix(self.len, extra)
    }

    /// A copy of the first `len` positions (at most all of them), with room for `extra` more.
    pub(crate) fn fork_prefix(&self, len: usize, extra: usize) -> Result<Self> {
        let len = len.min(self.len);
        let mut copy = Self::new(self.shape, len + extra, self.layers[0].0.device())?;
        for (i, (k, v)) in self.layers.iter().enumerate() {
            if len > 0 {
                let (ck, cv) = &copy.layers[i];
                ck.slice_set(&k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                cv.slice_set(&v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        copy.len = len;
        Ok(copy)
    }

    /// Bytes of keys and values per position.
    pub(crate) fn bytes_per_position(shape: &CacheShape) -> usize {
        shape.layers * shape.kv_heads * shape.head_dim * 2 * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> CacheShape {
        CacheShape { layers: 2, kv_heads: 1, head_dim: 2, max_len: 200 }
    }

    fn rows(from: f32, n: usize) -> Tensor {
        let data: Vec<f32> = (0..n * 2).map(|i| from + i as f32).collect();
        Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn appends_grow_and_forks_are_independent() {
        let mut c = SeqCache::new(shape(), 1, &Device::Cpu).unwrap();
        for step in 0..100 {
            c.reserve(1).unwrap();
            for layer in 0..2 {
                c.write(layer, &rows(step as f32 * 2.0, 1), &rows(-(step as f32), 1)).unwrap();
            }
            c.advance(1);
        }
        assert_eq!(c.len(), 100);
        let (k, _) = c.view(0, 0).unwrap();
        let k: Vec<Vec<f32>> = k.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(k[0], vec![0.0, 1.0]);
        assert_eq!(k[99], vec![198.0, 199.0]);

        let mut f = c.fork(5).unwrap();
        f.reserve(1).unwrap();
        f.write(0, &rows(1000.0, 1), &rows(1000.0, 1)).unwrap();
        f.advance(1);
        assert_eq!((c.len(), f.len()), (100, 101));
        // Writing into the fork left the original alone (its slot 100 is still zero).
        c.reserve(1).unwrap();
        let (k, _) = c.view(0, 1).unwrap();
        let k: Vec<Vec<f32>> = k.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(k[100], vec![0.0, 0.0]);
        c.truncate(10);
        assert_eq!(c.len(), 10);
        assert!(c.reserve(1000).is_err());
    }
}
