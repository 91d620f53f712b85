//! x86_64 kernels, chosen at run time when the CPU has AVX2, FMA and F16C.
//!
//! The 32-element formats use ggml's scheme: expand a block's weights to 32 bytes, multiply
//! with the Q8 activation bytes via `maddubs` (unsigned × signed pairs to i16), widen pairs to
//! i32 with `madd`, and accumulate the scaled float sums. Offset formats keep their weights
//! unsigned and add `m·dy·Σy` afterwards, so every block needs a single `maddubs`.

use std::arch::x86_64::*;

use super::activation::TokenActivation;
use super::dequant::k_scales_mins;
use super::dot::{self, by_tile_size, DotFn, TileDotFn};
use super::{GgmlType, QK, QK_K};

/// The CPU features every kernel here is compiled for.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

pub(super) fn select(ty: GgmlType) -> Option<DotFn> {
    if !available() {
        return None;
    }
    // SAFETY (every wrapper below): reached only when `available()` holds.
    let dot: DotFn = match ty {
        GgmlType::F32 => |w, a| unsafe { f32_row(w, a) },
        GgmlType::F16 => |w, a| unsafe { f16_row(w, a) },
        GgmlType::BF16 => |w, a| unsafe { bf16_row(w, a) },
        GgmlType::Q4_0 => |w, a| unsafe { q4_0(w, a) },
        GgmlType::Q4_1 => |w, a| unsafe { q4_1(w, a) },
        GgmlType::Q5_0 => |w, a| unsafe { q5_0(w, a) },
        GgmlType::Q5_1 => |w, a| unsafe { q5_1(w, a) },
        GgmlType::Q8_0 => |w, a| unsafe { q8_0(w, a) },
        GgmlType::Q4K => |w, a| unsafe { q4_k(w, a) },
        GgmlType::Q5K => |w, a| unsafe { q5_k(w, a) },
        GgmlType::Q6K => |w, a| unsafe { q6_k(w, a) },
    };
    Some(dot)
}

pub(super) fn select_tile(ty: GgmlType) -> Option<TileDotFn> {
    if !available() {
        return None;
    }
    // SAFETY: as in `select`.
    // Q6_K's tile measured 1.4-1.7× the per-token kernel, Q4_K's 0.8-1.15× (noise, not kept).
    let dot: TileDotFn = match ty {
        GgmlType::Q4_0 => |w, a, out| unsafe { q4_0_tile(w, a, out) },
        GgmlType::Q4_1 => |w, a, out| unsafe { q4_1_tile(w, a, out) },
        GgmlType::Q5_0 => |w, a, out| unsafe { q5_0_tile(w, a, out) },
        GgmlType::Q5_1 => |w, a, out| unsafe { q5_1_tile(w, a, out) },
        GgmlType::Q6K => |w, a, out| unsafe { q6_k_tile(w, a, out) },
        _ => return None,
    };
    Some(dot)
}

// The portable kernels, recompiled so LLVM may use 256-bit vectors.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    dot::f32_row(w, a)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    dot::f16_row(w, a)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_row(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    dot::bf16_row(w, a)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    dot::q5_k(w, a)
}

/// The f16 at `p` and the one after it, as floats in lanes 0 and 1.
#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> __m128 {
    let bits = (p as *const u32).read_unaligned();
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// The f16 at `p` as a float. The `vmovd` is written out: from `_mm_cvtsi32_si128` (or a
/// broadcast) LLVM keeps only the demanded low 16 bits and emits a `vpinsrw` into whatever
/// register it likes, which was a loop's accumulator, so every block waited for the previous
/// block's FMA (the Q4_0/Q5_0 one-token kernels ran at half Q4_1's speed).
#[inline(always)]
pub(super) unsafe fn f16_one(p: *const u8) -> f32 {
    let bits = u32::from((p as *const u16).read_unaligned());
    let v: __m128i;
    // SAFETY: a register-to-register move; the callers run with AVX enabled.
    std::arch::asm!(
        "vmovd {v}, {bits:e}",
        v = lateout(xmm_reg) v,
        bits = in(reg) bits,
        options(pure, nomem, nostack, preserves_flags)
    );
    _mm_cvtss_f32(_mm_cvtph_ps(v))
}

