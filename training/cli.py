"""``python -m training``: train a learned planner, export it, and compare planners in the simulator.

    python -m training train --scenario training/scenarios/stationary.toml --steps 20000 --out policy.onnx
    python -m training evaluate --scenario training/scenarios/nonstationary.toml --policy policy.onnx

``train`` writes, beside ``--out``: ``.csv`` (one row per PPO update), ``.png`` (the learning curve),
``.ckpt`` (a checkpoint after every update; ``--resume`` continues from it) and ``.json`` (the held-out
evaluation). The held-out seeds (:data:`HELDOUT_SEEDS`) were fixed before any policy was trained;
training draws its episodes from another stream (``--seed``), so they never meet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from policies.featurizer import FEATURIZER_VERSION
from policies.learned import PolicyMetadata, profile_digest
from policies.segments import ModelDims
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import Profile
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.controller import NamedPlanner, PlanChoice, PlanSpec
from training.simulator import MEASURED_NOISE_SD

__all__ = ["HELDOUT_SEEDS", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = ROOT / "deploy/profiles/reference-vm.smollm2-135m.profile.json"

HELDOUT_SEEDS = (7001, 7002, 7003)
"""Scenario realisations kept for evaluation; fixed before training (issue 12 §4)."""

EVAL_CHOICES = ("splitwise-rl", "splitwise-dp", "layer-dp", "layer-split", "edge-only", "cloud-only")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected integers ≥ 0, got {text!r}")
    return seeds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=Path, required=True, help="scenario file (docs/simulator.md)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="edge profile (default: the reference VM's)")
    p.add_argument("--cloud-profile", type=Path, help="cloud worker profile (default: --profile)")
    p.add_argument("--model", help="GGUF file whose shape to plan for (default: the bundled SmolLM2)")
    p.add_argument("--min-edge-layers", type=_non_negative, default=0, help="privacy prefix (default 0)")
    p.add_argument(
        "--noise-sd",
        type=float,
        default=MEASURED_NOISE_SD,
        help=f"σ of the log-normal latency noise (default {MEASURED_NOISE_SD}: the fit to measured residuals)",
    )
    p.add_argument("--seeds", type=_seeds, default=HELDOUT_SEEDS, help="held-out realisations (default 7001,7002,7003)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="imitation warm start + PPO in the simulator, then export to ONNX")
    _common(t)
    t.add_argument("--out", type=Path, required=True, help="the policy file to write (.onnx)")
    t.add_argument("--steps", type=_non_negative, default=20_000, help="PPO decisions (default 20000)")
    t.add_argument(
        "--imitation-steps", type=_non_negative, default=2_000, help="splitwise-dp decisions to imitate first (0: none)"
    )
    t.add_argument("--envs", type=_positive, default=4, help="environments stepped together (default 4)")
    t.add_argument("--rollout", type=_positive, default=128, help="decisions per environment per update (default 128)")
    t.add_argument("--history", type=_positive, default=8, help="past decisions the LSTM sees (default 8)")
    t.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    t.add_argument("--seed", type=_non_negative, default=0, help="training seed (default 0)")
    t.add_argument("--no-drift", action="store_true", help="train on the penalty alone (the Lyapunov ablation)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("evaluate", help="planners side by side on held-out realisations of a scenario")
    _common(e)
    e.add_argument(
        "--policy",
        type=_policy_entry,
        action="append",
        default=[],
        help="a splitwise-rl policy, PATH or LABEL=PATH (repeatable; without one, splitwise-rl is left out)",
    )
    e.add_argument("--planners", default=",".join(EVAL_CHOICES), help="comma-separated planners or plan specs")
    e.add_argument("--json", type=Path, help="also write the table as JSON")
    e.add_argument("--backlog-png", type=Path, help="plot each row's backlog over time (first seed) here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _evaluate(args)
    except (InvalidArgumentError, ValueError, OSError) as err:
        print(f"python -m training {args.command}: {err}", file=sys.stderr)
        return 2


def _load(args: argparse.Namespace) -> tuple[Any, Profile, Profile, ModelDims]:
    from training.scenario import load_scenario

    if not 0 <= args.noise_sd < 2:
        raise InvalidArgumentError(f"--noise-sd {args.noise_sd}: expected a number in [0, 2)")
    scenario = load_scenario(args.scenario)
    edge = Profile.load(args.profile)
    cloud = Profile.load(args.cloud_profile) if args.cloud_profile else edge
    dims = ModelDims.of_model_file(args.model or bundled_model_path())
    if args.min_edge_layers > dims.n_layer:
        raise InvalidArgumentError(f"--min-edge-layers {args.min_edge_layers}: the model has {dims.n_layer} layers")
    return scenario, edge, cloud, dims


def _train(args: argparse.Namespace) -> int:
    from training.env import SplitwiseEnv
    from training.export import export_onnx
    from training.ppo import TrainConfig, Trainer

    if args.out.suffix != ".onnx":
        raise InvalidArgumentError(f"--out {args.out}: expected a .onnx file name")
    if not args.lr > 0:
        raise InvalidArgumentError(f"--lr {args.lr}: expected a number > 0")
    scenario, edge, cloud, dims = _load(args)
    planning = scenario.planning(args.min_edge_layers)
    config = TrainConfig(
        steps=args.steps,
        envs=args.envs,
        rollout=args.rollout,
        history=args.history,
        imitation_steps=args.imitation_steps,
        lr=args.lr,
        drift=not args.no_drift,
        seed=args.seed,
    )
    trainer = Trainer(
        lambda: SplitwiseEnv(scenario, edge, cloud, dims, planning=planning, noise_sd=args.noise_sd),
        dims,
        config,
        progress=not args.quiet,
    )
    checkpoint, log_csv = args.out.with_suffix(".ckpt"), args.out.with_suffix(".csv")
    started = time.perf_counter()
    if args.resume:
        trainer.load(checkpoint)
        print(f"resumed from {checkpoint}: {trainer.steps_done} PPO decisions done", file=sys.stderr)
    elif config.imitation_steps:
        nll = trainer.imitate()
        print(f"imitation of splitwise-dp: {config.imitation_steps} decisions, final NLL {nll:.3f}", file=sys.stderr)
    trainer.train(log_csv=log_csv if config.steps else None, checkpoint=checkpoint)
    trained_s = time.perf_counter() - started
    metadata = PolicyMetadata(
        featurizer_version=FEATURIZER_VERSION,
        dims=dims,
        history=config.history,
        edge_machine=edge.machine,
        edge_profile=profile_digest(edge),
        cloud_profile=profile_digest(cloud),
        scenario=scenario.name,
        seed=config.seed,
        steps=trainer.steps_done,
        drift=config.drift,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(trainer.net, metadata, args.out)
    if trainer.log_rows:
        _plot(trainer.log_rows, args.out.with_suffix(".png"), f"{scenario.name}, seed {config.seed}")
    print(f"wrote {args.out} after {trained_s:.0f} s of training; held-out evaluation:", file=sys.stderr)
    env = SplitwiseEnv(scenario, edge, cloud, dims, planning=planning, noise_sd=args.noise_sd)
    rows = {name: asdict(trainer.evaluate(env, args.seeds, name)) for name in ("policy", "splitwise-dp")}
    for row in rows.values():
        row.pop("backlog")
    report = {"config": asdict(config), "seeds": list(args.seeds), "train_seconds": trained_s, "heldout": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print_table({"splitwise-rl (torch)": rows["policy"], "splitwise-dp": rows["splitwise-dp"]})
    return 0


def _policy_entry(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        return "splitwise-rl", Path(text)
    if not label or not path:
        raise argparse.ArgumentTypeError(f"expected PATH or LABEL=PATH, got {text!r}")
    return f"splitwise-rl[{label}]", Path(path)


def _evaluate(args: argparse.Namespace) -> int:
    from training.processes import Timeline
    from training.simulator import Simulator, fixed

    scenario, edge, cloud, dims = _load(args)
    for _, path in args.policy:
        if not path.is_file():
            raise InvalidArgumentError(f"--policy {path}: no such file")
    rows: list[tuple[str, PlanChoice, Path | None]] = []
    for name in (n.strip() for n in args.planners.split(",") if n.strip()):
        if name == "splitwise-rl":
            rows += [(label, NamedPlanner(name), path) for label, path in args.policy]
        else:
            rows.append((name, NamedPlanner(name) if name in _registry_names() else PlanSpec(name), None))
    table: dict[str, dict[str, float]] = {}
    traces: dict[str, tuple[list[float], list[int]]] = {}
    for label, choice, policy in rows:
        planning = scenario.planning(args.min_edge_layers, policy)
        objectives, latencies, responses, planner_ms, backlog, fallbacks = [], [], [], [], [], 0
        slopes = []
        for index, seed in enumerate(args.seeds):
            sim = Simulator(
                Timeline(scenario, seed=seed), edge, cloud, dims, planning=planning, noise_sd=args.noise_sd, seed=seed
            )
            times: list[float] = []
            queue: list[int] = []
            for outcome in sim.run(fixed(choice)):
                objectives.append(-outcome.reward)
                latencies.append(outcome.latency_s)
                responses.append(outcome.response_s)
                planner_ms.append(1e3 * outcome.decision.planner_s)
                fallbacks += "fallback" in outcome.decision.plan.name
                times.append(outcome.started_s)
                queue.append(outcome.decision.observation.backlog_requests if outcome.decision.observation else 0)
            backlog += queue
            # Growth while requests arrive (after the last arrival every queue drains).
            arriving = [(t, q) for t, q in zip(times, queue, strict=True) if t <= scenario.duration_s]
            if len(arriving) > 1:
                slopes.append(float(np.polyfit([t for t, _ in arriving], [q for _, q in arriving], 1)[0]))
            if index == 0:
                traces[label] = (times, queue)
        table[label] = {
            "objective": float(np.mean(objectives)),
            "latency_mean_s": float(np.mean(latencies)),
            "latency_p95_s": float(np.percentile(latencies, 95)),
            "response_p95_s": float(np.percentile(responses, 95)),
            "backlog_mean": float(np.mean(backlog)),
            "backlog_max": float(max(backlog)),
            "backlog_slope_per_s": float(np.mean(slopes)) if slopes else 0.0,
            "planner_ms_median": float(np.median(planner_ms)),
            "planner_ms_p99": float(np.percentile(planner_ms, 99)),
            "requests": float(len(objectives)),
            "rl_fallbacks": float(fallbacks),
        }
    _print_table(table)
    if args.json:
        args.json.write_text(
            json.dumps({"scenario": scenario.name, "seeds": list(args.seeds), "table": table}, indent=2) + "\n",
            encoding="utf-8",
        )
    if args.backlog_png:
        _plot_backlog(traces, args.backlog_png, f"{scenario.name}, seed {args.seeds[0]}")
    return 0


def _plot_backlog(traces: dict[str, tuple[list[float], list[int]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":", "-.")
    for index, (label, (times, queue)) in enumerate(traces.items()):
        ax.step(times, queue, where="post", label=label, linestyle=styles[index % len(styles)])
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests waiting at each decision")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title(f"backlog: {title}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _registry_names() -> tuple[str, ...]:
    from policies.planners.registry import PLANNER_NAMES

    return PLANNER_NAMES


def _print_table(table: dict[str, dict[str, Any]]) -> None:
    columns = [
        c
        for c in (
            "objective",
            "latency_mean_s",
            "latency_p95_s",
            "response_p95_s",
            "backlog_mean",
            "backlog_max",
            "backlog_slope_per_s",
            "planner_ms_median",
            "planner_ms_p99",
            "requests",
        )
        if any(c in row for row in table.values())
    ]
    # A Markdown table: it reads in a terminal and pastes into the docs as it is.
    print("| planner | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.4g}" if c in row else "" for c in columns) + " |")


def _plot(rows: Sequence[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["steps"] for r in rows], [r["objective"] for r in rows], marker=".")
    ax.set_xlabel("PPO decisions")
    ax.set_ylabel("mean objective per request (rollout)")
    ax.set_yscale("log")
    ax.set_title(f"learning curve: {title}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
