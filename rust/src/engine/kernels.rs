//! GGML tensor types, dequantization and quantized matmul.
