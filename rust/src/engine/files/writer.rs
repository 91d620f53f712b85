//! Cuts a model (plain GGUF or gguf-split set) into role shards: `base.gguf` plus one
//! `layer-NNN.gguf` per layer, tensor bytes copied unchanged.
//!
//! Every shard is a complete GGUF file carrying the source's metadata, so each can be inspected
//! on its own and the config comes with it. The tokenizer (`tokenizer.*`, ~1–2 MB for a 50k
//! vocabulary) is kept only in `base.gguf`: layer shards are re-mapped on every reload under a
//! memory budget, and parsing a vocabulary each time would cost more than the layer's matmuls.

use super::{
    file_error, layer_file_name, layer_of_tensor, split_files, split_identity, split_paths, BASE_FILE, KEY_LAYER,
    KEY_N_LAYER, KEY_ROLE, KEY_SOURCE_FILE, KEY_SOURCE_SHA256, ROLE_BASE, ROLE_LAYER,
};
use crate::engine::gguf::{GgufFile, GgufWriter, MetaValue, TensorInfo};
use crate::error::{CoreError, CoreResult};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One shard file as written.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenShard {
    pub path: PathBuf,
    /// "base" or "layer".
    pub role: &'static str,
    pub layer: Option<usize>,
    pub bytes: u64,
    pub tensors: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShardSummary {
    pub source_sha256: String,
    pub n_layer: usize,
    pub shards: Vec<WrittenShard>,
}

/// Metadata keys not copied into shards: the split bookkeeping of a split source (a shard is a
/// whole file) and the alignment, which the writer sets itself.
fn copied_key(key: &str, role: &str) -> bool {
    !(key.starts_with("split.")
        || key == "general.alignment"
        || key.starts_with("splitwise.shard.")
        || (role == ROLE_LAYER && key.starts_with("tokenizer.")))
}

/// The source's files: one plain GGUF, or every file of a split set given its first file.
fn open_source(path: &Path) -> CoreResult<Vec<GgufFile>> {
    let first = GgufFile::open(path)?;
    if first.metadata(KEY_ROLE).is_some() {
        return Err(file_error(path, "is already a shard; shard the original model file"));
    }
    match split_identity(&first)? {
        Some((_, count)) if count > 1 => {
            let paths = split_paths(path, count)?;
            split_files(first, &paths)
        }
        _ => Ok(vec![first]),
    }
}

/// Hex SHA-256 of the concatenated source files.
fn sha256_hex(files: &[GgufFile]) -> String {
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(file.mapped_bytes());
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the shards of `source` into the existing directory `out_dir`, calling `progress`
/// after each file; when it returns false the writing stops with a `Stopped` error. Each
/// file is written under a temporary name and renamed when complete, so
/// an interrupted run never leaves a truncated file under a shard name.
pub fn write_shards(
    source: &Path,
    out_dir: &Path,
    progress: &mut dyn FnMut(&WrittenShard) -> bool,
) -> CoreResult<ShardSummary> {
    if !out_dir.is_dir() {
        return Err(file_error(out_dir, "output directory does not exist"));
    }
    let files = open_source(source)?;
    let meta = &files[0];
    let arch = meta.meta_str("general.architecture")?;
    let n_layer = meta.meta_u32(&format!("{arch}.block_count"))? as usize;
    let alignment = meta.alignment() as u32;
    let source_sha256 = sha256_hex(&files);
    let source_name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let mut base_tensors: Vec<(&GgufFile, &TensorInfo)> = Vec::new();
    let mut layer_tensors: Vec<Vec<(&GgufFile, &TensorInfo)>> = vec![Vec::new(); n_layer];
    for file in &files {
        for info in file.tensors() {
            match layer_of_tensor(&info.name) {
                None => base_tensors.push((file, info)),
                Some(l) if l < n_layer => layer_tensors[l].push((file, info)),
                Some(l) => {
                    return Err(file_error(
                        file.path(),
                        format!(
                            "tensor {} is of layer {l} but the model has {n_layer} layers",
                            info.name
                        ),
                    ))
                }
            }
        }
    }
    if let Some(l) = layer_tensors.iter().position(Vec::is_empty) {
        return Err(file_error(source, format!("layer {l} has no tensors")));
    }

    let mut shards = Vec::with_capacity(n_layer + 1);
    let jobs = std::iter::once((None, BASE_FILE.to_string(), &base_tensors)).chain(
        layer_tensors
            .iter()
            .enumerate()
            .map(|(l, t)| (Some(l), layer_file_name(l), t)),
    );
    for (layer, name, tensors) in jobs {
        let role = if layer.is_some() { ROLE_LAYER } else { ROLE_BASE };
        let mut writer = GgufWriter::new();
        writer.set_alignment(alignment)?;
        for key in meta.metadata_keys().filter(|k| copied_key(k, role)) {
            writer.add_metadata(key, meta.metadata(key).expect("listed key").clone())?;
        }
        writer.add_metadata(KEY_SOURCE_SHA256, MetaValue::Str(source_sha256.clone()))?;
        writer.add_metadata(KEY_SOURCE_FILE, MetaValue::Str(source_name.clone()))?;
        writer.add_metadata(KEY_ROLE, MetaValue::Str(role.to_string()))?;
        writer.add_metadata(KEY_N_LAYER, MetaValue::U32(n_layer as u32))?;
        if let Some(l) = layer {
            writer.add_metadata(KEY_LAYER, MetaValue::U32(l as u32))?;
        }
        for (file, info) in tensors {
            writer.add_tensor(info.name.as_str(), &info.dims, info.ty, file.tensor_data(info))?;
        }
        let path = out_dir.join(&name);
        let partial = out_dir.join(format!(".{name}.partial"));
        writer.write(&partial)?;
        std::fs::rename(&partial, &path)
            .map_err(|e| file_error(&path, format!("cannot rename the written file: {e}")))?;
        let bytes = std::fs::metadata(&path)
            .map_err(|e| file_error(&path, format!("cannot stat: {e}")))?
            .len();
        let shard = WrittenShard {
            path,
            role,
            layer,
            bytes,
            tensors: tensors.len(),
        };
        let go_on = progress(&shard);
        shards.push(shard);
        if !go_on {
            return Err(CoreError::Stopped(format!(
                "stopped after writing {} of {} shards into {}",
                shards.len(),
                n_layer + 1,
                out_dir.display()
            )));
        }
    }
    Ok(ShardSummary {
        source_sha256,
        n_layer,
        shards,
    })
}
