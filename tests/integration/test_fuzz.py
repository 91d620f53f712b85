"""The front door under fuzzing: malformed requests at the agent and corrupted frames at workers,
a bounded count for CI (bench/fuzz.py throws thousands). Real mosquitto, agent and worker processes.

Every attempt that has a valid place to be answered must get a clear error (or, if it was valid
enough, an answer); the processes stay alive; a normal request still succeeds after each round;
nothing is published outside the project's namespace and the attempts' own reply topics; and the
second of two identical rounds leaves the agent's RSS within 10% of where the first left it.

The workers' RSS is printed, not asserted: it is not yet flat. `python bench/fuzz.py --payloads 250
--frames 250 --rounds 8` showed a one-time step of 9-16 MiB in both workers in the same round
(round 3 or 6 in two runs), then about 1 MiB a round (112.4 → 135.4 MiB over 8 rounds; the agent
176.0 → 179.4 MiB). Whether that is a leak or a bound being filled is open (issue 10).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzz import CLEAR_ERROR, Report, ask_normally, fuzz_round, fuzz_system

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(900)]

SEED = 20261130
PAYLOADS = 250
FRAMES = 250
SETTLE_S = 20.0
RSS_GROWTH = 0.10


def check(report: Report, what: str) -> None:
    print(f"\n{what}\n{report.table()}")
    assert not report.defects, "\n".join(report.defects[:30])
    assert not report.foreign_topics, report.foreign_topics
    for category in {c for c, _ in report.counts} - {"valid", "no ResponseTopic"}:
        assert report.counts[(category, CLEAR_ERROR)] > 0, f"{category}: no attempt reached a check"


def test_agent_and_workers_survive_two_identical_rounds(tmp_path: Path) -> None:
    with fuzz_system(tmp_path) as system:
        rss = []
        for round_ in (1, 2):
            agent, workers = fuzz_round(
                system, f"round{round_}", seed=SEED, payloads=PAYLOADS, frames=FRAMES, settle_s=SETTLE_S
            )
            assert all(system.alive().values()), f"{system.alive()}\n{system.logs()}"
            check(agent, f"round {round_}: {PAYLOADS} requests at the agent")
            check(workers, f"round {round_}: {FRAMES} frames at the workers")
            final = ask_normally(system.broker)
            assert final["tokens"]["completion"] >= 1, final
            rss.append(system.rss())
            print(f"RSS after round {round_}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in rss[-1].items()))
        agent = system.agent.name
        assert rss[1][agent] <= rss[0][agent] * (1 + RSS_GROWTH), f"agent RSS {rss[0][agent]} → {rss[1][agent]} bytes"
