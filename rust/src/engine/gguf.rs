//! Memory-mapped GGUF reader (versions 2 and 3) and a GGUF v3 writer.
//!
//! The reader trusts nothing in the file: every length and count is checked against the bytes
//! that remain before anything is allocated, and every tensor's type, shape and data range is
//! validated at open, so `tensor_data` can hand out slices of the map without further checks.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::kernels::GgmlType;
use crate::error::{CoreError, CoreResult};

const MAGIC: &[u8; 4] = b"GGUF";
const WRITTEN_VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal but never deep in practice; the cap keeps recursion bounded.
const MAX_ARRAY_NESTING: usize = 4;
/// magic + version + tensor count + metadata count.
const HEADER_BYTES: usize = 4 + 4 + 8 + 8;

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

// GGUF's value type ids.
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => TYPE_U8,
            MetaValue::I8(_) => TYPE_I8,
            MetaValue::U16(_) => TYPE_U16,
            MetaValue::I16(_) => TYPE_I16,
            MetaValue::U32(_) => TYPE_U32,
            MetaValue::I32(_) => TYPE_I32,
            MetaValue::U64(_) => TYPE_U64,
            MetaValue::I64(_) => TYPE_I64,
            MetaValue::F32(_) => TYPE_F32,
            MetaValue::F64(_) => TYPE_F64,
            MetaValue::Bool(_) => TYPE_BOOL,
            MetaValue::Str(_) => TYPE_STRING,
            MetaValue::Array(_) => TYPE_ARRAY,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F32(_) => "float32",
            MetaValue::F64(_) => "float64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// Any integer value, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (ne0).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute file offset of the data.
    pub offset: u64,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    /// Rows of the tensor seen as a matrix of `dims[0]`-long rows.
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// A GGUF file opened read-only through a memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn model_file_error(path: &Path, problem: impl Into<String>) -> CoreError {
    CoreError::ModelFile {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// Bounds-checked little-endian reads; problems are plain strings that `open` attaches the
/// path to.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type ParseResult<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file ends at {}",
                self.pos,
                self.bytes.len()
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each occupy at least `min_item_bytes`, checked against the rest
    /// of the file before anyone allocates for it.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> ParseResult<usize> {
        let count = self.u64(what)?;
        let fits = self.remaining() / min_item_bytes.max(1);
        if count > fits as u64 {
            return Err(format!(
                "truncated or corrupt: {what} is {count}, more than the {} remaining bytes \
                 can hold",
                self.remaining()
            ));
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &str) -> ParseResult<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        // Tokenizer vocabularies occasionally hold byte sequences that are not UTF-8; such a
        // value is still usable as a key or label, so it is kept (lossily) instead of failing.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: usize, what: &str) -> ParseResult<MetaValue> {
        Ok(match type_id {
            TYPE_U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            TYPE_I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            TYPE_U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            TYPE_I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            TYPE_U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            TYPE_I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            TYPE_U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            TYPE_I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            TYPE_F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            TYPE_F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            TYPE_BOOL => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => return Err(format!("{what} holds bool byte {other}, not 0 or 1")),
            },
            TYPE_STRING => MetaValue::Str(self.string(what)?),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(format!("{what} nests arrays deeper than {MAX_ARRAY_NESTING}"));
                }
                let item_type = self.u32(what)?;
                let min_item_bytes = min_value_bytes(item_type)
                    .ok_or_else(|| format!("{what} has unknown array item type {item_type}"))?;
                let count = self.count(min_item_bytes, what)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(item_type, depth + 1, what)?);
                }
                MetaValue::Array(items)
            }
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

/// The fewest bytes a value of this type can occupy.
fn min_value_bytes(type_id: u32) -> Option<usize> {
    Some(match type_id {
        TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
        TYPE_U16 | TYPE_I16 => 2,
        TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
        TYPE_U64 | TYPE_I64 | TYPE_F64 | TYPE_STRING => 8,
        TYPE_ARRAY => 12,
        _ => return None,
    })
}

