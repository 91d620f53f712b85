"""The cost model against the real system: predicted vs measured latency of random plans.

A small version of bench/validate_cost_model.py (which gives the report in docs/planners.md):
mosquitto and a worker process behind a shaped link (tbf in a network namespace when this machine
allows it, else the TCP emulator, plus the emulator's delay), the agent as a process. Worker and
agent measure their own profiles at start; the agent estimates the link itself. Every reply's
prediction (cost model, the agent's own link estimate) is compared with what it measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from evaluation.testbed import MESSAGES, LinkCondition, Testbed, validation_plan

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]  # measured up to 73 s on 2 busy cores
LINK = LinkCondition("20mbit-20ms", 20e6, 0.020)
PLANS = 6
TOKENS = 6
MEDIAN_ERROR = 0.20  # the bound on the median absolute error
RUNS_PER_PLAN = 2


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed(Path(tmp_path_factory.mktemp("testbed"))) as bed:
        bed.set_link(LINK)
        yield bed


def test_predicted_latency_matches_the_measured_one(testbed: Testbed) -> None:
    how = "tbf" if testbed.kernel_shaping else f"TCP emulator ({testbed.why_not_kernel})"
    print(f"\n{LINK.describe()}, bandwidth by {how}")
    for warmup in ("heads:4", "cloud-only", "cloud-only"):
        final = testbed.ask({"messages": MESSAGES, "max_tokens": TOKENS, "plan": warmup})
        assert final["type"] == "final", final
    rng = np.random.default_rng(7)
    errors = []
    for i in range(PLANS):
        plan = validation_plan(rng, i)
        runs = []
        for _ in range(RUNS_PER_PLAN):
            final = testbed.ask({"messages": MESSAGES, "max_tokens": TOKENS, "plan": plan.to_dict()})
            assert final["type"] == "final", final
            assert not final["plan"]["fell_back_to_edge"] and final["timings"]["cloud_requests"] > 0
            runs.append(final)
        # A stall on a busy machine only ever adds time: the faster run is the one the model speaks
        # for. A systematic error shows in both runs alike.
        final = min(runs, key=lambda reply: reply["timings"]["total_s"])
        predicted = final["plan"]["predicted"]["latency_s_for_completion"]
        measured = final["timings"]["total_s"]
        obs = final["plan"]["observation"]
        errors.append((predicted - measured) / measured)
        print(
            f"{plan.name:<14} predicted {predicted:7.3f} s measured {measured:7.3f} s error {100 * errors[-1]:+6.1f}% "
            f"(link estimate {obs['bandwidth_bps'] / 1e6:.1f} Mbit/s, {obs['rtt_ms']:.1f} ms)"
        )
        # The estimate must have found the shaped link: RTT at least the emulated delay.
        assert obs["rtt_ms"] >= 0.8 * 1e3 * LINK.rtt_s
    median = statistics.median(abs(e) for e in errors)
    print(f"median |error| {100 * median:.1f}%")
    assert median <= MEDIAN_ERROR, errors
