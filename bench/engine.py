"""Engine speed: our GGUF sub-block engine vs llama.cpp (llama-cpp-python), side by side in one run.

Prints, per thread count (--threads, default 1,2): prefill tokens/s (one batch of --prompt-tokens)
and decode tokens/s (--decode-tokens single-token steps after that prompt), ours and llama.cpp's,
and their ratio; then per thread count the peak RSS of each engine (each runs in its own child
process) and the memory-bandwidth floor of decoding: the weight bytes one decode step reads (every
matrix of the file; of token_embd one row when the output matrix is separate) divided by this
machine's read bandwidth (a numpy int64 sum over 1 GiB on that many threads, best of 5), beside the
measured ms/token of each engine. Last, for models up to 1 GB of weights, the decomposition overhead:
one decode step through all layers via the per-sub-block API (attn_norm, attention over all heads,
ffn_norm, ffn full — each a call from Python, as the split executor makes them) vs the fused layer
path, and vs one `forward` call.

Models: --model PATH (default: the bundled SmolLM2-135M Q4_1), or --shape NAME [--type MIX]: a
random-weight model of a paper-scale shape (evaluation/random_weights.py: smollm2, tinyllama-1.1b,
llama-7b, llama-13b as llama files, gpt2-1.5b as a GPT-2 file; mixes q4_k_m (default), q4_0, q8_0),
generated once and cached.
Prompt, decode and round counts default to less for bigger models (see `defaults_for`).
Ours runs once per kernel level (--simd, default avx2 and every level above it the CPU has: the
level is forced through SPLITWISE_SIMD in each child), so AVX-512 and AVX2 kernels are compared in
the same run.
Run: python bench/engine.py [--model PATH | --shape NAME [--type MIX]] [--rounds N] [--threads 1,2] [--simd avx2,avx512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.corpus import english_text
from evaluation.cpu import cpu_features
from evaluation.oracle import isolated, llama_cpp_build
from evaluation.processes import peak_rss_bytes
from evaluation.random_weights import BENCH_SHAPES, QTYPES, cached_bench_model, decode_bytes_per_token
from splitwise_core.engine import SIMD_LEVELS, Model, simd_level
from splitwise_core.tokenizer import Tokenizer, bundled_model_path

SIMD_LEVEL_ENV = "SPLITWISE_SIMD"


def best_of(rounds: int, fn: Callable[[], float]) -> float:
    """Median of `rounds` runs of fn, which returns the seconds it measured itself."""
    return statistics.median(fn() for _ in range(rounds))


def ours(
    model_path: Path, threads: int, simd: str, prompt: list[int], n_decode: int, rounds: int
) -> tuple[float, float, int]:
    """Prefill tok/s, decode tok/s and peak RSS with kernels of SIMD level `simd`; run in a child
    process (`isolated`, started with SPLITWISE_SIMD=simd) so that the peak RSS is this engine's
    alone and the level, read once per process, is this one."""
    model = Model(str(model_path), threads)
    if simd_level() != simd:
        raise RuntimeError(f"asked for {simd} kernels, the engine runs {simd_level()}")
    model.forward(model.new_session(), prompt[:1], [0])  # warm-up: faults every weight page in

    def prefill() -> float:
        session = model.new_session()
        start = time.perf_counter()
        model.forward(session, prompt, list(range(len(prompt))))
        return time.perf_counter() - start

    def decode() -> float:
        session = model.new_session()
        logits = model.forward(session, prompt, list(range(len(prompt))))[-1]
        start = time.perf_counter()
        for position in range(len(prompt), len(prompt) + n_decode):
            logits = model.forward(session, [int(np.argmax(logits))], [position])[-1]
        return time.perf_counter() - start

    return len(prompt) / best_of(rounds, prefill), n_decode / best_of(rounds, decode), peak_rss_bytes()


def llama_cpp(
    model_path: Path, threads: int, prompt: list[int], n_decode: int, rounds: int
) -> tuple[float, float, int]:
    """Run in a child process (evaluation.oracle.isolated): a crash in llama.cpp ends that
    measurement with a clear error, not the benchmark's process without one. The context holds just
    the prompt and the decoded tokens, and the batch just the prompt, so that its KV cache and
    compute buffers are no larger than the run needs (peak RSS)."""
    import llama_cpp

    n_batch = max(len(prompt), 8)
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=len(prompt) + n_decode + 8,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval(prompt[:1])  # warm-up: faults every weight page in
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        """The last evaluated token's logits (without logits_all, llm.scores is never written)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - start

    def decode() -> float:
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([int(np.argmax(last_logits()))])
        return time.perf_counter() - start

    return len(prompt) / best_of(rounds, prefill), n_decode / best_of(rounds, decode), peak_rss_bytes()


