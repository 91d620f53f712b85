"""A model larger than the device's memory: a LLaMA-7B-shaped file split between a device held to a
cgroup memory limit and a worker, per token.

The device is a child process that joins a new memory cgroup (limit --limit, default 2 GiB) before
it opens the model's role shards with a weight budget (--budget, default the limit minus 512 MiB
for activations, the K/V cache and the interpreter). It runs the plan `layer-split:K` (K = --edge-layers,
default the most layers whose files fit the budget with the base file): it keeps layers 0..K-1
(`retain_layers`, as the agent's executor does before a request), embeds each token, runs its
layers and hands the hidden state over a pipe to the worker (this process, no limit, serving the
other layers and the LM head), which returns the greedy token. Then, as the contrast, the same
device under the same budget runs the whole model locally (an edge fallback), where only LRU decides
what stays mapped.

Prints per run: tokens/s of decode, weight-file loads per decoded token, the device's peak RSS
(VmHWM) and the cgroup's peak usage (which also counts the page cache charged to it) against the
limit, and how often the cgroup hit its limit. The shard files are dropped from the page cache
before each run, so the device reads them from disk and the pages it maps are charged to its group.
The worker shares the machine's 2 cores with the device, so tokens/s is that of the whole model
either way; what differs is what the device must re-read. Skips, saying why, where no memory cgroup
can be made.

Run: python bench/memory_limit.py [--shape llama-7b] [--type q4_k_m] [--limit 2GiB] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.cgroup import CgroupUnavailable, MemoryCgroup, memory_cgroup
from evaluation.cpu import cpu_features
from evaluation.processes import peak_rss_bytes
from evaluation.random_weights import BENCH_SHAPES, QTYPES, cached_bench_model
from splitwise_core.engine import Model
from splitwise_core.shards import parse_size, shard_model

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 450, 4996, 17354, 1701]


def device(
    group: MemoryCgroup, shards: str, budget: int, edge_layers: int | None, tokens: int, threads: int, pipe: Connection
) -> None:
    """The device: joins `group`, then runs layers 0..edge_layers-1 per token and asks `pipe` for
    the rest (or, with edge_layers None, the whole model locally)."""
    group.join()
    model = Model(shards, threads, memory_budget_bytes=budget)
    n_layer = int(model.config["n_layer"])
    local = range(n_layer) if edge_layers is None else range(edge_layers)
    if edge_layers is not None:
        model.retain_layers(list(local))
    session = model.new_session()

    def step(batch: list[int], start: int) -> int:
        positions = list(range(start, start + len(batch)))
        x = model.embed(batch, positions)
        for layer in local:
            x = model.layer_fused(session, layer, x, positions)
        if edge_layers is None:
            return int(np.argmax(model.output_logits(np.ascontiguousarray(x[-1:]))))
        pipe.send((x, positions))
        token: int = pipe.recv()
        return token

    token = step(PROMPT, 0)
    loads_before = model.weight_stats()["loads"]
    start = time.perf_counter()
    for i in range(tokens):
        token = step([token], len(PROMPT) + i)
    elapsed = time.perf_counter() - start
    stats = model.weight_stats()
    pipe.send(
        {
            "tok_s": tokens / elapsed,
            "loads_per_token": (stats["loads"] - loads_before) / tokens,
            "peak_rss": peak_rss_bytes(),
            "peak_mapped": stats["peak_mapped_bytes"],
            "last_token": token,
        }
    )
    pipe.send(None)


def worker_loop(model: Model, first_layer: int, pipe: Connection) -> dict[str, Any]:
    """Serves the device's hand-overs until it reports; returns its report."""
    session = model.new_session()
    n_layer = int(model.config["n_layer"])
    while True:
        message = pipe.recv()
        if isinstance(message, dict):
            report = message
            pipe.recv()
            return report
        x, positions = message
        for layer in range(first_layer, n_layer):
            x = model.layer_fused(session, layer, x, positions)
        pipe.send(int(np.argmax(model.output_logits(np.ascontiguousarray(x[-1:])))))


