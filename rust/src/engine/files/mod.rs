//! Model files: a plain GGUF, a llama.cpp gguf-split set, or a directory of role shards, opened
//! as one [`TensorSource`] that maps files on demand under a memory budget.
//!
//! A role-shard directory (written by [`write_shards`]) holds `base.gguf` (all metadata with the
//! tokenizer, the embedding, the output norm and the LM head) and one `layer-NNN.gguf` per layer,
//! each tagged with the `splitwise.shard.*` keys below. Which file holds which layer comes from
//! the file names; whether a file really is that layer of this model comes from its keys, which
//! are checked every time the file is mapped.
//!
//! Budget rule: the bytes of the files this source holds mapped never exceed the budget. Files
//! holding non-layer tensors (and the metadata) are pinned; a layer file is mapped when one of
//! its tensors is asked for, after unmapping least-recently-used layer files until it fits. The
//! open fails when the budget cannot hold the pinned files plus the largest layer file. A call
//! that is still using an evicted file keeps that one mapping alive (through its `TensorRef`)
//! until it returns, so with one caller at most one file beyond the accounted ones is mapped.
//! Without a budget every needed file is mapped at the open and stays mapped.

#[cfg(test)]
mod tests;
mod writer;

pub use writer::{write_shards, ShardSummary, WrittenShard};

use crate::engine::gguf::GgufFile;
use crate::engine::model::{describe_layers, Model, ModelConfig, TensorRef, TensorSource, WeightStats};
use crate::error::{CoreError, CoreResult};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Hex SHA-256 of the source model file(s) a shard was cut from.
pub const KEY_SOURCE_SHA256: &str = "splitwise.shard.source_sha256";
/// File name of the source model, informative only.
pub const KEY_SOURCE_FILE: &str = "splitwise.shard.source_file";
/// "base" or "layer".
pub const KEY_ROLE: &str = "splitwise.shard.role";
/// Layer index of a layer shard.
pub const KEY_LAYER: &str = "splitwise.shard.layer";
/// Layers of the source model.
pub const KEY_N_LAYER: &str = "splitwise.shard.n_layer";
pub const ROLE_BASE: &str = "base";
pub const ROLE_LAYER: &str = "layer";
pub const BASE_FILE: &str = "base.gguf";

/// llama.cpp gguf-split keys.
const SPLIT_NO: &str = "split.no";
const SPLIT_COUNT: &str = "split.count";
const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// File name of layer `layer`'s shard.
pub fn layer_file_name(layer: usize) -> String {
    format!("layer-{layer:03}.gguf")
}

