"""The dynamic-program planners (see ``docs/planners.md``):

- ``layer-dp`` — the best plan whose layers are each entirely on one side, any number of cuts
  (EdgeShard style): the DP restricted to whole layers;
- ``splitwise-dp`` — the exact dynamic program at head and FFN granularity.

One decision: build the per-layer transition tables and run the DP over (layer, state)
(:mod:`policies.planners.tables`, where the states and why the DP is exact are described). If
its optimum fits the edge memory budget (or there is no budget) it is the answer; otherwise the
exact Pareto-front search under the budget (:mod:`policies.planners.pareto`) decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from policies.cost import Observation
from policies.plan import LayerPlan, Plan
from policies.planners.context import PlanningContext
from policies.planners.pareto import solve_pareto
from policies.planners.tables import Tables, dp

__all__ = ["DpResult", "LayerDpPlanner", "SplitwiseDpPlanner", "benchmark_dp"]


@dataclass(frozen=True)
class DpResult:
    plan: Plan
    objective: float  # equals objective(predict(plan)) up to rounding
    edge_memory_bytes: int
    pareto: bool  # the memory budget was binding and the Pareto-front DP ran
    seconds: float  # planning time


def _solve(ctx: PlanningContext, obs: Observation, heads_granular: bool, name: str) -> DpResult:
    t0 = time.perf_counter()
    tab = Tables(ctx, obs, heads_granular)
    d = ctx.dims
    k = ctx.min_edge_layers
    free = tab.transitions(False)
    locked = tab.transitions(True) if k else free
    sol = dp(tab, free, locked, k, d.n_layer)
    assert sol is not None  # the all-edge plan is always possible
    budget = obs.memory_budget_bytes
    pareto = budget is not None and sol.memory > budget
    if pareto:
        assert budget is not None
        sol = solve_pareto(tab, free, locked, k, d.n_layer, budget)
    plan = Plan(
        n_layer=d.n_layer,
        n_head=d.n_head,
        layers=tuple(LayerPlan(edge_heads=c.edge_heads, ffn=c.ffn) for c in sol.choices),
        lm_head=sol.lm,
        name=name,
    )
    return DpResult(plan, sol.objective, sol.memory, pareto, time.perf_counter() - t0)


class SplitwiseDpPlanner:
    """Exact head/FFN-granular DP (module docstring). `solve` also returns objective and timing."""

    name = "splitwise-dp"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def solve(self, observation: Observation) -> DpResult:
        return _solve(self.ctx, observation, True, self.name)

    def plan(self, observation: Observation) -> Plan:
        return self.solve(observation).plan


class LayerDpPlanner:
    """The same DP with whole layers only (each layer entirely on one side)."""

    name = "layer-dp"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def solve(self, observation: Observation) -> DpResult:
        return _solve(self.ctx, observation, False, self.name)

    def plan(self, observation: Observation) -> Plan:
        return self.solve(observation).plan


def benchmark_dp(ctx: PlanningContext, observation: Observation, repeats: int = 20) -> dict[str, float]:
    """Planning time of splitwise-dp in milliseconds (min, median, max over `repeats` runs)."""
    planner = SplitwiseDpPlanner(ctx)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        planner.plan(observation)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"min_ms": times[0], "median_ms": times[len(times) // 2], "max_ms": times[-1]}
