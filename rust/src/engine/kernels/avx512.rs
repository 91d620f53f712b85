//! x86_64 kernels for CPUs with AVX-512 (F, BW, VL) and VNNI, chosen at run time ahead of AVX2
//! where they measured faster (see `select` and `select_tile`); AVX2's serve the rest.
//!
//! The K-quants (the types of the Q4_K_M files people download) are rewritten for 512-bit
//! vectors, where the multiplies (`dpbusd`, `madd`, all on one port) are what limits a tile.
//! Q4_K reads a transposed activation (`ActivationKind::Q8KTransposed`) so that each i32 lane
//! stays within one sub-block: a super-block costs four `dpbusd` and one `madd` for its scales
//! per token. Q6_K unpacks a super-block into four vectors of 64 values whose activation bytes
//! lie contiguously; each vector's `dpbusd` sums are scaled per 16 values by a `dpwssd` (scales
//! broadcast per lane by one permute). The token-tile forms unpack a row's weights once for
//! `TOKEN_TILE` tokens (prefill). The 32-element formats take two blocks per vector and VNNI's
//! `dpbusd` (unsigned × signed bytes summed into i32 in one instruction); Q5's fifth bits are a
//! byte mask.

use std::arch::x86_64::*;

use super::activation::{ActivationKind, TokenActivation};
use super::avx2::{f16_one, horizontal_sum};
use super::dot::{by_tile_size, DotFn, TileDotFn};
use super::{GgmlType, QK, QK_K};

/// The CPU features every kernel here is compiled for.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && super::avx2::available()
}

/// The activation layout a kernel here reads where it is not `ty.activation_kind()`: Q4_K's
/// transposed super-blocks (see `q4_k`).
pub(super) fn activation_kind(ty: GgmlType) -> Option<ActivationKind> {
    (available() && ty == GgmlType::Q4K).then_some(ActivationKind::Q8KTransposed)
}

/// Single-token (decode) kernels: only the K-quants, where the wider unpacking measured 1.2-1.9×
/// AVX2's; for one token the 32-element formats gained nothing (0.8-1.1×, Q4_1 0.4-0.8×), so
/// AVX2's serve them (`cargo test --release -- --ignored --nocapture kernel_benchmark`).
pub(super) fn select(ty: GgmlType) -> Option<DotFn> {
    if !available() {
        return None;
    }
    // SAFETY (every wrapper below): reached only when `available()` holds.
    let dot: DotFn = match ty {
        GgmlType::Q4K => |w, a| unsafe { q4_k_one(w, a) },
        GgmlType::Q6K => |w, a| unsafe { q6_k_one(w, a) },
        _ => return None,
    };
    Some(dot)
}

/// Token-tile (prefill) kernels: 1.2-2.8× AVX2's per-token ones in the same benchmark, except
/// Q4_1, whose AVX2 kernel the tile beat only at some shapes (0.8-1.35×).
pub(super) fn select_tile(ty: GgmlType) -> Option<TileDotFn> {
    if !available() {
        return None;
    }
    // SAFETY: as in `select`.
    let dot: TileDotFn = match ty {
        GgmlType::Q4_0 => |w, a, out| unsafe { q4_0_tile(w, a, out) },
        GgmlType::Q5_0 => |w, a, out| unsafe { q5_0_tile(w, a, out) },
        GgmlType::Q5_1 => |w, a, out| unsafe { q5_1_tile(w, a, out) },
        GgmlType::Q8_0 => |w, a, out| unsafe { q8_0_tile(w, a, out) },
        GgmlType::Q4K => |w, a, out| unsafe { q4_k_tile(w, a, out) },
        GgmlType::Q6K => |w, a, out| unsafe { q6_k_tile(w, a, out) },
        _ => return None,
    };
    Some(dot)
}

macro_rules! one {
    ($kernel:ident, $one:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $one(w: &[u8], a: &TokenActivation<'_>) -> f32 {
            $kernel::<1>(w, [a])[0]
        }
    };
}

