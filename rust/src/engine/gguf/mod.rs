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
mod tests;
