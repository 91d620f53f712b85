"""The simulated device (training/simulator.py): the agent's queue discipline, the agent's own
controller as its view, the cost model on the true state as what happens, and −objective as reward."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest

from policies.cost import Observation, objective, predict
from policies.plan import parse_plan
from policies.segments import ModelDims, compile_plan
from splitwise_core.profile import Profile
from splitwise_device.config import PlanningConfig
from splitwise_device.controller import NamedPlanner, PlanSpec
from training.processes import Timeline
from training.scenario import Scenario
from training.simulator import Simulator, fixed

PROFILE = Path(__file__).resolve().parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
DIMS = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)  # SmolLM2-135M


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(PROFILE)


def timeline(tmp_path: Path, trace: str | None = None, **changes: object) -> Timeline:
    base: dict[str, object] = {
        "name": "t",
        "seed": 11,
        "duration_s": 300.0,
        "arrivals": {"kind": "poisson", "rate_per_s": 0.2},
        "lengths": {"prompt_len": {"low": 32, "high": 32}, "max_tokens": {"low": 8, "high": 8}},
        "link": {"states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}]},
    }
    if trace is not None:
        (tmp_path / "trace.csv").write_text("at_s,prompt_len,max_tokens\n" + trace)
        base["arrivals"] = {"kind": "trace", "file": str(tmp_path / "trace.csv")}
    return Timeline(Scenario.model_validate({**base, **changes}))


def test_requests_are_served_one_at_a_time_in_arrival_order(tmp_path: Path, profile: Profile) -> None:
    sim = Simulator(timeline(tmp_path, "0,32,8\n0,32,8\n0,32,8\n100,32,8\n"), profile, profile, DIMS)
    outcomes = list(sim.run(fixed(PlanSpec("edge-only"))))
    assert [o.request.at_s for o in outcomes] == [0, 0, 0, 100]
    for before, after in itertools.pairwise(outcomes[:3]):
        assert after.started_s == pytest.approx(before.finished_s)  # no gap while requests wait
    assert outcomes[3].started_s == 100  # the device idles until the next arrival
    backlogs = [o.decision.observation.backlog_requests for o in outcomes if o.decision.observation]
    assert backlogs == [2, 1, 0, 0]


def test_what_happens_is_the_cost_model_on_the_true_state(tmp_path: Path, profile: Profile) -> None:
    slow = timeline(tmp_path, "0,32,8\n", edge_load={"levels": [2.0]})
    (outcome,) = Simulator(slow, profile, profile, DIMS).run(fixed(PlanSpec("edge-only")))
    truth = Observation(50e6, 0.02, 32, 8, edge_load=2.0)
    expected = predict(parse_plan("edge-only", 30, 9), truth, profile, profile, DIMS, "q8_0")
    assert outcome.latency_s == pytest.approx(expected.latency_s)
    unloaded = predict(parse_plan("edge-only", 30, 9), replace(truth, edge_load=1.0), profile, profile, DIMS, "q8_0")
    assert outcome.latency_s == pytest.approx(2 * unloaded.latency_s)


def test_the_reward_is_minus_the_objective_of_what_happened(tmp_path: Path, profile: Profile) -> None:
    planning = PlanningConfig(v=2.0, w_latency=1.0)
    sim = Simulator(timeline(tmp_path, "0,32,8\n0,32,8\n"), profile, profile, DIMS, planning=planning)
    for outcome in sim.run(fixed(PlanSpec("layer-split:15"))):
        d = outcome.decision
        assert d.observation is not None and d.prediction is not None
        happened = replace(d.prediction, latency_s=outcome.latency_s, energy_j=outcome.energy_j)
        assert outcome.reward == pytest.approx(-objective(happened, d.observation, sim.weights))


def test_the_agent_learns_the_link_from_transfers_and_probes(tmp_path: Path, profile: Profile) -> None:
    drop = {"at_s": 150.0, "kind": "set", "bandwidth_mbps": 5.0}
    link = {"states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}], "events": [drop]}
    sim = Simulator(timeline(tmp_path, link=link), profile, profile, DIMS)
    seen = [(o.started_s, o.decision.observation) for o in sim.run(fixed(PlanSpec("layer-split:15")))]
    before = [obs for t, obs in seen if 100 < t < 150 and obs is not None]
    after = [obs for t, obs in seen if t > 250 and obs is not None]
    assert before and after
    assert before[-1].rtt_s == pytest.approx(0.02, rel=0.05)
    assert before[-1].bandwidth_bps == pytest.approx(50e6, rel=0.15)
    assert after[-1].bandwidth_bps == pytest.approx(5e6, rel=0.15)  # seen, with the estimator's lag


def test_a_cut_link_means_waiting_out_the_recovery_then_the_edge(tmp_path: Path, profile: Profile) -> None:
    link = {
        "states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}],
        "events": [{"at_s": 5.0, "duration_s": 100.0, "kind": "outage"}],
    }
    sim = Simulator(timeline(tmp_path, "0,32,8\n10,32,8\n200,32,8\n", link=link), profile, profile, DIMS)
    outcomes = list(sim.run(fixed(PlanSpec("cloud-only"))))
    assert [o.fell_back for o in outcomes] == [False, True, False]
    edge = predict(parse_plan("edge-only", 30, 9), Observation(0.0, math.inf, 32, 8), profile, profile, DIMS, "q8_0")
    assert outcomes[1].latency_s == pytest.approx(sim.fallback_wait_s + edge.latency_s)
    # The agent sees the cut too: its next cost-model decision during an outage stays on the edge.
    sim2 = Simulator(timeline(tmp_path, "10,32,8\n", link=link), profile, profile, DIMS)
    (outcome,) = sim2.run(fixed(NamedPlanner("splitwise-dp")))
    assert outcome.decision.plan.is_edge_only() and not outcome.fell_back


def test_overload_grows_the_backlog_and_the_drift_term(tmp_path: Path, profile: Profile) -> None:
    edge = predict(parse_plan("edge-only", 30, 9), Observation(50e6, 0.02, 32, 8), profile, profile, DIMS, "q8_0")
    rate = 1.5 / edge.latency_s  # utilisation 1.5 under edge-only
    sim = Simulator(
        timeline(tmp_path, duration_s=60.0, arrivals={"kind": "poisson", "rate_per_s": rate}), profile, profile, DIMS
    )
    outcomes = list(sim.run(fixed(PlanSpec("edge-only"))))
    waits = [o.started_s - o.request.at_s for o in outcomes]
    assert waits[-1] > 10 * edge.latency_s  # the queue grows without bound
    busiest = max(outcomes, key=lambda o: o.decision.observation.backlog_requests if o.decision.observation else 0)
    assert busiest.decision.observation is not None and busiest.decision.observation.work_queue_u > 0
    assert busiest.reward < -sim.weights.v * busiest.latency_s  # U·service enters the reward


def test_a_seed_replays_exactly(tmp_path: Path, profile: Profile) -> None:
    def rewards(seed: int) -> list[float]:
        sim = Simulator(timeline(tmp_path), profile, profile, DIMS, noise_sd=0.1, seed=seed)
        return [o.reward for o in sim.run(fixed(NamedPlanner("splitwise-dp")))]

    assert rewards(1) == rewards(1)
    assert rewards(1) != rewards(2)


def test_the_schedule_is_compiled_once_per_decision(tmp_path: Path, profile: Profile) -> None:
    sim = Simulator(timeline(tmp_path, "0,32,8\n"), profile, profile, DIMS)
    request = sim.next_request()
    assert request is not None
    decision = sim.decide(PlanSpec("heads:4"))
    assert decision.schedule == compile_plan(parse_plan("heads:4", 30, 9), DIMS)
    outcome = sim.serve(decision)
    assert outcome.decision is decision and sim.next_request() is None
