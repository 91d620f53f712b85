//! GGML tensor types, dequantization and quantized matmul.
//!
//! TEMPORARY minimal implementation written on branch `engine-model` only so the model code
//! can be tested: dequantize a row to f32, then a float dot product. Only F32, F16, Q4_0, Q4_1
//! and Q8_0 are decoded. The real kernels come from branch `engine-kernels` and replace this
//! file wholesale at merge. Nothing else may live here.

use crate::error::{CoreError, CoreResult};
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
            _ => 32,
        }
    }
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> CoreResult<()> {
    let n = out.len();
    if n % ty.block_elems() != 0 || src.len() != n / ty.block_elems() * ty.block_bytes() {
        return Err(CoreError::InvalidArgument(format!(
            "dequantize_row: {} bytes for {n} {ty:?} values",
            src.len()
        )));
    }
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = h(b);
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = h(b);
                for j in 0..32 {
                    o[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = h(b);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0xf) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = h(b);
                let m = h(&b[2..]);
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0xf) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        _ => {
            return Err(CoreError::InvalidArgument(format!(
                "temporary kernels: {ty:?} not supported"
            )))
        }
    }
    Ok(())
}

/// Row-major W (rows × cols).
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> CoreResult<Self> {
        if cols % ty.block_elems() != 0 || data.len() != rows * cols / ty.block_elems() * ty.block_bytes() {
            return Err(CoreError::InvalidArgument(format!(
                "QMatrix: {} bytes for {rows}x{cols} {ty:?}",
                data.len()
            )));
        }
        Ok(QMatrix { ty, rows, cols, data })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// out[t*rows.len() + i] = Σ_c W[rows.start+i, c]·x[t*cols + c], t in 0..n_tokens
    pub fn matmul_rows(
        &self,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        pool: &rayon::ThreadPool,
    ) {
        assert!(rows.end <= self.rows && x.len() == n_tokens * self.cols);
        let nr = rows.len();
        assert_eq!(out.len(), n_tokens * nr);
        let cols = self.cols;
        let res: Vec<Vec<f32>> = pool.install(|| {
            rows.clone()
                .into_par_iter()
                .map(|r| {
                    let mut w = vec![0.0f32; cols];
                    self.row(r, &mut w);
                    (0..n_tokens)
                        .map(|t| {
                            let xt = &x[t * cols..(t + 1) * cols];
                            w.iter().zip(xt).map(|(a, b)| a * b).sum::<f32>()
                        })
                        .collect()
                })
                .collect()
        });
        for (i, col) in res.iter().enumerate() {
            for t in 0..n_tokens {
                out[t * nr + i] = col[t];
            }
        }
    }

    pub fn matmul(&self, x: &[f32], n_tokens: usize, out: &mut [f32], pool: &rayon::ThreadPool) {
        self.matmul_rows(0..self.rows, x, n_tokens, out, pool)
    }

    /// Dequantize one row.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequantize_row(self.ty, &self.data[r * rb..(r + 1) * rb], out).expect("row dequantize");
    }
}
