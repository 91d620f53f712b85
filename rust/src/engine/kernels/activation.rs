//! The activation side of a matmul, quantized once per call and shared by every row task.

use rayon::prelude::*;

use super::{QK, QK_K};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum ActivationKind {
    #[default]
    /// Float weights multiply the float activation directly.
    Float,
    /// Q8 blocks of 32 with scale `d` and `d·Σq` (ggml's Q8_1), for Q4_0..Q8_0 weights.
    Q8Blocks,
    /// Q8_K: 256-element super-blocks with an f32 scale and sums per 16 elements.
    Q8K,
    /// Q8_K with each super-block's 256 values reordered for the AVX-512 Q4_K kernel: 64-value
    /// vector c holds values 8c..8c+8 of each of the 8 sub-blocks of 32 in turn, so every i32
    /// lane of a `dpbusd` stays within one sub-block and the scales are applied once per
    /// super-block instead of once per vector. The sums stay in the natural order.
    Q8KTransposed,
}

/// Buffers for the quantized activation of all tokens, reused across calls.
#[derive(Default)]
pub(super) struct QuantizedActivation {
    kind: ActivationKind,
    cols: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
    /// `d·Σq` per 32 elements, so offset formats add `m·Σx` without touching x again (Q8Blocks:
    /// per block; Q8K: per 32-element sub-block, for the K-quant minimums).
    scaled_sums: Vec<f32>,
    /// Q8K: Σq per 16 elements, for the K-quant minimums and Q6_K's offset of 32.
    group_sums: Vec<i16>,
}

/// One token's activation, in whichever form the weight type needs.
#[derive(Clone, Copy)]
pub(super) struct TokenActivation<'a> {
    pub x: &'a [f32],
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub scaled_sums: &'a [f32],
    pub group_sums: &'a [i16],
}

/// Below this many values the activation is quantized on the calling thread: a prefill's
/// (tens of thousands of values per matmul) was 2.9 % of a one-thread TinyLlama prefill, all of
/// it on one thread while the others waited.
const MIN_PARALLEL_VALUES: usize = 64 * 1024;

impl QuantizedActivation {
    /// Quantizes on the calling thread (the tests' reference for `quantize_on`).
    #[cfg(test)]
    pub fn quantize(&mut self, kind: ActivationKind, x: &[f32], n_tokens: usize, cols: usize) {
        self.quantize_on(None, kind, x, n_tokens, cols);
    }

