//! GGML's Q8_0 and Q4_0 block layouts, bit-exact with `gguf.quants` (which mirrors ggml's
//! reference quantizer): every intermediate is float32 with the same operation order.

use super::BLOCK_LEN;
use crate::error::{CoreError, CoreResult};
use half::f16;

pub(super) const Q8_0_BLOCK_BYTES: usize = 2 + BLOCK_LEN;
pub(super) const Q4_0_BLOCK_BYTES: usize = 2 + BLOCK_LEN / 2;

/// Smallest block scale that float16 rounds to infinity.
const F16_OVERFLOW: f32 = 65520.0;

type EncodeBlock = fn(&[f32; BLOCK_LEN], &mut [u8]) -> Result<(), usize>;
type DecodeBlock = fn(&[u8], &mut [f32; BLOCK_LEN]);

/// Encodes whole blocks, zero-padding the last one. A block encoder returns `Err(i)` when the
/// scale of its block overflows float16, `i` being the offending value's position in the block.
pub(super) fn encode_blocks(
    x: &[f32],
    out: &mut [u8],
    block_bytes: usize,
    encode_block: EncodeBlock,
) -> CoreResult<()> {
    let limit = match block_bytes {
        Q8_0_BLOCK_BYTES => F16_OVERFLOW * 127.0,
        _ => F16_OVERFLOW * 8.0,
    };
    let mut padded = [0f32; BLOCK_LEN];
    for (block_index, (src, dst)) in x
        .chunks(BLOCK_LEN)
        .zip(out.chunks_exact_mut(block_bytes))
        .enumerate()
    {
        let base = block_index * BLOCK_LEN;
        if let Some(pos) = super::codec::first_non_finite(src) {
            return Err(CoreError::NonFiniteInput { index: base + pos });
        }
        let block: &[f32; BLOCK_LEN] = match src.try_into() {
            Ok(full) => full,
            Err(_) => {
                padded[..src.len()].copy_from_slice(src);
                &padded
            }
        };
        encode_block(block, dst).map_err(|pos| CoreError::OutOfRange {
            index: base + pos,
            value: block[pos],
            limit,
        })?;
    }
    Ok(())
}

pub(super) fn decode_blocks(
    buf: &[u8],
    out: &mut [f32],
    block_bytes: usize,
    decode_block: DecodeBlock,
) -> CoreResult<()> {
    let mut scratch = [0f32; BLOCK_LEN];
    for (block_index, (src, dst)) in buf
        .chunks_exact(block_bytes)
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
            Ok(full) => decode_block(src, full),
            Err(_) => {
                decode_block(src, &mut scratch);
                let n = dst.len();
                dst.copy_from_slice(&scratch[..n]);
            }
        }
    }
    Ok(())
}

/// Rounds half away from zero, like C's `roundf`, for |v| well inside i32.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    let truncated = v as i32;
    let frac = v - truncated as f32;
    truncated + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

fn write_scale(out: &mut [u8], d: f32) -> bool {
    let scale = f16::from_f32(d);
    out[..2].copy_from_slice(&scale.to_le_bytes());
    scale.is_finite()
}

pub(super) fn encode_q8_0(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), usize> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    if !write_scale(out, d) {
        return Err(x.iter().position(|v| v.abs() == amax).unwrap_or(0));
    }
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let qs = &mut out[2..Q8_0_BLOCK_BYTES];
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

pub(super) fn decode_q8_0(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
    let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
    for (v, &q) in out.iter_mut().zip(&src[2..Q8_0_BLOCK_BYTES]) {
        *v = (q as i8) as f32 * d;
    }
}

pub(super) fn encode_q4_0(x: &[f32; BLOCK_LEN], out: &mut [u8]) -> Result<(), usize> {
    // The value of largest magnitude, first one on ties, keeping its sign (ggml's argmax).
    let (mut argmax, mut amax) = (0usize, x[0].abs());
    for (i, v) in x.iter().enumerate().skip(1) {
        if v.abs() > amax {
            amax = v.abs();
            argmax = i;
        }
    }
    let d = x[argmax] / -8.0;
    if !write_scale(out, d) {
        return Err(argmax);
    }
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let qs = &mut out[2..Q4_0_BLOCK_BYTES];
    if !id.is_finite() {
        qs.fill(0);
        return Ok(());
    }
    let nibble = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    let (low, high) = x.split_at(BLOCK_LEN / 2);
    for ((q, &a), &b) in qs.iter_mut().zip(low).zip(high) {
        *q = nibble(a) | (nibble(b) << 4);
    }
    Ok(())
}

pub(super) fn decode_q4_0(src: &[u8], out: &mut [f32; BLOCK_LEN]) {
    let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
    let (low, high) = out.split_at_mut(BLOCK_LEN / 2);
    for ((&q, a), b) in src[2..Q4_0_BLOCK_BYTES].iter().zip(low).zip(high) {
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
        let mut out = [0u8; Q4_0_BLOCK_BYTES];
        encode_q4_0(&x, &mut out).unwrap();
        // d = -2 / -8 = 0.25
        assert_eq!(f16::from_le_bytes([out[0], out[1]]).to_f32(), 0.25);
    }

    #[test]
    fn overflowing_scale_reports_the_value() {
        let mut x = [1f32; BLOCK_LEN];
        x[5] = 1e7;
        let mut out = [0u8; Q4_0_BLOCK_BYTES];
        assert_eq!(encode_q4_0(&x, &mut out), Err(5));
    }
}