struct ParsedHeader {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
}

fn parse(bytes: &[u8]) -> ParseResult<ParsedHeader> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.take(4, "magic")?;
    if magic != MAGIC {
        return Err(format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""));
    }
    let version = cur.u32("version")?;
    if version != 2 && version != 3 {
        return Err(format!("unsupported GGUF version {version} (supported: 2, 3)"));
    }
    // Smallest tensor entry: empty name, one dimension, type, offset.
    let tensor_count = cur.count(8 + 4 + 8 + 4 + 8, "tensor count")?;
    // Smallest metadata entry: empty key, type, one byte.
    let metadata_count = cur.count(8 + 4 + 1, "metadata count")?;

    let mut metadata = Vec::with_capacity(metadata_count);
    let mut seen_keys = HashMap::with_capacity(metadata_count);
    for _ in 0..metadata_count {
        let key = cur.string("metadata key")?;
        let type_id = cur.u32("metadata value type")?;
        let value = cur.value(type_id, 0, &format!("metadata {key:?}"))?;
        if seen_keys.insert(key.clone(), ()).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, value)) => match value.as_i128() {
            Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => a as u64,
            _ => return Err(format!("{ALIGNMENT_KEY} is {value:?}, not a power of two")),
        },
    };

    struct RawTensor {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        relative_offset: u64,
    }
    let mut raw_tensors = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = cur.string("tensor name")?;
        let n_dims = cur.u32("tensor dimension count")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| cur.u64("tensor dimension"))
            .collect::<ParseResult<Vec<u64>>>()?;
        let type_id = cur.u32("tensor type")?;
        let ty = GgmlType::from_ggml_id(type_id)
            .ok_or_else(|| format!("tensor {name:?} has unsupported ggml type id {type_id}"))?;
        let relative_offset = cur.u64("tensor offset")?;
        raw_tensors.push(RawTensor {
            name,
            dims,
            ty,
            relative_offset,
        });
    }

    let data_start = align_up(cur.pos as u64, alignment);
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw_tensors.len());
    let mut seen_names = HashMap::with_capacity(raw_tensors.len());
    for raw in raw_tensors {
        let name = raw.name;
        if seen_names.insert(name.clone(), ()).is_some() {
            return Err(format!("tensor {name:?} appears twice"));
        }
        let size = tensor_bytes(&raw.dims, raw.ty).map_err(|e| format!("tensor {name:?}: {e}"))?;
        if raw.relative_offset % alignment != 0 {
            return Err(format!(
                "tensor {name:?} data offset {} is not a multiple of the alignment {alignment}",
                raw.relative_offset
            ));
        }
        let offset = data_start
            .checked_add(raw.relative_offset)
            .filter(|&start| start.checked_add(size as u64).is_some_and(|end| end <= file_len))
            .ok_or_else(|| {
                format!(
                    "tensor {name:?} data ({size} bytes at data offset {}) lies beyond the end \
                     of the file ({file_len} bytes); the file is truncated or corrupt",
                    raw.relative_offset
                )
            })?;
        tensors.push(TensorInfo {
            name,
            dims: raw.dims,
            ty: raw.ty,
            offset,
            size,
        });
    }

    Ok(ParsedHeader {
        version,
        alignment,
        metadata,
        tensors,
    })
}

fn align_up(pos: u64, alignment: u64) -> u64 {
    pos.div_ceil(alignment) * alignment
}

