//! Portable dot products of one weight row with one token's activation. They are written as
//! plain fixed-length integer loops that LLVM vectorizes; `avx2` recompiles the K-quant and
//! float ones with AVX2 enabled and replaces the 32-element formats with intrinsics.

use std::sync::OnceLock;

use super::activation::{ActivationKind, TokenActivation};
use super::dequant::{bf16_bits_to_f32, f16_at, k_scales_mins, q5_values};
use super::{GgmlType, QK, QK_K};
use crate::error::{CoreError, CoreResult};

pub(super) type DotFn = fn(&[u8], &TokenActivation<'_>) -> f32;

/// Tokens a tile kernel takes at once: enough to amortise unpacking a row's weights, few enough
/// that their accumulators stay in registers. 8 measured faster than 4 for every tile at both
/// levels (`kernel_benchmark`, 32 tokens: AVX-512 Q4_K 1.3×, Q8_0 1.35×, Q4_0/Q5_0/Q5_1
/// 1.3-1.4×; AVX2 1.0-1.25×) on the AVX-512 VM of 2026-12-02.
pub(super) const TOKEN_TILE: usize = 8;
/// The smaller tile every tile kernel also takes, for the last 4-7 tokens of a prompt: a padded
/// full tile cost Q4_1 1.6× four per-token calls there.
pub(super) const HALF_TILE: usize = TOKEN_TILE / 2;

/// One weight row against `TOKEN_TILE` or `HALF_TILE` tokens (`a.len()`), the row unpacked once;
/// writes each token's sum to `out` (as long as `a`).
pub(super) type TileDotFn = fn(&[u8], &[TokenActivation<'_>], &mut [f32]);

/// The body of a `TileDotFn`: picks the tile size from `$a.len()`, names it as the const `$n`,
/// gives `$body` the tile as `$tokens: [&TokenActivation; $n]` and writes its sums to `$out`.
macro_rules! by_tile_size {
    ($a:expr, $out:expr, |$tokens:ident: [_; $n:ident]| $body:expr) => {
        match $a.len() {
            $crate::engine::kernels::dot::TOKEN_TILE => {
                const $n: usize = $crate::engine::kernels::dot::TOKEN_TILE;
                let $tokens: [&_; $n] = std::array::from_fn(|t| &$a[t]);
                $out.copy_from_slice(&$body)
            }
            $crate::engine::kernels::dot::HALF_TILE => {
                const $n: usize = $crate::engine::kernels::dot::HALF_TILE;
                let $tokens: [&_; $n] = std::array::from_fn(|t| &$a[t]);
                $out.copy_from_slice(&$body)
            }
            n => panic!("a tile of {n} tokens"),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(super) use by_tile_size;

/// What a matmul on one tensor type runs: a single-token kernel, a token-tile kernel where the
/// level has one, and the activation layout both read.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    pub dot: DotFn,
    pub tile: Option<TileDotFn>,
    pub activation: ActivationKind,
    /// The AMX block kernel (16 rows × 16 tokens) takes prompts of this type.
    pub amx_blocks: bool,
}

/// The kernels for `ty` at the SIMD level the kernels run at.
pub(super) fn kernels(ty: GgmlType) -> Kernels {
    Kernels {
        dot: select(ty),
        tile: select_tile(ty),
        activation: activation_kind(ty),
        amx_blocks: amx_blocks(ty),
    }
}

/// Whether prompts on `ty` run on the AMX block kernels at the running level.
fn amx_blocks(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd_level().unwrap_or_else(|_| SimdLevel::detected()) >= SimdLevel::Amx
        && super::amx::kernel(ty).is_some();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// The activation layout `ty`'s kernels at the running level read: a level may reorder it for
/// its vectors (AVX-512's Q4_K); the portable and AVX2 kernels read `ty.activation_kind()`.
pub(super) fn activation_kind(ty: GgmlType) -> ActivationKind {
    #[cfg(target_arch = "x86_64")]
    if let Some(kind) = best_at_level(ty, super::avx512::activation_kind, |_| None) {
        return kind;
    }
    ty.activation_kind()
}

/// The fastest dot product for `ty` at the SIMD level the kernels run at.
pub(super) fn select(ty: GgmlType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if let Some(dot) = best_at_level(ty, super::avx512::select, super::avx2::select) {
        return dot;
    }
    portable(ty)
}

/// A tile kernel for `ty` where the level has one; elsewhere a matmul calls `select`'s kernel
/// per token.
pub(super) fn select_tile(ty: GgmlType) -> Option<TileDotFn> {
    #[cfg(target_arch = "x86_64")]
    return best_at_level(ty, super::avx512::select_tile, super::avx2::select_tile);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The kernel of the highest family at or below the running level that has one for `ty`.
#[cfg(target_arch = "x86_64")]
fn best_at_level<K>(ty: GgmlType, avx512: fn(GgmlType) -> Option<K>, avx2: fn(GgmlType) -> Option<K>) -> Option<K> {
    let level = simd_level().unwrap_or_else(|_| SimdLevel::detected());
    [(SimdLevel::Avx512, avx512), (SimdLevel::Avx2, avx2)]
        .into_iter()
        .filter(|&(family, _)| level >= family)
        .find_map(|(_, select)| select(ty))
}

/// The kernel families, slowest first. ARM64 runs the portable loops (no NEON kernels yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI, with AVX2 kernels for the types it has none for.
    Avx512,
    /// AVX-512, and AMX-INT8 tiles for the prompts of the K-quant and 32-element-format matrices.
    Amx,
}

/// Names a lower level for the kernels than the CPU's best: for side-by-side benchmarks, and to
/// step around a CPU or compiler fault in one family.
pub const SIMD_LEVEL_ENV: &str = "SPLITWISE_SIMD";

impl SimdLevel {
    pub const ALL: [SimdLevel; 4] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512, SimdLevel::Amx];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Amx => "amx",
        }
    }

    /// The best level this CPU runs.
    pub fn detected() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if super::amx::available() {
                return SimdLevel::Amx;
            }
            if super::avx512::available() {
                return SimdLevel::Avx512;
            }
            if super::avx2::available() {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    pub(super) fn from_env(value: &str) -> Result<SimdLevel, String> {
        let detected = SimdLevel::detected();
        let names = || SimdLevel::ALL.map(SimdLevel::name).join(", ");
        let level = SimdLevel::ALL
            .into_iter()
            .find(|level| level.name() == value.trim())
            .ok_or_else(|| {
                format!(
                    "{SIMD_LEVEL_ENV}={value:?} is not a kernel level; use one of {}",
                    names()
                )
            })?;
        if level > detected {
            return Err(format!(
                "{SIMD_LEVEL_ENV}={value:?} asks for more than this CPU has (its best level is {})",
                detected.name()
            ));
        }
        Ok(level)
    }
}

/// The level the kernels run at: the CPU's best, or the lower one `SPLITWISE_SIMD` names. Read
/// once per process; an invalid value is an error here (the engine refuses to open a model) and
/// the kernels themselves fall back to the CPU's best.
pub fn simd_level() -> CoreResult<SimdLevel> {
    static LEVEL: OnceLock<Result<SimdLevel, String>> = OnceLock::new();
    LEVEL
        .get_or_init(|| match std::env::var(SIMD_LEVEL_ENV) {
            Ok(value) => SimdLevel::from_env(&value),
            Err(_) => Ok(SimdLevel::detected()),
        })
        .clone()
        .map_err(CoreError::InvalidArgument)
}

pub(super) fn portable(ty: GgmlType) -> DotFn {
    match ty {
        GgmlType::F32 => f32_row,
        GgmlType::F16 => f16_row,
        GgmlType::BF16 => bf16_row,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
    }
}

/// Float dot with eight independent partial sums, so the loop vectorizes without reordering
/// a single serial sum.
#[inline(always)]
fn float_dot(n: usize, weight: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut partial = [0.0f32; 8];
    let whole = n / 8 * 8;
    for base in (0..whole).step_by(8) {
        for (lane, p) in partial.iter_mut().enumerate() {
            *p += weight(base + lane) * x[base + lane];
        }
    }
    let mut sum: f32 = partial.iter().sum();
    for (i, &xi) in x.iter().enumerate().take(n).skip(whole) {
        sum += weight(i) * xi;
    }
    sum
}

/// Dot product of two float slices of equal length, summed like `float_dot`.
pub(super) fn f32_slices(a: &[f32], b: &[f32]) -> f32 {
    float_dot(a.len(), |i| a[i], b)
}

#[inline(always)]
pub(super) fn f32_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let w = &w[..a.x.len() * 4];
    float_dot(
        a.x.len(),
        |i| f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
        a.x,
    )
}

#[inline(always)]
pub(super) fn f16_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let w = &w[..a.x.len() * 2];
    float_dot(a.x.len(), |i| f16_at(w, 2 * i), a.x)
}

#[inline(always)]
pub(super) fn bf16_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let w = &w[..a.x.len() * 2];
    float_dot(
        a.x.len(),
        |i| bf16_bits_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])),
        a.x,
    )
}

