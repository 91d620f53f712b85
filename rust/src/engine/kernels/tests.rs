use super::activation::{ActivationKind, QuantizedActivation};
use super::*;

/// gguf-py's dequantization of random blocks; see rust/tests/make_kernel_fixtures.py.
const DEQUANT_FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/dequant.bin");

struct FixtureRecord {
    ty: GgmlType,
    raw: Vec<u8>,
    expected: Vec<f32>,
}

fn read_u32(bytes: &[u8], at: &mut usize) -> u32 {
    let v = u32::from_le_bytes(bytes[*at..*at + 4].try_into().unwrap());
    *at += 4;
    v
}

fn fixture_records() -> Vec<FixtureRecord> {
    let bytes = DEQUANT_FIXTURE;
    let mut at = 0;
    let mut records = Vec::new();
    loop {
        let id = read_u32(bytes, &mut at);
        if id == u32::MAX {
            break;
        }
        let ty = GgmlType::from_ggml_id(id).expect("fixture type id");
        let n = read_u32(bytes, &mut at) as usize;
        let n_bytes = read_u32(bytes, &mut at) as usize;
        let raw = bytes[at..at + n_bytes].to_vec();
        at += n_bytes;
        let expected = bytes[at..at + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        at += 4 * n;
        records.push(FixtureRecord { ty, raw, expected });
    }
    assert_eq!(at, bytes.len());
    records
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let records = fixture_records();
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::F32) {
        assert!(records.iter().any(|r| r.ty == ty), "no fixture for {}", ty.name());
    }
    for record in &records {
        let mut out = vec![f32::NAN; record.expected.len()];
        dequantize_row(record.ty, &record.raw, &mut out).unwrap();
        for (i, (got, want)) in out.iter().zip(&record.expected).enumerate() {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{} element {i}: got {got:e}, gguf-py {want:e}",
                record.ty.name()
            );
        }
        // The same bytes as a matrix of rows must give the same values row by row.
        let cols = record.ty.block_len().max(256);
        let rows = record.expected.len() / cols;
        let matrix = QMatrix::new(record.ty, rows, cols, &record.raw).unwrap();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            matrix.row(r, &mut row);
            assert_eq!(row, record.expected[r * cols..(r + 1) * cols]);
        }
    }
}

#[test]
fn f32_dequantizes_to_itself() {
    let values = [1.5f32, -0.0, 3.25e-39, f32::MAX];
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = [0.0f32; 4];
    dequantize_row(GgmlType::F32, &raw, &mut out).unwrap();
    assert_eq!(out.map(f32::to_bits), values.map(f32::to_bits));
}

#[test]
fn type_table_is_consistent() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_ggml_id(ty.ggml_id()), Some(ty));
    }
    assert_eq!(GgmlType::from_ggml_id(3), Some(GgmlType::Q4_1));
    assert_eq!(GgmlType::from_ggml_id(30), Some(GgmlType::BF16));
    assert_eq!(GgmlType::from_ggml_id(4), None);
    assert_eq!(GgmlType::from_ggml_id(10), None);
    assert_eq!(GgmlType::Q4_1.row_bytes(576).unwrap(), 18 * 20);
    assert_eq!(GgmlType::Q6K.row_bytes(512).unwrap(), 2 * 210);
    assert!(GgmlType::Q4_1.row_bytes(570).is_err());
    assert!(GgmlType::Q4K.row_bytes(576).is_err());
    assert!(dequantize_row(GgmlType::Q8_0, &[0; 33], &mut [0.0; 32]).is_err());
    assert!(QMatrix::new(GgmlType::Q8_0, 2, 32, &[0; 67]).is_err());
    assert!(QMatrix::new(GgmlType::Q8_0, 2, 32, &[0; 68]).is_ok());
}

/// SplitMix64, so the tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal (sum of uniforms), enough to make realistic activations.
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0
    }
}