macro_rules! tile {
    ($kernel:ident, $tile:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $tile(w: &[u8], a: &[TokenActivation<'_>], out: &mut [f32]) {
            by_tile_size!(a, out, |tokens: [_; N]| $kernel::<N>(w, tokens))
        }
    };
}

one!(q4_k, q4_k_one);
one!(q6_k, q6_k_one);
tile!(q4_k, q4_k_tile);
tile!(q6_k, q6_k_tile);
tile!(q8_0, q8_0_tile);
tile!(q4_0, q4_0_tile);
tile!(q5_0, q5_0_tile);
tile!(q5_1, q5_1_tile);

#[inline(always)]
unsafe fn load_512(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

/// Two 256-bit halves from two addresses.
#[inline(always)]
unsafe fn load_two_256(low: *const u8, high: *const u8) -> __m512i {
    let low = _mm512_castsi256_si512(_mm256_loadu_si256(low as *const __m256i));
    _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(high as *const __m256i))
}

/// For each of 32 i16 lanes, which entry of an i16 table it takes. The K-quant kernels sum
/// weight-activation products into i32 lanes (`dpbusd`) and then multiply every i32 lane by its
/// group's scale with `madd` or `dpwssd`, which read the lane as two i16 halves: the tables put
/// the scale under the low half and a zero (entry `ZERO`) under the high half, whose bits are
/// only the sign extension of a sum that fits in 16 bits.
#[repr(align(64))]
struct LaneTable([i16; 32]);

/// A table entry that is always zero: the scales fill at most the first 16 of 32 i16 entries.
const ZERO: i16 = 31;

impl LaneTable {
    /// i32 lane j of a 64-value vector belongs to group `first + j / lanes_per_group`.
    const fn groups(first: i16, lanes_per_group: usize) -> LaneTable {
        let mut lanes = [ZERO; 32];
        let mut j = 0;
        while j < 16 {
            lanes[2 * j] = first + (j / lanes_per_group) as i16;
            j += 1;
        }
        LaneTable(lanes)
    }

    #[inline(always)]
    unsafe fn load(&self) -> __m512i {
        _mm512_load_si512(self.0.as_ptr() as *const __m512i)
    }
}

/// Q4_K with a transposed activation: i32 lanes 2s and 2s+1 of every vector belong to
/// sub-block s.
static Q4K_SCALE_LANES: LaneTable = LaneTable::groups(0, 2);

/// Q6_K: vector k holds the 16-element groups 4k..4k+4 (4 i32 lanes each).
static Q6K_SCALE_LANES: [LaneTable; 4] = [
    LaneTable::groups(0, 4),
    LaneTable::groups(4, 4),
    LaneTable::groups(8, 4),
    LaneTable::groups(12, 4),
];

/// Σ weights·activation of 64 values, each group of them multiplied by its scale: `dpbusd` sums
/// 4 products per i32 lane (at most 4·63·127, so it fits in 16 bits) and `dpwssd` adds lane ×
/// scale to `acc`.
#[inline(always)]
unsafe fn scaled_dot_64(acc: __m512i, weights: __m512i, y: *const u8, scale_lanes: __m512i) -> __m512i {
    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, load_512(y));
    _mm512_dpwssd_epi32(acc, sums, scale_lanes)
}

/// Q4_K's twelve packed bytes as eight 6-bit scales and eight 6-bit minimums, one per byte,
/// unpacked four at a time in 32-bit words (the same layout `dequant::k_scales_mins` reads).
#[inline(always)]
pub(super) unsafe fn k_scales_mins_words(p: *const u8) -> (u64, u64) {
    let word = |i: usize| (p.add(4 * i) as *const u32).read_unaligned();
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let low6 = 0x3F3F_3F3F;
    let low4 = 0x0F0F_0F0F;
    let top2 = 0x0303_0303;
    let scales_low = w0 & low6;
    let scales_high = (w2 & low4) | (((w0 >> 6) & top2) << 4);
    let mins_low = w1 & low6;
    let mins_high = ((w2 >> 4) & low4) | (((w1 >> 6) & top2) << 4);
    (
        u64::from(scales_low) | (u64::from(scales_high) << 32),
        u64::from(mins_low) | (u64::from(mins_high) << 32),
    )
}