/// Σ q·y over a 32-element block stored as nibbles (low nibbles are elements 0..16).
#[inline(always)]
fn nibble_block_dot(qs: &[u8; 16], y: &[i8; 32]) -> i32 {
    let mut sum = 0i32;
    for j in 0..16 {
        sum += i32::from(qs[j] & 0x0F) * i32::from(y[j]);
        sum += i32::from(qs[j] >> 4) * i32::from(y[j + 16]);
    }
    sum
}

#[inline(always)]
fn block_y<'a>(a: &'a TokenActivation<'_>, block: usize) -> &'a [i8; QK] {
    a.qs[block * QK..(block + 1) * QK].try_into().unwrap()
}

// The offset formats use Σ(d·q + m)·x ≈ d·dy·Σq·y + m·(dy·Σy); Q4_0 and Q5_0 are the same
// with m = −8·d and −16·d.

pub(super) fn q4_0(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let d = f16_at(blk, 0);
        let sum = nibble_block_dot(blk[2..18].try_into().unwrap(), block_y(a, b));
        acc += d * (a.scales[b] * sum as f32 - 8.0 * a.scaled_sums[b]);
    }
    acc
}

pub(super) fn q4_1(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let sum = nibble_block_dot(blk[4..20].try_into().unwrap(), block_y(a, b));
        acc += d * a.scales[b] * sum as f32 + m * a.scaled_sums[b];
    }
    acc
}

