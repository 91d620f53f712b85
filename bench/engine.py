"""Engine speed: our GGUF sub-block engine vs llama.cpp (llama-cpp-python), side by side in one run.

Prints, for 1 and 2 threads: prefill tokens/s (one batch of --prompt-tokens) and decode tokens/s
(--decode-tokens single-token steps after that prompt), ours and llama.cpp's, and their ratio;
then the decomposition overhead: one decode step through all layers via the per-sub-block API
(attn_norm, attention over all heads, ffn_norm, ffn full — each a call from Python, as the split
executor makes them) vs the fused layer path, and vs one `forward` call.
Run: python bench/engine.py [--model PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.corpus import english_text
from evaluation.cpu import cpu_features
from evaluation.oracle import isolated, llama_cpp_build
from splitwise_core.engine import Model
from splitwise_core.tokenizer import Tokenizer, bundled_model_path


def best_of(rounds: int, fn: Callable[[], float]) -> float:
    """Median of `rounds` runs of fn, which returns the seconds it measured itself."""
    return statistics.median(fn() for _ in range(rounds))


def ours(model_path: Path, threads: int, prompt: list[int], n_decode: int, rounds: int) -> tuple[float, float]:
    model = Model(str(model_path), threads)

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

    return len(prompt) / best_of(rounds, prefill), n_decode / best_of(rounds, decode)


def llama_cpp(model_path: Path, threads: int, prompt: list[int], n_decode: int, rounds: int) -> tuple[float, float]:
    """Run in a child process (evaluation.oracle.isolated): a crash in llama.cpp ends that
    measurement with a clear error, not the benchmark's process without one."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )

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
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - start

    return len(prompt) / best_of(rounds, prefill), n_decode / best_of(rounds, decode)


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
            x = model.embed([token])
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
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: bundled SmolLM2 Q4_1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_path = args.model or bundled_model_path()
    prompt = Tokenizer(model_path).encode(english_text())[: args.prompt_tokens]
    print(f"CPU: {cpu_features()}")
    print(f"llama.cpp: {llama_cpp_build()}")
    print(
        f"model {model_path.name}; prompt {len(prompt)} tokens; decode {args.decode_tokens} tokens; "
        f"median of {args.rounds}"
    )
    print(
        f"{'threads':>7} | {'prefill tok/s':>13} {'llama.cpp':>9} {'ratio':>6} | "
        f"{'decode tok/s':>12} {'llama.cpp':>9} {'ratio':>6}"
    )
    for threads in (1, 2):
        p_ours, d_ours = ours(model_path, threads, prompt, args.decode_tokens, args.rounds)
        p_ref, d_ref = isolated(llama_cpp, model_path, threads, prompt, args.decode_tokens, args.rounds)
        print(
            f"{threads:>7} | {p_ours:>13.1f} {p_ref:>9.1f} {p_ours / p_ref:>5.2f}x | "
            f"{d_ours:>12.1f} {d_ref:>9.1f} {d_ours / d_ref:>5.2f}x"
        )
    per_step = decomposition(model_path, prompt[:32], steps=32, rounds=max(args.rounds, 5))
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
