//! AMX-INT8 tiles for Q4_K prompts (Intel Sapphire Rapids and later): 16 weight rows × 16 tokens
//! per block, one `tdpbusd` per 32-value sub-block.
//!
//! Why: the AVX-512 tile kernel spends six port-0 instructions on every 256 values of every token
//! (four `dpbusd`, the scale `madd`, the conversion), and that port limits a prompt. A `tdpbusd`
//! does a sub-block for 16 rows × 16 tokens at once; what is left on the vector units is applying
//! each sub-block's scale and minimum, once per row and 16 tokens.
//!
//! The weights' nibbles are unpacked into a 16 × 32-byte A tile per sub-block (unsigned, 0..15);
//! the activation's Q8_K bytes are repacked once per matmul into B tiles in the pair-of-four
//! layout `tdpbusd` reads (row k/4 holds values 4(k/4)..4(k/4)+4 of every token). The products
//! are exact 32-bit integers, so the sums differ from the AVX-512 kernel's only in the order the
//! float scales are applied.
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
use super::{QK, QK_K};

/// Rows and tokens of one block: the tile shape (16 rows of at most 64 bytes).
pub(super) const BLOCK: usize = 16;
const SUB_BLOCKS: usize = QK_K / QK;
/// Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;
/// B tile of one sub-block: 8 rows (32 values / 4) × 16 tokens × 4 bytes.
const B_TILE_BYTES: usize = QK / 4 * BLOCK * 4;

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

/// One block of up to 16 tokens of a Q8_K activation, repacked for `tdpbusd`: per super-block b
/// and sub-block s, the B tile; per b and s the 16 tokens' `d·Σq` (for the minimums); per b the
/// tokens' scales. Missing tokens of a short block are zeros, so their sums are 0.
pub(super) struct PackedTokens {
    tiles: Vec<u8>,
    scaled_sums: Vec<f32>,
    scales: Vec<f32>,
}

