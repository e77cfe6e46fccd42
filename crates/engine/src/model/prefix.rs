//! Prompt caching across requests: the caches of recent prompts, kept within a memory budget
//! (least recently used out first). A new request whose prompt starts like a kept one copies
//! that part of its cache instead of computing it again: the ML backend's questions about one
//! task, and its short generations, share the system prompt and the task text.

use candle_core::Result;

use super::kv_cache::{CacheShape, SeqCache};

/// Shortest shared prefix worth copying instead of recomputing.
pub(crate) const MIN_REUSE: usize = 16;

struct Entry {
    tokens: Vec<u32>,
    cache: SeqCache,
    /// Memory of `cache`.
    bytes: usize,
    last_used: u64,
}

/// Recently computed prompt caches.
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget_bytes: usize,
    clock: u64,
    /// Prompt tokens served from the cache so far.
    pub(crate) reused_tokens: u64,
}

impl PrefixCache {
    /// A cache holding at most `budget_bytes` of keys and values (0 turns caching off).
    pub(crate) fn new(shape: &CacheShape, budget_bytes: usize) -> Self {
        // Nothing fits a budget below one position.
        let budget_bytes = if budget_bytes < SeqCache::bytes_per_position(shape) {
            0
        } else {
            budget_bytes
        };
        Self {
            entries: Vec::new(),
            budget_bytes,
            clock: 0,
            reused_tokens: 0,
        }
    }

    /// A cache for `tokens` holding the longest kept prefix of them (at least [`MIN_REUSE`]
    /// tokens, never all of them: the last position's logits must be computed), with room for
    /// `extra` more positions; `None` when nothing useful is kept.
    pub(crate) fn lookup(&mut self, tokens: &[u32], extra: usize) -> Result<Option<SeqCache>> {
        let limit = tokens.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let n = e
                    .tokens
                    .iter()
                    .zip(tokens)
                    .take_while(|(a, b)| a == b)
                    .count()
                    .min(limit)
                    .min(e.cache.len());
                // A cache whose sliding-window layers moved past the shared part cannot serve it.
                (if e.cache.can_resume_at(n) { n } else { 0 }, e)
            })
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, entry)) if n >= MIN_REUSE => {
                self.clock += 1;
                entry.last_used = self.clock;
                self.reused_tokens += n as u64;
                Ok(Some(entry.cache.fork_prefix(n, tokens.len() - n + extra)?))
            }
            _ => Ok(None),
        }
    }

    /// Keeps `cache`, which holds the first `cache.len()` of `tokens`, counted against the
    /// budget by the memory it holds (without spare room: see [`SeqCache::compact`]).
    pub(crate) fn insert(&mut self, mut tokens: Vec<u32>, cache: SeqCache) {
        tokens.truncate(cache.len());
        if tokens.len() < MIN_REUSE || self.budget_bytes == 0 {
            return;
        }
        if self.entries.iter().any(|e| e.tokens.starts_with(&tokens)) {
            return; // already covered by a longer entry
        }
        let Ok(cache) = cache.compact() else { return };
        let bytes = cache.bytes();
        if bytes > self.budget_bytes {
            return;
        }
        // An entry that is a prefix of this one is superseded by it.
        self.entries
            .retain(|e| !(e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens)));
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            cache,
            bytes,
            last_used: self.clock,
        });
        while self.entries.iter().map(|e| e.bytes).sum::<usize>() > self.budget_bytes {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.entries.swap_remove(i);
                }
                None => break,
            }
        }
    }

    /// Positions kept.
    #[cfg(test)]
    pub(crate) fn positions(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn shape() -> CacheShape {
        CacheShape {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            max_len: 1000,
            local: None,
        }
    }

    fn filled(n: usize) -> SeqCache {
        let mut c = SeqCache::new(shape(), n, &Device::Cpu).unwrap();
        c.reserve(n).unwrap();
        let rows: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
        let t = Tensor::from_vec(rows, (1, n, 2), &Device::Cpu).unwrap();
        c.write(0, &t, &t, 0, n).unwrap();
        c.advance(n);
        c
    }

    #[test]
    fn longest_prefix_wins_and_budget_evicts_the_least_recent() {
        let bytes = SeqCache::bytes_per_position(&shape());
        let mut p = PrefixCache::new(&shape(), 100 * bytes);
        let a: Vec<u32> = (0..40).collect();
        let mut b: Vec<u32> = (0..30).collect();
        b.extend(100..130);
        p.insert(a.clone(), filled(40));
        p.insert(b.clone(), filled(60));
        assert_eq!(p.positions(), 100);
        // Shares 35 with a, 30 with b.
        let mut q: Vec<u32> = (0..35).collect();
        q.extend(500..510);
        let hit = p.lookup(&q, 4).unwrap().unwrap();
        assert_eq!(hit.len(), 35);
        assert_eq!(p.reused_tokens, 35);
        // Never the whole prompt.
        assert_eq!(p.lookup(&a, 0).unwrap().unwrap().len(), 39);
        // Too short a match is not worth it.
        assert!(p.lookup(&(0..10).collect::<Vec<_>>(), 0).unwrap().is_none());
        // Over budget: b (used least recently) goes.
        p.insert((200..250).collect(), filled(50));
        assert_eq!(p.positions(), 90);
        // b's own 60 positions are gone; its first 30 tokens are still a's.
        assert_eq!(p.lookup(&b, 0).unwrap().unwrap().len(), 30);
        // A longer prompt supersedes its own prefix.
        let mut longer = a.clone();
        longer.extend(900..905);
        p.insert(longer, filled(45));
        assert_eq!(p.positions(), 95);
        // Off.
        let mut off = PrefixCache::new(&shape(), 0);
        off.insert(a.clone(), filled(40));
        assert_eq!(off.positions(), 0);
    }
}
