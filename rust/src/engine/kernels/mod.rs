//! GGML tensor types, row dequantization and multithreaded matmul on quantized weights.
//!
//! Like ggml, a matmul first quantizes the activation once (Q8 blocks of 32 with their sums for
//! the 32-element formats, Q8_K super-blocks for the K-quants) and then takes integer dot
//! products block by block, so the weights are never expanded to floats.

mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dequant;
mod dot;

use std::cell::Cell;
use std::ops::Range;

use crate::error::{CoreError, CoreResult};
use activation::{ActivationKind, QuantizedActivation, TokenActivation};
pub use dot::{simd_level, SimdLevel, SIMD_LEVEL_ENV};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// Elements per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Elements per block of the 32-element formats.
pub(crate) const QK: usize = 32;

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    pub fn from_ggml_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|ty| ty.ggml_id() == id)
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name ggml and gguf-py use for the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
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

    /// Bytes of a row of `n` elements.
    pub fn row_bytes(self, n: usize) -> CoreResult<usize> {
        let block_len = self.block_len();
        if !n.is_multiple_of(block_len) {
            return Err(CoreError::InvalidArgument(format!(
                "a {} row must hold a multiple of {block_len} elements, got {n}",
                self.name()
            )));
        }
        (n / block_len)
            .checked_mul(self.block_bytes())
            .ok_or_else(|| CoreError::InvalidArgument(format!("a {} row of {n} elements overflows", self.name())))
    }

    fn activation_kind(self) -> ActivationKind {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => ActivationKind::Float,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                ActivationKind::Q8Blocks
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => ActivationKind::Q8K,
        }
    }
}

/// Expands one row stored as `ty` into floats; `out.len()` is the row length.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> CoreResult<()> {
    let expected = ty.row_bytes(out.len())?;
    if src.len() != expected {
        return Err(CoreError::BufferSize {
            expected,
            actual: src.len(),
        });
    }
    dequant::dequantize_unchecked(ty, src, out);
    Ok(())
}

/// A row-major weight matrix W (rows × cols) in its stored type; row r is bytes
/// `[r*row_bytes, (r+1)*row_bytes)`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

/// Below this many multiply-adds a matmul runs on the calling thread: handing it to the pool
/// would cost more than the work.
const MIN_PARALLEL_WORK: usize = 32 * 1024;
/// Rows per parallel task never drop below this, so each task amortises its scheduling.
const MIN_ROWS_PER_TASK: usize = 8;
/// Tasks per thread: a few, so a thread delayed by another process does not stall the call.
const TASKS_PER_THREAD: usize = 3;

/// How far ahead of the row it computes a task asks the cache for weight bytes: the hardware
/// prefetchers stop at page boundaries, and a decode step streams every matrix from memory.
/// TinyLlama Q4_K_M decode, 1 thread, AVX-512 VM: 92 ms/token without, 85 with 2 rows (2.3 KB)
/// ahead, 80 with 16 rows (18 KB), 82-83 with 32-64 rows; 16 KiB: 80.6, 32 KiB: 83.6.
const PREFETCH_BYTES_AHEAD: usize = 16 * 1024;
/// From this many tokens a matmul on a type with an AMX kernel runs on the tiles where the CPU has
/// them (a block of 16 tokens costs about what a few tokens cost the AVX-512 tiles).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_TOKENS: usize = 8;

/// Asks the cache for every line of `bytes` without waiting for them.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..bytes.len()).step_by(64) {
        // SAFETY: a prefetch of an address inside the slice; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(offset) as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

thread_local! {
    /// Reused activation buffers; taken out while in use, so a nested call on the same thread
    /// simply allocates its own.
    static ACTIVATION_SCRATCH: Cell<QuantizedActivation> = Cell::new(QuantizedActivation::default());
    /// Reused AMX token blocks, likewise.
    #[cfg(target_arch = "x86_64")]
    static AMX_SCRATCH: Cell<Vec<amx::PackedTokens>> = const { Cell::new(Vec::new()) };
}

/// The output pointer shared by the row tasks of one matmul.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint index sets (their own rows), and the matmul waits for all of
// them before the borrowed output is used again.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No other task may write `index` during this matmul.
    unsafe fn write(&self, index: usize, value: f32) {
        assert!(index < self.len);
        unsafe { *self.ptr.add(index) = value };
    }
}

