use super::{block, half_float, BLOCK_LEN};
use crate::error::{CoreError, CoreResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl Codec {
    pub const ALL: [Codec; 4] = [Codec::F32, Codec::F16, Codec::Q8_0, Codec::Q4_0];

    pub fn parse(name: &str) -> CoreResult<Codec> {
        match name {
            "f32" => Ok(Codec::F32),
            "f16" => Ok(Codec::F16),
            "q8_0" => Ok(Codec::Q8_0),
            "q4_0" => Ok(Codec::Q4_0),
            other => Err(CoreError::UnknownCodec(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Q8_0 => "q8_0",
            Codec::Q4_0 => "q4_0",
        }
    }

    /// Bytes needed to encode `n` values (block codecs round up to whole blocks).
    pub fn encoded_size(self, n: usize) -> usize {
        let blocks = n.div_ceil(BLOCK_LEN);
        match self {
            Codec::F32 => 4 * n,
            Codec::F16 => 2 * n,
            Codec::Q8_0 => blocks * <block::Q8_0 as block::BlockFormat>::BLOCK_BYTES,
            Codec::Q4_0 => blocks * <block::Q4_0 as block::BlockFormat>::BLOCK_BYTES,
        }
    }

    /// Encodes `x` into `out`, which must be exactly `encoded_size(x.len())` bytes.
    pub fn encode(self, x: &[f32], out: &mut [u8]) -> CoreResult<()> {
        check_len(self.encoded_size(x.len()), out.len())?;
        match self {
            Codec::F32 => encode_f32(x, out),
            Codec::F16 => half_float::encode(x, out),
            Codec::Q8_0 => block::encode_blocks::<block::Q8_0>(x, out),
            Codec::Q4_0 => block::encode_blocks::<block::Q4_0>(x, out),
        }
    }

    /// Decodes `buf` into `out`; `buf` must be exactly `encoded_size(out.len())` bytes.
    pub fn decode(self, buf: &[u8], out: &mut [f32]) -> CoreResult<()> {
        check_len(self.encoded_size(out.len()), buf.len())?;
        match self {
            Codec::F32 => decode_f32(buf, out),
            Codec::F16 => half_float::decode(buf, out),
            Codec::Q8_0 => block::decode_blocks::<block::Q8_0>(buf, out),
            Codec::Q4_0 => block::decode_blocks::<block::Q4_0>(buf, out),
        }
    }

    pub fn encode_to_vec(self, x: &[f32]) -> CoreResult<Vec<u8>> {
        let mut out = vec![0u8; self.encoded_size(x.len())];
        self.encode(x, &mut out)?;
        Ok(out)
    }

    pub fn decode_to_vec(self, buf: &[u8], n: usize) -> CoreResult<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.decode(buf, &mut out)?;
        Ok(out)
    }
}

fn check_len(expected: usize, actual: usize) -> CoreResult<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(CoreError::BufferSize { expected, actual })
    }
}

pub(super) fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

fn encode_f32(x: &[f32], out: &mut [u8]) -> CoreResult<()> {
    if let Some(index) = first_non_finite(x) {
        return Err(CoreError::NonFiniteInput { index });
    }
    for (dst, v) in out.chunks_exact_mut(4).zip(x) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

fn decode_f32(buf: &[u8], out: &mut [f32]) -> CoreResult<()> {
    for (v, src) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *v = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
    }
    match first_non_finite(out) {
        None => Ok(()),
        Some(index) => Err(CoreError::CorruptData(format!(
            "f32 payload holds NaN or infinity at index {index}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_blocks() {
        assert_eq!(Codec::Q8_0.encoded_size(32), 34);
        assert_eq!(Codec::Q8_0.encoded_size(33), 68);
        assert_eq!(Codec::Q4_0.encoded_size(576), 18 * 18);
        assert_eq!(Codec::F16.encoded_size(3), 6);
        assert_eq!(Codec::F32.encoded_size(0), 0);
    }

    #[test]
    fn unknown_codec_is_rejected() {
        assert!(matches!(Codec::parse("q5_k"), Err(CoreError::UnknownCodec(_))));
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        for (codec, tol) in [
            (Codec::F32, 0.0),
            (Codec::F16, 2e-3),
            (Codec::Q8_0, 0.03),
            (Codec::Q4_0, 0.45),
        ] {
            let buf = codec.encode_to_vec(&x).unwrap();
            let y = codec.decode_to_vec(&buf, x.len()).unwrap();
            let worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= tol, "{codec:?}: worst error {worst}");
        }
    }

    #[test]
    fn wrong_buffer_length_is_an_error() {
        let err = Codec::Q8_0.decode_to_vec(&[0u8; 33], 32).unwrap_err();
        assert_eq!(
            err,
            CoreError::BufferSize {
                expected: 34,
                actual: 33
            }
        );
    }

    #[test]
    fn non_finite_input_is_rejected_with_its_index() {
        let mut x = vec![1.0f32; 40];
        x[35] = f32::NAN;
        for codec in Codec::ALL {
            assert_eq!(
                codec.encode_to_vec(&x).unwrap_err(),
                CoreError::NonFiniteInput { index: 35 }
            );
        }
    }
}