#[inline(always)]
fn unsigned_block_dot(q: &[u8; 32], y: &[i8; 32]) -> i32 {
    q.iter().zip(y).map(|(&q, &y)| i32::from(q) * i32::from(y)).sum()
}

pub(super) fn q5_0(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let d = f16_at(blk, 0);
        let q = q5_values(&blk[2..6], &blk[6..22]);
        let sum = unsigned_block_dot(&q, block_y(a, b));
        acc += d * (a.scales[b] * sum as f32 - 16.0 * a.scaled_sums[b]);
    }
    acc
}

pub(super) fn q5_1(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(24).enumerate() {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let q = q5_values(&blk[4..8], &blk[8..24]);
        let sum = unsigned_block_dot(&q, block_y(a, b));
        acc += d * a.scales[b] * sum as f32 + m * a.scaled_sums[b];
    }
    acc
}

pub(super) fn q8_0(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let d = f16_at(blk, 0);
        let y = block_y(a, b);
        let sum: i32 = blk[2..34]
            .iter()
            .zip(y)
            .map(|(&q, &y)| i32::from(q as i8) * i32::from(y))
            .sum();
        acc += d * a.scales[b] * sum as f32;
    }
    acc
}

#[inline(always)]
fn super_block_y<'a>(a: &'a TokenActivation<'_>, block: usize) -> &'a [i8; QK_K] {
    a.qs[block * QK_K..(block + 1) * QK_K].try_into().unwrap()
}

/// Σ over sub-blocks of m·(Σy of the sub-block), for the K-quant minimums.
#[inline(always)]
fn k_min_sum(mins: &[u8; 8], group_sums: &[i16]) -> i32 {
    (0..8)
        .map(|sub| {
            let y_sum = i32::from(group_sums[2 * sub]) + i32::from(group_sums[2 * sub + 1]);
            i32::from(mins[sub]) * y_sum
        })
        .sum()
}