impl PackedTokens {
    /// Packs `tokens` (at most `BLOCK`, `kind` Q8K or Q8KTransposed, `cols` values each).
    pub fn new(tokens: &[TokenActivation<'_>], kind: ActivationKind, cols: usize) -> PackedTokens {
        assert!(tokens.len() <= BLOCK && cols.is_multiple_of(QK_K));
        let transposed = match kind {
            ActivationKind::Q8K => false,
            ActivationKind::Q8KTransposed => true,
            other => panic!("AMX tiles read a Q8_K activation, not {other:?}"),
        };
        let n_super = cols / QK_K;
        let mut tiles = vec![0u8; n_super * SUB_BLOCKS * B_TILE_BYTES];
        let mut scaled_sums = vec![0f32; n_super * SUB_BLOCKS * BLOCK];
        let mut scales = vec![0f32; n_super * BLOCK];
        for (n, token) in tokens.iter().enumerate() {
            assert!(token.qs.len() >= cols && token.scales.len() >= n_super && token.scaled_sums.len() >= cols / QK);
            for b in 0..n_super {
                scales[b * BLOCK + n] = token.scales[b];
                let qs = &token.qs[b * QK_K..(b + 1) * QK_K];
                for s in 0..SUB_BLOCKS {
                    scaled_sums[(b * SUB_BLOCKS + s) * BLOCK + n] = token.scaled_sums[b * SUB_BLOCKS + s];
                    let tile = &mut tiles[(b * SUB_BLOCKS + s) * B_TILE_BYTES..][..B_TILE_BYTES];
                    for k4 in 0..QK / 4 {
                        // Values 4·k4..4·k4+4 of sub-block s; in the transposed layout value
                        // 32s + 8c + j sits at 64c + 8s + j (activation.rs).
                        let at = if transposed {
                            64 * (k4 / 2) + 8 * s + 4 * (k4 % 2)
                        } else {
                            QK * s + 4 * k4
                        };
                        for i in 0..4 {
                            tile[k4 * BLOCK * 4 + n * 4 + i] = qs[at + i] as u8;
                        }
                    }
                }
            }
        }
        PackedTokens {
            tiles,
            scaled_sums,
            scales,
        }
    }
}

/// The tile configuration: palette 1; tmm0 and tmm6 hold weights (16 rows × 32 bytes), tmm1 and
/// tmm7 activations (8 rows × 64 bytes), tmm2..tmm5 sums (16 rows × 16 i32). Two of each operand
/// and four sums let the loads of one sub-block overlap the product of the previous one.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn q4_k() -> TileConfig {
        let mut config = [0u8; 64];
        config[0] = 1;
        let weights = (BLOCK, QK);
        let activation = (QK / 4, 4 * BLOCK);
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

/// `out[k][n][r]` = row r of `rows` (each the same length, up to 16 of them) against token n of
/// token block k (token-major, as a matmul's output is). Each super-block's weights are unpacked once for all the blocks.
pub(super) fn q4_k_rows(rows: &[&[u8]], blocks: &[PackedTokens], out: &mut [[[f32; BLOCK]; BLOCK]]) {
    assert!(available(), "AMX kernels called on a CPU without them");
    assert!(!rows.is_empty() && rows.len() <= BLOCK && out.len() == blocks.len());
    let row_bytes = rows[0].len();
    assert!(row_bytes.is_multiple_of(Q4K_BYTES) && rows.iter().all(|r| r.len() == row_bytes));
    let n_super = row_bytes / Q4K_BYTES;
    for block in blocks {
        assert_eq!(block.scales.len(), n_super * BLOCK, "tokens packed for another width");
    }
    // SAFETY: AVX-512 and AMX checked above; every pointer below stays inside the checked slices.
    unsafe { q4_k_rows_unchecked(rows, n_super, blocks, out) }
}

/// Four sub-blocks `first..first + 4` of one token block: products into tmm2..tmm5, stored to
/// `sums` (16 × 16 i32 each, in sub-block order).
#[inline(always)]
unsafe fn four_sub_blocks(weights: *const u8, activation: *const u8, sums: *mut u8) {
    const A: usize = BLOCK * QK;
    const C: usize = BLOCK * BLOCK * 4;
    asm!(
        "tilezero tmm2",
        "tilezero tmm3",
        "tilezero tmm4",
        "tilezero tmm5",
        "tileloadd tmm0, [{a} + {a_stride}*1]",
        "tileloadd tmm1, [{t} + {t_stride}*1]",
        "tdpbusd tmm2, tmm0, tmm1",
        "tileloadd tmm6, [{a} + {a_stride}*1 + {a1}]",
        "tileloadd tmm7, [{t} + {t_stride}*1 + {t1}]",
        "tdpbusd tmm3, tmm6, tmm7",
        "tileloadd tmm0, [{a} + {a_stride}*1 + {a2}]",
        "tileloadd tmm1, [{t} + {t_stride}*1 + {t2}]",
        "tdpbusd tmm4, tmm0, tmm1",
        "tileloadd tmm6, [{a} + {a_stride}*1 + {a3}]",
        "tileloadd tmm7, [{t} + {t_stride}*1 + {t3}]",
        "tdpbusd tmm5, tmm6, tmm7",
        "tilestored [{c} + {c_stride}*1], tmm2",
        "tilestored [{c} + {c_stride}*1 + {c1}], tmm3",
        "tilestored [{c} + {c_stride}*1 + {c2}], tmm4",
        "tilestored [{c} + {c_stride}*1 + {c3}], tmm5",
        a = in(reg) weights,
        a_stride = in(reg) QK,
        a1 = const A,
        a2 = const 2 * A,
        a3 = const 3 * A,
        t = in(reg) activation,
        t_stride = in(reg) 4 * BLOCK,
        t1 = const B_TILE_BYTES,
        t2 = const 2 * B_TILE_BYTES,
        t3 = const 3 * B_TILE_BYTES,
        c = in(reg) sums,
        c_stride = in(reg) 4 * BLOCK,
        c1 = const C,
        c2 = const 2 * C,
        c3 = const 3 * C,
        options(nostack),
    );
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q4_k_rows_unchecked(
    rows: &[&[u8]],
    n_super: usize,
    blocks: &[PackedTokens],
    out: &mut [[[f32; BLOCK]; BLOCK]],
) {
    let config = TileConfig::q4_k();
    // Sub-block s of the 16 rows, 32 bytes each; rows past the end stay zero.
    let mut weights = Aligned([0u8; SUB_BLOCKS * BLOCK * QK]);
    let mut sums = Aligned([0u8; SUB_BLOCKS * BLOCK * BLOCK * 4]);
    let mut acc = vec![[_mm512_setzero_ps(); BLOCK]; blocks.len()];
    let low_mask = _mm512_set1_epi8(0x0F);
    asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    for b in 0..n_super {
        let mut scales = [[0f32; SUB_BLOCKS]; BLOCK];
        let mut mins = [[0f32; SUB_BLOCKS]; BLOCK];
        let mut d = [0f32; BLOCK];
        for (r, row) in rows.iter().enumerate() {
            let block = row.as_ptr().add(b * Q4K_BYTES);
            if b + 2 < n_super {
                // 16 rows are 16 streams, more than the hardware prefetcher follows well.
                for line in (0..Q4K_BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(block.add(2 * Q4K_BYTES + line) as *const i8);
                }
            }
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
            let activation = tokens.tiles.as_ptr().add(b * SUB_BLOCKS * B_TILE_BYTES);
            for first in [0, 4] {
                four_sub_blocks(
                    weights.0.as_ptr().add(first * BLOCK * QK),
                    activation.add(first * B_TILE_BYTES),
                    sums.0.as_mut_ptr().add(first * BLOCK * BLOCK * 4),
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
                    let c = sums.0.as_ptr().add((s * BLOCK + r) * BLOCK * 4) as *const __m512i;
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
    for (out, acc) in out.iter_mut().zip(&acc) {
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
