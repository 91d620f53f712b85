//! Activation codecs for tensors that cross the edge/cloud boundary.
//!
//! `q8_0` and `q4_0` are GGML's block formats (32 values per block, float16 scale first) and
//! produce byte-for-byte what `gguf.quants.quantize` produces. A length that is not a multiple
//! of 32 is padded with zeros up to the next block; padding never changes a block's scale, and
//! the true length travels in the frame header, so `decode` drops it again.

mod block;
mod codec;
pub mod crc32c;
mod half_float;

pub use codec::Codec;
pub use crc32c::crc32c;

/// Values per quantization block for the block codecs.
pub const BLOCK_LEN: usize = 32;
