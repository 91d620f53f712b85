"""Predicted vs measured latency of random plans on the real system (the cost-model validation).

The loopback testbed (evaluation/testbed.py): mosquitto and one cloud worker process behind a
shaped link, the device agent as a process. The worker measures its own profile at start and
publishes it; the agent measures its own profile too (nothing is read from deploy/profiles), and
estimates the link from its transfers and probes. Each request carries a random plan; the final
reply carries what the agent predicted for it (cost model, its own link estimate) and what it
measured, so the error below is the error of the whole chain — profiles, link estimate, cost model.

Plans (fixed before any result was seen): plan i uses style i mod 3 —
0: every layer drawn independently (edge / cloud / a random proper head subset; FFN edge, cloud or
split; `policies.plan.random_plan`: many round trips per token);
1: runs of whole layers on one side (switching sides with probability 0.15 per layer) with 20% of
the layers split by heads; 2: runs of whole layers only. LM head on either side. The same plans
run under every link condition, in the same order, after three warm-up requests per condition
(heads:4 — many small messages, for the RTT estimate — then cloud-only twice — large logits
replies, for the bandwidth estimate; a first trial run with cloud-only warm-ups alone left the
RTT estimate stale for the first plan).

Link conditions: LAN (unshaped loopback), 100 Mbit/s + 10 ms RTT, 10 Mbit/s + 40 ms RTT.
Bandwidth by tbf in a network namespace when possible (else the TCP emulator), delay by the TCP
emulator (docs/link-emulation.md).

Run: python bench/validate_cost_model.py [--plans 30] [--tokens 8] [--json out.json]
Prints one row per plan and condition, then per condition the median and P90 absolute error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.testbed import MESSAGES, LinkCondition, Testbed, validation_plan
from policies.segments import ModelDims, compile_plan

CONDITIONS = (
    LinkCondition("lan", None, 0.0),
    LinkCondition("100mbit-10ms", 100e6, 0.010),
    LinkCondition("10mbit-40ms", 10e6, 0.040),
)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    plans = [validation_plan(rng, i) for i in range(args.plans)]
    dims = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)
    rows: list[dict[str, Any]] = []
    conditions = [c for c in CONDITIONS if not args.only or c.name in args.only]
    with tempfile.TemporaryDirectory(prefix="validate-") as tmp, Testbed(Path(tmp)) as bed:
        how = "tbf in a network namespace" if bed.kernel_shaping else f"the TCP emulator ({bed.why_not_kernel})"
        print(f"bandwidth shaped by {how}; delay by the TCP emulator", flush=True)
        for cond in conditions:
            bed.set_link(cond)
            # Warm-up, so the agent's link estimate settles on this link: small messages (heads:4, many
            # round trips) for the RTT, large ones (cloud-only: the prompt's f32/q8 rows go up) for the bandwidth.
            for warmup in ("heads:4", "cloud-only", "cloud-only"):
                bed.ask({"messages": MESSAGES, "max_tokens": args.tokens, "plan": warmup})
            print(f"\n{cond.describe()}", flush=True)
            print(
                f"{'plan':<14} {'trips':>5} {'tokens':>6} {'predicted s':>11} {'measured s':>10} {'error':>7}  "
                f"{'est. Mbit/s':>11} {'est. RTT ms':>11}",
                flush=True,
            )
            for plan in plans:
                started = time.monotonic()
                reply = bed.ask(
                    {"messages": MESSAGES, "max_tokens": args.tokens, "plan": plan.to_dict(), "temperature": 0.0}
                )
                if reply["type"] != "final":
                    raise RuntimeError(f"{plan.name}: {reply}")
                predicted = reply["plan"]["predicted"]["latency_s_for_completion"]
                measured = reply["timings"]["total_s"]
                obs = reply["plan"]["observation"]
                row = {
                    "condition": cond.name,
                    "plan": plan.name,
                    "round_trips_per_token": compile_plan(plan, dims).cloud_round_trips,
                    "tokens": reply["tokens"]["completion"],
                    "predicted_s": predicted,
                    "measured_s": measured,
                    "error": (predicted - measured) / measured,
                    "estimated_bandwidth_bps": obs["bandwidth_bps"],
                    "estimated_rtt_ms": obs["rtt_ms"],
                    "fell_back": reply["plan"].get("fell_back_to_edge", False),
                    "recovery_events": len(reply.get("recovery", [])),
                    "wall_s": time.monotonic() - started,
                }
                rows.append(row)
                print(
                    f"{plan.name:<14} {row['round_trips_per_token']:>5} {row['tokens']:>6} {predicted:>11.3f} "
                    f"{measured:>10.3f} {100 * row['error']:>+6.1f}%  {obs['bandwidth_bps'] / 1e6:>11.1f} "
                    f"{obs['rtt_ms']:>11.2f}",
                    flush=True,
                )
    return rows


def summarize(rows: list[dict[str, Any]]) -> None:
    print("\ncondition        plans  median |error|  P90 |error|  mean error  max |error|")
    for name in dict.fromkeys(r["condition"] for r in rows):
        errors = [r["error"] for r in rows if r["condition"] == name]
        absolute = sorted(abs(e) for e in errors)
        p90 = absolute[min(len(absolute) - 1, int(0.9 * len(absolute)))]
        print(
            f"{name:<16} {len(errors):>5} {100 * statistics.median(absolute):>13.1f}% {100 * p90:>11.1f}% "
            f"{100 * statistics.fmean(errors):>+10.1f}% {100 * absolute[-1]:>11.1f}%"
        )
    every = sorted(abs(r["error"]) for r in rows)
    print(f"{'all':<16} {len(every):>5} {100 * statistics.median(every):>13.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8, help="max_tokens of each request")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--only", nargs="*", help="condition names to run (default: all)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = run(args)
    summarize(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
