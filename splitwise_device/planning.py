"""`splitwise-device plan`: what a planner would choose for a link and a backlog, and why.

Prints the chosen plan as a per-layer table (edge heads, cloud heads, FFN mode) with the cost
model's predicted breakdown; `--all` compares every planner side by side (objective, predicted
latency, energy, edge memory, decision time).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from typing import Any

from policies.cost import Observation, Prediction, predict
from policies.plan import Plan, Side
from policies.planners.context import PlanningContext
from policies.planners.registry import PLANNER_NAMES, make_planner
from policies.segments import ModelDims
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import Profile
from splitwise_core.tokenizer import bundled_model_path

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps|b/s|kb/s|mb/s|gb/s)?\s*$", re.I)
_RATE_UNITS = {
    "bit": 1,
    "bps": 1,
    "kbit": 1e3,
    "kbps": 1e3,
    "mbit": 1e6,
    "mbps": 1e6,
    "gbit": 1e9,
    "gbps": 1e9,
    "b/s": 8,
    "kb/s": 8e3,
    "mb/s": 8e6,
    "gb/s": 8e9,
}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s)?\s*$", re.I)
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_rate(text: str) -> float:
    """Bits per second from `10mbit`, `100Mbps`, `1.5MB/s` (bytes), `0` (link cut)."""
    m = _RATE.match(text)
    if m is None:
        raise InvalidArgumentError(f"bandwidth {text!r}: expected e.g. 10mbit, 100Mbps, 1.5MB/s or 0")
    return float(m.group(1)) * _RATE_UNITS[(m.group(2) or "bit").lower()]


def parse_duration(text: str) -> float:
    """Seconds from `20ms`, `0.02s`, `500us`; `inf` means no link."""
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    m = _DURATION.match(text)
    if m is None:
        raise InvalidArgumentError(f"duration {text!r}: expected e.g. 20ms, 0.5s or 500us")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def _row(name: str, plan: Plan, pred: Prediction, objective: float, seconds: float) -> dict[str, Any]:
    return {
        "planner": name,
        "plan": plan.to_dict(),
        "summary": plan.summary(),
        "objective": objective,
        "latency_s": pred.latency_s,
        "prefill_s": pred.prefill_s,
        "decode_s_per_token": pred.decode_s_per_token,
        "energy_j": pred.energy_j,
        "accuracy_cost": pred.accuracy_cost,
        "edge_memory_bytes": pred.edge_memory_bytes,
        "breakdown": pred.breakdown,
        "decision_ms": seconds * 1e3,
    }


def run_plan_command(args: argparse.Namespace) -> int:
    edge, cloud = Profile.load(args.profile), Profile.load(args.cloud_profile)
    dims = ModelDims.of_model_file(args.model or bundled_model_path())
    observation = Observation(
        bandwidth_bps=parse_rate(args.bandwidth),
        rtt_s=parse_duration(args.rtt),
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        backlog_s=args.backlog_s,
        work_queue_u=args.backlog_s,
        cloud_load=args.cloud_load,
    )
    ctx = PlanningContext(edge, cloud, dims, codec=args.codec, min_edge_layers=args.min_edge_layers)
    rows = []
    for name in PLANNER_NAMES if args.all else (args.planner,):
        start = time.perf_counter()
        plan = make_planner(name, ctx).plan(observation)
        seconds = time.perf_counter() - start
        pred = predict(plan, observation, edge, cloud, dims, args.codec)
        rows.append(_row(name, plan, pred, ctx.score(plan, observation), seconds))
    if args.json:
        print(json.dumps(rows if args.all else rows[0], default=float))
        return 0
    if args.all:
        print(
            f"{'planner':<14} {'objective':>10} {'latency s':>10} {'ms/token':>9} {'energy J':>9} "
            f"{'edge MB':>8} {'decide ms':>9}  layers edge/cloud/mixed"
        )
        for r in rows:
            layers = r["summary"]["layers"]
            print(
                f"{r['planner']:<14} {r['objective']:>10.4g} {r['latency_s']:>10.4f} "
                f"{1e3 * r['decode_s_per_token']:>9.2f} {r['energy_j']:>9.3f} {r['edge_memory_bytes'] / 1e6:>8.1f} "
                f"{r['decision_ms']:>9.2f}  {layers['edge']}/{layers['cloud']}/{layers['mixed']}"
            )
        return 0
    r = rows[0]
    plan = Plan.from_dict(r["plan"])
    print(
        f"planner {r['planner']}: {args.bandwidth} link, RTT {args.rtt}, backlog {args.backlog_s:g} s, "
        f"codec {args.codec}; decided in {r['decision_ms']:.2f} ms"
    )
    print(f"{'layer':>5} {'edge heads':<28} {'cloud heads':<28} {'FFN':<5}")
    for i, layer in enumerate(plan.layers):
        edge_heads = ",".join(map(str, plan.heads(Side.EDGE, i))) or "-"
        cloud_heads = ",".join(map(str, plan.heads(Side.CLOUD, i))) or "-"
        print(f"{i:>5} {edge_heads:<28} {cloud_heads:<28} {layer.ffn.value:<5}")
    print(f"LM head on {plan.lm_head.value}")
    print(
        f"predicted: latency {r['latency_s']:.4f} s (prefill {r['prefill_s']:.4f} s + "
        f"{1e3 * r['decode_s_per_token']:.2f} ms/token), energy {r['energy_j']:.3f} J, "
        f"accuracy cost {r['accuracy_cost']:.4g}, edge memory {r['edge_memory_bytes'] / 1e6:.1f} MB, "
        f"objective {r['objective']:.4g}"
    )
    return 0