/// Bytes of a tensor of shape `dims` (ggml order) stored as `ty`.
fn tensor_bytes(dims: &[u64], ty: GgmlType) -> CoreResult<usize> {
    let overflow = || CoreError::InvalidArgument(format!("shape {dims:?} is too large"));
    let row_len = usize::try_from(dims[0]).map_err(|_| overflow())?;
    let row_bytes = ty.row_bytes(row_len)?;
    dims[1..]
        .iter()
        .try_fold(row_bytes, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .ok_or_else(overflow)
}

impl GgufFile {
    pub fn open(path: &Path) -> CoreResult<GgufFile> {
        let file = File::open(path).map_err(|e| model_file_error(path, format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| model_file_error(path, format!("cannot stat: {e}")))?
            .len();
        if len < HEADER_BYTES as u64 {
            return Err(model_file_error(
                path,
                format!("truncated: {len} bytes is shorter than a GGUF header"),
            ));
        }
        // SAFETY: the map is read-only and private to this process. Like every mmap-based
        // model loader we rely on the file not being truncated or rewritten while open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| model_file_error(path, format!("cannot map: {e}")))?;
        let header = parse(&mmap).map_err(|problem| model_file_error(path, problem))?;
        let metadata_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            metadata_index,
            tensors: header.tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Keys in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }

    fn required(&self, key: &str) -> CoreResult<&MetaValue> {
        self.metadata(key)
            .ok_or_else(|| self.error(format!("metadata key {key:?} is missing")))
    }

    fn error(&self, problem: String) -> CoreError {
        model_file_error(&self.path, problem)
    }

    /// An integer of any stored type, as long as its value fits u32.
    pub fn meta_u32(&self, key: &str) -> CoreResult<u32> {
        let value = self.required(key)?;
        match value.as_i128() {
            Some(v) => {
                u32::try_from(v).map_err(|_| self.error(format!("metadata key {key:?} is {v}, outside the u32 range")))
            }
            None => Err(self.error(format!(
                "metadata key {key:?} holds a {}, not an integer",
                value.type_name()
            ))),
        }
    }

    /// A float, or an integer read as a float (some converters store e.g. rope bases as ints).
    pub fn meta_f32(&self, key: &str) -> CoreResult<f32> {
        let value = self.required(key)?;
        match *value {
            MetaValue::F32(v) => Ok(v),
            MetaValue::F64(v) => Ok(v as f32),
            _ => value.as_i128().map(|v| v as f32).ok_or_else(|| {
                self.error(format!(
                    "metadata key {key:?} holds a {}, not a number",
                    value.type_name()
                ))
            }),
        }
    }

    pub fn meta_str(&self, key: &str) -> CoreResult<&str> {
        let value = self.required(key)?;
        value.as_str().ok_or_else(|| {
            self.error(format!(
                "metadata key {key:?} holds a {}, not a string",
                value.type_name()
            ))
        })
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The whole file as mapped.
    pub fn mapped_bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The tensor's bytes in the map.
    ///
    /// Panics if `info` describes data outside this file (a `TensorInfo` from another file);
    /// the ones from `tensors()` were validated at open.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = info.offset as usize;
        self.mmap
            .get(start..start + info.size)
            .unwrap_or_else(|| panic!("tensor {:?} lies outside {}", info.name, self.path.display()))
    }
}

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF v3 file: metadata and tensors in insertion order, tensor data aligned.
/// Tensor bytes may be borrowed (e.g. from another file's map) to avoid copies.
pub struct GgufWriter<'a> {
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

fn check_array_items(key: &str, value: &MetaValue) -> CoreResult<()> {
    if let MetaValue::Array(items) = value {
        if let Some(first) = items.first() {
            if items.iter().any(|item| item.type_id() != first.type_id()) {
                return Err(CoreError::InvalidArgument(format!(
                    "metadata {key:?}: GGUF arrays hold items of one type"
                )));
            }
        }
        for item in items {
            check_array_items(key, item)?;
        }
    }
    Ok(())
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Data alignment in bytes (a power of two); recorded as `general.alignment` when not 32.
    pub fn set_alignment(&mut self, alignment: u32) -> CoreResult<()> {
        if !alignment.is_power_of_two() {
            return Err(CoreError::InvalidArgument(format!(
                "alignment must be a power of two, got {alignment}"
            )));
        }
        self.alignment = u64::from(alignment);
        Ok(())
    }

    /// Adds or replaces a metadata entry. `general.alignment` is set with `set_alignment`.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> CoreResult<()> {
        let key = key.into();
        if key == ALIGNMENT_KEY {
            return Err(CoreError::InvalidArgument(format!(
                "set {ALIGNMENT_KEY} with set_alignment"
            )));
        }
        check_array_items(&key, &value)?;
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    /// Adds a tensor of shape `dims` (ggml order, `dims[0]` = row length) stored as `ty`.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> CoreResult<()> {
        let name = name.into();
        let data = data.into();
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(CoreError::InvalidArgument(format!(
                "tensor {name:?} has {} dimensions (1..={MAX_DIMS} allowed)",
                dims.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(CoreError::InvalidArgument(format!("tensor {name:?} added twice")));
        }
        let expected = tensor_bytes(dims, ty)?;
        if data.len() != expected {
            return Err(CoreError::ShapeMismatch(format!(
                "tensor {name:?} of shape {dims:?} as {} needs {expected} bytes, got {}",
                ty.name(),
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    pub fn write(&self, path: &Path) -> CoreResult<()> {
        let io_error = |e: std::io::Error| model_file_error(path, format!("cannot write: {e}"));
        let file = File::create(path).map_err(io_error)?;
        let mut out = CountingWriter {
            inner: BufWriter::new(file),
            written: 0,
        };
        self.write_to(&mut out).map_err(io_error)?;
        out.inner
            .into_inner()
            .map_err(|e| io_error(e.into_error()))?
            .sync_all()
            .map_err(io_error)
    }

    fn write_to<W: Write>(&self, out: &mut CountingWriter<W>) -> std::io::Result<()> {
        let mut metadata: Vec<(&str, Cow<'_, MetaValue>)> = Vec::new();
        if self.alignment != DEFAULT_ALIGNMENT {
            metadata.push((ALIGNMENT_KEY, Cow::Owned(MetaValue::U32(self.alignment as u32))));
        }
        metadata.extend(self.metadata.iter().map(|(k, v)| (k.as_str(), Cow::Borrowed(v))));

        out.put(MAGIC)?;
        out.put(&WRITTEN_VERSION.to_le_bytes())?;
        out.put(&(self.tensors.len() as u64).to_le_bytes())?;
        out.put(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &metadata {
            write_string(out, key)?;
            out.put(&value.type_id().to_le_bytes())?;
            write_value(out, value)?;
        }

        let mut relative_offset = 0u64;
        for tensor in &self.tensors {
            write_string(out, &tensor.name)?;
            out.put(&(tensor.dims.len() as u32).to_le_bytes())?;
            for d in &tensor.dims {
                out.put(&d.to_le_bytes())?;
            }
            out.put(&tensor.ty.ggml_id().to_le_bytes())?;
            out.put(&relative_offset.to_le_bytes())?;
            relative_offset = align_up(relative_offset + tensor.data.len() as u64, self.alignment);
        }

        for tensor in &self.tensors {
            out.pad_to(self.alignment)?;
            out.put(&tensor.data)?;
        }
        out.inner.flush()
    }
}

struct CountingWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, alignment: u64) -> std::io::Result<()> {
        let padding = align_up(self.written, alignment) - self.written;
        self.put(&vec![0u8; padding as usize])
    }
}

fn write_string<W: Write>(out: &mut CountingWriter<W>, s: &str) -> std::io::Result<()> {
    out.put(&(s.len() as u64).to_le_bytes())?;
    out.put(s.as_bytes())
}

fn write_value<W: Write>(out: &mut CountingWriter<W>, value: &MetaValue) -> std::io::Result<()> {
    match value {
        MetaValue::U8(v) => out.put(&v.to_le_bytes()),
        MetaValue::I8(v) => out.put(&v.to_le_bytes()),
        MetaValue::U16(v) => out.put(&v.to_le_bytes()),
        MetaValue::I16(v) => out.put(&v.to_le_bytes()),
        MetaValue::U32(v) => out.put(&v.to_le_bytes()),
        MetaValue::I32(v) => out.put(&v.to_le_bytes()),
        MetaValue::U64(v) => out.put(&v.to_le_bytes()),
        MetaValue::I64(v) => out.put(&v.to_le_bytes()),
        MetaValue::F32(v) => out.put(&v.to_le_bytes()),
        MetaValue::F64(v) => out.put(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.put(&[u8::from(*v)]),
        MetaValue::Str(s) => write_string(out, s),
        MetaValue::Array(items) => {
            // An empty array still needs an item type; any will do.
            let item_type = items.first().map_or(TYPE_U8, MetaValue::type_id);
            out.put(&item_type.to_le_bytes())?;
            out.put(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(out, item))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::QMatrix;

    /// The bundled SmolLM2 file, named by `SPLITWISE_TEST_GGUF` (scripts/test sets it). Without it
    /// the test says it is skipped — except under CI, where a missing model is a broken setup.
    fn real_model_path() -> Option<PathBuf> {
        match std::env::var_os("SPLITWISE_TEST_GGUF").map(PathBuf::from) {
            Some(path) => {
                assert!(path.is_file(), "SPLITWISE_TEST_GGUF={} is not a file", path.display());
                Some(path)
            }
            None if std::env::var_os("CI").is_some() => {
                panic!("SPLITWISE_TEST_GGUF is not set under CI: scripts/test names the bundled SmolLM2 file")
            }
            None => {
                eprintln!("SKIPPED: SPLITWISE_TEST_GGUF is not set (scripts/test sets it to the bundled SmolLM2 file)");
                None
            }
        }
    }

    /// A fresh path in the system temp dir, unique per test and process.
    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("splitwise-gguf-{}-{name}.gguf", std::process::id()))
    }

    fn expect_model_file_error(path: &Path, problem_contains: &str) {
        match GgufFile::open(path) {
            Err(CoreError::ModelFile {
                path: err_path,
                problem,
            }) => {
                assert_eq!(err_path, path.display().to_string());
                assert!(
                    problem.contains(problem_contains),
                    "problem {problem:?} should mention {problem_contains:?}"
                );
                let err = GgufFile::open(path).unwrap_err();
                assert_eq!(err.class_name(), "ModelFileError");
                assert!(err.to_string().contains(&path.display().to_string()));
            }
            Err(other) => panic!("expected ModelFile error, got {other:?}"),
            Ok(_) => panic!("{} opened but should not", path.display()),
        }
    }

    #[test]
    fn opens_the_real_smollm2_file() {
        let Some(path) = real_model_path() else {
            return;
        };
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.path(), path.as_path());
        assert_eq!(file.meta_str("general.architecture").unwrap(), "llama");
        assert_eq!(file.meta_u32("llama.block_count").unwrap(), 30);
        assert_eq!(file.meta_u32("llama.embedding_length").unwrap(), 576);
        assert!(file.meta_f32("llama.attention.layer_norm_rms_epsilon").unwrap() > 0.0);
        let tokens = file.metadata("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(tokens.len(), 49152);
        assert!(file.metadata_keys().any(|k| k == "tokenizer.ggml.model"));

        let q = file.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.dims.as_slice(), q.ty), (&[576u64, 576][..], GgmlType::Q4_1));
        let embedding = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embedding.dims, [576, 49152]);
        assert_eq!(embedding.ty, GgmlType::Q8_0);
        let norm = file.tensor("blk.29.ffn_norm.weight").unwrap();
        assert_eq!((norm.dims.as_slice(), norm.ty), (&[576u64][..], GgmlType::F32));
        assert_eq!(
            file.tensors().iter().filter(|t| t.name.starts_with("blk.")).count(),
            30 * 9
        );

        for info in file.tensors() {
            let data = file.tensor_data(info);
            assert_eq!(data.len(), info.size);
            let rows = info.n_rows() as usize;
            QMatrix::new(info.ty, rows, info.dims[0] as usize, data).unwrap();
        }
        // A dequantized embedding row must look like an embedding: finite, not all zero.
        let matrix = QMatrix::new(embedding.ty, 49152, 576, file.tensor_data(embedding)).unwrap();
        let mut row = vec![0.0f32; 576];
        matrix.row(1000, &mut row);
        assert!(row.iter().all(|v| v.is_finite()) && row.iter().any(|&v| v != 0.0));
        // Errors name the file and the key.
        let err = file.meta_u32("llama.no_such_key").unwrap_err();
        assert!(err.to_string().contains("llama.no_such_key"));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(file.meta_u32("general.architecture").is_err());
    }

    fn sample_writer(data: &[u8]) -> GgufWriter<'_> {
        let mut writer = GgufWriter::new();
        writer
            .add_metadata("general.architecture", MetaValue::Str("llama".into()))
            .unwrap();
        writer.add_metadata("llama.block_count", MetaValue::U32(2)).unwrap();
        writer.add_metadata("x.i8", MetaValue::I8(-5)).unwrap();
        writer.add_metadata("x.u16", MetaValue::U16(65535)).unwrap();
        writer.add_metadata("x.i64", MetaValue::I64(-1 << 40)).unwrap();
        writer.add_metadata("x.f64", MetaValue::F64(0.1)).unwrap();
        writer.add_metadata("x.f32", MetaValue::F32(1e-5)).unwrap();
        writer.add_metadata("x.bool", MetaValue::Bool(true)).unwrap();
        writer
            .add_metadata(
                "x.strings",
                MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("ü".into())]),
            )
            .unwrap();
        writer
            .add_metadata(
                "x.nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
                    MetaValue::Array(vec![]),
                ]),
            )
            .unwrap();
        writer
            .add_tensor("w.q8", &[32, 3], GgmlType::Q8_0, &data[..3 * 34])
            .unwrap();
        writer.add_tensor("w.f32", &[5], GgmlType::F32, &data[..20]).unwrap();
        writer
            .add_tensor("w.q4k", &[256, 1, 1], GgmlType::Q4K, &data[..144])
            .unwrap();
        writer
    }

    fn sample_bytes() -> Vec<u8> {
        (0..400u32).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn writer_round_trips_through_the_reader() {
        let data = sample_bytes();
        for alignment in [32u32, 64] {
            let mut writer = sample_writer(&data);
            writer.set_alignment(alignment).unwrap();
            let path = temp_path(&format!("roundtrip-{alignment}"));
            writer.write(&path).unwrap();
            let file = GgufFile::open(&path).unwrap();
            assert_eq!(file.version(), 3);
            assert_eq!(file.alignment(), u64::from(alignment));
            for (key, value) in &writer.metadata {
                assert_eq!(file.metadata(key), Some(value), "{key}");
            }
            assert_eq!(file.metadata(ALIGNMENT_KEY).is_some(), alignment != 32);
            assert_eq!(file.meta_u32("x.u16").unwrap(), 65535);
            assert!(file.meta_u32("x.i8").is_err());
            assert!((file.meta_f32("x.f64").unwrap() - 0.1).abs() < 1e-7);
            assert_eq!(file.tensors().len(), 3);
            for pending in &writer.tensors {
                let info = file.tensor(&pending.name).unwrap();
                assert_eq!(info.dims, pending.dims);
                assert_eq!(info.ty, pending.ty);
                assert_eq!(info.offset % u64::from(alignment), 0);
                assert_eq!(file.tensor_data(info), &pending.data[..]);
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn writer_rejects_inconsistent_input() {
        let data = sample_bytes();
        let mut writer = GgufWriter::new();
        assert!(writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..33]).is_err());
        assert!(writer.add_tensor("t", &[30], GgmlType::Q8_0, &data[..34]).is_err());
        assert!(writer.add_tensor("t", &[], GgmlType::F32, &data[..0]).is_err());
        writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..34]).unwrap();
        assert!(writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..34]).is_err());
        let mixed = MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]);
        assert!(writer.add_metadata("mixed", mixed).is_err());
        assert!(writer.add_metadata(ALIGNMENT_KEY, MetaValue::U32(64)).is_err());
        assert!(writer.set_alignment(48).is_err());
    }

    /// Writes the sample, applies `corrupt` to its bytes and returns the corrupted file's path.
    fn corrupted_sample(name: &str, corrupt: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let data = sample_bytes();
        let path = temp_path(name);
        sample_writer(&data).write(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        corrupt(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    /// Position of the tensor-info entry of `name` (the u64 length before its name).
    fn tensor_entry(bytes: &[u8], name: &str) -> usize {
        let mut needle = (name.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(name.as_bytes());
        bytes.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    type Corruption = Box<dyn FnOnce(&mut Vec<u8>)>;

    #[test]
    fn corrupted_files_give_model_file_errors_naming_the_file() {
        let cases: Vec<(&str, Corruption, &str)> = vec![
            (
                "truncated-data",
                Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 10)),
                "beyond the end",
            ),
            (
                "truncated-header",
                Box::new(|b: &mut Vec<u8>| b.truncate(60)),
                "truncated",
            ),
            ("tiny", Box::new(|b: &mut Vec<u8>| b.truncate(5)), "truncated"),
            (
                "magic",
                Box::new(|b: &mut Vec<u8>| b[..4].copy_from_slice(b"GGML")),
                "not a GGUF file",
            ),
            ("version", Box::new(|b: &mut Vec<u8>| b[4] = 7), "version 7"),
            (
                "tensor-type",
                Box::new(|b: &mut Vec<u8>| {
                    // name, n_dims = 1, one dim, then the type id.
                    let at = tensor_entry(b, "w.f32") + 8 + 5 + 4 + 8;
                    b[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
                }),
                "unsupported ggml type id 4",
            ),
            (
                "tensor-offset",
                Box::new(|b: &mut Vec<u8>| {
                    let at = tensor_entry(b, "w.f32") + 8 + 5 + 4 + 8 + 4;
                    b[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
                }),
                "beyond the end",
            ),
            (
                "huge-tensor-count",
                Box::new(|b: &mut Vec<u8>| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())),
                "tensor count",
            ),
            (
                "huge-dimension",
                Box::new(|b: &mut Vec<u8>| {
                    let at = tensor_entry(b, "w.q8") + 8 + 4 + 4 + 8;
                    b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                }),
                "too large",
            ),
            (
                "huge-string",
                Box::new(|b: &mut Vec<u8>| {
                    let at = tensor_entry(b, "w.q4k");
                    b[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
                }),
                "tensor name",
            ),
        ];
        for (name, corrupt, problem) in cases {
            let path = corrupted_sample(name, corrupt);
            expect_model_file_error(&path, problem);
            std::fs::remove_file(&path).unwrap();
        }
        expect_model_file_error(Path::new("/nonexistent/model.gguf"), "cannot open");
    }

    /// Random corruption must give an error or a consistent file, never a panic or a huge
    /// allocation.
    #[test]
    fn random_corruption_never_panics() {
        let data = sample_bytes();
        let path = temp_path("fuzz-original");
        sample_writer(&data).write(&path).unwrap();
        let original = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut opened = 0;
        for _ in 0..300 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if next() % 4 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            if let Ok(header) = parse(&bytes) {
                opened += 1;
                for t in &header.tensors {
                    assert!(t.offset as usize + t.size <= bytes.len());
                }
            }
        }
        assert!(opened > 0, "some corruptions (e.g. in tensor data) leave a valid file");
    }

    /// Leaves a sample at /tmp for checking with gguf-py:
    /// `cargo test --release -- --ignored write_sample_for_python`.
    #[test]
    #[ignore]
    fn write_sample_for_python() {
        let data = sample_bytes();
        let mut writer = sample_writer(&data);
        writer.set_alignment(64).unwrap();
        writer.write(Path::new("/tmp/splitwise_writer_sample.gguf")).unwrap();
    }
}
