//! GGML's Q8_0 and Q4_0 block layouts, bit-exact with `gguf.quants` (which mirrors ggml's
//! reference quantizer): every intermediate is float32 with the same operation order.

use super::BLOCK_LEN;
use crate::error::{CoreError, CoreResult};
use half::f16;

/// Smallest block scale that float16 rounds to infinity.
const F16_OVERFLOW: f32 = 65520.0;

/// Why a block could not be encoded; positions are within the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockFault {
    NonFinite(usize),
    ScaleOverflow(usize),
}

/// Runs `body` compiled for AVX2 when the CPU has it (the loops auto-vectorise wider), else for
/// the baseline target. Results are identical: no fast-math, no FMA contraction.
macro_rules! dispatch_simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { with_avx2($body) }
            } else {
                ($body)()
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            ($body)()
        }
    }};
}

/// One GGML block format. Static dispatch with always-inlined methods, so the block code is
/// compiled inside the AVX2 variant of the loops rather than called out of it.
pub(super) trait BlockFormat {
    const BLOCK_BYTES: usize;
    /// Largest |x| this format can encode: beyond it the float16 scale overflows.
    const LIMIT: f32;
    /// Whether encoding runs the AVX2 build of its loop. Measured with bench/codecs.py: AVX2
    /// roughly doubles Q8_0 encoding but slows Q4_0 encoding and both decoders (wider
    /// byte<->float shuffles), so only Q8_0 encoding uses it.
    const ENCODE_WITH_AVX2: bool;
    fn encode(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), BlockFault>;
    fn decode(src: &[u8], out: &mut [f32; BLOCK_LEN]);
}

pub(super) struct Q8_0;
pub(super) struct Q4_0;

impl BlockFormat for Q8_0 {
    const BLOCK_BYTES: usize = 2 + BLOCK_LEN;
    const LIMIT: f32 = F16_OVERFLOW * 127.0;
    const ENCODE_WITH_AVX2: bool = true;
    #[inline(always)]
    fn encode(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), BlockFault> {
        encode_q8_0(x, out)
    }
    #[inline(always)]
    fn decode(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
        decode_q8_0(src, out)
    }
}

impl BlockFormat for Q4_0 {
    const BLOCK_BYTES: usize = 2 + BLOCK_LEN / 2;
    const LIMIT: f32 = F16_OVERFLOW * 8.0;
    const ENCODE_WITH_AVX2: bool = false;
    #[inline(always)]
    fn encode(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), BlockFault> {
        encode_q4_0(x, out)
    }
    #[inline(always)]
    fn decode(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
        decode_q4_0(src, out)
    }
}

/// Encodes whole blocks, zero-padding the last one.
pub(super) fn encode_blocks<F: BlockFormat>(x: &[f32], out: &mut [u8]) -> CoreResult<()> {
    if F::ENCODE_WITH_AVX2 {
        dispatch_simd!(|| encode_blocks_inline::<F>(x, out))
    } else {
        encode_blocks_inline::<F>(x, out)
    }
}

#[inline(always)]
fn encode_blocks_inline<F: BlockFormat>(x: &[f32], out: &mut [u8]) -> CoreResult<()> {
    let mut padded = [0f32; BLOCK_LEN];
    for (block_index, (src, dst)) in x
        .chunks(BLOCK_LEN)
        .zip(out.chunks_exact_mut(F::BLOCK_BYTES))
        .enumerate()
    {
        let base = block_index * BLOCK_LEN;
        let block: &[f32; BLOCK_LEN] = match src.try_into() {
            Ok(full) => full,
            Err(_) => {
                padded[..src.len()].copy_from_slice(src);
                &padded
            }
        };
        F::encode(block, dst).map_err(|fault| match fault {
            BlockFault::NonFinite(pos) => CoreError::NonFiniteInput { index: base + pos },
            BlockFault::ScaleOverflow(pos) => CoreError::OutOfRange {
                index: base + pos,
                value: block[pos],
                limit: F::LIMIT,
            },
        })?;
    }
    Ok(())
}

pub(super) fn decode_blocks<F: BlockFormat>(buf: &[u8], out: &mut [f32]) -> CoreResult<()> {
    decode_blocks_inline::<F>(buf, out)
}

#[inline(always)]
fn decode_blocks_inline<F: BlockFormat>(buf: &[u8], out: &mut [f32]) -> CoreResult<()> {
    let mut scratch = [0f32; BLOCK_LEN];
    for (block_index, (src, dst)) in buf
        .chunks_exact(F::BLOCK_BYTES)
        .zip(out.chunks_mut(BLOCK_LEN))
        .enumerate()
    {
        let scale = f16::from_le_bytes([src[0], src[1]]);
        if !scale.is_finite() {
            return Err(CoreError::CorruptData(format!(
                "block {block_index} has a non-finite float16 scale (0x{:04x})",
                scale.to_bits()
            )));
        }
        match <&mut [f32; BLOCK_LEN]>::try_from(&mut *dst) {
            Ok(full) => F::decode(src, full),
            Err(_) => {
                F::decode(src, &mut scratch);
                let n = dst.len();
                dst.copy_from_slice(&scratch[..n]);
            }
        }
    }
    Ok(())
}