impl<'a> QMatrix<'a> {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> CoreResult<Self> {
        let expected = ty
            .row_bytes(cols)?
            .checked_mul(rows)
            .ok_or_else(|| CoreError::InvalidArgument(format!("{rows}×{cols} matrix overflows")))?;
        if data.len() != expected {
            return Err(CoreError::BufferSize {
                expected,
                actual: data.len(),
            });
        }
        Ok(QMatrix { ty, rows, cols, data })
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    fn row_data(&self, r: usize) -> &'a [u8] {
        let row_bytes = self.row_bytes();
        &self.data[r * row_bytes..(r + 1) * row_bytes]
    }

    /// Dequantizes row `r` into `out` (`out.len() == cols`); the embedding lookup.
    ///
    /// Panics if `r` is out of range or `out` has the wrong length.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(out.len(), self.cols, "output length must equal cols");
        dequant::dequantize_unchecked(self.ty, self.row_data(r), out);
    }

    /// All rows: `out[t*rows + i] = Σ_c W[i, c] · x[t*cols + c]`.
    pub fn matmul(&self, x: &[f32], n_tokens: usize, out: &mut [f32], pool: &rayon::ThreadPool) {
        self.matmul_rows(0..self.rows, x, n_tokens, out, pool);
    }

    /// `out[t*rows.len() + i] = Σ_c W[rows.start+i, c] · x[t*cols + c]` for `t in 0..n_tokens`
    /// (x is n_tokens × cols, row-major).
    ///
    /// Panics if the row range or the buffer lengths do not fit the matrix.
    pub fn matmul_rows(
        &self,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        pool: &rayon::ThreadPool,
    ) {
        self.matmul_rows_with(dot::kernels(self.ty), rows, x, n_tokens, out, pool);
    }

    /// `matmul_rows` with the given single-token and tile kernels (tests and benchmarks compare
    /// SIMD levels in one process this way).
    fn matmul_rows_with(
        &self,
        kernels: dot::Kernels,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        pool: &rayon::ThreadPool,
    ) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "row range {rows:?} out of bounds for {} rows",
            self.rows
        );
        assert_eq!(x.len(), n_tokens * self.cols, "x must be n_tokens × cols");
        let n_rows = rows.len();
        assert_eq!(out.len(), n_tokens * n_rows, "out must be n_tokens × rows.len()");
        if n_rows == 0 || n_tokens == 0 {
            return;
        }

        #[cfg(target_arch = "x86_64")]
        let amx = kernels.amx_blocks && n_tokens >= AMX_MIN_TOKENS;
        #[cfg(not(target_arch = "x86_64"))]
        let amx = false;
        // The AMX blocks repack the activation themselves, from the type's own layout.
        let kind = if amx {
            self.ty.activation_kind()
        } else {
            kernels.activation
        };
        let mut activation = ACTIVATION_SCRATCH.with(Cell::take);
        activation.quantize_on(Some(pool), kind, x, n_tokens, self.cols);
        let shared = SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        // Every token's view and every tile, built once per call rather than per row.
        let tokens: Vec<TokenActivation<'_>> = (0..n_tokens).map(|t| activation.token(x, t)).collect();
        #[cfg(target_arch = "x86_64")]
        if amx {
            self.matmul_rows_amx(kind, rows, &tokens, &shared, pool);
            ACTIVATION_SCRATCH.with(|cell| cell.set(activation));
            return;
        }
        // Whole tiles, then a half tile for 4-7 left over, then per-token calls.
        let mut tiles = Vec::new();
        let mut first_single = 0;
        if kernels.tile.is_some() {
            for size in [dot::TOKEN_TILE, dot::HALF_TILE] {
                while n_tokens - first_single >= size {
                    tiles.push(first_single..first_single + size);
                    first_single += size;
                }
            }
        }
        // Float weights over several tokens: convert each row once and reuse it for every token,
        // instead of converting it per token inside the dot product.
        let float_rows = kernels.activation == ActivationKind::Float && n_tokens > 1;
        let run_rows = |local: Range<usize>| {
            if float_rows {
                let mut row = vec![0f32; self.cols];
                for i in local {
                    dequantize_row(self.ty, self.row_data(rows.start + i), &mut row)
                        .expect("row length checked when the matrix was built");
                    for t in 0..n_tokens {
                        let value = dot::f32_slices(&row, &x[t * self.cols..(t + 1) * self.cols]);
                        // SAFETY: row i belongs to exactly one task.
                        unsafe { shared.write(t * n_rows + i, value) };
                    }
                }
                return;
            }
            let rows_ahead = (PREFETCH_BYTES_AHEAD / self.row_bytes().max(1)).max(1);
            for i in local.clone() {
                let weights = self.row_data(rows.start + i);
                if i + rows_ahead < local.end {
                    prefetch(self.row_data(rows.start + i + rows_ahead));
                }
                if let Some(tile_dot) = kernels.tile {
                    let mut sums = [0.0f32; dot::TOKEN_TILE];
                    for tile in &tiles {
                        let sums = &mut sums[..tile.len()];
                        tile_dot(weights, &tokens[tile.clone()], sums);
                        for (t, &value) in tile.clone().zip(sums.iter()) {
                            // SAFETY: row i belongs to exactly one task.
                            unsafe { shared.write(t * n_rows + i, value) };
                        }
                    }
                }
                for (t, token) in tokens.iter().enumerate().skip(first_single) {
                    let value = (kernels.dot)(weights, token);
                    // SAFETY: row i belongs to exactly one task.
                    unsafe { shared.write(t * n_rows + i, value) };
                }
            }
        };

        for_row_tasks(pool, n_rows, n_rows * n_tokens * self.cols, 1, run_rows);
        ACTIVATION_SCRATCH.with(|cell| cell.set(activation));
    }

    /// A prompt through the AMX tiles: the tokens (quantized as `kind`) packed once into blocks of
    /// 16 (the last one padded with zeros), the rows taken 16 at a time by each task.
    #[cfg(target_arch = "x86_64")]
    fn matmul_rows_amx(
        &self,
        kind: ActivationKind,
        rows: Range<usize>,
        tokens: &[TokenActivation<'_>],
        shared: &SharedOut,
        pool: &rayon::ThreadPool,
    ) {
        let n_rows = rows.len();
        let (kernel, group) = amx::kernel(self.ty).expect("amx_blocks is set only for types with an AMX kernel");
        // Block by block over the pool (on the calling thread alone it held back a two-thread
        // prompt), into buffers kept from the last call.
        let mut packed = AMX_SCRATCH.with(Cell::take);
        packed.resize_with(tokens.len().div_ceil(amx::BLOCK), Default::default);
        pool.install(|| {
            use rayon::prelude::*;
            packed
                .par_iter_mut()
                .zip(tokens.par_chunks(amx::BLOCK))
                .for_each(|(packed, block)| packed.pack(block, kind, self.cols, group))
        });
        let run_rows = |local: Range<usize>| {
            let mut sums = vec![[[0f32; amx::BLOCK]; amx::BLOCK]; packed.len()];
            for first in local.clone().step_by(amx::BLOCK) {
                let group = first..(first + amx::BLOCK).min(local.end);
                let weights: Vec<&[u8]> = group.clone().map(|i| self.row_data(rows.start + i)).collect();
                kernel(&weights, &packed, &mut sums);
                for (block, sums) in sums.iter().enumerate() {
                    let first_token = block * amx::BLOCK;
                    let n = amx::BLOCK.min(tokens.len() - first_token);
                    for (t, token_sums) in sums.iter().take(n).enumerate() {
                        for (i, &value) in group.clone().zip(token_sums) {
                            // SAFETY: row i belongs to exactly one task.
                            unsafe { shared.write((first_token + t) * n_rows + i, value) };
                        }
                    }
                }
            }
        };
        for_row_tasks(pool, n_rows, n_rows * tokens.len() * self.cols, amx::BLOCK, run_rows);
        AMX_SCRATCH.with(|cell| cell.set(packed));
    }
}

/// Runs `run_rows` over `0..n_rows`, split between the pool's threads when there is enough
/// `work`; every task but the last gets a multiple of `granule` rows.
fn for_row_tasks(
    pool: &rayon::ThreadPool,
    n_rows: usize,
    work: usize,
    granule: usize,
    run_rows: impl Fn(Range<usize>) + Sync,
) {
    let threads = pool.current_num_threads();
    if threads <= 1 || work < MIN_PARALLEL_WORK || n_rows < 2 * MIN_ROWS_PER_TASK.max(granule) {
        run_rows(0..n_rows);
        return;
    }
    let tasks = (threads * TASKS_PER_THREAD).min(n_rows / MIN_ROWS_PER_TASK.max(granule));
    let rows_per_task = n_rows.div_ceil(tasks).next_multiple_of(granule);
    pool.install(|| {
        use rayon::prelude::*;
        (0..n_rows.div_ceil(rows_per_task)).into_par_iter().for_each(|task| {
            let start = task * rows_per_task;
            run_rows(start..(start + rows_per_task).min(n_rows));
        });
    });
}

#[cfg(test)]
mod tests;