#[inline(always)]
pub(super) unsafe fn horizontal_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 bytes of nibbles as 32 bytes: low nibbles in bytes 0..16, high nibbles in 16..32.
#[inline(always)]
unsafe fn nibbles_to_bytes(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte j of the result is 0x10 when bit j of the little-endian u32 at `p` is set.
#[inline(always)]
unsafe fn high_bits_to_bytes(p: *const u8) -> __m256i {
    let bits = (p as *const u32).read_unaligned();
    // Broadcast byte j/8 of `bits` to byte j, then test bit j%8 of it.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Σ q·y for 32 unsigned weight bytes (< 128) and 32 activation bytes, as 8 float lanes.
#[inline(always)]
unsafe fn unsigned_dot(q: __m256i, y: *const i8) -> __m256 {
    let y = _mm256_loadu_si256(y as *const __m256i);
    let pairs = _mm256_maddubs_epi16(q, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// Shared loop of the 32-element formats, for N tokens (N = 1: one token's dot product; N =
/// `TOKEN_TILE` or `HALF_TILE`: a prefill tile, each block's weights unpacked once for all N).
/// `block(b)` returns the block's weight bytes (as unsigned values), its scale d and its offset
/// m. Every token's sum is formed in the same order whatever N is (even blocks in one accumulator,
/// odd in another, the offsets in block order), so a prompt computed in tiles equals the same
/// tokens decoded one by one, bit for bit.
#[inline(always)]
unsafe fn offset_blocks_tokens<const N: usize>(
    n_blocks: usize,
    a: [&TokenActivation<'_>; N],
    block: impl Fn(usize) -> (__m256i, f32, f32),
) -> [f32; N] {
    // Two accumulators per token so consecutive blocks' FMAs do not wait on each other.
    let mut even = [_mm256_setzero_ps(); N];
    let mut odd = [_mm256_setzero_ps(); N];
    let mut offsets = [0.0f32; N];
    let mut b = 0;
    while b + 1 < n_blocks {
        accumulate_block(block(b), b, &a, &mut even, &mut offsets);
        accumulate_block(block(b + 1), b + 1, &a, &mut odd, &mut offsets);
        b += 2;
    }
    if b < n_blocks {
        accumulate_block(block(b), b, &a, &mut even, &mut offsets);
    }
    std::array::from_fn(|t| horizontal_sum(_mm256_add_ps(even[t], odd[t])) + offsets[t])
}

/// Block `b` (its unsigned weight bytes, d and m) into every token's accumulator and offset. A
/// function, not a closure: a closure here would not inherit the caller's AVX2 target features,
/// and its intrinsics would become calls (prefill measured 20× slower).
#[inline(always)]
unsafe fn accumulate_block<const N: usize>(
    (q, d, m): (__m256i, f32, f32),
    b: usize,
    a: &[&TokenActivation<'_>; N],
    acc: &mut [__m256; N],
    offsets: &mut [f32; N],
) {
    for t in 0..N {
        offsets[t] += m * *a[t].scaled_sums.get_unchecked(b);
        let sums = unsigned_dot(q, a[t].qs.as_ptr().add(b * QK));
        acc[t] = _mm256_fmadd_ps(sums, _mm256_set1_ps(d * *a[t].scales.get_unchecked(b)), acc[t]);
    }
}

/// The blocks of `w` every token of the tile covers (lengths checked as `n_blocks` does).
#[inline(always)]
fn tile_blocks(w: &[u8], block_bytes: usize, a: &[TokenActivation<'_>]) -> usize {
    a.iter().map(|a| n_blocks(w, block_bytes, a)).min().unwrap_or(0)
}

/// Checks the slice lengths the unchecked loops rely on.
#[inline(always)]
fn n_blocks(w: &[u8], block_bytes: usize, a: &TokenActivation<'_>) -> usize {
    let n = w.len() / block_bytes;
    assert!(a.qs.len() >= n * QK && a.scales.len() >= n && a.scaled_sums.len() >= n);
    n
}

/// Block `b` of each 32-element offset format at `p`: its weights as unsigned bytes, d and m.
#[inline(always)]
unsafe fn q4_0_block(p: *const u8, b: usize) -> (__m256i, f32, f32) {
    let blk = p.add(b * 18);
    let d = f16_one(blk);
    (nibbles_to_bytes(blk.add(2)), d, -8.0 * d)
}

#[inline(always)]
unsafe fn q4_1_block(p: *const u8, b: usize) -> (__m256i, f32, f32) {
    let blk = p.add(b * 20);
    let dm = f16_pair(blk);
    (
        nibbles_to_bytes(blk.add(4)),
        _mm_cvtss_f32(dm),
        _mm_cvtss_f32(_mm_movehdup_ps(dm)),
    )
}

#[inline(always)]
unsafe fn q5_0_block(p: *const u8, b: usize) -> (__m256i, f32, f32) {
    let blk = p.add(b * 22);
    let d = f16_one(blk);
    let q = _mm256_or_si256(nibbles_to_bytes(blk.add(6)), high_bits_to_bytes(blk.add(2)));
    (q, d, -16.0 * d)
}

#[inline(always)]
unsafe fn q5_1_block(p: *const u8, b: usize) -> (__m256i, f32, f32) {
    let blk = p.add(b * 24);
    let dm = f16_pair(blk);
    let q = _mm256_or_si256(nibbles_to_bytes(blk.add(8)), high_bits_to_bytes(blk.add(4)));
    (q, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
}

/// The one-token kernel and the token tile of an offset format: the same loop, N = 1 and
/// N = `TOKEN_TILE` or `HALF_TILE`. (The closures are defined inside the `target_feature`
/// functions, whose features they inherit.)
macro_rules! offset_format {
    ($block:ident, $block_bytes:expr, $one:ident, $tile:ident) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $one(w: &[u8], a: &TokenActivation<'_>) -> f32 {
            let p = w.as_ptr();
            offset_blocks_tokens(n_blocks(w, $block_bytes, a), [a], |b| $block(p, b))[0]
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $tile(w: &[u8], a: &[TokenActivation<'_>], out: &mut [f32]) {
            let p = w.as_ptr();
            let n_blocks = tile_blocks(w, $block_bytes, a);
            by_tile_size!(a, out, |tokens: [_; N]| offset_blocks_tokens::<N>(
                n_blocks,
                tokens,
                |b| $block(p, b)
            ))
        }
    };
}

offset_format!(q4_0_block, 18, q4_0, q4_0_tile);
offset_format!(q4_1_block, 20, q4_1, q4_1_tile);
offset_format!(q5_0_block, 22, q5_0, q5_0_tile);
offset_format!(q5_1_block, 24, q5_1, q5_1_tile);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    let n = n_blocks(w, 34, a);
    let p = w.as_ptr();
    let y = a.qs.as_ptr();
    let scaled_block = |b: usize| {
        let blk = p.add(b * 34);
        let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let ys = _mm256_loadu_si256(y.add(b * QK) as *const __m256i);
        // maddubs needs an unsigned operand: move the weights' signs onto the activation.
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(ys, q));
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        (sums, _mm256_set1_ps(f16_one(blk) * *a.scales.get_unchecked(b)))
    };
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut b = 0;
    while b + 1 < n {
        let (sums, scale) = scaled_block(b);
        acc0 = _mm256_fmadd_ps(sums, scale, acc0);
        let (sums, scale) = scaled_block(b + 1);
        acc1 = _mm256_fmadd_ps(sums, scale, acc1);
        b += 2;
    }
    if b < n {
        let (sums, scale) = scaled_block(b);
        acc0 = _mm256_fmadd_ps(sums, scale, acc0);
    }
    horizontal_sum(_mm256_add_ps(acc0, acc1))
}

/// Checks the slice lengths the unchecked K-quant loops rely on.
#[inline(always)]
fn n_super_blocks(w: &[u8], block_bytes: usize, a: &TokenActivation<'_>) -> usize {
    let n = w.len() / block_bytes;
    assert!(a.qs.len() >= n * QK_K && a.scales.len() >= n && a.group_sums.len() >= n * 16);
    n
}

/// Q4_K: per pair of sub-blocks one 32-byte load of nibbles, two `maddubs` against the
/// activation, and the 6-bit scales applied in i16 → i32 via `madd`. Written for N tokens like
/// Q6_K, but only the one-token form is used (a 4-token tile gained nothing measurable here).
#[inline(always)]
unsafe fn q4_k_tokens<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = a.iter().map(|a| n_super_blocks(w, 144, a)).min().unwrap_or(0);
    let low_mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut min_total = [0.0f32; N];
    for b in 0..n {
        let blk = w.as_ptr().add(b * 144);
        let d_dmin = f16_pair(blk);
        let d = _mm_cvtss_f32(d_dmin);
        let dmin = _mm_cvtss_f32(_mm_movehdup_ps(d_dmin));
        let (scales, mins) = k_scales_mins(std::slice::from_raw_parts(blk.add(4), 12));
        for t in 0..N {
            let group_sums = a[t].group_sums.as_ptr().add(b * 16);
            let mut min_sum = 0i32;
            for (sub, &m) in mins.iter().enumerate() {
                let y_sum = i32::from(*group_sums.add(2 * sub)) + i32::from(*group_sums.add(2 * sub + 1));
                min_sum += i32::from(m) * y_sum;
            }
            min_total[t] += dmin * *a[t].scales.get_unchecked(b) * min_sum as f32;
        }
        let qs = blk.add(16);
        let mut sums = [_mm256_setzero_si256(); N];
        for pair in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * pair) as *const __m256i);
            let low = _mm256_and_si256(q, low_mask);
            let high = _mm256_and_si256(_mm256_srli_epi16(q, 4), low_mask);
            let low_scale = _mm256_set1_epi16(i16::from(scales[2 * pair]));
            let high_scale = _mm256_set1_epi16(i16::from(scales[2 * pair + 1]));
            for t in 0..N {
                let y = a[t].qs.as_ptr().add(b * QK_K);
                let y_low = _mm256_loadu_si256(y.add(64 * pair) as *const __m256i);
                let y_high = _mm256_loadu_si256(y.add(64 * pair + 32) as *const __m256i);
                let low = _mm256_madd_epi16(_mm256_maddubs_epi16(low, y_low), low_scale);
                let high = _mm256_madd_epi16(_mm256_maddubs_epi16(high, y_high), high_scale);
                sums[t] = _mm256_add_epi32(sums[t], _mm256_add_epi32(low, high));
            }
        }
        for t in 0..N {
            let scale = _mm256_set1_ps(d * *a[t].scales.get_unchecked(b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), scale, acc[t]);
        }
    }
    std::array::from_fn(|t| horizontal_sum(acc[t]) - min_total[t])
}

/// Q6_K: each quarter of a half super-block is one 32-byte vector of 6-bit values (nibble
/// plus two high bits), covering two 16-element scale groups; the offset of 32 is removed
/// once per super-block from the activation's group sums. The tile form unpacks each quarter
/// once for all of its tokens.
#[inline(always)]
unsafe fn q6_k_tokens<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = a.iter().map(|a| n_super_blocks(w, 210, a)).min().unwrap_or(0);
    let low_mask = _mm256_set1_epi8(0x0F);
    let high_mask = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..n {
        let blk = w.as_ptr().add(b * 210);
        let d = f16_one(blk.add(208));
        let scales = std::slice::from_raw_parts(blk.add(192) as *const i8, 16);
        let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales.as_ptr() as *const __m128i));
        let mut sums: [__m256i; N] = std::array::from_fn(|t| {
            let group_sums = _mm256_loadu_si256(a[t].group_sums.as_ptr().add(b * 16) as *const __m256i);
            // Σ_g sc_g·32·Σy_g, subtracted from the Σ_g sc_g·Σq·y below.
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(group_sums, scales16), 5);
            _mm256_sub_epi32(_mm256_setzero_si256(), offset)
        });
        for half in 0..2 {
            let ql = blk.add(64 * half);
            let ql0 = _mm256_loadu_si256(ql as *const __m256i);
            let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            // Bits 2k..2k+2 of qh moved to bits 4..6; bits shifted in from the neighbouring
            // byte of each 16-bit lane land outside the mask.
            let quarters = [
                (_mm256_and_si256(ql0, low_mask), _mm256_slli_epi16(qh, 4)),
                (_mm256_and_si256(ql1, low_mask), _mm256_slli_epi16(qh, 2)),
                (_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low_mask), qh),
                (
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low_mask),
                    _mm256_srli_epi16(qh, 2),
                ),
            ];
            for (quarter, (low, high)) in quarters.into_iter().enumerate() {
                let q = _mm256_or_si256(low, _mm256_and_si256(high, high_mask));
                let group = 8 * half + 2 * quarter;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(scales[group + 1])),
                    _mm_set1_epi16(i16::from(scales[group])),
                );
                for t in 0..N {
                    let y = a[t].qs.as_ptr().add(b * QK_K);
                    let ys = _mm256_loadu_si256(y.add(128 * half + 32 * quarter) as *const __m256i);
                    let products = _mm256_madd_epi16(_mm256_maddubs_epi16(q, ys), scale);
                    sums[t] = _mm256_add_epi32(sums[t], products);
                }
            }
        }
        for t in 0..N {
            let scale = _mm256_set1_ps(d * *a[t].scales.get_unchecked(b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), scale, acc[t]);
        }
    }
    std::array::from_fn(|t| horizontal_sum(acc[t]))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    q4_k_tokens::<1>(w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(w: &[u8], a: &TokenActivation<'_>) -> f32 {
    q6_k_tokens::<1>(w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_tile(w: &[u8], a: &[TokenActivation<'_>], out: &mut [f32]) {
    by_tile_size!(a, out, |tokens: [_; N]| q6_k_tokens::<N>(w, tokens))
}