fn put_f16(bytes: &mut [u8], at: usize, v: f32) {
    bytes[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Random but valid weights: random quant bytes with small finite scales.
fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let n = rows * cols;
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| rng.normal().to_le_bytes()).collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.normal()).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.normal()).to_le_bytes())
            .collect(),
        _ => {
            let mut bytes: Vec<u8> = (0..ty.row_bytes(cols).unwrap() * rows)
                .map(|_| rng.next_u64() as u8)
                .collect();
            for block in bytes.chunks_exact_mut(ty.block_bytes()) {
                let d = 0.01 + 0.02 * rng.uniform();
                let m = -0.1 * rng.uniform();
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put_f16(block, 0, d),
                    GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                        put_f16(block, 0, d);
                        put_f16(block, 2, -m * 0.1);
                    }
                    GgmlType::Q6K => put_f16(block, 208, d * 0.1),
                    _ => unreachable!(),
                }
            }
            bytes
        }
    }
}

fn dequantize_matrix(m: &QMatrix<'_>) -> Vec<f32> {
    let mut all = vec![0.0f32; m.rows * m.cols];
    for (r, row) in all.chunks_exact_mut(m.cols).enumerate() {
        m.row(r, row);
    }
    all
}

/// ‖got − want‖ / ‖want‖ over one token's outputs.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

/// ‖δx‖ bound for 8-bit activation blocks of `block` elements: each element is off by at most
/// half a step, amax/127/2.
fn max_activation_error_norm(x: &[f32], block: usize) -> f64 {
    x.chunks_exact(block)
        .map(|b| {
            let half_step = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64)) / 127.0 / 2.0;
            block as f64 * half_step * half_step
        })
        .sum::<f64>()
        .sqrt()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// Activation quantization to 8 bits rounds each x to within amax/254 of its block, ~0.6% RMS
/// of these Gaussian inputs; weights with a common offset (Q4_1/Q5_1/K-quant minimums) amplify
/// that relative to the output, up to ~2.5% seen here. Each element is also held to its
/// rigorous Cauchy–Schwarz bound below; layout mistakes give errors near 100%.
const QUANTIZED_ACTIVATION_TOLERANCE: f64 = 5e-2;
/// Float weights only reorder float sums.
const FLOAT_TOLERANCE: f64 = 1e-5;