fn file_error(path: &Path, problem: impl Into<String>) -> CoreError {
    CoreError::ModelFile {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(msg.into())
}

/// The layer a tensor name belongs to (`blk.N.…`), if any.
pub fn layer_of_tensor(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// What a file must turn out to be when it is mapped again.
#[derive(Debug, Clone, PartialEq)]
enum Identity {
    Plain,
    Split {
        no: u32,
        count: u32,
    },
    Shard {
        source_sha256: String,
        layer: Option<usize>,
    },
}

/// One weight file this source may map.
#[derive(Debug)]
struct Slot {
    path: PathBuf,
    bytes: u64,
    pinned: bool,
    identity: Identity,
    tensor_count: usize,
}

/// Which slots are mapped now, and the counters behind [`WeightStats`].
#[derive(Debug, Default)]
struct CacheState {
    mapped: Vec<Option<Arc<GgufFile>>>,
    /// Per slot, whether it holds a layer the current plan runs here (`retain_layers`): such
    /// files are loaded ahead and are the last to be evicted.
    retained: Vec<bool>,
    /// Per slot, the `clock` of its last lookup (LRU order).
    last_use: Vec<u64>,
    clock: u64,
    mapped_bytes: u64,
    peak_mapped_bytes: u64,
    loads: u64,
    evictions: u64,
}

/// How the model's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Plain,
    Split,
    Shards,
}

/// A model's weight files behind one tensor lookup, mapped on demand under a budget.
#[derive(Debug)]
pub struct ModelFiles {
    origin: PathBuf,
    layout: Layout,
    config: ModelConfig,
    slots: Vec<Slot>,
    /// Tensor name -> slot, for the tensors this instance may read.
    locations: HashMap<String, usize>,
    budget: Option<u64>,
    state: Mutex<CacheState>,
}

/// Opens `path` (a `.gguf`, the first file of a gguf-split set, a shard directory or its
/// `base.gguf`) and builds a model computing `layers` (all if `None`) with its weights mapped
/// under `budget_bytes` (unlimited if `None`).
pub fn open_model(
    path: &Path,
    threads: usize,
    layers: Option<&[usize]>,
    budget_bytes: Option<u64>,
) -> CoreResult<Model> {
    // A mistyped kernel override is refused before any work, not ignored.
    crate::engine::kernels::simd_level()?;
    let files = ModelFiles::open(path, layers, budget_bytes)?;
    let cfg = files.config().clone();
    Model::serving(cfg, Arc::new(files), threads, layers)
}

/// The shard keys of a role-shard file: (role, source hash, n_layer, layer).
fn shard_keys(file: &GgufFile) -> CoreResult<(String, String, usize, Option<usize>)> {
    let role = file.meta_str(KEY_ROLE)?.to_string();
    let hash = file.meta_str(KEY_SOURCE_SHA256)?.to_string();
    let n_layer = file.meta_u32(KEY_N_LAYER)? as usize;
    let layer = match role.as_str() {
        ROLE_BASE => None,
        ROLE_LAYER => Some(file.meta_u32(KEY_LAYER)? as usize),
        other => {
            return Err(file_error(
                file.path(),
                format!("{KEY_ROLE} is {other:?}, expected \"{ROLE_BASE}\" or \"{ROLE_LAYER}\""),
            ))
        }
    };
    Ok((role, hash, n_layer, layer))
}

/// The files of a gguf-split set, given its first file `NAME-00001-of-0000N.gguf`.
fn split_paths(first: &Path, count: u32) -> CoreResult<Vec<PathBuf>> {
    let name = first.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let suffix = format!("-00001-of-{count:05}.gguf");
    let prefix = name.strip_suffix(&suffix).ok_or_else(|| {
        file_error(
            first,
            format!("{SPLIT_COUNT} is {count} but the file is not named like the first of a split set (*{suffix})"),
        )
    })?;
    Ok((1..=count)
        .map(|i| first.with_file_name(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
        .collect())
}

/// Opens the rest of a split set whose first file is `first` and checks every file's
/// `split.no` / `split.count`.
fn split_files(first: GgufFile, paths: &[PathBuf]) -> CoreResult<Vec<GgufFile>> {
    let count = paths.len() as u32;
    let mut files = vec![first];
    for (i, path) in paths.iter().enumerate() {
        if i > 0 {
            if !path.exists() {
                return Err(file_error(path, format!("split {} of {count} is missing", i + 1)));
            }
            files.push(GgufFile::open(path)?);
        }
        let file = &files[i];
        let identity = split_identity(file)?;
        if identity != Some((i as u32, count)) {
            let found = identity.map_or("no split keys".to_string(), |(no, n)| {
                format!("{SPLIT_NO}={no}, {SPLIT_COUNT}={n}")
            });
            return Err(file_error(
                path,
                format!(
                    "expected split {} of {count} ({SPLIT_NO}={i}, {SPLIT_COUNT}={count}), found {found}",
                    i + 1
                ),
            ));
        }
    }
    Ok(files)
}

fn split_identity(file: &GgufFile) -> CoreResult<Option<(u32, u32)>> {
    if file.metadata(SPLIT_COUNT).is_none() {
        return Ok(None);
    }
    Ok(Some((file.meta_u32(SPLIT_NO)?, file.meta_u32(SPLIT_COUNT)?)))
}

impl ModelFiles {
    /// See [`open_model`].
    pub fn open(path: &Path, layers: Option<&[usize]>, budget: Option<u64>) -> CoreResult<ModelFiles> {
        if path.is_dir() {
            return ModelFiles::open_shards(path, layers, budget);
        }
        let first = GgufFile::open(path)?;
        if first.metadata(KEY_ROLE).is_some() {
            let (_, _, _, layer) = shard_keys(&first)?;
            if let Some(layer) = layer {
                return Err(file_error(
                    path,
                    format!("this is the shard of layer {layer} alone; open its directory instead"),
                ));
            }
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if path.file_name().and_then(|n| n.to_str()) != Some(BASE_FILE) {
                return Err(file_error(
                    path,
                    format!("a base shard must be called {BASE_FILE} (layer shards are found by name next to it)"),
                ));
            }
            return ModelFiles::open_shards(dir, layers, budget);
        }
        match split_identity(&first)? {
            Some((no, count)) if count > 1 && no != 0 => Err(file_error(
                path,
                format!(
                    "this is split {} of {count}; open the first file of the set instead",
                    no + 1
                ),
            )),
            Some((_, count)) if count > 1 => ModelFiles::open_split(first, count, layers, budget),
            _ => ModelFiles::open_plain(first, layers, budget),
        }
    }

    fn open_plain(file: GgufFile, layers: Option<&[usize]>, budget: Option<u64>) -> CoreResult<ModelFiles> {
        let config = ModelConfig::from_gguf(&file)?;
        let slot = Slot {
            path: file.path().to_path_buf(),
            bytes: file.mapped_bytes().len() as u64,
            pinned: true,
            identity: Identity::Plain,
            tensor_count: file.tensors().len(),
        };
        let locations = file.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
        ModelFiles::assemble(
            file.path().to_path_buf(),
            Layout::Plain,
            config,
            vec![(slot, Some(file))],
            locations,
            layers,
            budget,
        )
    }

    fn open_split(
        first: GgufFile,
        count: u32,
        layers: Option<&[usize]>,
        budget: Option<u64>,
    ) -> CoreResult<ModelFiles> {
        let origin = first.path().to_path_buf();
        let paths = split_paths(&origin, count)?;
        let expected_tensors = match first.metadata(SPLIT_TENSORS_COUNT) {
            Some(_) => Some(first.meta_u32(SPLIT_TENSORS_COUNT)? as usize),
            None => None,
        };
        let files = split_files(first, &paths)?;
        let mut locations = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            for t in file.tensors() {
                if locations.insert(t.name.clone(), i).is_some() {
                    return Err(file_error(
                        file.path(),
                        format!("tensor {} also appears in another split", t.name),
                    ));
                }
            }
        }
        if let Some(expected) = expected_tensors {
            if expected != locations.len() {
                return Err(file_error(
                    &origin,
                    format!(
                        "{SPLIT_TENSORS_COUNT} is {expected} but the {count} splits hold {}",
                        locations.len()
                    ),
                ));
            }
        }
        let dims = |name: &str| {
            locations
                .get(name)
                .and_then(|&i| files[i].tensor(name))
                .map(|t| t.dims.clone())
        };
        let config = ModelConfig::from_metadata(&files[0], &dims)?;
        let entries = files
            .into_iter()
            .enumerate()
            .map(|(i, file)| {
                let pinned = i == 0 || file.tensors().iter().any(|t| layer_of_tensor(&t.name).is_none());
                let slot = Slot {
                    path: file.path().to_path_buf(),
                    bytes: file.mapped_bytes().len() as u64,
                    pinned,
                    identity: Identity::Split { no: i as u32, count },
                    tensor_count: file.tensors().len(),
                };
                (slot, Some(file))
            })
            .collect();
        ModelFiles::assemble(origin, Layout::Split, config, entries, locations, layers, budget)
    }

    fn open_shards(dir: &Path, layers: Option<&[usize]>, budget: Option<u64>) -> CoreResult<ModelFiles> {
        let base_path = dir.join(BASE_FILE);
        if !base_path.is_file() {
            return Err(file_error(
                dir,
                format!("not a shard directory: {BASE_FILE} is missing (make one with `splitwise-device shard`)"),
            ));
        }
        let base = GgufFile::open(&base_path)?;
        let (role, hash, n_layer, _) = shard_keys(&base)?;
        if role != ROLE_BASE {
            return Err(file_error(
                &base_path,
                format!("{KEY_ROLE} is {role:?}, expected \"{ROLE_BASE}\""),
            ));
        }
        let config = ModelConfig::from_gguf(&base)?;
        if n_layer != config.n_layer {
            return Err(file_error(
                &base_path,
                format!(
                    "{KEY_N_LAYER} is {n_layer} but the model config has {} layers",
                    config.n_layer
                ),
            ));
        }
        let served: Vec<usize> = match layers {
            Some(l) => l.to_vec(),
            None => (0..n_layer).collect(),
        };
        check_layers(&served, n_layer)?;
        let mut locations: HashMap<String, usize> = base.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
        let mut entries = vec![(
            Slot {
                path: base_path.clone(),
                bytes: base.mapped_bytes().len() as u64,
                pinned: true,
                identity: Identity::Shard {
                    source_sha256: hash.clone(),
                    layer: None,
                },
                tensor_count: base.tensors().len(),
            },
            Some(base),
        )];
        let mut sorted = served.clone();
        sorted.sort_unstable();
        sorted.dedup();
        for layer in sorted {
            let path = dir.join(layer_file_name(layer));
            if !path.is_file() {
                return Err(file_error(
                    dir,
                    format!("layer {layer} has no shard: {} is missing", layer_file_name(layer)),
                ));
            }
            let file = GgufFile::open(&path)?;
            let identity = Identity::Shard {
                source_sha256: hash.clone(),
                layer: Some(layer),
            };
            check_shard(&file, &identity, n_layer)?;
            let index = entries.len();
            for t in file.tensors() {
                if layer_of_tensor(&t.name) != Some(layer) {
                    return Err(file_error(
                        &path,
                        format!("holds tensor {}, which is not of layer {layer}", t.name),
                    ));
                }
                locations.insert(t.name.clone(), index);
            }
            let slot = Slot {
                path,
                bytes: file.mapped_bytes().len() as u64,
                pinned: false,
                identity,
                tensor_count: file.tensors().len(),
            };
            entries.push((slot, Some(file)));
        }
        ModelFiles::assemble(
            dir.to_path_buf(),
            Layout::Shards,
            config,
            entries,
            locations,
            layers,
            budget,
        )
    }

    /// Keeps the slots this instance may read, applies the budget (unmapping every unpinned
    /// file when there is one) and checks that it can work at all.
    fn assemble(
        origin: PathBuf,
        layout: Layout,
        config: ModelConfig,
        entries: Vec<(Slot, Option<GgufFile>)>,
        mut locations: HashMap<String, usize>,
        layers: Option<&[usize]>,
        budget: Option<u64>,
    ) -> CoreResult<ModelFiles> {
        let mut served = vec![layers.is_none(); config.n_layer];
        if let Some(layers) = layers {
            check_layers(layers, config.n_layer)?;
            layers.iter().for_each(|&l| served[l] = true);
        }
        locations.retain(|name, _| layer_of_tensor(name).is_none_or(|l| l < served.len() && served[l]));
        let mut needed = vec![false; entries.len()];
        locations.values().for_each(|&i| needed[i] = true);

        let mut slots = Vec::new();
        let mut remap = vec![usize::MAX; entries.len()];
        let mut state = CacheState::default();
        for (i, (slot, file)) in entries.into_iter().enumerate() {
            if !(needed[i] || slot.pinned) {
                continue;
            }
            remap[i] = slots.len();
            let keep_mapped = slot.pinned || budget.is_none();
            if keep_mapped {
                state.mapped_bytes += slot.bytes;
            }
            state.mapped.push(if keep_mapped { file.map(Arc::new) } else { None });
            state.last_use.push(0);
            state.retained.push(false);
            slots.push(slot);
        }
        locations.values_mut().for_each(|i| *i = remap[*i]);
        state.peak_mapped_bytes = state.mapped_bytes;

        if let Some(budget) = budget {
            let pinned: u64 = slots.iter().filter(|s| s.pinned).map(|s| s.bytes).sum();
            let largest = slots.iter().filter(|s| !s.pinned).max_by_key(|s| s.bytes);
            let needed = pinned + largest.map_or(0, |s| s.bytes);
            if budget < needed {
                let what = match (layout, largest) {
                    (Layout::Plain, _) => format!(
                        "{} ({pinned} bytes), which is one file that cannot be loaded in parts; shard it with \
                         `splitwise-device shard`",
                        origin.display()
                    ),
                    (_, Some(largest)) => format!(
                        "the always-mapped files ({pinned} bytes) plus the largest other file {} ({} bytes)",
                        largest.path.display(),
                        largest.bytes
                    ),
                    (_, None) => format!("the always-mapped files ({pinned} bytes)"),
                };
                return Err(invalid(format!(
                    "a memory budget of {budget} bytes cannot hold {what}; it needs at least {needed} bytes"
                )));
            }
        }
        Ok(ModelFiles {
            origin,
            layout,
            config,
            slots,
            locations,
            budget,
            state: Mutex::new(state),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Makes the mapped files follow a plan: the files of `layers` (the layers the plan runs on
    /// this device) are mapped now and kept ahead of any other, every other layer file is
    /// unmapped. Fails, changing nothing, if those files and the always-mapped ones exceed the
    /// budget.
    pub fn retain_layers(&self, layers: &[usize]) -> CoreResult<()> {
        check_layers(layers, self.config.n_layer)?;
        let Some(budget) = self.budget else {
            return Ok(()); // everything stays mapped
        };
        let mut wanted = vec![false; self.slots.len()];
        for (name, &index) in &self.locations {
            if !self.slots[index].pinned && layer_of_tensor(name).is_some_and(|layer| layers.contains(&layer)) {
                wanted[index] = true;
            }
        }
        let needed: u64 = self.pinned_bytes()
            + (0..self.slots.len())
                .filter(|&i| wanted[i])
                .map(|i| self.slots[i].bytes)
                .sum::<u64>();
        if needed > budget {
            return Err(CoreError::InvalidArgument(format!(
                "the files of the {} layers to keep here ({}) and the always-mapped ones need \
                 {needed} bytes; the memory budget is {budget}",
                layers.len(),
                describe_layers(
                    &(0..self.config.n_layer)
                        .map(|l| layers.contains(&l))
                        .collect::<Vec<_>>()
                ),
            )));
        }
        {
            let mut state = self.lock();
            for (index, slot) in self.slots.iter().enumerate() {
                state.retained[index] = wanted[index];
                if !wanted[index] && !slot.pinned && state.mapped[index].take().is_some() {
                    state.mapped_bytes -= slot.bytes;
                    state.evictions += 1;
                }
            }
        }
        for index in (0..self.slots.len()).filter(|&i| wanted[i]) {
            self.mapped(index)?;
        }
        Ok(())
    }

    /// Bytes of the files that are never evicted.
    fn pinned_bytes(&self) -> u64 {
        self.slots.iter().filter(|s| s.pinned).map(|s| s.bytes).sum()
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock leaves consistent state (every update is one step),
        // so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mapped file of `slot`, mapping it (after making room) if needed.
    fn mapped(&self, index: usize) -> CoreResult<Arc<GgufFile>> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        state.last_use[index] = now;
        if let Some(file) = &state.mapped[index] {
            return Ok(file.clone());
        }
        let slot = &self.slots[index];
        if let Some(budget) = self.budget {
            while state.mapped_bytes + slot.bytes > budget {
                // Files of layers the plan does not run here go first; a retained one only when
                // nothing else is left (a fallback running the whole model under the budget).
                let victim = (0..self.slots.len())
                    .filter(|&i| i != index && !self.slots[i].pinned && state.mapped[i].is_some())
                    .min_by_key(|&i| (state.retained[i], state.last_use[i]))
                    .expect("the open checked that the budget holds the pinned files and any one other");
                state.mapped[victim] = None;
                state.mapped_bytes -= self.slots[victim].bytes;
                state.evictions += 1;
            }
        }
        // Mapping under the lock keeps two callers from mapping one file twice; it reads only
        // the header (layer shards carry no vocabulary), so other callers wait briefly.
        let file = Arc::new(GgufFile::open(&slot.path)?);
        self.check_remapped(slot, &file)?;
        state.mapped_bytes += slot.bytes;
        state.peak_mapped_bytes = state.peak_mapped_bytes.max(state.mapped_bytes);
        state.loads += 1;
        state.mapped[index] = Some(file.clone());
        Ok(file)
    }

    /// A file mapped again must still be the one seen at the open.
    fn check_remapped(&self, slot: &Slot, file: &GgufFile) -> CoreResult<()> {
        match &slot.identity {
            Identity::Plain => {}
            Identity::Split { no, count } => {
                let found = split_identity(file)?;
                if found != Some((*no, *count)) {
                    return Err(file_error(
                        &slot.path,
                        format!("changed since it was opened: split {found:?}"),
                    ));
                }
            }
            identity @ Identity::Shard { .. } => check_shard(file, identity, self.config.n_layer)?,
        }
        if file.mapped_bytes().len() as u64 != slot.bytes || file.tensors().len() != slot.tensor_count {
            return Err(file_error(&slot.path, "changed on disk since the model was opened"));
        }
        Ok(())
    }
}

fn check_layers(layers: &[usize], n_layer: usize) -> CoreResult<()> {
    match layers.iter().find(|&&l| l >= n_layer) {
        Some(l) => Err(invalid(format!(
            "cannot serve layer {l}: the model has {n_layer} layers (0..{n_layer})"
        ))),
        None => Ok(()),
    }
}

/// Checks a shard's keys against what its name and the base shard say it must be.
fn check_shard(file: &GgufFile, expected: &Identity, n_layer: usize) -> CoreResult<()> {
    let Identity::Shard { source_sha256, layer } = expected else {
        unreachable!("only shard identities are checked here");
    };
    let (_, hash, found_n_layer, found_layer) = shard_keys(file)?;
    if &hash != source_sha256 {
        return Err(file_error(
            file.path(),
            format!(
                "shard of another model: its source hash {} differs from {BASE_FILE}'s {}",
                short_hash(&hash),
                short_hash(source_sha256)
            ),
        ));
    }
    if found_layer != *layer {
        let show = |l: &Option<usize>| l.map_or("the base".to_string(), |l| format!("layer {l}"));
        return Err(file_error(
            file.path(),
            format!("holds {} but should hold {}", show(&found_layer), show(layer)),
        ));
    }
    if found_n_layer != n_layer {
        return Err(file_error(
            file.path(),
            format!("{KEY_N_LAYER} is {found_n_layer}, the base shard says {n_layer}"),
        ));
    }
    Ok(())
}

fn short_hash(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl TensorSource for ModelFiles {
    fn tensor(&self, name: &str) -> CoreResult<Option<TensorRef>> {
        let Some(&index) = self.locations.get(name) else {
            return Ok(None);
        };
        let file = self.mapped(index)?;
        Ok(TensorRef::from_gguf(&file, name))
    }

    fn origin(&self) -> String {
        self.origin.display().to_string()
    }

    fn origin_of(&self, name: &str) -> String {
        if let Some(&index) = self.locations.get(name) {
            return self.slots[index].path.display().to_string();
        }
        match (self.layout, layer_of_tensor(name)) {
            (Layout::Shards, Some(layer)) => self.origin.join(layer_file_name(layer)).display().to_string(),
            (Layout::Shards, None) => self.origin.join(BASE_FILE).display().to_string(),
            _ => self.origin(),
        }
    }

    fn all_resident(&self) -> bool {
        self.budget.is_none()
    }

    fn retain_layers(&self, layers: &[usize]) -> CoreResult<()> {
        ModelFiles::retain_layers(self, layers)
    }

    fn weight_stats(&self) -> Option<WeightStats> {
        let state = self.lock();
        Some(WeightStats {
            budget_bytes: self.budget,
            mapped_bytes: state.mapped_bytes,
            peak_mapped_bytes: state.peak_mapped_bytes,
            pinned_bytes: self.pinned_bytes(),
            mapped_files: state.mapped.iter().filter(|m| m.is_some()).count(),
            files: self.slots.len(),
            loads: state.loads,
            evictions: state.evictions,
        })
    }
}
