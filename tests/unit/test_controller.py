"""The agent's controller: observation from estimates, planner per request, feedback after a request.

Profiles are the measured reference-VM profile (both sides, in a ProfileStore); the link, the probe
and the clock are plain callables the test drives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from policies.cost import Observation, predict
from policies.plan import parse_plan
from policies.planners.context import PlanningContext
from policies.planners.registry import PLANNER_NAMES, make_planner
from policies.segments import ModelDims
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import PowerModel, Profile
from splitwise_device.config import PlanningConfig
from splitwise_device.controller import Controller, Decision, InlinePlan, NamedPlanner, PlanChoice, PlanSpec, Served
from splitwise_device.executor import SplitResult, StepTiming, TransferStats
from splitwise_device.profile_store import ProfileStore

PROFILE = Path(__file__).parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
DIMS = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)  # SmolLM2-135M


def choice(name: str) -> PlanChoice:
    """A registry planner by name, else a plan spec (``heads:4``, ``layer-split:12``)."""
    return NamedPlanner(name) if name in PLANNER_NAMES else PlanSpec(name)


def finished(
    d: Decision,
    seconds: float,
    steps: int,
    cloud_compute_s: float,
    fell_back: bool,
    edge_compute_by_kind: dict[str, float] | None = None,
) -> Served:
    """What the controller learns from the executor's result for a request of `steps` token steps
    taking `seconds` in all."""
    result = SplitResult(
        tokens=[1] * steps,
        stop_reason="max_tokens",
        plan=d.plan,
        steps=[StepTiming(i, 1, seconds / steps) for i in range(steps)],
        events=[],
        transfer=TransferStats(cloud_compute_s=cloud_compute_s),
        fell_back_to_edge=fell_back,
        edge_compute_by_kind=dict(edge_compute_by_kind or {}),
    )
    return Served.from_result(result)


@dataclass
class Sample:
    bytes_up: int
    bytes_down: int
    round_trip_s: float
    compute_s: float


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(PROFILE)


def make(
    profile: Profile, *, cloud: bool = True, up: bool = True, probe_rtt: float = 0.02, **planning: object
) -> tuple[Controller, Clock, list[int]]:
    clock = Clock()
    probes: list[int] = []
    link = {"up": up}

    def probe() -> list[Sample]:
        probes.append(1)
        # 10 Mbit/s: 64 KB takes 52 ms on top of the RTT.
        return [Sample(64, 64, probe_rtt, 0.0), Sample(65536, 64, probe_rtt + 8 * 65600 / 10e6, 0.0)]

    c = Controller(
        PlanningConfig.model_validate(planning),
        DIMS,
        codec="q8_0",
        profiles=ProfileStore(profile, cloud={"w1": profile} if cloud else None),
        link_up=lambda: link["up"],
        probe=probe,
        clock=clock,
    )
    return c, clock, probes


def test_without_a_cloud_profile_cost_model_planners_stay_on_the_edge(profile: Profile) -> None:
    c, _, _ = make(profile, cloud=False)
    d = c.decide(choice("splitwise-dp"), 16, 8, 0)
    assert d.plan.is_edge_only() and d.prediction is None
    assert d.to_json()["planner"] == "splitwise-dp"


def test_a_cut_link_gives_edge_only_and_no_probe(profile: Profile) -> None:
    c, _, probes = make(profile, up=False)
    for name in ("splitwise-dp", "layer-dp", "layer-split"):
        d = c.decide(choice(name), 16, 8, 0)
        assert d.plan.is_edge_only(), name
        assert d.observation is not None and not d.observation.link_up
    assert probes == []
    # A fixed plan that needs the cloud predicts an infinite latency, which the reply leaves out.
    d = c.decide(choice("cloud-only"), 16, 8, 0)
    assert d.prediction is not None and math.isinf(d.prediction.latency_s)
    assert "predicted" not in d.to_json()


def test_probe_feeds_the_link_estimate_and_is_rate_limited(profile: Profile) -> None:
    c, clock, probes = make(profile, probe_interval_s=10.0)
    # No estimate yet: the first decision probes inline and plans with the result.
    d = c.decide(choice("splitwise-dp"), 16, 8, 0)
    assert len(probes) == 1
    assert d.observation is not None
    assert d.observation.rtt_s == pytest.approx(0.02, rel=1e-6)
    assert d.observation.bandwidth_bps == pytest.approx(10e6, rel=0.01)
    clock.now += 5
    c.decide(choice("splitwise-dp"), 16, 8, 0)
    c.join_probe(5)
    assert len(probes) == 1  # estimate still fresh
    clock.now += 6
    c.decide(choice("splitwise-dp"), 16, 8, 0)  # stale: a probe in the background
    c.join_probe(5)
    assert len(probes) == 2
    # Real transfers keep the estimate fresh: no probe while they flow...
    clock.now += 20
    c.link.observe(100, 100, 0.02)
    c.link.observe(50_000, 100, 0.08)
    c.decide(choice("splitwise-dp"), 16, 8, 0)
    c.join_probe(5)
    assert len(probes) == 2
    # ...but only large ones flowing leave the RTT stale (e.g. cloud-only with its logits): probe.
    clock.now += 20
    c.link.observe(50_000, 100, 0.08)
    c.decide(choice("splitwise-dp"), 16, 8, 0)
    c.join_probe(5)
    assert len(probes) == 3
    # Edge-only plans do not need the link at all.
    clock.now += 60
    c.decide(choice("edge-only"), 16, 8, 0)
    c.join_probe(5)
    assert len(probes) == 3


def test_a_stale_estimate_is_probed_in_the_background(profile: Profile) -> None:
    import threading

    release = threading.Event()
    calls: list[int] = []
    c, clock, _ = make(profile, probe_interval_s=1.0)
    c.decide(choice("splitwise-dp"), 16, 8, 0)  # inline: the first estimate

    def slow_probe() -> list[Sample]:
        calls.append(1)
        release.wait(5)
        return [Sample(64, 64, 0.2, 0.0)]

    c._probe = slow_probe
    clock.now += 5
    d = c.decide(choice("splitwise-dp"), 16, 8, 0)  # returns while the probe is still out
    assert calls == [1] and not release.is_set()
    assert d.observation is not None and d.observation.rtt_s == pytest.approx(0.02, rel=1e-6)
    c.decide(choice("splitwise-dp"), 16, 8, 0)
    assert calls == [1]  # one probe at a time
    release.set()
    c.join_probe(5)
    assert c.link.rtt_s is not None and c.link.rtt_s > 0.02


def test_decision_equals_the_planner_on_the_same_observation(profile: Profile) -> None:
    c, _, _ = make(profile)
    d = c.decide(choice("splitwise-dp"), 64, 32, 0)
    assert d.observation is not None and d.prediction is not None
    ctx = PlanningContext(profile, profile, DIMS, "q8_0")
    expected = make_planner("splitwise-dp", ctx).plan(d.observation)
    assert d.plan == expected
    pred = predict(expected, d.observation, profile, profile, DIMS, "q8_0")
    assert d.prediction.latency_s == pytest.approx(pred.latency_s)
    out = d.to_json(steps=10)
    assert out["predicted"]["latency_s_for_completion"] == pytest.approx(pred.prefill_s + 9 * pred.decode_s_per_token)
    assert out["observation"]["rtt_ms"] == pytest.approx(20.0, rel=1e-6)


def test_a_given_plan_is_predicted_not_replanned(profile: Profile) -> None:
    c, _, _ = make(profile)
    plan = parse_plan("layer-split:12", 30, 9)
    d = c.decide(InlinePlan(plan), 16, 8, 0)
    assert d.plan == plan and d.prediction is not None and math.isfinite(d.prediction.latency_s)
    d = c.decide(choice("heads:4"), 16, 8, 0)
    assert d.plan == parse_plan("heads:4", 30, 9) and d.prediction is not None


def test_backlog_becomes_the_work_queue(profile: Profile) -> None:
    c, _, _ = make(profile)
    d = c.decide(choice("edge-only"), 16, 8, 0)
    c.completed(d, finished(d, 2.0, 8, 0.0, False))
    obs = c.observation(16, 8, backlog_requests=3)
    assert obs.backlog_s == pytest.approx(6.0) and obs.work_queue_u == pytest.approx(6.0)


def test_cloud_service_times_set_the_cloud_load(profile: Profile) -> None:
    c, _, _ = make(profile)
    d = c.decide(choice("cloud-only"), 16, 8, 0)
    assert d.prediction is not None
    b = d.prediction.breakdown
    expected = b["prefill_cloud_compute_s"] + 7 * b["decode_cloud_compute_s"]
    c.completed(d, finished(d, 1.0, 8, 3 * expected, False))
    assert c.observation(16, 8, 0).cloud_load == pytest.approx(3.0)
    # A request that fell back to the edge says nothing about the cloud's speed.
    d = c.decide(choice("cloud-only"), 16, 8, 0)
    c.completed(d, finished(d, 1.0, 8, 0.1 * expected, True))
    assert c.observation(16, 8, 0).cloud_load == pytest.approx(3.0)


def test_energy_budget_grows_the_energy_queue(profile: Profile) -> None:
    # The VM has no power sensor (its profile says 0 W); a Raspberry-Pi-like power model instead.
    profile = profile.model_copy(update={"power": PowerModel(compute_w=6.0, transmit_w=1.5, idle_w=2.7)})
    c, _, _ = make(profile, energy_budget_j=1e-9)
    d = c.decide(choice("edge-only"), 16, 8, 0)
    assert d.prediction is not None and d.prediction.energy_j > 0
    c.completed(d, finished(d, 1.0, 8, 0.0, False))
    z = c.observation(16, 8, 0).energy_queue_z
    assert z == pytest.approx(d.prediction.energy_j - 1e-9)
    unbudgeted, _, _ = make(profile)
    unbudgeted.completed(d, finished(d, 1.0, 8, 0.0, False))
    assert unbudgeted.observation(16, 8, 0).energy_queue_z == 0.0


def test_min_edge_layers_beyond_the_model_is_refused(profile: Profile) -> None:
    with pytest.raises(InvalidArgumentError, match="min_edge_layers = 31"):
        make(profile, min_edge_layers=31)


def test_observation_is_a_valid_planner_input(profile: Profile) -> None:
    c, _, _ = make(profile)
    c.decide(choice("splitwise-dp"), 16, 8, 0)
    obs = c.observation(16, 8, 2)
    assert isinstance(obs, Observation) and obs.link_up and obs.backlog_requests == 2


def test_edge_compute_times_set_the_edge_load(profile: Profile) -> None:
    c, _, _ = make(profile)
    d = c.decide(choice("edge-only"), 16, 8, 0)
    assert d.prediction is not None
    b = d.prediction.breakdown
    expected = b["prefill_edge_ops_s"] + 7 * b["decode_edge_ops_s"]
    c.completed(d, finished(d, 1.0, 8, 0.0, False, {"FORWARD": 0.5 * expected}))
    assert c.observation(16, 8, 0).edge_load == pytest.approx(0.5)
    again = c.decide(choice("edge-only"), 16, 8, 0)
    assert again.prediction is not None
    assert again.prediction.latency_s == pytest.approx(0.5 * d.prediction.latency_s, rel=1e-6)
    assert again.to_json()["observation"]["edge_load"] == pytest.approx(0.5)


@pytest.mark.parametrize(("edge_load", "cloud_load"), [(0.5, 1.0), (1.0, 0.5), (1.7, 0.6)])
def test_the_planners_see_the_loads_as_predict_does(profile: Profile, edge_load: float, cloud_load: float) -> None:
    obs = Observation(
        bandwidth_bps=100e6, rtt_s=0.004, prompt_len=32, max_tokens=16, edge_load=edge_load, cloud_load=cloud_load
    )
    ctx = PlanningContext(profile, profile, DIMS, "q8_0")
    plans = {name: make_planner(name, ctx).plan(obs) for name in ("edge-only", "layer-dp", "splitwise-dp")}
    scores = {name: ctx.score(plan, obs) for name, plan in plans.items()}
    # splitwise-dp is exact: never worse than the others under the same loads.
    assert scores["splitwise-dp"] <= min(scores.values()) + 1e-9
    edge_only = predict(plans["edge-only"], obs, profile, profile, DIMS, "q8_0")
    unloaded = predict(plans["edge-only"], Observation(100e6, 0.004, 32, 16), profile, profile, DIMS, "q8_0")
    assert edge_only.latency_s == pytest.approx(edge_load * unloaded.latency_s, rel=1e-6)


def test_each_edge_op_kind_is_calibrated_on_its_own(profile: Profile) -> None:
    c, _, _ = make(profile)
    # An edge-only request runs whole local forward passes: embedding, fused layers and LM head
    # take its ratio, other kinds stay untouched.
    d = c.decide(choice("edge-only"), 16, 8, 0)
    assert d.prediction is not None
    c.completed(d, finished(d, 1.0, 8, 0.0, False, {"FORWARD": 0.3 * d.prediction.latency_s}))
    loads = c.observation(16, 8, 0).edge_op_load
    assert set(loads) == {"EMBED", "LAYER", "LM_HEAD"}
    assert all(v == pytest.approx(0.3) for v in loads.values())
    after = c.decide(choice("edge-only"), 16, 8, 0).prediction
    assert after is not None and after.latency_s == pytest.approx(0.3 * d.prediction.latency_s)
    # A head split: the attention the edge ran took twice its prediction.
    d = c.decide(choice("heads:4"), 16, 8, 0)
    assert d.prediction is not None
    b = d.prediction.breakdown
    attention = b["prefill_edge_s.ATTN"] + 7 * b["decode_edge_s.ATTN"]
    c.completed(d, finished(d, 1.0, 8, 0.0, False, {"ATTN": 2 * attention}))
    loads = c.observation(16, 8, 0).edge_op_load
    # Its prediction used the overall edge_load (0.3 by now): the attention factor becomes 2 × 0.3.
    assert loads["ATTN"] == pytest.approx(0.6) and loads["LAYER"] == pytest.approx(0.3)
    again = c.decide(choice("heads:4"), 16, 8, 0).prediction
    assert again is not None
    assert again.breakdown["decode_edge_s.ATTN"] == pytest.approx(2 * b["decode_edge_s.ATTN"])


def test_observation_rejects_unknown_op_kinds() -> None:
    with pytest.raises(InvalidArgumentError, match="edge_op_load"):
        Observation(10e6, 0.01, 8, 8, edge_op_load={"WARP": 1.0})
    with pytest.raises(InvalidArgumentError, match="edge_op_load"):
        Observation(10e6, 0.01, 8, 8, edge_op_load={"ATTN": 0.0})


def test_requests_may_name_exactly_the_planners_there_are() -> None:
    from pydantic import ValidationError

    from policies.planners.registry import PLANNER_NAMES
    from splitwise_device.app_messages import InferRequest

    for name in PLANNER_NAMES:
        assert InferRequest(prompt="Hi", planner=name).planner == name
    for unknown in ("fixed", "splitwise_rl", "Edge-Only", ""):
        with pytest.raises(ValidationError, match=f"unknown planner {unknown!r}; known: {', '.join(PLANNER_NAMES)}"):
            InferRequest(prompt="Hi", planner=unknown)
