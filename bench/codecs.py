"""Codec throughput: Splitwise's Rust codecs vs a numpy implementation vs a plain memcpy.

Prints GB/s of float32 input for 4 KB, 64 KB and 4 MB arrays, all measured in one run so the
ratios are comparable on a noisy machine. The numpy implementation is gguf-py's quantizer, the
reference our bytes match. Run: python bench/codecs.py [--seconds S]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from splitwise_core import codecs

SIZES = {"4 KB": 4 << 10, "64 KB": 64 << 10, "4 MB": 4 << 20}
GGUF = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def throughput(fn: Callable[[], object], nbytes: int, seconds: float) -> float:
    """Median GB/s over 5 rounds, each repeating `fn` for about seconds/5."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(1, int(seconds / 5 / once))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps)
    return nbytes / statistics.median(rounds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    header = (
        f"{'size':>6} {'codec':>5} {'op':>6} | {'rust GB/s':>9} {'numpy GB/s':>10} {'memcpy GB/s':>11} |"
        f" {'rust/numpy':>10} {'rust/memcpy':>11}"
    )
    print(header)
    print("-" * len(header))
    for label, nbytes in SIZES.items():
        x = rng.standard_normal(nbytes // 4).astype(np.float32)
        dst = np.empty_like(x)
        memcpy = throughput(lambda x=x, dst=dst: np.copyto(dst, x), nbytes, args.seconds)
        for codec, qtype in GGUF.items():
            buf = codecs.encode(x, codec)
            raw = np.frombuffer(buf, np.uint8)
            ops = {
                "encode": (lambda x=x, c=codec: codecs.encode(x, c), lambda x=x, t=qtype: quantize(x, t)),
                "decode": (
                    lambda b=buf, c=codec, n=x.size: codecs.decode(b, c, n),
                    lambda r=raw, t=qtype: dequantize(r, t),
                ),
            }
            for op, (ours, reference) in ops.items():
                rust = throughput(ours, nbytes, args.seconds)
                numpy = throughput(reference, nbytes, args.seconds)
                print(
                    f"{label:>6} {codec:>5} {op:>6} | {rust:>9.2f} {numpy:>10.3f} {memcpy:>11.2f} |"
                    f" {rust / numpy:>9.1f}x {rust / memcpy:>10.2f}x"
                )


if __name__ == "__main__":
    main()
