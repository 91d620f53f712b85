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
}

/// Buffers for the quantized activation of all tokens, reused across calls.
#[derive(Default)]
pub(super) struct QuantizedActivation {
    kind: ActivationKind,
    cols: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
    /// Q8Blocks: `d·Σq` per block, so offset formats add `m·Σx` without touching x again.
    scaled_sums: Vec<f32>,
    /// Q8K: Σq per 16 elements, for the K-quant minimums and Q6_K's offset of 32.
    group_sums: Vec<i16>,
}

/// One token's activation, in whichever form the weight type needs.
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
            ActivationKind::Q8K => {
                let n_blocks = n / QK_K;
                self.qs.resize(n, 0);
                self.scales.resize(n_blocks, 0.0);
                self.scaled_sums.clear();
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
            ActivationKind::Q8K => TokenActivation {
                x,
                qs: &self.qs[span(1)],
                scales: &self.scales[span(QK_K)],
                scaled_sums: &[],
                group_sums: &self.group_sums[span(16)],
            },
        }
    }
}

/// Symmetric 8-bit quantization of one block; returns the scale.
fn quantize_block(src: &[f32], qs: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(src) {
        // `as` saturates, so a rounding excursion past ±127 cannot wrap.
        *q = (v * inv).round() as i8;
    }
    d
}
