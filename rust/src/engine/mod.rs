//! GGUF sub-block engine: llama-architecture models computed directly on quantized weights,
//! one attention-head set or FFN part at a time, so a plan can put any of them on either side.
//!
//! - `gguf`: memory-mapped GGUF reader (metadata, tensor table, bounds-checked tensor bytes).
//! - `kernels`: GGML tensor types, row dequantization, multithreaded quantized matmul.
//! - `files`: plain GGUF, gguf-split sets and role-shard directories behind one tensor source
//!   that maps files on demand under a memory budget (LRU); the role-shard writer.
//! - `model`: model config from metadata, RMSNorm, RoPE, per-head attention with KV cache,
//!   SwiGLU FFN parts, embedding and LM head, sessions.

pub mod files;
pub mod gguf;
pub mod kernels;
pub mod model;