    /// Quantizes, block by block over `pool` when there is enough to share.
    pub fn quantize_on(
        &mut self,
        pool: Option<&rayon::ThreadPool>,
        kind: ActivationKind,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) {
        self.kind = kind;
        self.cols = cols;
        let n = n_tokens * cols;
        let pool = pool.filter(|pool| pool.current_num_threads() > 1 && n >= MIN_PARALLEL_VALUES);
        match kind {
            ActivationKind::Float => {
                self.qs.clear();
                self.scales.clear();
                self.scaled_sums.clear();
                self.group_sums.clear();
            }
            ActivationKind::Q8Blocks => {
                let n_blocks = n / QK;
                self.qs.resize(n, 0);
                self.scales.resize(n_blocks, 0.0);
                self.scaled_sums.resize(n_blocks, 0.0);
                self.group_sums.clear();
                let each = |((src, qs), (d, scaled_sum)): Q8Block<'_>| {
                    let scale = quantize_block(src, qs);
                    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                    *d = scale;
                    *scaled_sum = scale * sum as f32;
                };
                match pool {
                    Some(pool) => pool.install(|| {
                        x.par_chunks_exact(QK)
                            .zip(self.qs.par_chunks_exact_mut(QK))
                            .zip(self.scales.par_iter_mut().zip(self.scaled_sums.par_iter_mut()))
                            .for_each(each)
                    }),
                    None => x
                        .chunks_exact(QK)
                        .zip(self.qs.chunks_exact_mut(QK))
                        .zip(self.scales.iter_mut().zip(self.scaled_sums.iter_mut()))
                        .for_each(each),
                }
            }
            ActivationKind::Q8K | ActivationKind::Q8KTransposed => {
                let n_blocks = n / QK_K;
                self.qs.resize(n, 0);
                self.scales.resize(n_blocks, 0.0);
                self.scaled_sums.resize(n / QK, 0.0);
                self.group_sums.resize(n / 16, 0);
                let transposed = kind == ActivationKind::Q8KTransposed;
                let each = |(((src, qs), d), (group_sums, scaled_sums)): K8Block<'_>| {
                    quantize_k_block(src, qs, d, group_sums, scaled_sums, transposed)
                };
                match pool {
                    Some(pool) => pool.install(|| {
                        x.par_chunks_exact(QK_K)
                            .zip(self.qs.par_chunks_exact_mut(QK_K))
                            .zip(self.scales.par_iter_mut())
                            .zip(
                                self.group_sums
                                    .par_chunks_exact_mut(QK_K / 16)
                                    .zip(self.scaled_sums.par_chunks_exact_mut(QK_K / QK)),
                            )
                            .for_each(each)
                    }),
                    None => x
                        .chunks_exact(QK_K)
                        .zip(self.qs.chunks_exact_mut(QK_K))
                        .zip(self.scales.iter_mut())
                        .zip(
                            self.group_sums
                                .chunks_exact_mut(QK_K / 16)
                                .zip(self.scaled_sums.chunks_exact_mut(QK_K / QK)),
                        )
                        .for_each(each),
                }
            }
        }
    }

    /// Token `t`'s activation; `x` is the float input the buffers were quantized from.
    pub fn token<'a>(&'a self, x: &'a [f32], t: usize) -> TokenActivation<'a> {
        let cols = self.cols;
        let span = |block: usize| t * cols / block..(t + 1) * cols / block;
        let x = &x[span(1)];
        match self.kind {
            ActivationKind::Float => TokenActivation {
                x,
                qs: &[],
                scales: &[],
                scaled_sums: &[],
                group_sums: &[],
            },
            ActivationKind::Q8Blocks => TokenActivation {
                x,
                qs: &self.qs[span(1)],
                scales: &self.scales[span(QK)],
                scaled_sums: &self.scaled_sums[span(QK)],
                group_sums: &[],
            },
            ActivationKind::Q8K | ActivationKind::Q8KTransposed => TokenActivation {
                x,
                qs: &self.qs[span(1)],
                scales: &self.scales[span(QK_K)],
                scaled_sums: &self.scaled_sums[span(QK)],
                group_sums: &self.group_sums[span(16)],
            },
        }
    }
}

/// One Q8 block's input and outputs: values, quantized values, scale and scaled sum.
type Q8Block<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut f32, &'a mut f32));

/// One Q8_K super-block's input and outputs: values, quantized values, scale, sums per 16 and
/// scaled sums per 32.
type K8Block<'a> = (((&'a [f32], &'a mut [i8]), &'a mut f32), (&'a mut [i16], &'a mut [f32]));

fn quantize_k_block(
    src: &[f32],
    qs: &mut [i8],
    d: &mut f32,
    group_sums: &mut [i16],
    scaled_sums: &mut [f32],
    transposed: bool,
) {
    *d = quantize_block(src, qs);
    for (sum, qs) in group_sums.iter_mut().zip(qs.chunks_exact(16)) {
        // 16 values of at most 127 in magnitude cannot overflow i16.
        *sum = qs.iter().map(|&q| i16::from(q)).sum();
    }
    for (scaled, pair) in scaled_sums.iter_mut().zip(group_sums.chunks_exact(2)) {
        *scaled = *d * f32::from(pair[0] + pair[1]);
    }
    if transposed {
        transpose_sub_block_chunks(qs);
    }
}

/// Natural position `32·s + 8·c + j` (sub-block s, chunk c of 8 values, j within it) moves to
/// `64·c + 8·s + j`.
fn transpose_sub_block_chunks(block: &mut [i8]) {
    let natural: [i8; QK_K] = block.try_into().expect("a super-block");
    for (s, sub_block) in natural.chunks_exact(QK).enumerate() {
        for (c, chunk) in sub_block.chunks_exact(8).enumerate() {
            block[64 * c + 8 * s..64 * c + 8 * s + 8].copy_from_slice(chunk);
        }
    }
}

/// Symmetric 8-bit quantization of one block; returns the scale.
fn quantize_block(src: &[f32], qs: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(src) {
        // The clamp keeps a rounding excursion past ±127 from wrapping.
        *q = nearest_int(v * inv).clamp(-127, 127) as i8;
    }
    d
}

/// `v` rounded to the nearest integer, ties to even, for |v| < 2^22 (as ggml's `nearest_int`):
/// adding 1.5·2^23 leaves the integer in the low mantissa bits. `f32::round` is a libm call on
/// baseline x86-64 (no SSE4.1) and measured 2.6 % of a prefill; this loop vectorises.
#[inline(always)]
pub(super) fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}
