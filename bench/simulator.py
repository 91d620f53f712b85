"""Simulator speed: decisions per second on one core for SmolLM2's shape, per plan choice, from one
run (the issue's target is ≥ 2,000 decisions/s; a planner's own time counts for the named planners).

Run: python bench/simulator.py [--scenario training/scenarios/stationary.toml] [--requests 300]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.cpu import cpu_features
from policies.segments import ModelDims
from splitwise_core.profile import Profile
from splitwise_device.controller import NamedPlanner, PlanChoice, PlanSpec
from training.processes import Timeline
from training.scenario import load_scenario
from training.simulator import Simulator, fixed

ROOT = Path(__file__).resolve().parents[1]
DIMS = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)  # SmolLM2-135M


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "training/scenarios/stationary.toml")
    parser.add_argument("--profile", type=Path, default=ROOT / "deploy/profiles/reference-vm.smollm2-135m.profile.json")
    parser.add_argument("--requests", type=int, default=300, help="decisions per choice (default 300)")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    scenario, profile = load_scenario(args.scenario), Profile.load(args.profile)
    print(
        f"CPU: {cpu_features()}; scenario {scenario.name}; profile {args.profile.name}; {args.requests} decisions each"
    )
    choices: list[PlanChoice] = [
        PlanSpec("edge-only"),
        PlanSpec("cloud-only"),
        PlanSpec("layer-split:15"),
        PlanSpec("heads:4"),
        NamedPlanner("splitwise-dp"),
    ]
    print(f"{'choice':<18} {'decisions/s':>12} {'ms/decision':>12}")
    for choice in choices:
        sim = Simulator(Timeline(scenario), profile, profile, DIMS)
        started = time.perf_counter()
        n = sum(1 for _ in itertools.islice(sim.run(fixed(choice)), args.requests))
        elapsed = time.perf_counter() - started
        print(f"{choice.label:<18} {n / elapsed:>12.0f} {1e3 * elapsed / n:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
