//! Per-conversation KV cache, kept per (layer, KV group) so each side of a split only holds the
//! groups its heads need.

use super::ModelConfig;
use crate::error::{CoreError, CoreResult};

/// K and V rows (RoPE already applied to K) of one (layer, KV group), one `head_dim` row per
/// cached position, with the position each row belongs to.
#[derive(Debug, Default, Clone)]
pub(super) struct KvCache {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) pos: Vec<u32>,
}

/// KV cache of one sequence. Entries of a (layer, group) are created on demand by
/// `Model::attention` / `Model::layer_fused`, with strictly increasing positions.
#[derive(Debug, Clone)]
pub struct Session {
    n_layer: usize,
    n_head_kv: usize,
    head_dim: usize,
    caches: Vec<Option<KvCache>>,
}

/// What appending `positions` to one cache means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Append {
    /// The cache does not hold these positions yet: compute and append K/V.
    Compute,
    /// The cache already ends with exactly these positions (another head subset of the same
    /// group ran on this step): reuse them.
    Reuse,
}

impl Session {
    pub fn new(cfg: &ModelConfig) -> Session {
        Session {
            n_layer: cfg.n_layer,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            caches: vec![None; cfg.n_layer * cfg.n_head_kv],
        }
    }

    /// Number of cached positions of (layer, group); 0 if none were computed (or out of range).
    pub fn len(&self, layer: usize, group: usize) -> usize {
        if layer >= self.n_layer || group >= self.n_head_kv {
            return 0;
        }
        self.caches[layer * self.n_head_kv + group]
            .as_ref()
            .map_or(0, |c| c.pos.len())
    }

    /// True if no (layer, group) holds any position.
    pub fn is_empty(&self) -> bool {
        self.caches.iter().flatten().all(|c| c.pos.is_empty())
    }

    /// Drops every cached position `>= n_positions` in every (layer, group).
    pub fn truncate(&mut self, n_positions: usize) {
        let hd = self.head_dim;
        for c in self.caches.iter_mut().flatten() {
            let keep = c.pos.partition_point(|&p| (p as usize) < n_positions);
            c.pos.truncate(keep);
            c.k.truncate(keep * hd);
            c.v.truncate(keep * hd);
        }
    }

    /// Bytes allocated by the cache (capacity, not just length).
    pub fn memory_bytes(&self) -> usize {
        self.caches
            .iter()
            .flatten()
            .map(|c| 4 * (c.k.capacity() + c.v.capacity() + c.pos.capacity()))
            .sum()
    }

    /// Drops everything and releases the memory.
    pub fn clear(&mut self) {
        self.caches.iter_mut().for_each(|c| *c = None);
    }

    pub(super) fn check_matches(&self, cfg: &ModelConfig) -> CoreResult<()> {
        if self.n_layer != cfg.n_layer || self.n_head_kv != cfg.n_head_kv || self.head_dim != cfg.head_dim {
            return Err(CoreError::InvalidArgument(format!(
                "session was made for {} layers x {} KV groups x head_dim {}, model has {} x {} x {}",
                self.n_layer, self.n_head_kv, self.head_dim, cfg.n_layer, cfg.n_head_kv, cfg.head_dim
            )));
        }
        Ok(())
    }

    /// Decides, without changing anything, how `positions` (strictly increasing) go into
    /// (layer, group).
    pub(super) fn plan_append(&self, layer: usize, group: usize, positions: &[u32]) -> CoreResult<Append> {
        let Some(c) = &self.caches[layer * self.n_head_kv + group] else {
            return Ok(Append::Compute);
        };
        let n = positions.len();
        if c.pos.len() >= n && c.pos[c.pos.len() - n..] == *positions {
            return Ok(Append::Reuse);
        }
        match c.pos.last() {
            Some(&last) if positions[0] <= last => Err(CoreError::InvalidArgument(format!(
                "layer {layer} KV group {group}: position {} is not after the cached position {last} \
                 (truncate the session first)",
                positions[0]
            ))),
            _ => Ok(Append::Compute),
        }
    }

    pub(super) fn append(&mut self, layer: usize, group: usize, positions: &[u32], k: &[f32], v: &[f32]) {
        let c = self.caches[layer * self.n_head_kv + group].get_or_insert_with(KvCache::default);
        c.pos.extend_from_slice(positions);
        c.k.extend_from_slice(k);
        c.v.extend_from_slice(v);
    }

    pub(super) fn cache(&self, layer: usize, group: usize) -> Option<&KvCache> {
        self.caches[layer * self.n_head_kv + group].as_ref()
    }
}
