"""Scenario files and their random processes (training/): strict loading, arrivals at the stated
rates, Markov-modulated levels in the stated proportions, scripted link events, traces, seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from splitwise_core.errors import ConfigError, InvalidArgumentError
from training.processes import LinkTimeline, Timeline, load_trace, markov_path
from training.scenario import LinkSection, Scenario, load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "training" / "scenarios"


def scenario(**changes: object) -> Scenario:
    base: dict[str, object] = {
        "name": "t",
        "seed": 7,
        "duration_s": 2000.0,
        "arrivals": {"kind": "poisson", "rate_per_s": 2.0},
        "link": {"states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}]},
    }
    return Scenario.model_validate({**base, **changes})


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_the_committed_scenarios_load_and_draw(path: Path) -> None:
    loaded = load_scenario(path)
    assert loaded.name == path.stem
    timeline = Timeline(loaded)
    assert len(timeline.requests) > 100
    assert all(0 <= r.at_s < loaded.duration_s for r in timeline.requests)


def test_a_scenario_file_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "x"\nseed = 1\nduration_s = 10.0\n'
        '[arrivals]\nkind = "mmpp"\nrates_per_s = [1.0, 2.0]\nmean_dwell_s = [5.0, 5.0, 5.0]\n'
        "[link]\nstates = [{ bandwidth_mbps = 10.0, rtt_ms = 5.0 }]\nbandwith = 3\n"
        'events = [{ at_s = 1.0, kind = "outage", bandwidth_mbps = 5.0 }]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    text = str(err.value)
    assert "link.bandwith: unknown key 'bandwith'" in text
    assert "arrivals.mmpp: rates_per_s and mean_dwell_s need one value per state" in text
    assert "link.events[0]: an outage takes no bandwidth_mbps or rtt_ms" in text


def test_poisson_arrivals_come_at_the_stated_rate_and_follow_the_seed() -> None:
    timeline = Timeline(scenario())
    n = len(timeline.requests)
    assert abs(n - 4000) < 4 * math.sqrt(4000), n  # Poisson: sd = sqrt(mean)
    gaps = np.diff([r.at_s for r in timeline.requests])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() == pytest.approx(0.5, rel=0.08)  # exponential: sd = mean
    assert [r.at_s for r in Timeline(scenario()).requests] == [r.at_s for r in timeline.requests]
    assert [r.at_s for r in Timeline(scenario(), seed=8).requests] != [r.at_s for r in timeline.requests]
    lengths = scenario().lengths
    assert all(lengths.prompt_len.low <= r.prompt_len <= lengths.prompt_len.high for r in timeline.requests)
    assert all(lengths.max_tokens.low <= r.max_tokens <= lengths.max_tokens.high for r in timeline.requests)


def test_mmpp_arrivals_average_the_phase_rates_by_their_dwell() -> None:
    bursty = scenario(
        duration_s=40000.0, arrivals={"kind": "mmpp", "rates_per_s": [0.2, 2.0], "mean_dwell_s": [30.0, 10.0]}
    )
    n = len(Timeline(bursty).requests)
    assert n / 40000 == pytest.approx(0.75 * 0.2 + 0.25 * 2.0, rel=0.1)


def test_markov_levels_hold_in_proportion_to_their_dwell() -> None:
    path = markov_path([1.0, 3.0, 5.0], [10.0, 20.0, 70.0], 200000.0, np.random.default_rng(3))
    ends = [*path.starts[1:], 200000.0]
    share = {v: 0.0 for v in (1.0, 3.0, 5.0)}
    for start, end, value in zip(path.starts, ends, path.values, strict=True):
        share[float(value)] += (end - start) / 200000.0
    assert share[1.0] == pytest.approx(0.1, abs=0.02)
    assert share[3.0] == pytest.approx(0.2, abs=0.03)
    assert share[5.0] == pytest.approx(0.7, abs=0.04)
    assert np.all(np.diff(path.values) != 0)  # a jump always goes to another level


def test_link_events_apply_on_top_of_the_markov_link() -> None:
    section = LinkSection.model_validate(
        {
            "states": [{"bandwidth_mbps": 100.0, "rtt_ms": 5.0}],
            "events": [
                {"at_s": 300.0, "duration_s": 120.0, "kind": "set", "bandwidth_mbps": 10.0},
                {"at_s": 350.0, "duration_s": 10.0, "kind": "rtt_spike", "rtt_ms": 200.0},
                {"at_s": 500.0, "duration_s": 20.0, "kind": "outage"},
                {"at_s": 800.0, "kind": "set", "rtt_ms": 40.0},
            ],
        }
    )
    link = LinkTimeline(section, 1000.0, np.random.default_rng(0))
    assert link.at(299.9) == (100e6, 0.005)
    assert link.at(300.0) == (10e6, 0.005)
    assert link.at(355.0) == pytest.approx((10e6, 0.205))
    assert link.at(420.0) == (100e6, 0.005)
    assert link.at(510.0) == (0.0, math.inf)
    assert link.at(520.0) == (100e6, 0.005)
    assert link.at(999.0) == (100e6, 0.04)  # no duration: to the end
    assert link.state_changes() == [300.0, 350.0, 360.0, 420.0, 500.0, 520.0, 800.0]


def test_each_process_has_its_own_stream() -> None:
    calm = scenario()
    stormy = scenario(
        link={
            "states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}, {"bandwidth_mbps": 5.0, "rtt_ms": 80.0}],
            "mean_dwell_s": [10.0, 10.0],
        },
        cloud_load={"levels": [1.0, 4.0], "mean_dwell_s": [5.0, 5.0]},
    )
    assert Timeline(calm).requests == Timeline(stormy).requests


def test_traces_replay_in_order_and_bad_rows_are_named(tmp_path: Path) -> None:
    csv_trace = tmp_path / "t.csv"
    csv_trace.write_text("at_s,prompt_len,max_tokens\n2.5,40,8\n0.5,10,4\n9999,1,1\n")
    replayed = Timeline(scenario(duration_s=100.0, arrivals={"kind": "trace", "file": str(csv_trace)})).requests
    assert [(r.at_s, r.prompt_len, r.max_tokens) for r in replayed] == [(0.5, 10, 4), (2.5, 40, 8)]
    json_trace = tmp_path / "t.json"
    json_trace.write_text(
        json.dumps([{"at_s": 1, "prompt_len": 3, "max_tokens": 2}, {"at_s": 1.25, "prompt_len": 4.0, "max_tokens": 1}])
    )
    assert [(r.at_s, r.prompt_len) for r in load_trace(json_trace)] == [(1.0, 3), (1.25, 4)]

    bad = {
        "at_s,prompt_len\n1,2\n": "header at_s,prompt_len,max_tokens",
        "at_s,prompt_len,max_tokens\n1,0,4\n": "line 2: at_s ≥ 0, prompt_len ≥ 1",
        "at_s,prompt_len,max_tokens\n1,2,4\nx,2,4\n": "line 3: at_s is a number",
    }
    for text, expected in bad.items():
        csv_trace.write_text(text)
        with pytest.raises(InvalidArgumentError, match=expected):
            load_trace(csv_trace)
    for row in ({"at_s": 1, "prompt_len": 2.5, "max_tokens": 2}, {"at_s": True, "prompt_len": 2, "max_tokens": 2}):
        json_trace.write_text(json.dumps([row]))
        with pytest.raises(InvalidArgumentError, match="request 0: at_s is a number"):
            load_trace(json_trace)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_trace(tmp_path / "missing.csv")


def test_the_objective_section_sets_the_agents_weights_and_rejects_unknown_keys() -> None:
    planning = scenario(objective={"v": 2.0, "w_accuracy": 200.0}).planning(min_edge_layers=3)
    assert (planning.v, planning.w_latency, planning.w_energy, planning.w_accuracy) == (2.0, 1.0, 0.0, 200.0)
    assert planning.min_edge_layers == 3 and planning.policy is None
    default = scenario().planning()
    assert (default.v, default.w_latency, default.w_accuracy) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"objective\.w_acuracy"):
        scenario(objective={"w_acuracy": 1.0})
    with pytest.raises(ValueError, match=r"objective\.v"):
        scenario(objective={"v": -1.0})
