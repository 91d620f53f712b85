//! Memory-mapped GGUF reader.
//!
//! TEMPORARY minimal implementation written on branch `engine-model` only so the model code
//! can be tested; the real reader comes from branch `engine-kernels` and replaces this file
//! wholesale at merge. Nothing else may live here.

use crate::engine::kernels::GgmlType;
use crate::error::{CoreError, CoreResult};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// dims[0] = row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub size: usize,
}

pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    meta: HashMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

fn bad(path: &Path, problem: impl Into<String>) -> CoreError {
    CoreError::ModelFile {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> CoreResult<&[u8]> {
        if self.pos + n > self.buf.len() {
            return Err(bad(self.path, "truncated header"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> CoreResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> CoreResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> CoreResult<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32) -> CoreResult<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.take(1)?[0]),
            1 => MetaValue::I8(self.take(1)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => MetaValue::I16(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(self.u32()? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32()?)),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let ety = self.u32()?;
                let n = self.u64()? as usize;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(bad(self.path, format!("unknown metadata type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> CoreResult<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(path, e.to_string()))?;
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(bad(path, "not a GGUF file"));
        }
        let _version = c.u32()?;
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            meta.insert(key, c.value(ty)?);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64()?);
            }
            let tid = c.u32()?;
            let ty = GgmlType::from_ggml_id(tid)
                .ok_or_else(|| bad(path, format!("tensor {name}: unsupported type {tid}")))?;
            let offset = c.u64()?;
            let n: u64 = dims.iter().product();
            let size = (n as usize / ty.block_len()) * ty.block_bytes();
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        let align = match meta.get("general.alignment") {
            Some(MetaValue::U32(a)) => *a as usize,
            _ => 32,
        };
        let data_start = c.pos.div_ceil(align) * align;
        for t in &tensors {
            if data_start + t.offset as usize + t.size > map.len() {
                return Err(bad(path, format!("tensor {} extends past end of file", t.name)));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            meta,
            tensors,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self, key: &str) -> Option<&MetaValue> {
        self.meta.get(key)
    }

    pub fn meta_u32(&self, key: &str) -> CoreResult<u32> {
        match self.meta.get(key) {
            Some(MetaValue::U32(v)) => Ok(*v),
            Some(MetaValue::I32(v)) if *v >= 0 => Ok(*v as u32),
            Some(MetaValue::U64(v)) if *v <= u32::MAX as u64 => Ok(*v as u32),
            _ => Err(bad(&self.path, format!("missing or non-integer metadata {key}"))),
        }
    }

    pub fn meta_f32(&self, key: &str) -> CoreResult<f32> {
        match self.meta.get(key) {
            Some(MetaValue::F32(v)) => Ok(*v),
            Some(MetaValue::F64(v)) => Ok(*v as f32),
            _ => Err(bad(&self.path, format!("missing or non-float metadata {key}"))),
        }
    }

    pub fn meta_str(&self, key: &str) -> CoreResult<&str> {
        match self.meta.get(key) {
            Some(MetaValue::Str(v)) => Ok(v),
            _ => Err(bad(&self.path, format!("missing or non-string metadata {key}"))),
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let s = self.data_start + info.offset as usize;
        &self.map[s..s + info.size]
    }
}
