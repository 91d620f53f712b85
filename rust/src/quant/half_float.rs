use crate::error::{CoreError, CoreResult};
use half::f16;

pub(super) fn encode(x: &[f32], out: &mut [u8]) -> CoreResult<()> {
    for (index, (&v, dst)) in x.iter().zip(out.chunks_exact_mut(2)).enumerate() {
        let h = f16::from_f32(v);
        if !h.is_finite() {
            return Err(if v.is_finite() {
                CoreError::OutOfRange {
                    index,
                    value: v,
                    limit: 65520.0,
                }
            } else {
                CoreError::NonFiniteInput { index }
            });
        }
        dst.copy_from_slice(&h.to_le_bytes());
    }
    Ok(())
}

pub(super) fn decode(buf: &[u8], out: &mut [f32]) -> CoreResult<()> {
    for (index, (v, src)) in out.iter_mut().zip(buf.chunks_exact(2)).enumerate() {
        let h = f16::from_le_bytes([src[0], src[1]]);
        if !h.is_finite() {
            return Err(CoreError::CorruptData(format!(
                "f16 payload holds NaN or infinity at index {index}"
            )));
        }
        *v = h.to_f32();
    }
    Ok(())
}
