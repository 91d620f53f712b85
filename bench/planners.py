"""The five planners on the loopback testbed: latency per request under Poisson arrivals.

The testbed (evaluation/testbed.py): mosquitto and one cloud worker process behind a shaped
link, the device agent as a process, each with one compute thread (2-core machine). The agent
plans every request itself: the request names the planner (`"planner": "splitwise-dp"` etc.), the
agent observes its link estimate, backlog, cloud load and energy queue and runs that planner.

Protocol (fixed before any result was seen):
- link conditions 100 Mbit/s + 5 ms RTT and 10 Mbit/s + 40 ms RTT (bandwidth by tbf in a network
  namespace when possible, else by the TCP emulator; delay by the TCP emulator);
- per condition, a warm-up (2 cloud-only requests for the link estimate, then 2 edge-only requests
  whose mean service time S sets the arrival rate λ = --load / S);
- per planner, --requests requests of --tokens tokens each (greedy, a prompt that asks for a long
  answer) with exponential inter-arrival times at rate λ — the same arrival times for every
  planner (one seeded draw per condition); planners run one after the other, in a rotated order
  per condition, each after the queue has drained;
- latency = from publishing the request to its final reply (queueing included), measured by the
  app; decision time = the planner's own time as the agent reports it (`plan.planner_ms`).

Prints per condition and planner: mean and P95 latency, ratios to splitwise-dp, mean tokens, the
share of requests that used the cloud, and decision time (median, max).

On a machine where device and worker share one CPU model the cloud is no faster than the edge;
`--edge-cpu 0.33` limits the agent to a third of a core (a device three times slower than the
cloud worker, like the Raspberry Pi 5 against a server core).

Run: python bench/planners.py [--requests 12] [--tokens 64] [--load 0.6] [--edge-cpu SHARE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.testbed import LinkCondition, Testbed
from policies.planners.registry import PLANNER_NAMES

CONDITIONS = (LinkCondition("100mbit-5ms", 100e6, 0.005), LinkCondition("10mbit-40ms", 10e6, 0.040))
PROMPT = "Write a long story about a robot who learns to paint. Describe every painting in detail."


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95, method="linear"))


def run_planner(bed: Testbed, planner: str, arrivals: list[float], tokens: int) -> list[dict[str, Any]]:
    """Sends one request per arrival time (seconds from now); returns each final reply with its latency."""
    results: list[dict[str, Any]] = [{} for _ in arrivals]
    waiters: list[threading.Thread] = []
    start = time.monotonic()
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, start + at - time.monotonic()))
        sent = time.monotonic()
        box = bed.send({"prompt": PROMPT, "max_tokens": tokens, "planner": planner, "temperature": 0.0})

        def wait(i: int = i, box: Any = box, sent: float = sent) -> None:
            reply = bed.wait_final(box)
            results[i] = {"reply": reply, "latency_s": time.monotonic() - sent}

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        waiters.append(thread)
    for thread in waiters:
        thread.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="requests per planner and condition")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--load", type=float, default=0.6, help="arrival rate as a fraction of edge-only capacity")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--edge-cpu",
        type=float,
        default=None,
        metavar="SHARE",
        help="limit the device agent to SHARE of one core (cgroup CFS quota), making it slower than the worker",
    )
    parser.add_argument("--json", help="write every request's figures here")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    table: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-planners-") as tmp,
        Testbed(Path(tmp), edge_cpu_share=args.edge_cpu) as bed,
    ):
        how = "tbf in a network namespace" if bed.kernel_shaping else f"the TCP emulator ({bed.why_not_kernel})"
        edge = "a full core" if args.edge_cpu is None else f"{args.edge_cpu:g} of a core (CFS quota)"
        print(
            f"bandwidth shaped by {how}; delay by the TCP emulator; {args.tokens}-token requests; "
            f"device agent on {edge}, worker on a full core",
            flush=True,
        )
        for ci, cond in enumerate(CONDITIONS):
            bed.set_link(cond)
            for _ in range(2):
                bed.ask({"prompt": PROMPT, "max_tokens": 8, "plan": "cloud-only"})
            service = statistics.fmean(
                bed.ask({"prompt": PROMPT, "max_tokens": args.tokens, "plan": "edge-only"})["timings"]["total_s"]
                for _ in range(2)
            )
            rate = args.load / service
            arrivals = list(np.cumsum(rng.exponential(1 / rate, size=args.requests)) - 0.0)
            arrivals = [a - arrivals[0] for a in arrivals]
            print(
                f"\n{cond.describe()}: edge-only service {service:.2f} s/request → Poisson arrivals at "
                f"{rate:.3f}/s ({args.requests} requests over {arrivals[-1]:.1f} s)",
                flush=True,
            )
            order = PLANNER_NAMES[ci % len(PLANNER_NAMES) :] + PLANNER_NAMES[: ci % len(PLANNER_NAMES)]
            rows: dict[str, dict[str, Any]] = {}
            for planner in order:
                results = run_planner(bed, planner, arrivals, args.tokens)
                finals = [r["reply"] for r in results]
                bad = [f for f in finals if f.get("type") != "final"]
                if bad:
                    raise RuntimeError(f"{planner}: {bad[0]}")
                latencies = [r["latency_s"] for r in results]
                decide = [f["plan"]["planner_ms"] for f in finals]
                rows[planner] = {
                    "condition": cond.name,
                    "planner": planner,
                    "mean_s": statistics.fmean(latencies),
                    "p95_s": p95(latencies),
                    "tokens": statistics.fmean(f["tokens"]["completion"] for f in finals),
                    "cloud_share": sum(f["timings"]["cloud_requests"] > 0 for f in finals) / len(finals),
                    "decision_ms_median": statistics.median(decide),
                    "decision_ms_max": max(decide),
                    "latencies_s": latencies,
                    "plans": [
                        {k: f["plan"][k] for k in ("name", "layers", "edge_heads", "ffn", "lm_head")} for f in finals
                    ],
                }
                print(f"  {planner:<13} done: mean {rows[planner]['mean_s']:.2f} s", flush=True)
            ref = rows["splitwise-dp"]
            print(
                f"{'planner':<13} {'mean s':>8} {'P95 s':>8} {'mean/dp':>8} {'P95/dp':>8} {'tokens':>7} "
                f"{'cloud':>6} {'decide ms (median/max)':>23}"
            )
            for planner in PLANNER_NAMES:
                r = rows[planner]
                print(
                    f"{planner:<13} {r['mean_s']:>8.2f} {r['p95_s']:>8.2f} {r['mean_s'] / ref['mean_s']:>8.2f} "
                    f"{r['p95_s'] / ref['p95_s']:>8.2f} {r['tokens']:>7.1f} {100 * r['cloud_share']:>5.0f}% "
                    f"{r['decision_ms_median']:>11.2f} / {r['decision_ms_max']:<9.2f}",
                    flush=True,
                )
            table.extend(rows.values())
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