def drop_cached_pages(shards: Path) -> None:
    """Evicts the shard files from the page cache, so the device's reads are charged to its cgroup:
    cgroup v1 charges a cached page to the group that first read it (here: this process, which
    wrote the shards), and the limit would not see pages that are already cached."""
    for path in shards.glob("*.gguf"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(
    group: MemoryCgroup, shards: Path, budget: int, edge_layers: int | None, tokens: int, threads: int
) -> dict[str, Any]:
    drop_cached_pages(shards)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=device, args=(group, str(shards), budget, edge_layers, tokens, threads, ours))
    child.start()
    worker = None
    if edge_layers is not None:
        n_layer = int(json.loads((shards / "manifest.json").read_text())["n_layer"])
        worker = Model(str(shards), threads, layers=list(range(edge_layers, n_layer)))
    try:
        if worker is not None and edge_layers is not None:
            report = worker_loop(worker, edge_layers, theirs)
        else:
            report = theirs.recv()
            theirs.recv()
    except EOFError:
        child.join()
        raise SystemExit(f"the device died (exit code {child.exitcode}; -9: killed at the memory limit)") from None
    child.join()
    report["cgroup_peak"] = group.peak_bytes()
    report["limit_hits"] = group.limit_hits()
    return report


def layer_file_bytes(shards: Path) -> tuple[int, int]:
    base = (shards / "base.gguf").stat().st_size
    layers = max(p.stat().st_size for p in shards.glob("layer-*.gguf"))
    return base, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(BENCH_SHAPES), default="llama-7b")
    parser.add_argument("--type", choices=QTYPES, default="q4_k_m")
    parser.add_argument("--limit", type=parse_size, default=parse_size("2GiB"), help="cgroup memory limit")
    parser.add_argument("--budget", type=parse_size, default=None, help="weight budget (default: limit - 512MiB)")
    parser.add_argument("--edge-layers", type=int, default=None, help="layers on the device (default: all that fit)")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per run")
    parser.add_argument("--fallback-tokens", type=int, default=3, help="decoded tokens of the whole-model run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    budget = args.budget if args.budget is not None else args.limit - parse_size("512MiB")
    if budget <= 0:
        parser.error("--budget must be positive (and below --limit)")

    print(f"CPU: {cpu_features()}")
    model_path = cached_bench_model(args.shape, args.type)
    shards = model_path.with_suffix(".shards")
    if not (shards / "manifest.json").is_file():
        print(f"  .. sharding {model_path.name} into {shards}", file=sys.stderr)
        shard_model(model_path, shards, force=True)
    base, layer = layer_file_bytes(shards)
    fit = (budget - base) // layer
    edge_layers = args.edge_layers if args.edge_layers is not None else int(fit)
    if edge_layers < 1:
        parser.error(f"the budget {budget} holds the base file ({base}) and no layer file ({layer})")
    gib = 2**30
    print(
        f"model {model_path.name} ({model_path.stat().st_size / 1e9:.2f} GB; base file {base / 1e6:.0f} MB, "
        f"layer files {layer / 1e6:.0f} MB); cgroup limit {args.limit / gib:.2f} GiB; weight budget "
        f"{budget / gib:.2f} GiB; {args.threads} threads"
    )
    try:
        with memory_cgroup(args.limit) as group:
            print(f"cgroup v{group.version}: {group.path}")
            rows = [
                (
                    f"layer-split:{edge_layers} (retained)",
                    run(group, shards, budget, edge_layers, args.tokens, args.threads),
                ),
            ]
        with memory_cgroup(args.limit) as group:
            rows.append(
                (
                    "whole model on the device (LRU)",
                    run(group, shards, budget, None, args.fallback_tokens, args.threads),
                )
            )
    except CgroupUnavailable as err:
        print(f"SKIPPED: {err}")
        return
    print(
        f"{'device runs':<34} | {'tok/s':>6} | {'loads/token':>11} | {'peak RSS MiB':>12} | "
        f"{'cgroup peak MiB':>15} | {'limit MiB':>9} | {'limit hits':>10}"
    )
    for name, r in rows:
        cgroup_peak = "?" if r["cgroup_peak"] is None else f"{r['cgroup_peak'] / 2**20:.0f}"
        print(
            f"{name:<34} | {r['tok_s']:>6.2f} | {r['loads_per_token']:>11.1f} | {r['peak_rss'] / 2**20:>12.0f} | "
            f"{cgroup_peak:>15} | {args.limit / 2**20:>9.0f} | {r['limit_hits']!s:>10}"
        )


if __name__ == "__main__":
    main()
