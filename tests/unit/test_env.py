"""The simulator as a gymnasium environment (training/env.py) and the policy's features
(policies/featurizer.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policies.cost import Observation
from policies.featurizer import FEATURE_NAMES, FEATURIZER_VERSION, N_FEATURES, features
from policies.plan import Side, parse_plan
from policies.segments import ModelDims
from splitwise_core.profile import Profile
from splitwise_device.config import PlanningConfig
from training.env import SplitwiseEnv
from training.scenario import Scenario

PROFILE = Path(__file__).resolve().parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
DIMS = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)  # SmolLM2-135M


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(PROFILE)


def scenario(**changes: object) -> Scenario:
    base: dict[str, object] = {
        "name": "t",
        "seed": 3,
        "duration_s": 60.0,
        "arrivals": {"kind": "poisson", "rate_per_s": 0.3},
        "lengths": {"prompt_len": {"low": 16, "high": 64}, "max_tokens": {"low": 4, "high": 16}},
        "link": {"states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}]},
    }
    return Scenario.model_validate({**base, **changes})


def test_the_environment_passes_gymnasiums_checks(profile: Profile) -> None:
    check_env(SplitwiseEnv(scenario(), profile, profile, DIMS), skip_render_check=True)


def test_an_episode_serves_every_request_with_masked_random_actions(profile: Profile) -> None:
    env = SplitwiseEnv(scenario(), profile, profile, DIMS, planning=PlanningConfig(min_edge_layers=3))
    obs, info = env.reset(seed=1)
    assert env.sim is not None
    requests = len(env.sim.timeline.requests)
    steps, total, done = 0, 0.0, False
    while not done:
        assert env.observation_space.contains(obs)
        action = env.action_space.sample(mask=info["action_mask"])
        plan = env.plan_of(action, info["observation"])
        assert all(plan.layers[i].all_on(Side.EDGE, 9) for i in range(3))  # the privacy prefix
        obs, reward, done, truncated, info = env.step(action)
        assert not truncated and math.isfinite(reward) and reward < 0
        assert env.last_outcome is not None and env.last_outcome.decision.plan == plan
        assert info["latency_s"] == env.last_outcome.latency_s
        steps, total = steps + 1, total + reward
    assert steps == requests > 5


def test_a_cut_link_masks_every_cloud_choice(profile: Profile) -> None:
    cut = {"states": [{"bandwidth_mbps": 50.0, "rtt_ms": 20.0}], "events": [{"at_s": 0.0, "kind": "outage"}]}
    env = SplitwiseEnv(scenario(link=cut), profile, profile, DIMS)
    _, info = env.reset(seed=2)
    observation = info["observation"]
    assert not observation.link_up
    everything_cloud = env.action_space.nvec - 1
    assert env.plan_of(everything_cloud, observation) == parse_plan("edge-only", 30, 9)
    assert all(mask[0] == 1 and not mask[1:].any() for mask in info["action_mask"])


def test_actions_stand_for_the_plans_they_say(profile: Profile) -> None:
    env = SplitwiseEnv(scenario(), profile, profile, DIMS)
    _, info = env.reset(seed=4)
    obs = info["observation"]
    nvec = env.action_space.nvec
    assert env.plan_of(np.zeros_like(nvec), obs) == parse_plan("edge-only", 30, 9)
    cloud = np.concatenate([np.ones(30 * 9), np.ones(30), [1]]).astype(np.int64)
    assert env.plan_of(cloud, obs) == parse_plan("cloud-only", 30, 9)
    heads = np.zeros_like(nvec)
    heads[: 30 * 9] = np.tile([0, 0, 0, 0, 1, 1, 1, 1, 1], 30)
    assert env.plan_of(heads, obs) == parse_plan("heads:4", 30, 9)
    with pytest.raises(ValueError, match="not in MultiDiscrete"):
        env.plan_of(nvec, obs)


def test_a_seed_replays_the_episode(profile: Profile) -> None:
    def episode(seed: int) -> list[float]:
        env = SplitwiseEnv(scenario(), profile, profile, DIMS, noise_sd=0.1)
        env.action_space.seed(0)
        _, info = env.reset(seed=seed)
        rewards, done = [], False
        while not done:
            _, reward, done, _, info = env.step(env.action_space.sample(mask=info["action_mask"]))
            rewards.append(reward)
        return rewards

    assert episode(7) == episode(7)
    assert episode(7) != episode(8)


def test_features_are_bounded_and_versioned() -> None:
    assert FEATURIZER_VERSION == 1 and len(FEATURE_NAMES) == N_FEATURES
    calm = features(Observation(50e6, 0.02, 64, 32))
    extreme = features(
        Observation(
            0.0,
            math.inf,
            100_000,
            100_000,
            backlog_requests=10**6,
            backlog_s=1e9,
            arrival_rate=1e6,
            cloud_load=1e9,
            edge_load=1e-9,
            energy_queue_z=1e12,
            work_queue_u=1e12,
            memory_budget_bytes=2**50,
        )
    )
    for vector in (calm, extreme):
        assert vector.shape == (N_FEATURES,) and vector.dtype == np.float32
        assert np.all(np.isfinite(vector)) and np.all(np.abs(vector) <= 2)
    named = dict(zip(FEATURE_NAMES, extreme, strict=True))
    assert named["link_up"] == 0 and named["rtt"] == 1 and named["has_budget"] == 1
    assert dict(zip(FEATURE_NAMES, calm, strict=True))["budget_gib"] == 1  # no budget