const ABS_MASK: u32 = 0x7FFF_FFFF;
const NON_FINITE_BITS: u32 = 0x7F80_0000;

/// Bit pattern of the block's largest |x|. For finite floats the order of |x| bit patterns is
/// the order of the values, and any NaN or infinity lands at or above `NON_FINITE_BITS`, so
/// one integer max both finds the scale and screens the input.
#[inline(always)]
fn max_abs_bits(x: &[f32; BLOCK_LEN]) -> Result<u32, BlockFault> {
    let bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & ABS_MASK));
    if bits >= NON_FINITE_BITS {
        let pos = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(BlockFault::NonFinite(pos));
    }
    Ok(bits)
}

/// Rounds half away from zero, like C's `roundf`; `v` must be finite with |v| < 2^23.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    debug_assert!(v.is_finite() && v.abs() < 8_388_608.0);
    // SAFETY: callers pass products x·(1/d) with |x| <= 127·d, so |v| <= 127.5.
    let truncated: i32 = unsafe { v.to_int_unchecked() };
    let frac = v - truncated as f32;
    truncated + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

#[inline(always)]
fn write_scale(out: &mut [u8], d: f32) -> bool {
    let scale = f16::from_f32(d);
    out[..2].copy_from_slice(&scale.to_le_bytes());
    scale.is_finite()
}

#[inline(always)]
fn encode_q8_0(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), BlockFault> {
    let amax_bits = max_abs_bits(x)?;
    let d = f32::from_bits(amax_bits) / 127.0;
    if !write_scale(out, d) {
        let pos = x.iter().position(|v| v.to_bits() & ABS_MASK == amax_bits).unwrap_or(0);
        return Err(BlockFault::ScaleOverflow(pos));
    }
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let qs = &mut out[2..<Q8_0 as BlockFormat>::BLOCK_BYTES];
    if !id.is_finite() {
        // The reference casts inf/NaN products to 0; the float16 scale is 0 here anyway.
        qs.fill(0);
        return Ok(());
    }
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8 as u8;
    }
    Ok(())
}

#[inline(always)]
fn decode_q8_0(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
    let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
    for (v, &q) in out.iter_mut().zip(&src[2..<Q8_0 as BlockFormat>::BLOCK_BYTES]) {
        *v = (q as i8) as f32 * d;
    }
}

#[inline(always)]
fn encode_q4_0(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), BlockFault> {
    // ggml's scale comes from the first value of largest magnitude, keeping its sign.
    let amax_bits = max_abs_bits(x)?;
    let argmax = x.iter().position(|v| v.to_bits() & ABS_MASK == amax_bits).unwrap_or(0);
    let d = x[argmax] / -8.0;
    if !write_scale(out, d) {
        return Err(BlockFault::ScaleOverflow(argmax));
    }
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let qs = &mut out[2..<Q4_0 as BlockFormat>::BLOCK_BYTES];
    if !id.is_finite() {
        qs.fill(0);
        return Ok(());
    }
    // v·id lies in [-8, 8], so v·id + 8.5 is in [0.5, 16.5] and truncation is exact.
    let nibble = |v: f32| unsafe { (v * id + 8.5).to_int_unchecked::<i32>() }.min(15) as u8;
    let (low, high) = x.split_at(BLOCK_LEN / 2);
    for ((q, &a), &b) in qs.iter_mut().zip(low).zip(high) {
        *q = nibble(a) | (nibble(b) << 4);
    }
    Ok(())
}

#[inline(always)]
fn decode_q4_0(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
    let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
    let (low, high) = out.split_at_mut(BLOCK_LEN / 2);
    for ((&q, a), b) in src[2..<Q4_0 as BlockFormat>::BLOCK_BYTES].iter().zip(low).zip(high) {
        *a = ((q & 0x0F) as i32 - 8) as f32 * d;
        *b = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_matches_roundf() {
        for v in [
            -2.5f32,
            -1.5,
            -0.5,
            -0.49999997,
            0.0,
            0.49999997,
            0.5,
            1.5,
            2.5,
            126.5,
            -127.4,
        ] {
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
        }
    }

    #[test]
    fn q4_0_keeps_sign_of_first_largest_value() {
        let mut x = [0f32; BLOCK_LEN];
        x[3] = -2.0;
        x[7] = 2.0;
        let mut out = [0u8; <Q4_0 as BlockFormat>::BLOCK_BYTES];
        encode_q4_0(&x, &mut out).unwrap();
        // d = -2 / -8 = 0.25
        assert_eq!(f16::from_le_bytes([out[0], out[1]]).to_f32(), 0.25);
    }

    #[test]
    fn overflowing_scale_reports_the_value() {
        let mut x = [1f32; BLOCK_LEN];
        x[5] = 1e7;
        let mut out = [0u8; <Q4_0 as BlockFormat>::BLOCK_BYTES];
        assert_eq!(encode_q4_0(&x, &mut out), Err(BlockFault::ScaleOverflow(5)));
        x[9] = f32::NAN;
        assert_eq!(encode_q4_0(&x, &mut out), Err(BlockFault::NonFinite(9)));
    }
}