/// Checks the slice lengths the unchecked K-quant loops rely on.
#[inline(always)]
fn n_super_blocks<const N: usize>(w: &[u8], block_bytes: usize, a: &[&TokenActivation<'_>; N]) -> usize {
    let n = w.len() / block_bytes;
    for a in a {
        assert!(
            a.qs.len() >= n * QK_K
                && a.scales.len() >= n
                && a.group_sums.len() >= n * 16
                && a.scaled_sums.len() >= n * 8
        );
    }
    n
}

/// Checks the slice lengths the unchecked 32-element loops rely on.
#[inline(always)]
fn n_blocks<const N: usize>(w: &[u8], block_bytes: usize, a: &[&TokenActivation<'_>; N]) -> usize {
    let n = w.len() / block_bytes;
    for a in a {
        assert!(a.qs.len() >= n * QK && a.scales.len() >= n && a.scaled_sums.len() >= n);
    }
    n
}

/// Q4_K against a `Q8KTransposed` activation. The 128 bytes of nibbles hold the sub-blocks in
/// pairs (32 bytes: sub-block 2p in the low nibbles, 2p+1 in the high ones); they are regrouped so
/// that vector c holds values 8c..8c+8 of every sub-block, qword s from sub-block s, as the
/// activation does. Then one i32 lane only ever sums one sub-block: four `dpbusd` accumulate the
/// whole super-block (16 products of at most 15·127 per lane, within 16 bits) and one `madd`
/// applies the eight scales, where a vector per sub-block pair would need a `madd` each.
#[inline(always)]
unsafe fn q4_k<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = n_super_blocks(w, 144, &a);
    let low_mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut min_acc = [_mm256_setzero_ps(); N];
    for b in 0..n {
        let blk = w.as_ptr().add(b * 144);
        let d = _mm512_set1_ps(f16_one(blk));
        let dmin = f16_one(blk.add(2));
        let (scales, mins) = k_scales_mins_words(blk.add(4));
        let scales16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
        let scale_lanes = _mm512_permutexvar_epi16(Q4K_SCALE_LANES.load(), scales16);
        let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mins as i64)));
        let mins = _mm256_mul_ps(mins, _mm256_set1_ps(dmin));
        // Half h's 64 bytes: low nibbles = [sub-block 4h | 4h+2], high = [4h+1 | 4h+3], each
        // 4 qwords (chunks 0..4). Interleave the qwords of the low and high nibbles, then pick
        // the 128-bit lanes that hold one chunk of each sub-block.
        let mut pairs = [_mm512_setzero_si512(); 4];
        for half in 0..2 {
            let q = load_512(blk.add(16 + 64 * half));
            let low = _mm512_and_si512(q, low_mask);
            let high = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low_mask);
            // Even chunks: [s0.c0 s1.c0 | s0.c2 s1.c2 | s2.c0 s3.c0 | s2.c2 s3.c2]; odd likewise.
            pairs[half] = _mm512_unpacklo_epi64(low, high);
            pairs[2 + half] = _mm512_unpackhi_epi64(low, high);
        }
        let weights = [
            _mm512_shuffle_i64x2::<0b10_00_10_00>(pairs[0], pairs[1]),
            _mm512_shuffle_i64x2::<0b10_00_10_00>(pairs[2], pairs[3]),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(pairs[0], pairs[1]),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(pairs[2], pairs[3]),
        ];
        for t in 0..N {
            let y = a[t].qs.as_ptr().add(b * QK_K) as *const u8;
            let mut sums = _mm512_setzero_si512();
            for (c, &weights) in weights.iter().enumerate() {
                sums = _mm512_dpbusd_epi32(sums, weights, load_512(y.add(64 * c)));
            }
            let sums = _mm512_madd_epi16(sums, scale_lanes);
            let dy = _mm512_mul_ps(d, _mm512_set1_ps(*a[t].scales.get_unchecked(b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), dy, acc[t]);
            // The minimums: Σ_sub dmin·min · (dy·Σq), the second factor from the activation.
            let y_sums = _mm256_loadu_ps(a[t].scaled_sums.as_ptr().add(b * 8));
            min_acc[t] = _mm256_fmadd_ps(mins, y_sums, min_acc[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) - horizontal_sum(min_acc[t]))
}

#[inline(always)]
unsafe fn q6_k<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = n_super_blocks(w, 210, &a);
    let low_mask = _mm512_set1_epi8(0x0F);
    let high_mask = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..n {
        let blk = w.as_ptr().add(b * 210);
        let d = _mm512_set1_ps(f16_one(blk.add(208)));
        let scales16_256 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
        let scales16 = _mm512_zextsi256_si512(scales16_256);
        // Half h's 64 bytes of low nibbles are [quarters 0,1 | quarters 2,3 in the high nibbles];
        // its 32 bytes of high bits carry quarter q in bits 2q..2q+2. Vector 2h holds quarters
        // 0 and 1 of the half, vector 2h+1 quarters 2 and 3: values 128h..128h+64, 128h+64..+128.
        let mut weights = [_mm512_setzero_si512(); 4];
        let mut scale_lanes = [_mm512_setzero_si512(); 4];
        for half in 0..2 {
            let low_bits = load_512(blk.add(64 * half));
            let high_bits = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            let high_bits =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(high_bits), _mm256_srli_epi16::<2>(high_bits));
            let first = _mm512_and_si512(low_bits, low_mask);
            let second = _mm512_and_si512(_mm512_srli_epi16::<4>(low_bits), low_mask);
            weights[2 * half] = _mm512_or_si512(first, _mm512_and_si512(_mm512_slli_epi16::<4>(high_bits), high_mask));
            weights[2 * half + 1] = _mm512_or_si512(second, _mm512_and_si512(high_bits, high_mask));
        }
        for (k, lanes) in Q6K_SCALE_LANES.iter().enumerate() {
            scale_lanes[k] = _mm512_permutexvar_epi16(lanes.load(), scales16);
        }
        for t in 0..N {
            let y = a[t].qs.as_ptr().add(b * QK_K) as *const u8;
            let group_sums = _mm256_loadu_si256(a[t].group_sums.as_ptr().add(b * 16) as *const __m256i);
            // The values are stored with an offset of 32: Σ_g sc_g·(Σq·y − 32·Σy_g).
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(group_sums, scales16_256));
            let mut sums = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(offset));
            for k in 0..4 {
                sums = scaled_dot_64(sums, weights[k], y.add(64 * k), scale_lanes[k]);
            }
            let dy = _mm512_mul_ps(d, _mm512_set1_ps(*a[t].scales.get_unchecked(b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), dy, acc[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]))
}

