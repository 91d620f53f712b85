"""What every planner gets besides the observation (:class:`PlanningContext`: profiles, model
shape, codec, weights, privacy) and what a planner is (:class:`Planner`: ``plan(observation) -> Plan``).

Its own module so that the planners and the registry can all import it: the registry imports the
planners, the planners import this, never the registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from policies.cost import CostModel, Observation, Weights, objective, predict
from policies.plan import Plan, Side
from policies.segments import ModelDims
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.profile import Profile

__all__ = ["Planner", "PlanningContext"]


@dataclass(frozen=True)
class PlanningContext:
    """Everything a planner needs besides the observation."""

    edge_profile: Profile
    cloud_profile: Profile
    dims: ModelDims
    codec: str = "q8_0"
    weights: Weights = field(default_factory=Weights)
    min_edge_layers: int = 0  # privacy: layers 0..k-1 run entirely on the edge
    codec_kl: Mapping[str, float] | None = None
    # The learned planner's policy file; None: the shipped one for this model and edge machine.
    policy: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.min_edge_layers, int) or not 0 <= self.min_edge_layers <= self.dims.n_layer:
            raise InvalidArgumentError(
                f"min_edge_layers: expected an integer in 0..{self.dims.n_layer}, got {self.min_edge_layers!r}"
            )

    def cost_model(self, observation: Observation) -> CostModel:
        return CostModel(
            observation, self.edge_profile, self.cloud_profile, self.dims, self.codec, codec_kl=self.codec_kl
        )

    def score(self, plan: Plan, observation: Observation, model: CostModel | None = None) -> float:
        """The objective of `plan` (inf when infeasible: link cut, over budget, privacy broken)."""
        m = model or self.cost_model(observation)
        pred = predict(
            plan,
            observation,
            self.edge_profile,
            self.cloud_profile,
            self.dims,
            self.codec,
            codec_kl=self.codec_kl,
            model=m,
        )
        budget = observation.memory_budget_bytes
        if budget is not None and pred.edge_memory_bytes > budget:
            return math.inf
        if any(not lp.all_on(Side.EDGE, plan.n_head) for lp in plan.layers[: self.min_edge_layers]):
            return math.inf
        return objective(pred, observation, self.weights)


class Planner(Protocol):
    name: str

    def plan(self, observation: Observation) -> Plan: ...
