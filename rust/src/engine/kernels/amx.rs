//! AMX-INT8 tiles for prompts on Q4_K, Q6_K and the 32-element formats (Intel Sapphire Rapids and
//! later): 16 weight rows × 16 tokens per block, one `tdpbusd` per scale group (32 values: a
//! Q4_K sub-block or a block of the 32-element formats; 16 in Q6_K).
//!
//! Why: the AVX-512 tile kernel spends six port-0 instructions on every 256 values of every token
//! (four `dpbusd`, the scale `madd`, the conversion), and that port limits a prompt. A `tdpbusd`
//! does a sub-block for 16 rows × 16 tokens at once; what is left on the vector units is applying
//! each sub-block's scale and minimum, once per row and 16 tokens.
//!
//! The weights are unpacked into one A tile per scale group (16 rows × group bytes, unsigned:
//! Q4_K's nibbles 0..15, Q6_K's 6-bit values 0..63 before their offset of 32, Q8_0's bytes moved
//! to 0..255); the activation's Q8_K or Q8 block bytes are repacked once per matmul into B tiles in the layout `tdpbusd` reads (row k/4
//! holds values 4(k/4)..4(k/4)+4 of every token). The products are exact 32-bit integers, so the
//! sums differ from the AVX-512 kernels' only in the order the float scales are applied.
//!
//! The tile instructions are written in `asm!` (Rust's AMX intrinsics are unstable) and run only
//! where `available()` says the CPU has AMX-TILE and AMX-INT8 and Linux granted this process the
//! tile data state.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::activation::{ActivationKind, TokenActivation};
use super::avx2::f16_one;
use super::avx512::k_scales_mins_words;
use super::{GgmlType, QK, QK_K};

/// Rows and tokens of one block: the tile shape (16 rows of at most 64 bytes).
pub(super) const BLOCK: usize = 16;
const SUB_BLOCKS: usize = QK_K / QK;
/// Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;
/// Q6_K super-block: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales, f16 d.
const Q6K_BYTES: usize = 210;
/// Q6_K's scale groups are 16 values.
const Q6K_GROUP: usize = 16;
/// A tile of sums: 16 rows × 16 i32.
const C_TILE_BYTES: usize = BLOCK * BLOCK * 4;

