"""Planners: ``plan(observation) -> Plan``, all scored by the one cost model (:mod:`policies.cost`).

The planners (see ``docs/planners.md``):

- ``edge-only``, ``cloud-only`` — fixed baselines (they ignore the memory budget and privacy);
- ``layer-split`` — the best single cut ``layer-split:K`` (Neurosurgeon style) by the objective;
- ``layer-dp`` — the best plan whose layers are each entirely on one side, any number of cuts
  (EdgeShard style), by the dynamic program restricted to whole layers;
- ``splitwise-dp`` — the exact dynamic program at head and FFN granularity.

What lives where (this package re-exports nothing: import each name from its module):

- :mod:`~policies.planners.registry` — the one registry: :data:`PLANNERS` (``PlannerSpec``: name,
  factory, whether it uses the cost model), ``PLANNER_NAMES``, ``COST_MODEL_PLANNERS`` and
  ``make_planner(name, ctx)``;
- :mod:`~policies.planners.context` — ``PlanningContext`` (what a planner gets besides the
  observation: profiles, model shape, codec, weights, privacy; ``score``) and the ``Planner`` protocol;
- :mod:`~policies.planners.baselines` — ``EdgeOnlyPlanner``, ``CloudOnlyPlanner``, ``LayerSplitPlanner``;
- :mod:`~policies.planners.dp` — ``SplitwiseDpPlanner``, ``LayerDpPlanner``, ``DpResult``,
  ``benchmark_dp``: the DP, then the Pareto search when the memory budget binds;
- :mod:`~policies.planners.tables` — the DP's states (``St``), one decision's per-layer transition
  tables and the DP pass over (layer, state) at a price of memory; why that DP is exact;
- :mod:`~policies.planners.pareto` — the exact search under an edge memory budget (a knapsack
  constraint): per state the Pareto front of (objective, memory), with Lagrangian bounds.

Imports go one way: ``context`` ← ``baselines``; ``context`` ← ``tables`` ← ``pareto`` ← ``dp``;
``registry`` imports ``baselines``, ``dp`` and ``context``, and nothing here imports ``registry``.
"""
