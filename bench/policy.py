"""Decision time of the learned planner on the device path (``splitwise-rl``: features, one
onnxruntime run, the plan checked) beside ``splitwise-dp``, from one run, for SmolLM2's shape and the
LLaMA-13B shape (40 layers × 40 heads), with and without an edge memory budget.

The policy's weights do not change its run time (the graph is the same), so a file shipped for the
model is used when there is one and a freshly initialised network of the same shape otherwise.
The issue's target for SmolLM2 on the reference VM: median ≤ 1 ms, P99 ≤ 2 ms.

Run: python bench/policy.py [--decisions 2000]   (needs the train extra for the 40×40 export)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from evaluation.cpu import cpu_features
from policies.cost import Observation, plan_memory
from policies.learned import PolicyMetadata, profile_digest
from policies.plan import edge_only
from policies.planners.context import PlanningContext
from policies.planners.dp import SplitwiseDpPlanner
from policies.planners.learned import LearnedPlanner, shipped_policy
from policies.segments import ModelDims
from splitwise_core.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
SHAPES = {
    "smollm2-135m (30×9, 3 KV)": ModelDims(30, 9, 3, 576, 1536, 49152),
    "llama-13b shape (40×40)": ModelDims(40, 40, 40, 5120, 13824, 32000),
}


def policy_file(dims: ModelDims, profile: Profile, where: Path) -> tuple[Path, str]:
    shipped = shipped_policy(dims, profile)
    if shipped is not None:
        return shipped, f"shipped {shipped.name}"
    import torch

    from training.export import export_onnx
    from training.policy import PolicyNet

    torch.manual_seed(0)
    net = PolicyNet(dims, 8)
    digest = profile_digest(profile)
    path = where / f"{dims.n_layer}x{dims.n_head}.onnx"
    export_onnx(net, PolicyMetadata(1, dims, 8, profile.machine, digest, digest, "bench", 0, 0, True), path)
    return path, "untrained (same graph)"


def observations(n: int, budget: int | None, rng: np.random.Generator) -> list[Observation]:
    return [
        Observation(
            bandwidth_bps=float(10 ** rng.uniform(6, 9)),
            rtt_s=float(rng.uniform(0.005, 0.1)),
            prompt_len=int(rng.integers(16, 256)),
            max_tokens=int(rng.integers(8, 128)),
            backlog_requests=int(rng.integers(0, 4)),
            memory_budget_bytes=budget,
        )
        for _ in range(n)
    ]


def timed(planner: LearnedPlanner | SplitwiseDpPlanner, obs: list[Observation]) -> list[float]:
    out = []
    for o in obs:
        started = time.perf_counter()
        planner.plan(o)
        out.append(1e3 * (time.perf_counter() - started))
    return out


def row(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"{name:<44} {statistics.median(ms):>9.3f} {p99:>9.3f} {ms[-1]:>9.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000, help="decisions per row (default 2000)")
    args = parser.parse_args()
    if args.decisions < 10:
        parser.error("--decisions must be at least 10")
    profile = Profile.load(PROFILE)
    print(f"CPU: {cpu_features()}; {args.decisions} decisions per row; times in ms")
    print(f"{'planner':<44} {'median':>9} {'P99':>9} {'max':>9}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, dims in SHAPES.items():
            path, what = policy_file(dims, profile, Path(tmp))
            print(f"-- {shape}: policy {what}")
            for label, budget in (("no budget", None), ("budget 60 %", "60%")):
                ctx = PlanningContext(profile, profile, dims, policy=path)
                rl = LearnedPlanner(ctx)
                dp = SplitwiseDpPlanner(ctx)
                if budget is None:
                    limit = None
                else:
                    model = ctx.cost_model(observations(1, None, rng)[0])
                    limit = int(0.6 * plan_memory(edge_only(dims.n_layer, dims.n_head), model))
                obs = observations(args.decisions, limit, rng)
                timed(rl, obs[:20])  # warm-up: first runs allocate
                rl_ms = timed(rl, obs)
                if rl.problem is not None:
                    print(f"   splitwise-rl fell back: {rl.problem}")
                dp_obs = obs[: max(10, args.decisions // 10)]
                print(row(f"splitwise-rl, {label}", rl_ms))
                print(row(f"splitwise-dp, {label} ({len(dp_obs)} decisions)", timed(dp, dp_obs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