/// Scales of two consecutive blocks, one per 256-bit half.
#[inline(always)]
unsafe fn two_scales(first: f32, second: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(first), _mm512_set1_ps(second))
}

/// Q8_0, two blocks per vector. `dpbusd` needs one unsigned operand: the weights' magnitudes,
/// with their signs moved onto the activation.
#[inline(always)]
unsafe fn q8_0<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = n_blocks(w, 34, &a);
    let p = w.as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut tail = [0.0f32; N];
    let mut b = 0;
    while b + 1 < n {
        let (first, second) = (p.add(b * 34), p.add((b + 1) * 34));
        let q = load_two_256(first.add(2), second.add(2));
        let negative = _mm512_movepi8_mask(q);
        let magnitude = _mm512_abs_epi8(q);
        let (d0, d1) = (f16_one(first), f16_one(second));
        for t in 0..N {
            let y = load_512(a[t].qs.as_ptr().add(b * QK) as *const u8);
            let signed_y = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
            let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed_y);
            let scales = a[t].scales.as_ptr().add(b);
            let scale = two_scales(d0 * *scales, d1 * *scales.add(1));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[t]);
        }
        b += 2;
    }
    if b < n {
        let blk = p.add(b * 34);
        let d = f16_one(blk);
        for t in 0..N {
            let y = a[t].qs.as_ptr().add(b * QK);
            let sum: i32 = (0..QK)
                .map(|i| i32::from(*(blk.add(2 + i) as *const i8)) * i32::from(*y.add(i)))
                .sum();
            tail[t] = d * *a[t].scales.get_unchecked(b) * sum as f32;
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) + tail[t])
}

/// Where a 32-element nibble format keeps its parts; the offset formats' values are unsigned.
#[derive(Clone, Copy)]
struct NibbleLayout {
    block_bytes: usize,
    /// The 16 bytes of nibbles: elements 0..16 in the low nibbles, 16..32 in the high ones.
    qs_at: usize,
    /// Q5: a little-endian u32 whose bit j is element j's fifth bit.
    qh_at: Option<usize>,
    /// Q5_1: the f16 minimum m (x = d·q + m); the others centre q by subtracting `centre`.
    min_at: Option<usize>,
    centre: f32,
}

const Q4_0: NibbleLayout = NibbleLayout {
    block_bytes: 18,
    qs_at: 2,
    qh_at: None,
    min_at: None,
    centre: 8.0,
};
const Q5_0: NibbleLayout = NibbleLayout {
    block_bytes: 22,
    qs_at: 6,
    qh_at: Some(2),
    min_at: None,
    centre: 16.0,
};
const Q5_1: NibbleLayout = NibbleLayout {
    block_bytes: 24,
    qs_at: 8,
    qh_at: Some(4),
    min_at: Some(2),
    centre: 0.0,
};

