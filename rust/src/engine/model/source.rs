//! Where weights come from: a name -> (type, dims, bytes) lookup. `Model` only ever reads
//! weights through this trait, so per-layer shard files loaded lazily under a memory budget can
//! replace the single mapped GGUF file without touching the model math.

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::GgmlType;
use std::collections::HashMap;

/// One tensor as stored: GGML type, dims (`dims[0]` = row length) and raw bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub ty: GgmlType,
    pub dims: &'a [u64],
    pub data: &'a [u8],
}

/// Name -> tensor lookup.
pub trait TensorSource: Send + Sync {
    /// The tensor called `name`, or `None` if this source does not hold it.
    fn tensor(&self, name: &str) -> Option<TensorView<'_>>;
    /// Where the tensors come from, for error messages (a file path, "memory", ...).
    fn origin(&self) -> String;
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let info = GgufFile::tensor(self, name)?;
        Some(TensorView {
            ty: info.ty,
            dims: &info.dims,
            data: self.tensor_data(info),
        })
    }

    fn origin(&self) -> String {
        self.path().display().to_string()
    }
}

/// Tensors held in memory (tests, small synthetic models).
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    tensors: HashMap<String, (GgmlType, Vec<u64>, Vec<u8>)>,
}

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource::default()
    }

    /// Adds (or replaces) a tensor with raw bytes.
    pub fn insert(&mut self, name: &str, ty: GgmlType, dims: Vec<u64>, data: Vec<u8>) {
        self.tensors.insert(name.to_string(), (ty, dims, data));
    }

    /// Adds (or replaces) an F32 tensor; `values` is row-major with rows of length `dims[0]`.
    pub fn insert_f32(&mut self, name: &str, dims: Vec<u64>, values: &[f32]) {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.insert(name, GgmlType::F32, dims, data);
    }
}

impl TensorSource for MemorySource {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensors
            .get(name)
            .map(|(ty, dims, data)| TensorView { ty: *ty, dims, data })
    }

    fn origin(&self) -> String {
        "<memory>".to_string()
    }
}
