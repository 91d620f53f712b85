"""The one registry of planners: every list of planner names (device config, CLI, request schema,
docs, tests) and every "does this planner need the cost model?" derives from :data:`PLANNERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from policies.planners.baselines import CloudOnlyPlanner, EdgeOnlyPlanner, LayerSplitPlanner
from policies.planners.context import Planner, PlanningContext
from policies.planners.dp import LayerDpPlanner, SplitwiseDpPlanner
from policies.planners.learned import LearnedPlanner
from splitwise_core.errors import InvalidArgumentError

__all__ = ["COST_MODEL_PLANNERS", "PLANNERS", "PLANNER_NAMES", "PlannerSpec", "make_planner"]


@dataclass(frozen=True)
class PlannerSpec:
    """One planner: its name (what configs and requests say), how to build it for a context, and
    whether it plans with the cost model (then it needs the edge and cloud profiles)."""

    name: str
    factory: Callable[[PlanningContext], Planner]
    uses_cost_model: bool


PLANNERS: tuple[PlannerSpec, ...] = (
    PlannerSpec(EdgeOnlyPlanner.name, EdgeOnlyPlanner, uses_cost_model=False),
    PlannerSpec(CloudOnlyPlanner.name, CloudOnlyPlanner, uses_cost_model=False),
    PlannerSpec(LayerSplitPlanner.name, LayerSplitPlanner, uses_cost_model=True),
    PlannerSpec(LayerDpPlanner.name, LayerDpPlanner, uses_cost_model=True),
    PlannerSpec(SplitwiseDpPlanner.name, SplitwiseDpPlanner, uses_cost_model=True),
    PlannerSpec(LearnedPlanner.name, LearnedPlanner, uses_cost_model=True),
)
"""The planners there are, in the registry's order."""

_BY_NAME: dict[str, PlannerSpec] = {spec.name: spec for spec in PLANNERS}
assert len(_BY_NAME) == len(PLANNERS), "two planners share a name"

PLANNER_NAMES: tuple[str, ...] = tuple(spec.name for spec in PLANNERS)
"""The planners' names, in the registry's order."""

COST_MODEL_PLANNERS: frozenset[str] = frozenset(spec.name for spec in PLANNERS if spec.uses_cost_model)
"""The planners that plan with the cost model, so need the profiles (the others are fixed plans)."""


def make_planner(name: str, ctx: PlanningContext) -> Planner:
    """The planner called `name` for `ctx`; InvalidArgumentError naming the known ones otherwise."""
    try:
        spec = _BY_NAME[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown planner {name!r}; known: {', '.join(PLANNER_NAMES)}") from None
    return spec.factory(ctx)
