"""Activation codecs for tensors that cross the edge/cloud boundary.

``q8_0`` and ``q4_0`` are GGML's block formats (a float16 scale and 32 values per block) and are
byte-identical to ``gguf.quants.quantize`` for float32 input whose length is a multiple of 32.
Other lengths are zero-padded to whole blocks; the true shape travels beside the bytes (in the
frame header) and :func:`decode` drops the padding.

Errors (all from :mod:`splitwise_core.errors`): unknown codec, wrong dtype or non-contiguous
input, NaN/Inf, values whose block scale would overflow float16 (|x| ≥ 65520·127 for ``q8_0``,
65520·8 for ``q4_0``, 65520 for ``f16``), and buffers whose size does not match codec and shape.
Both directions release the GIL while they work.
"""

from __future__ import annotations

from splitwise_core._core import BLOCK_LEN, CODECS, codec_size, crc32c, decode, encode

__all__ = ["BLOCK_LEN", "CODECS", "codec_size", "crc32c", "decode", "encode"]
