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

With --simulate, each condition is also replayed in the training simulator (training/simulator.py)
with what the testbed had: the agent's measured profile and the worker's published one, the
condition's bandwidth and RTT (fixed), the agent's planning settings, and per planner the same
arrival times, prompt and completion lengths as its testbed requests; the simulator's noise is the
one training uses (MEASURED_NOISE_SD, seeded by --seed). Twice: (A) with the edge and cloud running at
their profiles' speeds, and (B) with the edge slowdown and cloud load the warm-up requests measured
(the service time they took against the cost model's; the profiles are measured once at start, and
this machine's speed drifts by up to 3x from minute to minute). It prints the simulator's mean and
P95 beside the testbed's and their ratios (the calibration check of docs/simulator.md: within 20 %).

On a machine where device and worker share one CPU model the cloud is no faster than the edge;
`--edge-cpu 0.33` limits the agent to a third of a core (a device three times slower than the
cloud worker, like the Raspberry Pi 5 against a server core).

Run: python bench/planners.py [--requests 12] [--tokens 64] [--load 0.6] [--edge-cpu SHARE] [--simulate]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.cpu import cpu_features
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


@dataclass(frozen=True)
class SimulatorWorld:
    """What the simulator replays a condition with: the testbed's profiles, link and, as the true edge
    slowdown and cloud load (each a constant level), either 1 (the speeds the profiles were measured
    at) or what the warm-up requests measured."""

    edge: Any  # splitwise_core.profile.Profile (imported with the simulator)
    cloud: Any
    dims: Any  # policies.segments.ModelDims
    edge_load: float = 1.0
    cloud_load: float = 1.0


def simulator_world(bed: Testbed) -> SimulatorWorld:
    # Imported here: the simulator is only needed with --simulate.
    from policies.segments import ModelDims
    from splitwise_core.profile import Profile
    from splitwise_core.tokenizer import bundled_model_path

    dims = ModelDims.of_model_file(bundled_model_path())
    (published,) = bed.worker_profiles.values()
    cloud = Profile.model_validate(json.loads(published)["profile"])  # the message wraps it
    return SimulatorWorld(Profile.load(bed.edge_profile()), cloud, dims)


def warm_up_loads(
    world: SimulatorWorld, cond: LinkCondition, edge_only: list[dict[str, Any]], cloud_only: list[dict[str, Any]]
) -> SimulatorWorld:
    """`world` with the edge slowdown and cloud load the warm-up requests show: the measured service
    time against the cost model's at load 1 and 2 (a latency is linear in each load), solved for the
    load, the edge's from the edge-only requests first, then the cloud's from the cloud-only ones."""
    from policies.cost import Observation, predict
    from policies.plan import parse_plan
    from policies.segments import compile_plan

    bandwidth = shaped_bandwidth(cond)

    def solve(plan: str, replies: list[dict[str, Any]], edge_load: float | None = None) -> float:
        """The load of the side `plan` computes on: the edge's when `edge_load` is None, else the
        cloud's with the edge at `edge_load`."""
        schedule = compile_plan(parse_plan(plan, world.dims.n_layer, world.dims.n_head), world.dims)

        def latency(reply: dict[str, Any], load: float) -> float:
            tokens = reply["tokens"]
            obs = Observation(
                bandwidth_bps=bandwidth,
                rtt_s=cond.rtt_s,
                prompt_len=tokens["prompt"],
                max_tokens=max(1, tokens["completion"]),
                edge_load=load if edge_load is None else edge_load,
                cloud_load=1.0 if edge_load is None else load,
            )
            return predict(schedule, obs, world.edge, world.cloud, world.dims, "q8_0").latency_s

        at_1 = statistics.fmean(latency(r, 1.0) for r in replies)
        per_load = statistics.fmean(latency(r, 2.0) for r in replies) - at_1
        measured = statistics.fmean(r["timings"]["total_s"] for r in replies)
        return max(0.05, 1.0 + (measured - at_1) / per_load) if per_load > 0 else 1.0

    edge_load = solve("edge-only", edge_only)
    return dataclasses.replace(world, edge_load=edge_load, cloud_load=solve("cloud-only", cloud_only, edge_load))


def shaped_bandwidth(cond: LinkCondition) -> float:
    if cond.bandwidth_bps is None:
        raise ValueError(f"{cond.name}: the simulator needs a bandwidth; this condition leaves the link unshaped")
    return cond.bandwidth_bps


def simulate(
    tmp: Path,
    world: SimulatorWorld,
    cond: LinkCondition,
    rows: dict[str, dict[str, Any]],
    arrivals: list[float],
    seed: int,
) -> dict[str, tuple[float, float]]:
    """Each planner's mean and P95 response time (arrival to last token) in the simulator, on the
    requests the testbed served it (see the module's docstring)."""
    from splitwise_device.config import PlanningConfig
    from splitwise_device.controller import NamedPlanner
    from training.processes import Timeline
    from training.scenario import Scenario
    from training.simulator import MEASURED_NOISE_SD, Simulator, fixed

    planning = PlanningConfig(probe_interval_s=2.0, link_half_life_s=5.0)  # the testbed agent's
    out: dict[str, tuple[float, float]] = {}
    for planner, row in rows.items():
        trace = tmp / f"trace-{cond.name}-{planner}.json"
        requests = [
            {"at_s": at, "prompt_len": tokens["prompt"], "max_tokens": max(1, tokens["completion"])}
            for at, tokens in zip(arrivals, row["token_counts"], strict=True)
        ]
        trace.write_text(json.dumps(requests))
        scenario = Scenario.model_validate(
            {
                "name": f"testbed-{cond.name}",
                "seed": seed,
                "duration_s": arrivals[-1] + 1.0,
                "arrivals": {"kind": "trace", "file": str(trace)},
                "link": {"states": [{"bandwidth_mbps": shaped_bandwidth(cond) / 1e6, "rtt_ms": cond.rtt_s * 1e3}]},
                "edge_load": {"levels": [world.edge_load]},
                "cloud_load": {"levels": [world.cloud_load]},
            }
        )
        sim = Simulator(
            Timeline(scenario),
            world.edge,
            world.cloud,
            world.dims,
            codec="q8_0",
            planning=planning,
            noise_sd=MEASURED_NOISE_SD,
            seed=seed,
        )
        responses = [outcome.response_s for outcome in sim.run(fixed(NamedPlanner(planner)))]
        out[planner] = (statistics.fmean(responses), p95(responses))
    return out


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
    parser.add_argument(
        "--simulate", action="store_true", help="also replay each condition in the training simulator, side by side"
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
        print(f"CPU: {cpu_features()}")
        print(
            f"bandwidth shaped by {how}; delay by the TCP emulator; {args.tokens}-token requests; "
            f"device agent on {edge}, worker on a full core",
            flush=True,
        )
        for ci, cond in enumerate(CONDITIONS):
            bed.set_link(cond)
            warm_cloud = [bed.ask({"prompt": PROMPT, "max_tokens": 8, "plan": "cloud-only"}) for _ in range(2)]
            warm_edge = [bed.ask({"prompt": PROMPT, "max_tokens": args.tokens, "plan": "edge-only"}) for _ in range(2)]
            service = statistics.fmean(reply["timings"]["total_s"] for reply in warm_edge)
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
                    "token_counts": [f["tokens"] for f in finals],
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
            if args.simulate:
                world = simulator_world(bed)
                loaded = warm_up_loads(world, cond, warm_edge, warm_cloud)
                as_profiled = simulate(Path(tmp), world, cond, rows, arrivals, args.seed)
                with_loads = simulate(Path(tmp), loaded, cond, rows, arrivals, args.seed)
                print(
                    f"\nsimulator vs testbed, {cond.name}: A = loads 1 (the profiles' speeds), B = the warm-up's "
                    f"edge slowdown {loaded.edge_load:.2f} and cloud load {loaded.cloud_load:.2f}\n"
                    f"{'planner':<13} {'bed mean':>9} {'A mean':>7} {'A/bed':>6} {'B mean':>7} {'B/bed':>6} "
                    f"{'bed P95':>8} {'A P95':>7} {'A/bed':>6} {'B P95':>7} {'B/bed':>6}"
                )
                for planner in PLANNER_NAMES:
                    r = rows[planner]
                    (a_mean, a_p95), (b_mean, b_p95) = as_profiled[planner], with_loads[planner]
                    r["sim"] = {
                        "edge_load": loaded.edge_load,
                        "cloud_load": loaded.cloud_load,
                        "loads_1": {"mean_s": a_mean, "p95_s": a_p95},
                        "warm_up_loads": {"mean_s": b_mean, "p95_s": b_p95},
                    }
                    print(
                        f"{planner:<13} {r['mean_s']:>9.2f} {a_mean:>7.2f} {a_mean / r['mean_s']:>6.2f} "
                        f"{b_mean:>7.2f} {b_mean / r['mean_s']:>6.2f} {r['p95_s']:>8.2f} {a_p95:>7.2f} "
                        f"{a_p95 / r['p95_s']:>6.2f} {b_p95:>7.2f} {b_p95 / r['p95_s']:>6.2f}",
                        flush=True,
                    )
            table.extend(rows.values())
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
