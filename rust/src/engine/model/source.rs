//! Where weights come from: a name -> (type, dims, bytes) lookup. `Model` only ever reads
//! weights through this trait, so per-layer shard files loaded lazily under a memory budget can
//! replace the single mapped GGUF file without touching the model math.
//!
//! A lookup hands out an owned [`TensorRef`] that keeps the bytes' owner (a mapped file, an
//! in-memory buffer) alive: a source that evicts files to stay under a memory budget can drop
//! its own reference at any time, and the mapping goes away when the last call using it ends.

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::GgmlType;
use crate::error::CoreResult;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// One tensor as stored: GGML type, dims (`dims[0]` = row length) and raw bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub ty: GgmlType,
    pub dims: &'a [u64],
    pub data: &'a [u8],
}

/// Something that owns tensor bytes (a mapped file, a buffer).
pub trait TensorBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl TensorBytes for GgufFile {
    fn bytes(&self) -> &[u8] {
        self.mapped_bytes()
    }
}

impl TensorBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A tensor plus a reference to the owner of its bytes.
#[derive(Clone)]
pub struct TensorRef {
    ty: GgmlType,
    dims: Vec<u64>,
    owner: Arc<dyn TensorBytes>,
    range: Range<usize>,
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("ty", &self.ty)
            .field("dims", &self.dims)
            .field("bytes", &self.range.len())
            .finish()
    }
}

impl TensorRef {
    /// Panics if `range` lies outside the owner's bytes.
    pub fn new(ty: GgmlType, dims: Vec<u64>, owner: Arc<dyn TensorBytes>, range: Range<usize>) -> TensorRef {
        assert!(range.end <= owner.bytes().len(), "tensor range outside its owner");
        TensorRef { ty, dims, owner, range }
    }

    /// The tensor `name` of a mapped GGUF file, if the file holds it.
    pub fn from_gguf(file: &Arc<GgufFile>, name: &str) -> Option<TensorRef> {
        let info = GgufFile::tensor(file, name)?;
        let start = info.offset as usize;
        let owner: Arc<dyn TensorBytes> = file.clone();
        Some(TensorRef::new(
            info.ty,
            info.dims.clone(),
            owner,
            start..start + info.size,
        ))
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            ty: self.ty,
            dims: &self.dims,
            data: &self.owner.bytes()[self.range.clone()],
        }
    }
}

/// Bytes of weight files a source holds mapped, against its budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightStats {
    /// `None`: no budget, every needed file stays mapped.
    pub budget_bytes: Option<u64>,
    /// Bytes of the files mapped now (whole files; pages count in RSS only once touched).
    pub mapped_bytes: u64,
    pub peak_mapped_bytes: u64,
    /// Bytes of the files that are never evicted (metadata, embedding, output).
    pub pinned_bytes: u64,
    pub mapped_files: usize,
    /// Files this instance may map (those holding the served layers, plus the pinned ones).
    pub files: usize,
    /// Maps made after the open (reloads of evicted files included).
    pub loads: u64,
    pub evictions: u64,
}

/// Name -> tensor lookup.
pub trait TensorSource: Send + Sync {
    /// The tensor called `name`: `Ok(None)` if this source does not hold it, an error if it
    /// should but cannot provide it (a shard file that vanished or changed since the open).
    fn tensor(&self, name: &str) -> CoreResult<Option<TensorRef>>;
    /// Where the tensors come from, for error messages (a file path, "memory", ...).
    fn origin(&self) -> String;
    /// The file that holds (or should hold) tensor `name`, for error messages.
    fn origin_of(&self, name: &str) -> String {
        let _ = name;
        self.origin()
    }
    /// True if every tensor was available at open, so the model checks all of them eagerly;
    /// sources that load parts on demand return false and the model checks a layer's tensors
    /// on its first use instead.
    fn all_resident(&self) -> bool {
        true
    }
    /// Memory accounting of a source that maps files under a budget; `None` for others.
    fn weight_stats(&self) -> Option<WeightStats> {
        None
    }
    /// Keeps the weights of `layers` loaded and lets the others go (sources that load parts on
    /// demand); a no-op for sources that hold everything.
    fn retain_layers(&self, layers: &[usize]) -> CoreResult<()> {
        let _ = layers;
        Ok(())
    }
}

impl TensorSource for Arc<GgufFile> {
    fn tensor(&self, name: &str) -> CoreResult<Option<TensorRef>> {
        Ok(TensorRef::from_gguf(self, name))
    }

    fn origin(&self) -> String {
        self.path().display().to_string()
    }
}

/// Type, dims and bytes of a tensor held in memory.
type StoredTensor = (GgmlType, Vec<u64>, Arc<Vec<u8>>);

/// Tensors held in memory (tests, small synthetic models).
#[derive(Default, Clone)]
pub struct MemorySource {
    tensors: HashMap<String, StoredTensor>,
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySource")
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Adds (or replaces) a tensor with raw bytes.
    pub fn insert(&mut self, name: &str, ty: GgmlType, dims: Vec<u64>, data: Vec<u8>) {
        self.tensors.insert(name.to_string(), (ty, dims, Arc::new(data)));
    }

    /// Adds (or replaces) an F32 tensor; `values` is row-major with rows of length `dims[0]`.
    pub fn insert_f32(&mut self, name: &str, dims: Vec<u64>, values: &[f32]) {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.insert(name, GgmlType::F32, dims, data);
    }

    /// The stored tensor, borrowed.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensors
            .get(name)
            .map(|(ty, dims, data)| TensorView { ty: *ty, dims, data })
    }
}

impl TensorSource for MemorySource {
    fn tensor(&self, name: &str) -> CoreResult<Option<TensorRef>> {
        Ok(self.tensors.get(name).map(|(ty, dims, data)| {
            let owner: Arc<dyn TensorBytes> = data.clone();
            TensorRef::new(*ty, dims.clone(), owner, 0..data.len())
        }))
    }

    fn origin(&self) -> String {
        "<memory>".to_string()
    }
}