def read_bandwidth(threads: int, gib: float = 1.0, rounds: int = 5) -> float:
    """Bytes/s that `threads` threads read: numpy sums over disjoint parts of one `gib` GiB int64
    array (numpy releases the GIL in the reduction), best of `rounds`. An int64 sum runs about twice
    as fast from L2 as from DRAM here, so it measures memory, not arithmetic."""
    array = np.ones(int(gib * (1 << 30)) // 8, dtype=np.int64)
    parts = np.array_split(array, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return array.nbytes / best


def defaults_for(weight_bytes: int) -> tuple[int, int, int]:
    """(prompt tokens, decode tokens, rounds) when not given: a 7B run takes a few minutes."""
    if weight_bytes <= 1_000_000_000:
        return 128, 64, 3
    if weight_bytes <= 3_000_000_000:
        return 64, 32, 1
    return 32, 16, 1


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def decomposition(model_path: Path, prompt: list[int], steps: int, rounds: int) -> dict[str, float]:
    """Seconds per decode step through all layers, three ways, interleaved round by round."""
    model = Model(str(model_path), 1)
    n_layer, n_head = model.config["n_layer"], model.config["n_head"]
    all_heads = list(range(n_head))

    def run(path: str) -> float:
        session = model.new_session()
        model.forward(session, prompt, list(range(len(prompt))))
        token = prompt[-1]
        start = time.perf_counter()
        for position in range(len(prompt), len(prompt) + steps):
            if path == "forward":
                model.forward(session, [token], [position])
                continue
            x = model.embed([token], [position])
            for layer in range(n_layer):
                if path == "fused":
                    x = model.layer_fused(session, layer, x, [position])
                else:
                    h = x + model.attention(session, layer, all_heads, model.attn_norm(layer, x), [position])
                    x = h + model.ffn(layer, "full", model.ffn_norm(layer, h))
            model.output_logits(x)
        return (time.perf_counter() - start) / steps

    samples: dict[str, list[float]] = {"sub-blocks": [], "fused": [], "forward": []}
    for _ in range(rounds):
        for path in samples:
            samples[path].append(run(path))
    return {path: statistics.median(values) for path, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=None, help="GGUF model (default: bundled SmolLM2 Q4_1)")
    which.add_argument(
        "--shape",
        choices=list(BENCH_SHAPES),
        default=None,
        help="a random-weight model of this shape (gpt2-1.5b: a GPT-2 file, the others llama), generated once",
    )
    parser.add_argument("--type", choices=QTYPES, default=None, help="type mix of --shape (default q4_k_m)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --shape file's random weights")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 128; 64 above 1 GB, 32 above 3 GB")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default 64; 32 above 1 GB, 16 above 3 GB")
    parser.add_argument("--rounds", type=int, default=None, help="median of N (default 3; 1 above 1 GB of weights)")
    parser.add_argument(
        "--simd",
        default=None,
        help="our kernel levels to run, comma-separated, from "
        f"{', '.join(SIMD_LEVELS)} (default: avx2 and every level above it this CPU has)",
    )
    args = parser.parse_args()
    if args.type is not None and args.shape is None:
        parser.error("--type needs --shape")
    thread_counts = [int(t) for t in args.threads.split(",")]
    best = simd_level()
    runnable = SIMD_LEVELS[: SIMD_LEVELS.index(best) + 1]
    if args.simd is None:
        levels = [level for level in runnable if level != "portable"] or [best]
    else:
        levels = args.simd.split(",")
        for level in levels:
            if level not in runnable:
                parser.error(f"--simd {level}: this CPU runs {', '.join(runnable)}")

    print(f"CPU: {cpu_features()}; our kernel levels: {', '.join(levels)}")
    print(f"llama.cpp: {llama_cpp_build()}")
    if args.shape is not None:
        qtype = args.type or "q4_k_m"
        progress(f"random {args.shape} {qtype} (seed {args.seed}): from the cache or generated now")
        model_path = cached_bench_model(args.shape, qtype, args.seed)
    else:
        model_path = args.model or bundled_model_path()
    weight_bytes = decode_bytes_per_token(model_path)
    prompt_default, decode_default, rounds_default = defaults_for(weight_bytes)
    n_prompt = args.prompt_tokens or prompt_default
    n_decode = args.decode_tokens or decode_default
    rounds = args.rounds or rounds_default
    prompt = Tokenizer(model_path).encode(english_text())[:n_prompt]
    print(
        f"model {model_path.name} ({model_path.stat().st_size / 1e9:.2f} GB; weights read per decoded token "
        f"{weight_bytes / 1e9:.3f} GB); prompt {len(prompt)} tokens; decode {n_decode} tokens; median of {rounds}"
    )

    bandwidth: dict[int, float] = {}
    for threads in thread_counts:
        progress(f"read bandwidth, {threads} thread(s)")
        bandwidth[threads] = read_bandwidth(threads)
    print(
        "read bandwidth (numpy int64 sum over 1 GiB, best of 5): "
        + ", ".join(f"{t} thread(s) {bw / 1e9:.1f} GB/s" for t, bw in bandwidth.items())
    )

    Measured = tuple[float, float, int]
    results: dict[int, tuple[dict[str, Measured], Measured]] = {}
    for threads in thread_counts:
        mine: dict[str, Measured] = {}
        for level in levels:
            progress(f"ours ({level}), {threads} thread(s)")
            # The child inherits it from its start: the level is read once per process.
            os.environ[SIMD_LEVEL_ENV] = level
            try:
                mine[level] = isolated(
                    ours, model_path, threads, level, prompt, n_decode, rounds, label=f"ours on {model_path.name}"
                )
            finally:
                del os.environ[SIMD_LEVEL_ENV]
        progress(f"llama.cpp, {threads} thread(s)")
        ref = isolated(llama_cpp, model_path, threads, prompt, n_decode, rounds, label=model_path.name)
        results[threads] = (mine, ref)

    print(
        f"{'threads':>7} {'ours':>8} | {'prefill tok/s':>13} {'llama.cpp':>9} {'ratio':>6} | "
        f"{'decode tok/s':>12} {'llama.cpp':>9} {'ratio':>6}"
    )
    for threads, (mine, (p_ref, d_ref, _)) in results.items():
        for level, (p_ours, d_ours, _) in mine.items():
            print(
                f"{threads:>7} {level:>8} | {p_ours:>13.1f} {p_ref:>9.1f} {p_ours / p_ref:>5.2f}x | "
                f"{d_ours:>12.1f} {d_ref:>9.1f} {d_ours / d_ref:>5.2f}x"
            )
    print(
        f"{'threads':>7} {'ours':>8} | {'floor ms/tok':>12} {'ours':>8} {'llama.cpp':>9} | "
        f"{'ours/floor':>10} {'llama/floor':>11} | "
        f"{'peak RSS MiB ours':>17} {'llama.cpp':>9}"
    )
    for threads, (mine, (_, d_ref, rss_ref)) in results.items():
        for level, (_, d_ours, rss_ours) in mine.items():
            floor_ms = 1e3 * weight_bytes / bandwidth[threads]
            ours_ms, ref_ms = 1e3 / d_ours, 1e3 / d_ref
            print(
                f"{threads:>7} {level:>8} | {floor_ms:>12.2f} {ours_ms:>8.2f} {ref_ms:>9.2f} | "
                f"{ours_ms / floor_ms:>9.2f}x {ref_ms / floor_ms:>10.2f}x | "
                f"{rss_ours / 2**20:>17.0f} {rss_ref / 2**20:>9.0f}"
            )

    if weight_bytes > 1_000_000_000:
        print("decomposition (sub-block API overhead): skipped for models with more than 1 GB of weights")
        return
    small = weight_bytes <= 200_000_000
    progress("decomposition, 1 thread")
    per_step = decomposition(model_path, prompt[:32], steps=32 if small else 8, rounds=max(rounds, 5) if small else 3)
    fused = per_step["fused"]
    print(
        "decode step through all layers, 1 thread (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in per_step.items())
    )
    print(
        f"per-sub-block API overhead vs fused: {100 * (per_step['sub-blocks'] / fused - 1):+.1f}%; "
        f"fused vs forward: {100 * (fused / per_step['forward'] - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