#[test]
fn matmul_matches_float64_reference_for_every_type() {
    let pools = [pool(1), pool(2)];
    let mut rng = Rng(7);
    for ty in GgmlType::ALL {
        let float_weights = ty.block_len() == 1;
        let shapes: &[(usize, usize)] = if float_weights {
            &[(67, 512), (300, 37)]
        } else {
            &[(67, 512), (300, 256)]
        };
        for &(rows, cols) in shapes {
            let data = random_weights(ty, rows, cols, &mut rng);
            let matrix = QMatrix::new(ty, rows, cols, &data).unwrap();
            let dense = dequantize_matrix(&matrix);
            // 7: a half tile and three per-token calls; 12: a whole tile and a half one; 13: the
            // same and one per-token call.
            for n_tokens in [1, 7, 12, 13] {
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.normal()).collect();
                for range in [0..rows, 3..rows - 2, 5..6] {
                    for pool in &pools {
                        let mut out = vec![f32::NAN; n_tokens * range.len()];
                        matrix.matmul_rows(range.clone(), &x, n_tokens, &mut out, pool);
                        for t in 0..n_tokens {
                            let xt = &x[t * cols..(t + 1) * cols];
                            let want: Vec<f64> = range
                                .clone()
                                .map(|r| {
                                    dense[r * cols..(r + 1) * cols]
                                        .iter()
                                        .zip(xt)
                                        .map(|(&w, &x)| w as f64 * x as f64)
                                        .sum()
                                })
                                .collect();
                            let got = &out[t * range.len()..(t + 1) * range.len()];
                            let context = format!(
                                "{} {rows}×{cols} rows {range:?} T={n_tokens} token {t} threads {}",
                                ty.name(),
                                pool.current_num_threads()
                            );
                            // Cauchy–Schwarz: |Σ w·δx| ≤ ‖w‖·‖δx‖, with each |δx| at most half
                            // a quantization step of its activation block.
                            let activation_error = if float_weights {
                                0.0
                            } else {
                                max_activation_error_norm(xt, ty.block_len())
                            };
                            for (i, r) in range.clone().enumerate() {
                                let w = &dense[r * cols..(r + 1) * cols];
                                let w_norm = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                                let magnitude: f64 = w.iter().zip(xt).map(|(&w, &x)| (w as f64 * x as f64).abs()).sum();
                                let bound = w_norm * activation_error * 1.001 + 1e-5 * magnitude;
                                let err = (got[i] as f64 - want[i]).abs();
                                assert!(err <= bound, "{context} row {r}: error {err:e} > bound {bound:e}");
                            }
                            if range.len() >= 50 {
                                let err = relative_error(got, &want);
                                let tolerance = if float_weights {
                                    FLOAT_TOLERANCE
                                } else {
                                    QUANTIZED_ACTIVATION_TOLERANCE
                                };
                                assert!(err < tolerance, "{context}: relative error {err:e}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A SIMD level's kernel choice per tensor type (None: the level has no kernel for it).
type SimdSelect = fn(GgmlType) -> Option<dot::DotFn>;
/// A SIMD level's token-tile kernel per tensor type.
type SimdTileSelect = fn(GgmlType) -> Option<dot::TileDotFn>;

struct LevelUnderTest {
    name: &'static str,
    select: SimdSelect,
    select_tile: SimdTileSelect,
    /// The activation layout the level's kernels read where it is not the type's own.
    activation: fn(GgmlType) -> Option<ActivationKind>,
    /// The types the level must have a single-token kernel for; the others fall through to the
    /// next level.
    covers: &'static [GgmlType],
    /// The types the level must have a token-tile kernel for.
    tiles: &'static [GgmlType],
}

/// Every SIMD level this CPU can run. Each is tested on its own, whatever `dot::select` would
/// pick, so a faster level does not hide a slower one that other CPUs still run.
fn simd_levels() -> Vec<LevelUnderTest> {
    #[allow(unused_mut)]
    let mut levels = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx2::available() {
            levels.push(LevelUnderTest {
                name: "avx2",
                select: super::avx2::select,
                select_tile: super::avx2::select_tile,
                activation: |_| None,
                covers: &GgmlType::ALL,
                tiles: &[
                    GgmlType::Q4_0,
                    GgmlType::Q4_1,
                    GgmlType::Q5_0,
                    GgmlType::Q5_1,
                    GgmlType::Q6K,
                ],
            });
        }
        if super::avx512::available() {
            levels.push(LevelUnderTest {
                name: "avx512",
                select: super::avx512::select,
                select_tile: super::avx512::select_tile,
                activation: super::avx512::activation_kind,
                covers: &[GgmlType::Q4K, GgmlType::Q6K],
                tiles: &[
                    GgmlType::Q4_0,
                    GgmlType::Q5_0,
                    GgmlType::Q5_1,
                    GgmlType::Q8_0,
                    GgmlType::Q4K,
                    GgmlType::Q6K,
                ],
            });
        }
    }
    levels
}

/// Row lengths with an odd number of blocks and super-blocks, so pairwise loops run their tails.
fn odd_and_even_lengths(ty: GgmlType) -> [usize; 3] {
    let block = ty.block_len().max(32);
    [block, 5 * block, 8 * block]
}

/// The SIMD kernels see the same integers as the portable ones, so they may differ only by float
/// summation order. ARM64 has no SIMD level of its own yet (its portable loops are what runs), and
/// an x86 CPU without AVX2/FMA/F16C has none either: there the test says it has nothing to compare.
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "no SIMD kernels on this architecture: dot::select is the portable code"
)]
#[test]
fn simd_kernels_agree_with_portable_ones() {
    let levels = simd_levels();
    if levels.is_empty() {
        eprintln!("SKIPPED: this CPU has no SIMD level (AVX2+FMA+F16C); only portable kernels run");
        return;
    }
    for level in levels {
        eprintln!("testing SIMD level {}", level.name);
        let mut rng = Rng(11);
        for ty in GgmlType::ALL {
            let single = (level.select)(ty);
            let tile = (level.select_tile)(ty);
            assert_eq!(
                single.is_some(),
                level.covers.contains(&ty),
                "{} {}",
                level.name,
                ty.name()
            );
            assert_eq!(
                tile.is_some(),
                level.tiles.contains(&ty),
                "{} {} tile",
                level.name,
                ty.name()
            );
            // `dot::kernels` takes the layout and each kernel from the best level that has one:
            // a level that reorders a type's activation must bring both kernels that read it.
            if (level.activation)(ty).is_some() {
                assert!(
                    single.is_some() && tile.is_some(),
                    "{} reorders the {} activation without both of its kernels",
                    level.name,
                    ty.name()
                );
            }
            if single.is_none() && tile.is_none() {
                continue;
            }
            for cols in odd_and_even_lengths(ty) {
                let data = random_weights(ty, 9, cols, &mut rng);
                let matrix = QMatrix::new(ty, 9, cols, &data).unwrap();
                let n_tokens = dot::TOKEN_TILE;
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.normal()).collect();
                let mut activation = QuantizedActivation::default();
                activation.quantize(ty.activation_kind(), &x, n_tokens, cols);
                let natural: [_; dot::TOKEN_TILE] = std::array::from_fn(|t| activation.token(&x, t));
                let mut level_activation = QuantizedActivation::default();
                let level_kind = (level.activation)(ty).unwrap_or(ty.activation_kind());
                level_activation.quantize(level_kind, &x, n_tokens, cols);
                let tokens: [_; dot::TOKEN_TILE] = std::array::from_fn(|t| level_activation.token(&x, t));
                let portable = dot::portable(ty);
                let mut row = vec![0f32; cols];
                for r in 0..9 {
                    let weights = matrix.row_data(r);
                    matrix.row(r, &mut row);
                    let tiled = tile.map(|tile| {
                        let mut sums = [0.0f32; dot::TOKEN_TILE];
                        tile(weights, &tokens, &mut sums);
                        // The half tile's sums must be the whole tile's first ones.
                        let mut half = [0.0f32; dot::HALF_TILE];
                        tile(weights, &tokens[..dot::HALF_TILE], &mut half);
                        assert_eq!(half.map(f32::to_bits), std::array::from_fn(|t| sums[t].to_bits()));
                        sums
                    });
                    for (t, token) in tokens.iter().enumerate() {
                        let want = portable(weights, &natural[t]);
                        // Σ|w·x|: a different summation order moves the result by a few float32
                        // epsilons of it (2.5e-8 seen), a layout mistake by a sizeable share.
                        let magnitude: f32 = row.iter().zip(&x[t * cols..]).map(|(w, x)| (w * x).abs()).sum();
                        let close = |got: f32| (got - want).abs() <= 1e-5 * want.abs().max(1.0) + 1e-6 * magnitude;
                        let context = format!("{} {} cols {cols} row {r} token {t}", level.name, ty.name());
                        if let Some(single) = single {
                            let got = single(weights, token);
                            assert!(close(got), "{context}: simd {got} portable {want}");
                        }
                        if let Some(tiled) = tiled {
                            assert!(close(tiled[t]), "{context}: tile {} portable {want}", tiled[t]);
                            // A level's tile sums each token as its single-token kernel does, so
                            // a prompt computed in tiles equals the same tokens decoded one by one.
                            if let Some(single) = single {
                                let one = single(weights, token);
                                assert_eq!(tiled[t].to_bits(), one.to_bits(), "{context}: tile vs single");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The AMX block kernels against the tiles they replace for prompts (every type with an AMX kernel:
/// the K-quants and the 32-element formats): the same integer products, the float scales applied
/// in another order. Row groups and token blocks that do not fill 16, block counts that leave
/// partial groups, a row range not starting at 0, one and two threads; for Q4_K against both the
/// AVX-512 tile (transposed activation) and the AVX2 kernel (natural).
#[cfg_attr(not(target_arch = "x86_64"), ignore = "AMX is an x86-64 extension")]
#[test]
fn amx_blocks_agree_with_the_avx512_tiles() {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::amx::available() {
            eprintln!("SKIPPED: this CPU (or OS) has no AMX-INT8 tiles");
            return;
        }
        let mut rng = Rng(23);
        for ty in GgmlType::ALL.into_iter().filter(|&ty| super::amx::kernel(ty).is_some()) {
            // What the AVX-512 level runs for the type (its own kernels, else AVX2's).
            let tiles = dot::Kernels {
                dot: super::avx512::select(ty).or(super::avx2::select(ty)).unwrap(),
                tile: super::avx512::select_tile(ty).or(super::avx2::select_tile(ty)),
                activation: super::avx512::activation_kind(ty).unwrap_or(ty.activation_kind()),
                amx_blocks: false,
            };
            let natural = dot::Kernels {
                dot: super::avx2::select(ty).unwrap(),
                tile: None,
                activation: ty.activation_kind(),
                amx_blocks: false,
            };
            // 3 and 18 blocks of 32 leave partial groups of 8 and 4 blocks for the small formats.
            let shapes = if ty.block_len() == QK_K {
                [(16, 256), (37, 768), (160, 2048)]
            } else {
                [(16, 96), (37, 576), (160, 2048)]
            };
            for (rows, cols) in shapes {
                let data = random_weights(ty, rows, cols, &mut rng);
                let matrix = QMatrix::new(ty, rows, cols, &data).unwrap();
                for n_tokens in [8, 16, 21, 40] {
                    let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.normal()).collect();
                    for range in [0..rows, 3..rows] {
                        let n_rows = range.len();
                        for threads in [1, 2] {
                            let pool = pool(threads);
                            for reference in [tiles, natural] {
                                let amx = dot::Kernels {
                                    amx_blocks: true,
                                    ..reference
                                };
                                let mut want = vec![0f32; n_rows * n_tokens];
                                let mut got = vec![0f32; n_rows * n_tokens];
                                matrix.matmul_rows_with(reference, range.clone(), &x, n_tokens, &mut want, &pool);
                                matrix.matmul_rows_with(amx, range.clone(), &x, n_tokens, &mut got, &pool);
                                let mut row = vec![0f32; cols];
                                for (i, r) in range.clone().enumerate() {
                                    matrix.row(r, &mut row);
                                    for t in 0..n_tokens {
                                        let magnitude: f32 =
                                            row.iter().zip(&x[t * cols..]).map(|(w, x)| (w * x).abs()).sum();
                                        let (want, got) = (want[t * n_rows + i], got[t * n_rows + i]);
                                        assert!(
                                            (got - want).abs() <= 1e-5 * want.abs().max(1.0) + 1e-6 * magnitude,
                                            "{} {rows}×{cols} rows {range:?} tokens {n_tokens} threads {threads} \
                                             {:?} row {r} token {t}: amx {got} tiles {want}",
                                            ty.name(),
                                            reference.activation
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A prefill's activation is quantized over the pool block by block; every kind must come out as
/// the calling thread alone makes it, bit for bit, on enough values to be shared.
#[test]
fn activation_over_the_pool_equals_one_thread() {
    let mut rng = Rng(17);
    let (n_tokens, cols) = (40, 2048); // 81 920 values
    let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.normal()).collect();
    for kind in [
        ActivationKind::Q8Blocks,
        ActivationKind::Q8K,
        ActivationKind::Q8KTransposed,
    ] {
        let (mut one, mut two) = (QuantizedActivation::default(), QuantizedActivation::default());
        one.quantize(kind, &x, n_tokens, cols);
        two.quantize_on(Some(&pool(2)), kind, &x, n_tokens, cols);
        for t in 0..n_tokens {
            let (a, b) = (one.token(&x, t), two.token(&x, t));
            assert_eq!(a.qs, b.qs, "{kind:?} token {t}");
            assert_eq!(a.group_sums, b.group_sums, "{kind:?} token {t}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a.scales), bits(b.scales), "{kind:?} token {t}");
            assert_eq!(bits(a.scaled_sums), bits(b.scaled_sums), "{kind:?} token {t}");
            assert!(!a.scales.is_empty() && a.qs.iter().any(|&q| q != 0));
        }
    }
}

#[test]
fn activation_rounding_is_to_nearest_with_ties_to_even() {
    use super::activation::nearest_int;
    let cases = [
        (0.0, 0),
        (-0.4, 0),
        (0.6, 1),
        (2.5, 2),
        (3.5, 4),
        (-2.5, -2),
        (-3.5, -4),
        (126.6, 127),
        (-127.2, -127),
        (127.49, 127),
    ];
    for (v, want) in cases {
        assert_eq!(nearest_int(v), want, "{v}");
    }
}

#[test]
fn activation_sums_describe_the_quantized_values() {
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..512).map(|_| rng.normal()).collect();
    let mut activation = QuantizedActivation::default();
    activation.quantize(ActivationKind::Q8K, &x, 2, 256);
    let second = activation.token(&x, 1);
    assert_eq!(second.scales.len(), 1);
    let group0: i16 = second.qs[..16].iter().map(|&q| i16::from(q)).sum();
    assert_eq!(second.group_sums[0], group0);
    for (q, &v) in second.qs.iter().zip(&x[256..]) {
        assert!((f32::from(*q) * second.scales[0] - v).abs() <= second.scales[0] * 0.5001);
    }
}

#[test]
#[should_panic(expected = "out of bounds")]
fn matmul_rejects_rows_past_the_end() {
    let data = vec![0u8; 4 * 34];
    let matrix = QMatrix::new(GgmlType::Q8_0, 4, 32, &data).unwrap();
    let mut out = [0.0f32; 2];
    matrix.matmul_rows(3..5, &[0.0; 32], 1, &mut out, &pool(1));
}

/// `cargo test --release -- --ignored --nocapture kernel_benchmark`: every SIMD level this CPU runs
/// on the same matrices in one process, rounds interleaved, median of 5 (these machines are
/// noisy). One token is a decode matvec, 32 a prefill batch (the portable kernels only for one
/// token: at 32 they take minutes).
#[test]
#[ignore]
fn kernel_benchmark() {
    let mut rng = Rng(5);
    let levels = simd_levels();
    let mut names = vec!["portable".to_string()];
    names.extend(levels.iter().map(|l| l.name.to_string()));
    if let Some(first) = levels.first() {
        names.insert(1, format!("{} without tiles", first.name));
    }
    #[cfg(target_arch = "x86_64")]
    let with_amx = super::amx::available();
    #[cfg(target_arch = "x86_64")]
    if with_amx {
        names.push("amx (Q4_K/Q6_K prompts of 8+ tokens)".to_string());
    }
    println!(
        "µs per matmul, median of 5 interleaved rounds; columns {names:?}; speed-up of the last column \
         over the first and over the one before it"
    );
    // The quantized types with SIMD kernels (Q5_K has none of its own), or those named by
    // SPLITWISE_BENCH_TYPES (e.g. "Q4_K,Q6_K") when one looks at a few.
    let only = std::env::var("SPLITWISE_BENCH_TYPES").ok();
    for ty in GgmlType::ALL.into_iter().filter(|&t| match &only {
        Some(names) => names.split(',').any(|name| name.trim() == t.name()),
        None => t.block_len() > 1 && t != GgmlType::Q5K,
    }) {
        for (rows, cols) in [(576, 1536), (2048, 2048), (5632, 2048)] {
            let cols = if ty.block_len() == 256 { cols / 256 * 256 } else { cols };
            let data = random_weights(ty, rows, cols, &mut rng);
            let matrix = QMatrix::new(ty, rows, cols, &data).unwrap();
            for n_tokens in [1, 4, 32] {
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.normal()).collect();
                let mut out = vec![0.0f32; rows * n_tokens];
                for threads in [1, 2] {
                    let pool = pool(threads);
                    let mut kernels = Vec::new();
                    let portable = dot::Kernels {
                        dot: dot::portable(ty),
                        tile: None,
                        activation: ty.activation_kind(),
                        amx_blocks: false,
                    };
                    if n_tokens == 1 {
                        kernels.push(portable);
                    }
                    if let Some(first) = levels.first() {
                        kernels.push(dot::Kernels {
                            dot: (first.select)(ty).unwrap_or(portable.dot),
                            tile: None,
                            activation: (first.activation)(ty).unwrap_or(portable.activation),
                            amx_blocks: false,
                        });
                    }
                    // A level without a kernel for the type runs the levels' below it, as `dot::select` does.
                    let mut below = portable;
                    for level in &levels {
                        below = dot::Kernels {
                            dot: (level.select)(ty).unwrap_or(below.dot),
                            tile: (level.select_tile)(ty).or(below.tile),
                            activation: (level.activation)(ty).unwrap_or(below.activation),
                            amx_blocks: false,
                        };
                        kernels.push(below);
                    }
                    #[cfg(target_arch = "x86_64")]
                    if with_amx {
                        kernels.push(dot::Kernels {
                            amx_blocks: super::amx::kernel(ty).is_some(),
                            ..below
                        });
                    }
                    let iterations = (500_000_000 / (rows * cols * n_tokens)).clamp(2, 500);
                    let mut samples = vec![Vec::new(); kernels.len()];
                    // "in pool": the model's forward calls matmuls from a pool thread.
                    pool.install(|| {
                        for _round in 0..5 {
                            for (k, &kernel) in kernels.iter().enumerate() {
                                matrix.matmul_rows_with(kernel, 0..rows, &x, n_tokens, &mut out, &pool);
                                let start = std::time::Instant::now();
                                for _ in 0..iterations {
                                    matrix.matmul_rows_with(kernel, 0..rows, &x, n_tokens, &mut out, &pool);
                                }
                                samples[k].push(start.elapsed().as_secs_f64() / iterations as f64);
                            }
                        }
                    });
                    let medians: Vec<f64> = samples
                        .iter_mut()
                        .map(|s| {
                            s.sort_by(f64::total_cmp);
                            s[s.len() / 2] * 1e6
                        })
                        .collect();
                    let mut cells: Vec<String> = medians.iter().map(|m| format!("{m:9.1}")).collect();
                    let last = medians[medians.len() - 1];
                    let mut ratios = format!("{:5.2}x", medians[medians.len() - 2] / last);
                    if n_tokens == 1 {
                        ratios = format!("{:5.2}x {ratios}", medians[0] / last);
                    } else {
                        cells.insert(0, format!("{:>9}", "-"));
                        ratios = format!("{:>6} {ratios}", "-");
                    }
                    println!(
                        "{:5} {rows:5}×{cols:<5} tokens {n_tokens:2} threads {threads}: {} | {ratios}",
                        ty.name(),
                        cells.join(" "),
                    );
                }
            }
        }
    }
}

#[test]
fn simd_override_names_a_known_level_no_higher_than_the_cpu() {
    let err = SimdLevel::from_env("avx1024").unwrap_err();
    assert!(err.contains("portable, avx2, avx512"), "{err}");
    assert_eq!(SimdLevel::from_env("portable"), Ok(SimdLevel::Portable));
    assert_eq!(
        SimdLevel::from_env(SimdLevel::detected().name()),
        Ok(SimdLevel::detected())
    );
    match SimdLevel::ALL.into_iter().find(|&level| level > SimdLevel::detected()) {
        Some(above) => {
            let err = SimdLevel::from_env(above.name()).unwrap_err();
            assert!(err.contains("more than this CPU has"), "{err}");
        }
        None => eprintln!("this CPU runs the highest level; nothing above it to refuse"),
    }
}