impl NibbleLayout {
    /// The block's scale d and offset m (x = d·q + m).
    #[inline(always)]
    unsafe fn scale_and_offset(self, blk: *const u8) -> (f32, f32) {
        let d = f16_one(blk);
        match self.min_at {
            Some(at) => (d, f16_one(blk.add(at))),
            None => (d, -self.centre * d),
        }
    }

    #[inline(always)]
    unsafe fn fifth_bits(self, blk: *const u8) -> u64 {
        match self.qh_at {
            Some(at) => u64::from((blk.add(at) as *const u32).read_unaligned()),
            None => 0,
        }
    }
}

/// The 32-element nibble formats, two blocks per vector: each block's 16 bytes become its 32
/// unsigned values (low nibbles first) plus the fifth bit where there is one (a byte mask, one
/// bit per element); the offsets are added through the activation's block sums.
#[inline(always)]
unsafe fn nibble_blocks<const N: usize>(layout: NibbleLayout, w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    let n = n_blocks(w, layout.block_bytes, &a);
    let p = w.as_ptr();
    let low_mask = _mm512_set1_epi8(0x0F);
    let fifth_bit = _mm512_set1_epi8(0x10);
    // Every 128-bit lane holds one block's 16 bytes; odd lanes take their high nibbles.
    let shifts = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut offsets = [0.0f32; N];
    let mut b = 0;
    while b + 1 < n {
        let (first, second) = (p.add(b * layout.block_bytes), p.add((b + 1) * layout.block_bytes));
        let packed = _mm512_inserti32x4::<2>(
            _mm512_castsi128_si512(_mm_loadu_si128(first.add(layout.qs_at) as *const __m128i)),
            _mm_loadu_si128(second.add(layout.qs_at) as *const __m128i),
        );
        // Lanes [first, first, second, second], then the high nibbles into lanes 1 and 3.
        let spread = _mm512_shuffle_i64x2::<0b10_10_00_00>(packed, packed);
        let mut q = _mm512_and_si512(_mm512_srlv_epi64(spread, shifts), low_mask);
        if layout.qh_at.is_some() {
            let bits = layout.fifth_bits(first) | (layout.fifth_bits(second) << 32);
            q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(bits, fifth_bit));
        }
        let (d0, m0) = layout.scale_and_offset(first);
        let (d1, m1) = layout.scale_and_offset(second);
        for t in 0..N {
            let y = load_512(a[t].qs.as_ptr().add(b * QK) as *const u8);
            let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, y);
            let scales = a[t].scales.as_ptr().add(b);
            let scale = two_scales(d0 * *scales, d1 * *scales.add(1));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[t]);
            let scaled_sums = a[t].scaled_sums.as_ptr().add(b);
            offsets[t] += m0 * *scaled_sums + m1 * *scaled_sums.add(1);
        }
        b += 2;
    }
    if b < n {
        let blk = p.add(b * layout.block_bytes);
        let (d, m) = layout.scale_and_offset(blk);
        let bits = layout.fifth_bits(blk);
        for t in 0..N {
            let y = a[t].qs.as_ptr().add(b * QK);
            let mut sum = 0i32;
            for i in 0..16 {
                let byte = *blk.add(layout.qs_at + i);
                let low = i32::from(byte & 0x0F) | (((bits >> i) & 1) << 4) as i32;
                let high = i32::from(byte >> 4) | (((bits >> (16 + i)) & 1) << 4) as i32;
                sum += low * i32::from(*y.add(i)) + high * i32::from(*y.add(16 + i));
            }
            offsets[t] += d * *a[t].scales.get_unchecked(b) * sum as f32 + m * *a[t].scaled_sums.get_unchecked(b);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) + offsets[t])
}

#[inline(always)]
unsafe fn q4_0<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    nibble_blocks(Q4_0, w, a)
}

#[inline(always)]
unsafe fn q5_0<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    nibble_blocks(Q5_0, w, a)
}

#[inline(always)]
unsafe fn q5_1<const N: usize>(w: &[u8], a: [&TokenActivation<'_>; N]) -> [f32; N] {
    nibble_blocks(Q5_1, w, a)
}
