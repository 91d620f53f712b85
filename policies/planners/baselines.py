"""The planners that need no dynamic program: the two fixed baselines and the best single cut.

- ``edge-only``, ``cloud-only`` — fixed baselines (they ignore the memory budget and privacy);
- ``layer-split`` — the best single cut ``layer-split:K`` (Neurosurgeon style) by the objective.
"""

from __future__ import annotations

import math

from policies.cost import Observation
from policies.plan import Plan, cloud_only, edge_only, layer_split
from policies.planners.context import PlanningContext

__all__ = ["CloudOnlyPlanner", "EdgeOnlyPlanner", "LayerSplitPlanner"]


class EdgeOnlyPlanner:
    name = "edge-only"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        return edge_only(self.ctx.dims.n_layer, self.ctx.dims.n_head)


class CloudOnlyPlanner:
    name = "cloud-only"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        return cloud_only(self.ctx.dims.n_layer, self.ctx.dims.n_head)


class LayerSplitPlanner:
    """Best ``layer-split:K`` by the objective; K = n_layer (edge-only) when nothing else is feasible."""

    name = "layer-split"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        d = self.ctx.dims
        model = self.ctx.cost_model(observation)
        best, best_score = layer_split(d.n_layer, d.n_layer, d.n_head), math.inf
        for k in range(self.ctx.min_edge_layers, d.n_layer + 1):
            cand = layer_split(k, d.n_layer, d.n_head)
            s = self.ctx.score(cand, observation, model)
            if s < best_score:
                best, best_score = cand, s
        return best
