"""Writes rust/tests/fixtures/dequant.bin: raw GGML blocks and gguf-py's float32 dequantization of
them, one record per type, so the Rust kernels are checked against an independent implementation.

Run with the project venv (numpy + gguf 0.19):
    /work/main/.venv/bin/python rust/tests/make_kernel_fixtures.py

Record layout (little endian): u32 ggml type id, u32 element count, u32 byte count,
the raw bytes, then element-count float32 expected values. The file ends with type id 0xFFFFFFFF.
"""

import pathlib
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

N_ELEMENTS = 1024
QUANTIZABLE = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# gguf-py cannot quantize these, so the blocks are random bytes with sane f16 scales.
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]


def random_scale_bytes(rng: np.random.Generator, count: int) -> np.ndarray:
    scale = rng.uniform(1e-3, 1e-1, size=count) * rng.choice([-1.0, 1.0], size=count)
    return scale.astype(np.float16).view(np.uint8).reshape(count, 2)


def random_k_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):
        blocks[:, 0:2] = random_scale_bytes(rng, n_blocks)  # d
        blocks[:, 2:4] = random_scale_bytes(rng, n_blocks)  # dmin
    else:
        blocks[:, block_bytes - 2 :] = random_scale_bytes(rng, n_blocks)  # Q6_K keeps d last
    return blocks


def main() -> None:
    rng = np.random.default_rng(20261128)
    out = bytearray()
    for qtype in QUANTIZABLE + K_QUANTS:
        block_len, _ = GGML_QUANT_SIZES[qtype]
        if qtype in K_QUANTS:
            raw = random_k_blocks(rng, qtype, N_ELEMENTS // block_len)
        else:
            values = rng.standard_normal(N_ELEMENTS).astype(np.float32) * np.float32(0.7)
            values[:8] = [0.0, -0.0, 1e-6, -1e-7, 65504.0, -3.0e-5, 2.5, -2.5]
            raw = quants.quantize(values.reshape(4, -1), qtype)
        expected = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
        raw_bytes = np.ascontiguousarray(raw).view(np.uint8).tobytes()
        assert expected.size == N_ELEMENTS
        assert np.all(np.isfinite(expected))
        out += struct.pack("<III", int(qtype), expected.size, len(raw_bytes))
        out += raw_bytes
        out += expected.astype("<f4").tobytes()
    out += struct.pack("<I", 0xFFFFFFFF)
    path = pathlib.Path(__file__).parent / "fixtures" / "dequant.bin"
    path.write_bytes(bytes(out))
    print(f"wrote {len(out)} bytes to {path}")


if __name__ == "__main__":
    main()