/// Whether this CPU and OS run the tile kernels: CPUID leaf 7 reports AMX-TILE and AMX-INT8 and
/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)` succeeds (Linux 5.16+ refuses the tile state to a
/// process that has not asked). Asked once per process.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !super::avx512::available() {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf7 = __cpuid_count(7, 0);
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        let amx_int8 = leaf7.edx & (1 << 25) != 0;
        amx_tile && amx_int8 && request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let result: i64;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permitted XSAVE
    // features; the syscall clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    result == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// One block of up to 16 tokens of a quantized activation, repacked for `tdpbusd` with scale
/// groups of `group` values: per group g of the row the B tile; the tokens' scales (per 256
/// values for Q8_K, per 32 for Q8 blocks); per 32 values the tokens' `d·Σq` (Q4_K's minimums and
/// the 32-element formats' offsets); for Q6_K's offset of 32 (groups of 16) per group the tokens'
/// `32·Σq`. Missing tokens of a short block are zeros, so their sums are 0.
#[derive(Default)]
pub(super) struct PackedTokens {
    group: usize,
    kind: ActivationKind,
    tiles: Vec<u8>,
    scales: Vec<f32>,
    scaled_sums: Vec<f32>,
    offsets: Vec<i32>,
}

impl PackedTokens {
    /// Packs `tokens` (at most `BLOCK`, `cols` values each, quantized as `kind`: Q8K for the
    /// K-quants, Q8Blocks for the 32-element formats) for groups of
    /// `group` (32 or 16) values, into this block's buffers: they keep their capacity from one
    /// matmul to the next (a prompt's tiles are hundreds of KiB; fresh ones cost page faults and
    /// zeroing every call).
    pub fn pack(&mut self, tokens: &[TokenActivation<'_>], kind: ActivationKind, cols: usize, group: usize) {
        assert!(tokens.len() <= BLOCK && (group == QK || group == Q6K_GROUP));
        let scale_span = match kind {
            ActivationKind::Q8K => QK_K,
            ActivationKind::Q8Blocks => QK,
            other => panic!("AMX tiles read a Q8_K or Q8-block activation, not {other:?}"),
        };
        assert!(cols.is_multiple_of(scale_span));
        let n_groups = cols / group;
        let tile_bytes = group * BLOCK;
        self.group = group;
        self.kind = kind;
        // clear + resize: zeros (the padding tokens') without giving the capacity back.
        self.tiles.clear();
        self.tiles.resize(n_groups * tile_bytes, 0);
        self.scales.clear();
        self.scales.resize(cols / scale_span * BLOCK, 0.0);
        self.scaled_sums.clear();
        self.scaled_sums
            .resize(if group == QK { cols / QK * BLOCK } else { 0 }, 0.0);
        self.offsets.clear();
        self.offsets
            .resize(if group == Q6K_GROUP { n_groups * BLOCK } else { 0 }, 0);
        let (tiles, scales) = (&mut self.tiles, &mut self.scales);
        let (scaled_sums, offsets) = (&mut self.scaled_sums, &mut self.offsets);
        for (n, token) in tokens.iter().enumerate() {
            assert!(token.qs.len() >= cols && token.scales.len() >= cols / scale_span);
            for (unit, &scale) in token.scales[..cols / scale_span].iter().enumerate() {
                scales[unit * BLOCK + n] = scale;
            }
            for g in 0..n_groups {
                if group == QK {
                    scaled_sums[g * BLOCK + n] = token.scaled_sums[g];
                } else {
                    offsets[g * BLOCK + n] = 32 * i32::from(token.group_sums[g]);
                }
                let tile = &mut tiles[g * tile_bytes..][..tile_bytes];
                for k4 in 0..group / 4 {
                    let at = g * group + 4 * k4;
                    for i in 0..4 {
                        tile[k4 * BLOCK * 4 + n * 4 + i] = token.qs[at + i] as u8;
                    }
                }
            }
        }
    }
}

/// The tile configuration for scale groups of `group` values: palette 1; tmm0 and tmm6 hold
/// weights (16 rows × `group` bytes), tmm1 and tmm7 activations (`group`/4 rows × 64 bytes),
/// tmm2..tmm5 sums (16 rows × 16 i32). Two of each operand and four sums let the loads of one
/// group overlap the product of the previous one.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn for_group(group: usize) -> TileConfig {
        let mut config = [0u8; 64];
        config[0] = 1;
        let weights = (BLOCK, group);
        let activation = (group / 4, 4 * BLOCK);
        let sums = (BLOCK, 4 * BLOCK);
        let shapes = [weights, activation, sums, sums, sums, sums, weights, activation];
        for (tile, (rows, bytes_per_row)) in shapes.into_iter().enumerate() {
            config[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(bytes_per_row as u16).to_le_bytes());
            config[48 + tile] = rows as u8;
        }
        TileConfig(config)
    }
}

#[repr(C, align(64))]
struct Aligned<T>(T);

/// Groups `first..first + 4` of one token block: `weights` holds each group's A tile (16 rows ×
/// `group` bytes), `activation` each group's B tile; the four products go to `sums` (one C tile
/// each, in group order).
#[inline(always)]
unsafe fn four_groups(weights: *const u8, activation: *const u8, sums: *mut u8, group: usize) {
    let a = |k: usize| weights.add(k * BLOCK * group);
    let t = |k: usize| activation.add(k * BLOCK * group);
    asm!(
        "tilezero tmm2",
        "tilezero tmm3",
        "tilezero tmm4",
        "tilezero tmm5",
        "tileloadd tmm0, [{a0} + {a_stride}*1]",
        "tileloadd tmm1, [{t0} + {t_stride}*1]",
        "tdpbusd tmm2, tmm0, tmm1",
        "tileloadd tmm6, [{a1} + {a_stride}*1]",
        "tileloadd tmm7, [{t1} + {t_stride}*1]",
        "tdpbusd tmm3, tmm6, tmm7",
        "tileloadd tmm0, [{a2} + {a_stride}*1]",
        "tileloadd tmm1, [{t2} + {t_stride}*1]",
        "tdpbusd tmm4, tmm0, tmm1",
        "tileloadd tmm6, [{a3} + {a_stride}*1]",
        "tileloadd tmm7, [{t3} + {t_stride}*1]",
        "tdpbusd tmm5, tmm6, tmm7",
        a0 = in(reg) a(0),
        a1 = in(reg) a(1),
        a2 = in(reg) a(2),
        a3 = in(reg) a(3),
        a_stride = in(reg) group,
        t0 = in(reg) t(0),
        t1 = in(reg) t(1),
        t2 = in(reg) t(2),
        t3 = in(reg) t(3),
        t_stride = in(reg) 4 * BLOCK,
        options(nostack, readonly),
    );
    asm!(
        "tilestored [{c} + {stride}*1], tmm2",
        "tilestored [{c} + {stride}*1 + {c1}], tmm3",
        "tilestored [{c} + {stride}*1 + {c2}], tmm4",
        "tilestored [{c} + {stride}*1 + {c3}], tmm5",
        c = in(reg) sums,
        stride = in(reg) 4 * BLOCK,
        c1 = const C_TILE_BYTES,
        c2 = const 2 * C_TILE_BYTES,
        c3 = const 3 * C_TILE_BYTES,
        options(nostack),
    );
}

/// `out[k][n][r]`: row r of up to 16 rows against token n of token block k.
pub(super) type RowsKernel = fn(&[&[u8]], &[PackedTokens], &mut [[[f32; BLOCK]; BLOCK]]);

/// The block kernel for `ty` and the scale group its tokens are packed for.
pub(super) fn kernel(ty: GgmlType) -> Option<(RowsKernel, usize)> {
    match ty {
        GgmlType::Q4K => Some((q4_k_rows, QK)),
        GgmlType::Q6K => Some((q6_k_rows, Q6K_GROUP)),
        GgmlType::Q4_0 => Some((|rows, blocks, out| small_blocks_rows(Q4_0, rows, blocks, out), QK)),
        GgmlType::Q4_1 => Some((|rows, blocks, out| small_blocks_rows(Q4_1, rows, blocks, out), QK)),
        GgmlType::Q5_0 => Some((|rows, blocks, out| small_blocks_rows(Q5_0, rows, blocks, out), QK)),
        GgmlType::Q5_1 => Some((|rows, blocks, out| small_blocks_rows(Q5_1, rows, blocks, out), QK)),
        GgmlType::Q8_0 => Some((|rows, blocks, out| small_blocks_rows(Q8_0, rows, blocks, out), QK)),
        _ => None,
    }
}

/// `four_groups` for one group: its product to one C tile at `sums`.
#[inline(always)]
unsafe fn one_group(weights: *const u8, activation: *const u8, sums: *mut u8, group: usize) {
    asm!(
        "tilezero tmm2",
        "tileloadd tmm0, [{a} + {a_stride}*1]",
        "tileloadd tmm1, [{t} + {t_stride}*1]",
        "tdpbusd tmm2, tmm0, tmm1",
        "tilestored [{c} + {t_stride}*1], tmm2",
        a = in(reg) weights,
        a_stride = in(reg) group,
        t = in(reg) activation,
        t_stride = in(reg) 4 * BLOCK,
        c = in(reg) sums,
        options(nostack),
    );
}

/// The checks every kernel shares: up to 16 rows of whole `block_bytes` blocks, tokens packed
/// for `group` from a `kind` activation of the rows' width. Returns the blocks per row.
fn check(
    rows: &[&[u8]],
    block_bytes: usize,
    block_len: usize,
    blocks: &[PackedTokens],
    group: usize,
    kind: fn(ActivationKind) -> bool,
    out_blocks: usize,
) -> usize {
    assert!(available(), "AMX kernels called on a CPU without them");
    assert!(!rows.is_empty() && rows.len() <= BLOCK && out_blocks == blocks.len());
    let row_bytes = rows[0].len();
    assert!(row_bytes.is_multiple_of(block_bytes) && rows.iter().all(|r| r.len() == row_bytes));
    let n_blocks = row_bytes / block_bytes;
    for block in blocks {
        assert!(
            block.group == group && kind(block.kind),
            "tokens packed for another kernel"
        );
        assert_eq!(
            block.tiles.len(),
            n_blocks * block_len * BLOCK,
            "tokens packed for another width"
        );
    }
    n_blocks
}

/// Writes `acc[k][r]` (row r, 16 tokens of block k) to `out[k][n][r]`.
#[inline(always)]
unsafe fn store_token_major(acc: &[[__m512; BLOCK]], out: &mut [[[f32; BLOCK]; BLOCK]]) {
    for (out, acc) in out.iter_mut().zip(acc) {
        let mut by_row = [[0f32; BLOCK]; BLOCK];
        for (row, acc) in by_row.iter_mut().zip(acc) {
            _mm512_storeu_ps(row.as_mut_ptr(), *acc);
        }
        for (n, token) in out.iter_mut().enumerate() {
            for (r, value) in token.iter_mut().enumerate() {
                *value = by_row[r][n];
            }
        }
    }
}

/// `out[k][n][r]` = Q4_K row r of `rows` (each the same length, up to 16 of them) against token n
/// of token block k (token-major, as a matmul's output is). Each super-block's weights are
/// unpacked once for all the blocks.
pub(super) fn q4_k_rows(rows: &[&[u8]], blocks: &[PackedTokens], out: &mut [[[f32; BLOCK]; BLOCK]]) {
    let n_super = check(
        rows,
        Q4K_BYTES,
        QK_K,
        blocks,
        QK,
        |kind| kind == ActivationKind::Q8K,
        out.len(),
    );
    // SAFETY: AVX-512 and AMX checked; every pointer below stays inside the checked slices.
    unsafe { q4_k_rows_unchecked(rows, n_super, blocks, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q4_k_rows_unchecked(
    rows: &[&[u8]],
    n_super: usize,
    blocks: &[PackedTokens],
    out: &mut [[[f32; BLOCK]; BLOCK]],
) {
    let config = TileConfig::for_group(QK);
    // Sub-block s of the 16 rows, 32 bytes each; rows past the end stay zero.
    let mut weights = Aligned([0u8; SUB_BLOCKS * BLOCK * QK]);
    let mut sums = Aligned([0u8; SUB_BLOCKS * C_TILE_BYTES]);
    let mut acc = vec![[_mm512_setzero_ps(); BLOCK]; blocks.len()];
    let low_mask = _mm512_set1_epi8(0x0F);
    asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    for b in 0..n_super {
        let mut scales = [[0f32; SUB_BLOCKS]; BLOCK];
        let mut mins = [[0f32; SUB_BLOCKS]; BLOCK];
        let mut d = [0f32; BLOCK];
        for (r, row) in rows.iter().enumerate() {
            // 16 rows are 16 streams, more than the hardware prefetcher follows well.
            if let Some(ahead) = row.get((b + 2) * Q4K_BYTES..(b + 3) * Q4K_BYTES) {
                super::prefetch(ahead);
            }
            let block = row.as_ptr().add(b * Q4K_BYTES);
            d[r] = f16_one(block);
            let dmin = f16_one(block.add(2));
            let (scale_bytes, min_bytes) = k_scales_mins_words(block.add(4));
            for s in 0..SUB_BLOCKS {
                scales[r][s] = ((scale_bytes >> (8 * s)) & 0xFF) as f32;
                mins[r][s] = dmin * ((min_bytes >> (8 * s)) & 0xFF) as f32;
            }
            // Pair p (32 bytes): sub-block 2p in the low nibbles, 2p+1 in the high ones.
            for half in 0..2 {
                let q = _mm512_loadu_si512(block.add(16 + 64 * half) as *const __m512i);
                let low = _mm512_and_si512(q, low_mask);
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low_mask);
                for (s, value, upper) in [(0, low, false), (1, high, false), (2, low, true), (3, high, true)] {
                    let part = if upper {
                        _mm512_extracti64x4_epi64::<1>(value)
                    } else {
                        _mm512_castsi512_si256(value)
                    };
                    let at = weights.0.as_mut_ptr().add(((4 * half + s) * BLOCK + r) * QK);
                    _mm256_store_si256(at as *mut __m256i, part);
                }
            }
        }
        for (tokens, acc) in blocks.iter().zip(acc.iter_mut()) {
            let activation = tokens.tiles.as_ptr().add(b * SUB_BLOCKS * QK * BLOCK);
            for first in [0, 4] {
                four_groups(
                    weights.0.as_ptr().add(first * BLOCK * QK),
                    activation.add(first * QK * BLOCK),
                    sums.0.as_mut_ptr().add(first * C_TILE_BYTES),
                    QK,
                );
            }
            let dy = _mm512_loadu_ps(tokens.scales.as_ptr().add(b * BLOCK));
            let y_sums: [__m512; SUB_BLOCKS] =
                std::array::from_fn(|s| _mm512_loadu_ps(tokens.scaled_sums.as_ptr().add((b * SUB_BLOCKS + s) * BLOCK)));
            for r in 0..rows.len() {
                // Two chains each for the scaled products and the minimums: one chain of eight
                // dependent FMAs per row was the longest path of the block.
                let mut block_sums = [_mm512_setzero_ps(); 2];
                let mut min_sums = [_mm512_setzero_ps(); 2];
                for s in 0..SUB_BLOCKS {
                    let c = sums.0.as_ptr().add(s * C_TILE_BYTES + r * BLOCK * 4) as *const __m512i;
                    let products = _mm512_cvtepi32_ps(_mm512_load_si512(c));
                    block_sums[s % 2] = _mm512_fmadd_ps(products, _mm512_set1_ps(scales[r][s]), block_sums[s % 2]);
                    min_sums[s % 2] = _mm512_fmadd_ps(y_sums[s], _mm512_set1_ps(mins[r][s]), min_sums[s % 2]);
                }
                let dd = _mm512_mul_ps(dy, _mm512_set1_ps(d[r]));
                let block_sum = _mm512_add_ps(block_sums[0], block_sums[1]);
                let min_sum = _mm512_add_ps(min_sums[0], min_sums[1]);
                acc[r] = _mm512_sub_ps(_mm512_fmadd_ps(block_sum, dd, acc[r]), min_sum);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_token_major(&acc, out);
}

/// `q4_k_rows` for Q6_K rows: groups of 16, i8 scales, values stored with an offset of 32.
pub(super) fn q6_k_rows(rows: &[&[u8]], blocks: &[PackedTokens], out: &mut [[[f32; BLOCK]; BLOCK]]) {
    let n_super = check(
        rows,
        Q6K_BYTES,
        QK_K,
        blocks,
        Q6K_GROUP,
        |kind| kind == ActivationKind::Q8K,
        out.len(),
    );
    // SAFETY: AVX-512 and AMX checked; every pointer below stays inside the checked slices.
    unsafe { q6_k_rows_unchecked(rows, n_super, blocks, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q6_k_rows_unchecked(
    rows: &[&[u8]],
    n_super: usize,
    blocks: &[PackedTokens],
    out: &mut [[[f32; BLOCK]; BLOCK]],
) {
    const GROUPS: usize = QK_K / Q6K_GROUP;
    let config = TileConfig::for_group(Q6K_GROUP);
    // Group g of the 16 rows, 16 bytes each; rows past the end stay zero.
    let mut weights = Aligned([0u8; GROUPS * BLOCK * Q6K_GROUP]);
    let mut sums = Aligned([0u8; GROUPS * C_TILE_BYTES]);
    let mut acc = vec![[_mm512_setzero_ps(); BLOCK]; blocks.len()];
    let low_mask = _mm512_set1_epi8(0x0F);
    let high_mask = _mm512_set1_epi8(0x30);
    asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    for b in 0..n_super {
        let mut scales = [[0f32; GROUPS]; BLOCK];
        let mut d = [0f32; BLOCK];
        for (r, row) in rows.iter().enumerate() {
            if let Some(ahead) = row.get((b + 2) * Q6K_BYTES..(b + 3) * Q6K_BYTES) {
                super::prefetch(ahead);
            }
            let block = row.as_ptr().add(b * Q6K_BYTES);
            d[r] = f16_one(block.add(208));
            for (g, scale) in scales[r].iter_mut().enumerate() {
                *scale = f32::from(*(block.add(192 + g) as *const i8));
            }
            // As the AVX-512 kernel: vector 2h holds values 128h..128h+64, 2h+1 the next 64.
            for half in 0..2 {
                let low_bits = _mm512_loadu_si512(block.add(64 * half) as *const __m512i);
                let high_bits = _mm256_loadu_si256(block.add(128 + 32 * half) as *const __m256i);
                let high_bits =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(high_bits), _mm256_srli_epi16::<2>(high_bits));
                let first = _mm512_and_si512(low_bits, low_mask);
                let second = _mm512_and_si512(_mm512_srli_epi16::<4>(low_bits), low_mask);
                let values = [
                    _mm512_or_si512(first, _mm512_and_si512(_mm512_slli_epi16::<4>(high_bits), high_mask)),
                    _mm512_or_si512(second, _mm512_and_si512(high_bits, high_mask)),
                ];
                for (k, value) in values.into_iter().enumerate() {
                    // 64 values: groups 4(2h+k)..4(2h+k)+4, 16 bytes each.
                    let first_group = 4 * (2 * half + k);
                    let parts = [
                        _mm512_extracti32x4_epi32::<0>(value),
                        _mm512_extracti32x4_epi32::<1>(value),
                        _mm512_extracti32x4_epi32::<2>(value),
                        _mm512_extracti32x4_epi32::<3>(value),
                    ];
                    for (j, part) in parts.into_iter().enumerate() {
                        let at = weights.0.as_mut_ptr().add(((first_group + j) * BLOCK + r) * Q6K_GROUP);
                        _mm_store_si128(at as *mut __m128i, part);
                    }
                }
            }
        }
        for (tokens, acc) in blocks.iter().zip(acc.iter_mut()) {
            let activation = tokens.tiles.as_ptr().add(b * GROUPS * Q6K_GROUP * BLOCK);
            for first in (0..GROUPS).step_by(4) {
                four_groups(
                    weights.0.as_ptr().add(first * BLOCK * Q6K_GROUP),
                    activation.add(first * Q6K_GROUP * BLOCK),
                    sums.0.as_mut_ptr().add(first * C_TILE_BYTES),
                    Q6K_GROUP,
                );
            }
            let dy = _mm512_loadu_ps(tokens.scales.as_ptr().add(b * BLOCK));
            let offsets = tokens.offsets.as_ptr().add(b * GROUPS * BLOCK);
            for r in 0..rows.len() {
                let mut block_sums = [_mm512_setzero_ps(); 2];
                for g in 0..GROUPS {
                    let c = sums.0.as_ptr().add(g * C_TILE_BYTES + r * BLOCK * 4) as *const __m512i;
                    // Σ(q − 32)·y = Σq·y − 32·Σy, exactly, before the float scale.
                    let offset = _mm512_loadu_si512(offsets.add(g * BLOCK) as *const __m512i);
                    let products = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c), offset));
                    block_sums[g % 2] = _mm512_fmadd_ps(products, _mm512_set1_ps(scales[r][g]), block_sums[g % 2]);
                }
                let dd = _mm512_mul_ps(dy, _mm512_set1_ps(d[r]));
                acc[r] = _mm512_fmadd_ps(_mm512_add_ps(block_sums[0], block_sums[1]), dd, acc[r]);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_token_major(&acc, out);
}

/// A 32-element format: where its parts sit and how its stored values map to unsigned bytes.
/// Every weight is `d·u + m` for the unsigned value u the tile multiplies, with m the format's
/// minimum (Q4_1, Q5_1) or `-centre·d` (Q4_0: 8, Q5_0: 16, Q8_0: 128 once its signed bytes are
/// moved to 0..255).
#[derive(Clone, Copy)]
struct SmallBlocks {
    block_bytes: usize,
    qs_at: usize,
    /// Q5: the u32 of fifth bits.
    qh_at: Option<usize>,
    /// Q4_1, Q5_1: the f16 minimum.
    min_at: Option<usize>,
    centre: f32,
    /// Q8_0: 32 signed bytes instead of 16 bytes of nibbles.
    bytes: bool,
}

const Q4_0: SmallBlocks = SmallBlocks {
    block_bytes: 18,
    qs_at: 2,
    qh_at: None,
    min_at: None,
    centre: 8.0,
    bytes: false,
};
const Q4_1: SmallBlocks = SmallBlocks {
    block_bytes: 20,
    qs_at: 4,
    qh_at: None,
    min_at: Some(2),
    centre: 0.0,
    bytes: false,
};
const Q5_0: SmallBlocks = SmallBlocks {
    block_bytes: 22,
    qs_at: 6,
    qh_at: Some(2),
    min_at: None,
    centre: 16.0,
    bytes: false,
};
const Q5_1: SmallBlocks = SmallBlocks {
    block_bytes: 24,
    qs_at: 8,
    qh_at: Some(4),
    min_at: Some(2),
    centre: 0.0,
    bytes: false,
};
const Q8_0: SmallBlocks = SmallBlocks {
    block_bytes: 34,
    qs_at: 2,
    qh_at: None,
    min_at: None,
    centre: 128.0,
    bytes: true,
};

/// `q4_k_rows` for the 32-element formats (Q8 block activation): one group per block.
fn small_blocks_rows(format: SmallBlocks, rows: &[&[u8]], blocks: &[PackedTokens], out: &mut [[[f32; BLOCK]; BLOCK]]) {
    let n_blocks = check(
        rows,
        format.block_bytes,
        QK,
        blocks,
        QK,
        |kind| kind == ActivationKind::Q8Blocks,
        out.len(),
    );
    // SAFETY: AVX-512 and AMX checked; every pointer below stays inside the checked slices.
    unsafe { small_blocks_rows_unchecked(format, rows, n_blocks, blocks, out) }
}

/// Blocks taken at once: the A tiles of 8 blocks (16 rows × 32 bytes each) are unpacked, then
/// multiplied with every token block.
const SMALL_BLOCKS_AT_ONCE: usize = 8;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn small_blocks_rows_unchecked(
    format: SmallBlocks,
    rows: &[&[u8]],
    n_blocks: usize,
    blocks: &[PackedTokens],
    out: &mut [[[f32; BLOCK]; BLOCK]],
) {
    let config = TileConfig::for_group(QK);
    let mut weights = Aligned([0u8; SMALL_BLOCKS_AT_ONCE * BLOCK * QK]);
    let mut sums = Aligned([0u8; SMALL_BLOCKS_AT_ONCE * C_TILE_BYTES]);
    let mut acc = vec![[_mm512_setzero_ps(); BLOCK]; blocks.len()];
    let low_mask = _mm_set1_epi8(0x0F);
    let fifth_bit = _mm_set1_epi8(0x10);
    let sign_flip = _mm256_set1_epi8(i8::MIN);
    asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    for first in (0..n_blocks).step_by(SMALL_BLOCKS_AT_ONCE) {
        let count = SMALL_BLOCKS_AT_ONCE.min(n_blocks - first);
        let mut d = [[0f32; SMALL_BLOCKS_AT_ONCE]; BLOCK];
        let mut m = [[0f32; SMALL_BLOCKS_AT_ONCE]; BLOCK];
        for (r, row) in rows.iter().enumerate() {
            let chunk_bytes = SMALL_BLOCKS_AT_ONCE * format.block_bytes;
            let next = (first + SMALL_BLOCKS_AT_ONCE) * format.block_bytes;
            if let Some(ahead) = row.get(next..next + chunk_bytes) {
                super::prefetch(ahead);
            }
            let start = row.as_ptr().add(first * format.block_bytes);
            for j in 0..count {
                let block = start.add(j * format.block_bytes);
                let scale = f16_one(block);
                d[r][j] = scale;
                m[r][j] = match format.min_at {
                    Some(at) => f16_one(block.add(at)),
                    None => -format.centre * scale,
                };
                let at = weights.0.as_mut_ptr().add((j * BLOCK + r) * QK) as *mut __m256i;
                let values = if format.bytes {
                    _mm256_xor_si256(_mm256_loadu_si256(block.add(format.qs_at) as *const __m256i), sign_flip)
                } else {
                    let q = _mm_loadu_si128(block.add(format.qs_at) as *const __m128i);
                    let mut low = _mm_and_si128(q, low_mask);
                    let mut high = _mm_and_si128(_mm_srli_epi16::<4>(q), low_mask);
                    if let Some(qh_at) = format.qh_at {
                        let bits = (block.add(qh_at) as *const u32).read_unaligned();
                        low = _mm_or_si128(low, _mm_maskz_mov_epi8(bits as u16, fifth_bit));
                        high = _mm_or_si128(high, _mm_maskz_mov_epi8((bits >> 16) as u16, fifth_bit));
                    }
                    _mm256_set_m128i(high, low)
                };
                _mm256_store_si256(at, values);
            }
        }
        for (tokens, acc) in blocks.iter().zip(acc.iter_mut()) {
            let activation = tokens.tiles.as_ptr().add(first * QK * BLOCK);
            let mut j = 0;
            while j < count {
                let (a, t, c) = (
                    weights.0.as_ptr().add(j * BLOCK * QK),
                    activation.add(j * QK * BLOCK),
                    sums.0.as_mut_ptr().add(j * C_TILE_BYTES),
                );
                if j + 4 <= count {
                    four_groups(a, t, c, QK);
                    j += 4;
                } else {
                    one_group(a, t, c, QK);
                    j += 1;
                }
            }
            for j in 0..count {
                let dy = _mm512_loadu_ps(tokens.scales.as_ptr().add((first + j) * BLOCK));
                let y_sums = _mm512_loadu_ps(tokens.scaled_sums.as_ptr().add((first + j) * BLOCK));
                for r in 0..rows.len() {
                    let c = sums.0.as_ptr().add(j * C_TILE_BYTES + r * BLOCK * 4) as *const __m512i;
                    let products = _mm512_cvtepi32_ps(_mm512_load_si512(c));
                    let scaled = _mm512_fmadd_ps(products, _mm512_mul_ps(dy, _mm512_set1_ps(d[r][j])), acc[r]);
                    acc[r] = _mm512_fmadd_ps(y_sums, _mm512_set1_ps(m[r][j]), scaled);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    store_token_major(&acc, out);
}
