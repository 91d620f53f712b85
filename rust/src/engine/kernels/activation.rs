//! The activation side of a matmul, quantized once per call and shared by every row task.

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

impl QuantizedActivation {
    pub fn quantize(&mut self, kind: ActivationKind, x: &[f32], n_tokens: usize, cols: usize) {
        self.kind = kind;
        self.cols = cols;
        let n = n_tokens * cols;
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
                for (((src, qs), d), s) in x
                    .chunks_exact(QK)
                    .zip(self.qs.chunks_exact_mut(QK))
                    .zip(self.scales.iter_mut())
                    .zip(self.scaled_sums.iter_mut())
                {
                    let scale = quantize_block(src, qs);
                    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
                    *d = scale;
                    *s = scale * sum as f32;
                }
            }
            ActivationKind::Q8K | ActivationKind::Q8KTransposed => {
                let n_blocks = n / QK_K;
                self.qs.resize(n, 0);
                self.scales.resize(n_blocks, 0.0);
                self.scaled_sums.resize(n / QK, 0.0);
                self.group_sums.resize(n / 16, 0);
                for ((src, qs), d) in x
                    .chunks_exact(QK_K)
                    .zip(self.qs.chunks_exact_mut(QK_K))
                    .zip(self.scales.iter_mut())
                {
                    *d = quantize_block(src, qs);
                }
                for (qs, sum) in self.qs.chunks_exact(16).zip(self.group_sums.iter_mut()) {
                    // 16 values of at most 127 in magnitude cannot overflow i16.
                    *sum = qs.iter().map(|&q| i16::from(q)).sum();
                }
                for (b, (sums, d)) in self.group_sums.chunks_exact(QK_K / 16).zip(&self.scales).enumerate() {
                    for (i, pair) in sums.chunks_exact(2).enumerate() {
                        self.scaled_sums[b * (QK_K / QK) + i] = d * f32::from(pair[0] + pair[1]);
                    }
                }
                if kind == ActivationKind::Q8KTransposed {
                    for block in self.qs.chunks_exact_mut(QK_K) {
                        transpose_sub_block_chunks(block);
                    }
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