#[inline(always)]
pub(super) fn q4_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let dy = a.scales[b];
        let d = f16_at(blk, 0) * dy;
        let dmin = f16_at(blk, 2) * dy;
        let (scales, mins) = k_scales_mins(&blk[4..16]);
        let qs: &[u8; 128] = blk[16..144].try_into().unwrap();
        let y = super_block_y(a, b);
        let mut sum = 0i32;
        for pair in 0..4 {
            let mut low = 0i32;
            let mut high = 0i32;
            for l in 0..32 {
                let q = qs[32 * pair + l];
                low += i32::from(q & 0x0F) * i32::from(y[64 * pair + l]);
                high += i32::from(q >> 4) * i32::from(y[64 * pair + 32 + l]);
            }
            sum += i32::from(scales[2 * pair]) * low + i32::from(scales[2 * pair + 1]) * high;
        }
        let min_sum = k_min_sum(&mins, &a.group_sums[16 * b..16 * b + 16]);
        acc += d * sum as f32 - dmin * min_sum as f32;
    }
    acc
}

#[inline(always)]
pub(super) fn q5_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(176).enumerate() {
        let dy = a.scales[b];
        let d = f16_at(blk, 0) * dy;
        let dmin = f16_at(blk, 2) * dy;
        let (scales, mins) = k_scales_mins(&blk[4..16]);
        let qh: &[u8; 32] = blk[16..48].try_into().unwrap();
        let qs: &[u8; 128] = blk[48..176].try_into().unwrap();
        let y = super_block_y(a, b);
        let mut sum = 0i32;
        for pair in 0..4 {
            let mut low = 0i32;
            let mut high = 0i32;
            for l in 0..32 {
                let q = qs[32 * pair + l];
                let h = qh[l] >> (2 * pair);
                let q_low = (q & 0x0F) | ((h & 1) << 4);
                let q_high = (q >> 4) | ((h & 2) << 3);
                low += i32::from(q_low) * i32::from(y[64 * pair + l]);
                high += i32::from(q_high) * i32::from(y[64 * pair + 32 + l]);
            }
            sum += i32::from(scales[2 * pair]) * low + i32::from(scales[2 * pair + 1]) * high;
        }
        let min_sum = k_min_sum(&mins, &a.group_sums[16 * b..16 * b + 16]);
        acc += d * sum as f32 - dmin * min_sum as f32;
    }
    acc
}

#[inline(always)]
pub(super) fn q6_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let ql = &blk[0..128];
        let qh = &blk[128..192];
        let scales = &blk[192..208];
        let d = f16_at(blk, 208) * a.scales[b];
        let y = super_block_y(a, b);
        let group_sums = &a.group_sums[16 * b..16 * b + 16];
        let mut sum = 0i32;
        // Same element order as `q6_value`, walked so the inner loop reads contiguous bytes.
        for half in 0..2 {
            let ql = &ql[64 * half..64 * half + 64];
            let qh = &qh[32 * half..32 * half + 32];
            for quarter in 0..4 {
                let low_bytes = &ql[32 * (quarter % 2)..32 * (quarter % 2) + 32];
                let low_shift = 4 * (quarter / 2);
                let high_shift = 2 * quarter;
                let y = &y[128 * half + 32 * quarter..128 * half + 32 * quarter + 32];
                for g in 0..2 {
                    let mut group_dot = 0i32;
                    for l in 16 * g..16 * g + 16 {
                        let q = ((low_bytes[l] >> low_shift) & 0x0F) | (((qh[l] >> high_shift) & 0x03) << 4);
                        group_dot += i32::from(q) * i32::from(y[l]);
                    }
                    let group = 8 * half + 2 * quarter + g;
                    // q is stored with an offset of 32: Σ(q − 32)·y = Σq·y − 32·Σy.
                    let centred = group_dot - 32 * i32::from(group_sums[group]);
                    sum += i32::from(scales[group] as i8) * centred;
                }
            }
        }
        acc += d * sum as f32;
    }
    acc
}
