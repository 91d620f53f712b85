"""The simulator as a gymnasium environment: one step per request.

- Observation: :func:`policies.featurizer.features` of the agent's own observation (the controller's,
  after the probe it would send), shape ``(N_FEATURES,)``.
- Action (``MultiDiscrete``), the full per-layer choice: for every layer, one bit per query head
  (0 edge, 1 cloud), then for every layer the FFN mode (0 edge, 1 cloud, 2 split: W1 on the edge, W2 in
  the cloud), then the LM head's side (0 edge, 1 cloud).
- Feasibility by masking: the privacy prefix (``min_edge_layers``) and a cut link force edge choices.
  ``info["action_mask"]`` gives the masks in gymnasium's form (``action_space.sample(mask=…)``), and
  :meth:`SplitwiseEnv.plan_of` applies them whatever the action says, so every plan is valid. The edge
  memory budget is not masked yet (the committed scenarios set none).
- Reward: the simulator's, −(drift-plus-penalty) of what happened.
- ``info``: the agent's `observation` and the `action_mask` for the next request; after a step also the
  served request's `latency_s`, `energy_j` and `fell_back`.
- An episode is one realisation of the scenario: ``reset(seed=…)`` draws it. Without a seed it draws from
  the environment's own generator, so successive episodes differ.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import numpy.typing as npt

from policies.cost import Observation
from policies.featurizer import N_FEATURES, features
from policies.plan import FfnMode, LayerPlan, Plan, Side
from policies.segments import ModelDims
from splitwise_core.profile import Profile
from splitwise_device.config import PlanningConfig
from splitwise_device.controller import InlinePlan
from training.processes import Timeline
from training.scenario import Scenario
from training.simulator import Outcome, Simulator

__all__ = ["SplitwiseEnv"]

_FFN_MODES = (FfnMode.EDGE, FfnMode.CLOUD, FfnMode.SPLIT)


class SplitwiseEnv(gym.Env[npt.NDArray[np.float32], npt.NDArray[np.int64]]):
    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium declares it as a class attribute

    def __init__(
        self,
        scenario: Scenario,
        edge_profile: Profile,
        cloud_profile: Profile,
        dims: ModelDims,
        *,
        codec: str = "q8_0",
        planning: PlanningConfig | None = None,
        noise_sd: float = 0.0,
    ) -> None:
        self.scenario = scenario
        self.edge_profile, self.cloud_profile = edge_profile, cloud_profile
        self.dims = dims
        self.codec = codec
        self.planning = planning or PlanningConfig()
        self.noise_sd = noise_sd
        n_layer, n_head = dims.n_layer, dims.n_head
        self._head_bits = n_layer * n_head
        self._nvec = np.array([2] * self._head_bits + [3] * n_layer + [2], dtype=np.int64)
        self.action_space = gym.spaces.MultiDiscrete(self._nvec)
        self.observation_space = gym.spaces.Box(-2.0, 2.0, shape=(N_FEATURES,), dtype=np.float32)
        self.sim: Simulator | None = None
        self.last_outcome: Outcome | None = None  # the request the last step served (with its decision)
        self._observation: Observation | None = None

    # --- gymnasium --------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed)
        draw = int(self.np_random.integers(2**62)) if seed is None else seed
        self.sim = Simulator(
            Timeline(self.scenario, seed=draw),
            self.edge_profile,
            self.cloud_profile,
            self.dims,
            codec=self.codec,
            planning=self.planning,
            noise_sd=self.noise_sd,
            seed=draw,
        )
        if self.sim.next_request() is None:
            raise ValueError(f"scenario {self.scenario.name}: no request arrives within {self.scenario.duration_s} s")
        return self._observe(), self._info(None)

    def step(self, action: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        if self.sim is None or self._observation is None:
            raise RuntimeError("call reset() before step()")
        plan = self.plan_of(action, self._observation)
        outcome = self.last_outcome = self.sim.serve(self.sim.decide(InlinePlan(plan)))
        if self.sim.next_request() is None:
            self._observation = None
            return np.zeros(N_FEATURES, dtype=np.float32), outcome.reward, True, False, self._info(outcome)
        return self._observe(), outcome.reward, False, False, self._info(outcome)

    # --- actions and masks ----------------------------------------------------------------------

    def forced_edge_layers(self, observation: Observation) -> int:
        """How many leading layers must stay whole on the edge: all of them when the link is cut."""
        return self.dims.n_layer if not observation.link_up else min(self.planning.min_edge_layers, self.dims.n_layer)

    def action_mask(self, observation: Observation) -> tuple[npt.NDArray[np.int8], ...]:
        """Per action dimension, which of its values are allowed (gymnasium's MultiDiscrete mask)."""
        n_layer, n_head = self.dims.n_layer, self.dims.n_head
        forced = self.forced_edge_layers(observation)
        edge_only = np.array([1, 0], dtype=np.int8)
        heads = [edge_only if i // n_head < forced else np.ones(2, dtype=np.int8) for i in range(n_layer * n_head)]
        ffn = [np.array([1, 0, 0], dtype=np.int8) if i < forced else np.ones(3, dtype=np.int8) for i in range(n_layer)]
        lm_head = edge_only if not observation.link_up else np.ones(2, dtype=np.int8)
        return (*heads, *ffn, lm_head)

    def plan_of(self, action: npt.NDArray[np.int64], observation: Observation) -> Plan:
        """The plan an action stands for, with the masks applied (a masked choice becomes the edge)."""
        n_layer, n_head = self.dims.n_layer, self.dims.n_head
        a = np.asarray(action, dtype=np.int64)
        if a.shape != self._nvec.shape or np.any(a < 0) or np.any(a >= self._nvec):
            raise ValueError(f"action of shape {a.shape} is not in {self.action_space}")
        forced = self.forced_edge_layers(observation)
        bits = a[: self._head_bits].reshape(n_layer, n_head)
        modes = a[self._head_bits : self._head_bits + n_layer]
        layers = []
        for layer in range(n_layer):
            if layer < forced:
                layers.append(LayerPlan(tuple(range(n_head)), FfnMode.EDGE))
            else:
                edge = tuple(int(h) for h in np.flatnonzero(bits[layer] == 0))
                layers.append(LayerPlan(edge, _FFN_MODES[int(modes[layer])]))
        lm_head = Side.CLOUD if a[-1] == 1 and observation.link_up else Side.EDGE
        return Plan(n_layer, n_head, tuple(layers), lm_head, name="rl-action").validate_for(n_layer, n_head)

    # --- helpers ----------------------------------------------------------------------------------

    def _observe(self) -> npt.NDArray[np.float32]:
        assert self.sim is not None
        self.sim.controller.refresh_link()  # the probe the agent would send before deciding
        self._observation = self.sim.observe()
        return features(self._observation)

    def _info(self, outcome: Outcome | None) -> dict[str, Any]:
        """Plain, reproducible values (gymnasium compares them across seeded runs); the served request
        with its decision (which holds wall-clock timings) is in :attr:`last_outcome`."""
        info: dict[str, Any] = {}
        if outcome is not None:
            info.update(latency_s=outcome.latency_s, energy_j=outcome.energy_j, fell_back=outcome.fell_back)
        if self._observation is not None:
            info["observation"] = self._observation
            info["action_mask"] = self.action_mask(self._observation)
        return info
