"""Predicted vs measured device memory of random plans: the cost model's `plan_memory` against the
resident set of a process that runs exactly a plan's edge side.

For each plan a fresh child process opens the model file (no budget: the whole file is mapped and a
page counts in RSS once touched), reads its resident set, then runs what the plan keeps on the
device for a prompt of --prompt tokens and --tokens decode steps: the embedding, the edge heads'
attention (their KV groups' K/V cached), the edge FFN parts (`full`, or `gate_up` for a split FFN)
and the LM head when it is on the edge. The cloud's sub-blocks are skipped: the device never
touches their weights, and which pages are touched does not depend on the activations' values.
Measured = resident set after the run − resident set after the open; predicted = `plan_memory`
with a KV length of prompt + tokens and the file's bytes per weight.

Before the run the child embeds every token id once: a device that has served for a while has
read every row of the embedding table, and the cost model counts the whole table (a fresh process
touches one row per distinct token; --cold-embedding measures that instead).

Plans: --plans random plans (`policies.plan.random_plan`, seed --seed) and the named plans in
NAMED_PLANS, fixed here before any run.

Run: python bench/plan_memory.py [--shape tinyllama-1.1b] [--type q4_k_m] [--plans 12]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.cpu import cpu_features
from evaluation.processes import peak_rss_bytes, rss_bytes
from evaluation.random_weights import BENCH_SHAPES, QTYPES, cached_bench_model
from policies.cost import CostModel, Observation, plan_memory
from policies.plan import FfnMode, Plan, Side, parse_plan, random_plan
from policies.segments import ModelDims
from splitwise_core.engine import Model, simd_level
from splitwise_core.profile import Profile
from splitwise_core.profiler import weight_bytes_per_param

NAMED_PLANS = ("cloud-only", "layer-split:5", "layer-split:11", "heads:8", "heads:16", "edge-only")
PROFILE = Path(__file__).resolve().parents[1] / "deploy" / "profiles" / "reference-vm.smollm2-135m.profile.json"
EMBED_CHUNK = 4096
MIB = 1 << 20


def run_edge_side(
    path: str, plan_json: str, prompt: list[int], tokens: int, warm_embedding: bool, pipe: Connection
) -> None:
    """The child: opens the model, runs the plan's edge sub-blocks, reports its resident set."""
    plan = Plan.from_json(plan_json)
    model = Model(path, 1)
    session = model.new_session()
    before = rss_bytes()
    if warm_embedding:
        n_vocab = int(model.config["n_vocab"])
        for start in range(0, n_vocab, EMBED_CHUNK):
            model.embed(list(range(start, min(start + EMBED_CHUNK, n_vocab))))
    rng = np.random.default_rng(0)
    batch, position = prompt, 0
    for _ in range(tokens + 1):
        positions = list(range(position, position + len(batch)))
        x = model.embed(batch, positions)
        for layer, lp in enumerate(plan.layers):
            if lp.edge_heads:
                x = x + model.attention(session, layer, list(lp.edge_heads), model.attn_norm(layer, x), positions)
            if lp.ffn is FfnMode.EDGE:
                x = x + model.ffn(layer, "full", model.ffn_norm(layer, x))
            elif lp.ffn is FfnMode.SPLIT:
                model.ffn(layer, "gate_up", model.ffn_norm(layer, x))  # W2 runs on the cloud
        if plan.lm_head is Side.EDGE:
            model.output_logits(np.ascontiguousarray(x[-1:]))
        position += len(batch)
        batch = [int(rng.integers(int(model.config["n_vocab"])))]
    pipe.send({"resident": rss_bytes() - before, "peak": peak_rss_bytes() - before, "kv": session.memory_bytes})


def measure(path: Path, plan: Plan, prompt: list[int], tokens: int, warm_embedding: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(
        target=run_edge_side, args=(str(path), plan.to_json(), prompt, tokens, warm_embedding, theirs)
    )
    child.start()
    theirs.close()
    try:
        report: dict[str, Any] = ours.recv()
    except EOFError:
        child.join()
        raise SystemExit(f"the child running {plan.name} died (exit code {child.exitcode})") from None
    child.join()
    return report


def describe(plan: Plan) -> str:
    """Where the plan's parts run, in a few words."""
    edge_heads = sum(len(lp.edge_heads) for lp in plan.layers)
    modes = {mode: sum(lp.ffn is mode for lp in plan.layers) for mode in FfnMode}
    layers = sum(bool(lp.edge_heads) or lp.ffn is not FfnMode.CLOUD for lp in plan.layers)
    return (
        f"{layers} layers on the device, {edge_heads}/{plan.n_layer * plan.n_head} heads, FFN "
        f"{modes[FfnMode.EDGE]} edge/{modes[FfnMode.SPLIT]} split/{modes[FfnMode.CLOUD]} cloud, "
        f"LM head {plan.lm_head.value}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(BENCH_SHAPES))
    parser.add_argument("--type", default="q4_k_m", choices=QTYPES)
    parser.add_argument("--plans", type=int, default=12, help="random plans (besides the named ones)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps")
    parser.add_argument("--cold-embedding", action="store_true", help="do not read the whole embedding first")
    args = parser.parse_args()
    if args.plans < 0 or args.prompt < 1 or args.tokens < 0:
        parser.error("--plans and --tokens must be ≥ 0, --prompt ≥ 1")

    path = cached_bench_model(args.shape, args.type)
    config = Model(str(path), 1, layers=[]).config
    dims = ModelDims.from_config(config)
    profile = Profile.load(PROFILE)
    edge = profile.model_copy(update={"weight_bytes_per_param": weight_bytes_per_param(path, dict(config))})
    observation = Observation(bandwidth_bps=1e8, rtt_s=0.01, prompt_len=args.prompt, max_tokens=args.tokens)
    cost_model = CostModel(observation, edge, profile, dims, next(iter(profile.codecs)))
    rng = np.random.default_rng(args.seed)
    plans = [parse_plan(name, dims.n_layer, dims.n_head) for name in NAMED_PLANS]
    plans += [random_plan(rng, dims.n_layer, dims.n_head, i) for i in range(args.plans)]
    prompt = [int(t) for t in rng.integers(dims.n_vocab, size=args.prompt)]

    print(f"CPU features: {cpu_features()}; kernel level {simd_level()}")
    print(
        f"model: {path.name} ({args.shape}, {args.type}, {path.stat().st_size / MIB:.0f} MiB, "
        f"{edge.weight_bytes_per_param:.4f} bytes per weight); KV length {args.prompt}+{args.tokens}; "
        f"embedding {'cold' if args.cold_embedding else 'read whole first'}"
    )
    print()
    print("| plan | where | predicted MiB | measured MiB | measured / predicted | peak MiB | K/V MiB |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    started = time.perf_counter()
    for i, plan in enumerate(plans):
        predicted = plan_memory(plan, cost_model)
        got = measure(path, plan, prompt, args.tokens, not args.cold_embedding)
        ratio = got["resident"] / predicted if predicted else float("nan")
        ratios.append(ratio)
        print(
            f"| {plan.name} | {describe(plan)} | {predicted / MIB:.1f} | {got['resident'] / MIB:.1f} | "
            f"{ratio:.3f} | {got['peak'] / MIB:.1f} | {got['kv'] / MIB:.1f} |",
            flush=True,
        )
        print(f"  [{i + 1}/{len(plans)}] {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    worst = max(ratios, key=lambda r: abs(r - 1))
    print()
    print(f"measured / predicted: {min(ratios):.3f} … {max(ratios):.3f}; worst |error| {abs(worst - 1):.1%}")


if __name__ == "__main__":
    main()
