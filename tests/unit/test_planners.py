"""Planners: splitwise-dp is exact (brute force over every plan, scored by predict()), fast, and sane.

Brute force enumerates all (2^H·3)^L · 2 plans (head subsets, FFN modes, LM head side) of reduced
models and scores each with `PlanningContext.score` (objective(predict(plan)), inf when over the
memory budget or breaking the privacy constraint).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from policies.cost import Observation, Weights, objective, predict
from policies.plan import FfnMode, LayerPlan, Plan, Side, edge_only
from policies.planners.context import PlanningContext
from policies.planners.dp import LayerDpPlanner, SplitwiseDpPlanner, benchmark_dp
from policies.planners.registry import COST_MODEL_PLANNERS, PLANNER_NAMES, PLANNERS, make_planner
from policies.segments import ModelDims
from splitwise_core.errors import InvalidArgumentError, PlanError
from splitwise_core.profile import Profile
from tests.unit.test_cost import CLOUD, EDGE, SMOL, obs, synthetic_profile

DIMS_3x3 = ModelDims(n_layer=3, n_head=3, n_head_kv=3, d_model=96, n_ff=256, n_vocab=500)
DIMS_GQA = ModelDims(n_layer=2, n_head=4, n_head_kv=2, d_model=128, n_ff=384, n_vocab=500)
SLOW_EDGE = synthetic_profile("slow-edge", 0.05, power=(5.0, 4.0, 1.5), attn_curve=3.0)


def all_plans(dims: ModelDims) -> list[Plan]:
    h = dims.n_head
    subsets = [tuple(c) for k in range(h + 1) for c in itertools.combinations(range(h), k)]
    layer_choices = [LayerPlan(s, f) for s in subsets for f in FfnMode]
    return [
        Plan(dims.n_layer, h, layers, lm)
        for layers in itertools.product(layer_choices, repeat=dims.n_layer)
        for lm in Side
    ]


def brute_force(ctx: PlanningContext, o: Observation, plans: list[Plan]) -> float:
    model = ctx.cost_model(o)
    return min(ctx.score(p, o, model) for p in plans)


def check_exact(ctx: PlanningContext, o: Observation, plans: list[Plan]) -> None:
    res = SplitwiseDpPlanner(ctx).solve(o)
    best = brute_force(ctx, o, plans)
    assert res.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    # the DP's own objective is the cost model's objective of the plan it returns
    assert ctx.score(res.plan, o) == pytest.approx(res.objective, rel=1e-9, abs=1e-12)


def _ctx(dims: ModelDims, edge: Profile = SLOW_EDGE, **kw: object) -> PlanningContext:
    weights = kw.pop("weights", Weights(v=1.0, w_latency=1.0, w_energy=0.05, w_accuracy=20.0))
    return PlanningContext(edge, CLOUD, dims, weights=weights, **kw)  # type: ignore[arg-type]


# Observations that make different plan shapes optimal: fast/slow links, loaded cloud, queues.
OBSERVATIONS = [
    # loaded cloud as fast as the edge, tiny RTT: a mixed layer whose cloud FFN opens a residual run
    obs(bandwidth_bps=1e9, rtt_s=1e-5, prompt_len=16, max_tokens=64, cloud_load=200.0, work_queue_u=0.5),
    # heads split inside a KV group (cached on both sides)
    obs(bandwidth_bps=1e8, rtt_s=1e-4, prompt_len=256, max_tokens=64, cloud_load=400.0),
    # slower link, energy queue
    obs(bandwidth_bps=5e6, rtt_s=0.002, prompt_len=8, max_tokens=32, cloud_load=3.0, energy_queue_z=5.0),
]


@pytest.fixture(scope="module")
def plans_3x3() -> list[Plan]:
    return all_plans(DIMS_3x3)


@pytest.fixture(scope="module")
def plans_gqa() -> list[Plan]:
    return all_plans(DIMS_GQA)


def test_brute_force_enumerates_every_plan(plans_3x3: list[Plan], plans_gqa: list[Plan]) -> None:
    assert len(plans_3x3) == (2**3 * 3) ** 3 * 2
    assert len(plans_gqa) == (2**4 * 3) ** 2 * 2
    assert len(set(plans_gqa)) == len(plans_gqa)


def test_dp_equals_brute_force_3_layers_3_heads(plans_3x3: list[Plan]) -> None:
    # one observation (27 648 plans take ~6 s to score); its optimum mixes heads and a cloud FFN
    check_exact(_ctx(DIMS_3x3), OBSERVATIONS[0], plans_3x3)


@pytest.mark.parametrize("o", OBSERVATIONS)
def test_dp_equals_brute_force_gqa(plans_gqa: list[Plan], o: Observation) -> None:
    check_exact(_ctx(DIMS_GQA), o, plans_gqa)


def test_dp_picks_mixed_plans_somewhere(plans_gqa: list[Plan]) -> None:
    """The exactness cases are not trivial: some optimum splits heads or the FFN."""
    mixed = 0
    for o in OBSERVATIONS:
        plan = SplitwiseDpPlanner(_ctx(DIMS_GQA)).plan(o)
        mixed += plan.summary()["layers"]["mixed"]
    assert mixed > 0


def test_dp_exact_under_memory_budget_and_privacy(plans_gqa: list[Plan]) -> None:
    o0 = OBSERVATIONS[0]
    ctx = _ctx(DIMS_GQA, min_edge_layers=1)
    check_exact(ctx, o0, plans_gqa)
    unconstrained = SplitwiseDpPlanner(_ctx(DIMS_GQA)).solve(o0)
    model = ctx.cost_model(o0)
    edge_mem = ctx.score(edge_only(2, 4), o0, model)
    assert math.isfinite(edge_mem)
    # budgets between "only the embedding fits" and "everything fits" make the knapsack bind
    lo = model.fixed_memory(Side.CLOUD)
    hi = lo + 2 * model.layer_memory(4, 2, model.ffn_params("edge"), False) + model.fixed_memory(Side.EDGE)
    binding = 0
    for frac in (0.0, 0.05, 0.2, 0.5):
        budget = int(lo + frac * (hi - lo))
        o = Observation(**{**o0.__dict__, "memory_budget_bytes": budget})
        res = SplitwiseDpPlanner(_ctx(DIMS_GQA)).solve(o)
        assert res.edge_memory_bytes <= budget
        check_exact(_ctx(DIMS_GQA), o, plans_gqa)
        binding += res.pareto
    assert binding > 0 and unconstrained.edge_memory_bytes > lo
    with pytest.raises(PlanError, match="memory budget"):
        SplitwiseDpPlanner(_ctx(DIMS_GQA)).solve(Observation(**{**o0.__dict__, "memory_budget_bytes": lo - 1}))


def test_layer_dp_is_exact_over_whole_layer_plans(plans_3x3: list[Plan]) -> None:
    whole = [p for p in plans_3x3 if all(lp.all_on(Side.EDGE, 3) or lp.all_on(Side.CLOUD, 3) for lp in p.layers)]
    for o in OBSERVATIONS:
        ctx = _ctx(DIMS_3x3)
        res = LayerDpPlanner(ctx).solve(o)
        assert res.objective == pytest.approx(brute_force(ctx, o, whole), rel=1e-9)
        assert ctx.score(res.plan, o) == pytest.approx(res.objective, rel=1e-9)


def test_smollm2_planning_time() -> None:
    ctx = _ctx(SMOL)
    o = obs(bandwidth_bps=1e9, rtt_s=0.001)
    res = SplitwiseDpPlanner(ctx).solve(o)
    assert ctx.score(res.plan, o) == pytest.approx(res.objective, rel=1e-9)
    timing = benchmark_dp(ctx, o, repeats=10)
    print(f"\nsplitwise-dp 30×9 (3 KV groups): {timing} ; plan {res.plan.summary()}")


def test_fast_link_idle_cloud_dp_never_worse_than_any_planner() -> None:
    for edge in (EDGE, SLOW_EDGE):
        ctx = _ctx(SMOL, edge)
        for o in (obs(bandwidth_bps=1e9, rtt_s=0.001, cloud_load=1.0), obs(bandwidth_bps=3e8, rtt_s=0.003)):
            model = ctx.cost_model(o)
            dp = ctx.score(make_planner("splitwise-dp", ctx).plan(o), o, model)
            for name in PLANNER_NAMES:
                assert dp <= ctx.score(make_planner(name, ctx).plan(o), o, model) * (1 + 1e-12), name


def test_large_backlog_picks_a_faster_plan() -> None:
    # The radio is power-hungry, so with energy weighted the idle-queue optimum stays on the slow
    # edge; a large work queue U makes latency dominate and moves work to the cloud.
    edge = synthetic_profile("edge", 0.2, power=(2.0, 20.0, 1.9))
    ctx = _ctx(SMOL, edge, weights=Weights(v=1.0, w_latency=0.1, w_energy=1.0, w_accuracy=0.0))
    # 5 Mbit/s: at 10 Mbit/s the cloud is the idle optimum too, now that a worker running the LM
    # head answers with the sampled token rather than the logits.
    base = obs(bandwidth_bps=5e6, rtt_s=0.002)
    busy = Observation(**{**base.__dict__, "work_queue_u": 100.0, "backlog_s": 100.0, "backlog_requests": 20})
    dp = SplitwiseDpPlanner(ctx)
    m = ctx.cost_model(base)
    idle_plan, busy_plan = dp.plan(base), dp.plan(busy)
    lat_idle = predict(idle_plan, base, edge, CLOUD, SMOL, "q8_0", model=m).latency_s
    lat_busy = predict(busy_plan, busy, edge, CLOUD, SMOL, "q8_0", model=m).latency_s
    assert idle_plan.is_edge_only() and not busy_plan.is_edge_only()
    assert lat_busy < 0.5 * lat_idle


@pytest.mark.parametrize("cut", [{"bandwidth_bps": 0.0}, {"rtt_s": math.inf}])
def test_link_cut_gives_edge_only(cut: dict[str, float]) -> None:
    o = obs(**cut)
    for name in ("splitwise-dp", "layer-dp", "layer-split"):
        plan = make_planner(name, _ctx(SMOL)).plan(o)
        assert plan.is_edge_only(), name


def test_privacy_constraint_keeps_first_layers_on_the_edge() -> None:
    o = obs(bandwidth_bps=1e9, rtt_s=0.0005)
    free = SplitwiseDpPlanner(_ctx(SMOL)).plan(o)
    assert not free.layers[0].all_on(Side.EDGE, 9)  # the constraint binds
    for name in ("splitwise-dp", "layer-dp", "layer-split"):
        plan = make_planner(name, _ctx(SMOL, min_edge_layers=4)).plan(o)
        assert all(lp.all_on(Side.EDGE, 9) for lp in plan.layers[:4]), name


def test_make_planner_and_context_validation() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown planner"):
        make_planner("greedy", _ctx(SMOL))
    with pytest.raises(InvalidArgumentError, match="min_edge_layers"):
        _ctx(SMOL, min_edge_layers=31)
    assert make_planner("edge-only", _ctx(SMOL)).plan(obs()).is_edge_only()
    assert make_planner("cloud-only", _ctx(SMOL)).plan(obs()).summary()["layers"]["cloud"] == 30


def test_the_registry_names_each_planner_once_and_knows_which_use_the_cost_model() -> None:
    assert tuple(spec.name for spec in PLANNERS) == PLANNER_NAMES
    assert len(set(PLANNER_NAMES)) == len(PLANNER_NAMES)
    for spec in PLANNERS:
        assert make_planner(spec.name, _ctx(SMOL)).name == spec.name
    # The fixed baselines are the only planners that plan without the cost model.
    assert frozenset(PLANNER_NAMES) - COST_MODEL_PLANNERS == {"edge-only", "cloud-only"}


def test_dp_objective_equals_predict_on_random_observations() -> None:
    rng = random.Random(5)
    seen_ffn: set[str] = set()
    for _ in range(40):
        o = obs(
            bandwidth_bps=10 ** rng.uniform(6, 9.5),
            rtt_s=10 ** rng.uniform(-5, -1.5),
            prompt_len=rng.randint(1, 3000),
            max_tokens=rng.randint(1, 128),
            cloud_load=10 ** rng.uniform(0, 2.7),
            work_queue_u=rng.uniform(0, 5),
            energy_queue_z=rng.uniform(0, 5),
            memory_budget_bytes=rng.choice([None, rng.randint(60_000_000, 120_000_000)]),
        )
        w = Weights(v=rng.uniform(0.1, 10), w_latency=rng.uniform(0, 1), w_energy=rng.uniform(0, 1), w_accuracy=100.0)
        ctx = _ctx(SMOL, rng.choice([EDGE, SLOW_EDGE]), weights=w, min_edge_layers=rng.choice([0, 0, 3]))
        try:
            res = SplitwiseDpPlanner(ctx).solve(o)
        except PlanError:
            continue
        assert ctx.score(res.plan, o) == pytest.approx(res.objective, rel=1e-9), o
        seen_ffn |= {lp.ffn.value for lp in res.plan.layers}
    assert seen_ffn >= {"edge", "cloud"}


def test_binding_memory_budget_on_smollm2() -> None:
    ctx = _ctx(SMOL)
    o = obs(bandwidth_bps=1e9, rtt_s=1e-5, prompt_len=256, max_tokens=64, cloud_load=400.0)
    free = SplitwiseDpPlanner(ctx).solve(o)
    previous = free.objective
    for frac in (0.9, 0.5, 0.3):
        budget = int(free.edge_memory_bytes * frac)
        ob = Observation(**{**o.__dict__, "memory_budget_bytes": budget})
        res = SplitwiseDpPlanner(ctx).solve(ob)
        assert res.pareto and res.edge_memory_bytes <= budget
        assert ctx.score(res.plan, ob) == pytest.approx(res.objective, rel=1e-9)
        assert res.objective >= previous  # a tighter budget never helps
        previous = res.objective
        # layer-dp and layer-split respect the budget too, and splitwise-dp is at least as good
        for name in ("layer-dp", "layer-split"):
            assert res.objective <= ctx.score(make_planner(name, ctx).plan(ob), ob) * (1 + 1e-12)
        print(f"\nbudget {frac:.0%}: pareto DP {res.seconds * 1e3:.1f} ms")


def _all_scores(ctx: PlanningContext, o: Observation, plans: list[Plan]) -> list[tuple[float, int, bool]]:
    """(objective without budget, edge memory, privacy respected) of every plan, via predict()."""
    model = ctx.cost_model(o)
    k = ctx.min_edge_layers
    out = []
    for p in plans:
        pred = predict(p, o, ctx.edge_profile, ctx.cloud_profile, ctx.dims, ctx.codec, model=model)
        private = all(lp.all_on(Side.EDGE, p.n_head) for lp in p.layers[:k])
        out.append((objective(pred, o, ctx.weights), pred.edge_memory_bytes, private))
    return out


@pytest.mark.parametrize("k", [0, 1])
def test_dp_exact_under_binding_budgets_brute_force(plans_gqa: list[Plan], k: int) -> None:
    """Budgeted splitwise-dp equals brute force (every plan scored by predict(), the budget and the
    privacy prefix applied to the scores) for every observation and several binding budgets."""
    pareto_runs = 0
    for o in OBSERVATIONS:
        ctx = _ctx(DIMS_GQA, min_edge_layers=k)
        scores = _all_scores(ctx, o, plans_gqa)
        free = SplitwiseDpPlanner(ctx).solve(o)
        least = min(m for _, m, ok in scores if ok)
        for frac in (0.0, 0.1, 0.3, 0.6, 0.85, 0.97):
            budget = int(least + frac * (free.edge_memory_bytes - least))
            ob = Observation(**{**o.__dict__, "memory_budget_bytes": budget})
            best = min(s for s, m, ok in scores if ok and m <= budget)
            res = SplitwiseDpPlanner(ctx).solve(ob)
            assert res.objective == pytest.approx(best, rel=1e-9, abs=1e-12), (o, k, frac)
            assert ctx.score(res.plan, ob) == pytest.approx(res.objective, rel=1e-9, abs=1e-12)
            assert res.edge_memory_bytes <= budget
            pareto_runs += res.pareto
    assert pareto_runs >= 10  # the budgets bind: the constrained search ran


def _reference_pareto(ctx: PlanningContext, o: Observation) -> float:
    """Unpruned Pareto-front DP over the planner's own transition table (no bounds, no
    incumbent): checks the branch and bound of the budgeted search on models too deep for brute
    force. The tables themselves are checked against brute force above."""
    from policies.planners.tables import St, Tables

    budget = o.memory_budget_bytes
    assert budget is not None
    tab = Tables(ctx, o, True)
    k = ctx.min_edge_layers
    tables = (tab.transitions(False), tab.transitions(True))
    fronts: dict[St, list[tuple[float, int]]] = {St.E: [(tab.embed, 0)]}
    for ell in range(ctx.dims.n_layer):
        cand: dict[St, list[tuple[float, int]]] = {}
        for (a, b), opts in tables[1 if ell < k else 0].items():
            for c0, m0 in fronts.get(a, []):
                cand.setdefault(b, []).extend((c0 + c, m0 + m) for c, m, _ in opts if m0 + m <= budget)
        fronts = {}
        for b, entries in cand.items():
            kept: list[tuple[float, int]] = []
            for c, m in sorted(entries, key=lambda e: (e[1], e[0])):
                if not kept or c < kept[-1][0]:
                    kept.append((c, m))
            fronts[b] = kept
    fixed = {side: tab.m.fixed_memory(side) for side in Side}
    totals = [
        c + lc for s, front in fronts.items() for c, m in front for lc, side in tab.lm[s] if m + fixed[side] <= budget
    ]
    return min(totals, default=math.inf)


def test_budgeted_dp_equals_unpruned_pareto_dp_on_deeper_gqa_model() -> None:
    dims = ModelDims(n_layer=8, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=2000)
    rng = random.Random(3)
    pareto_runs = 0
    for i in range(200):
        if pareto_runs == 12:
            break
        o = obs(
            bandwidth_bps=10 ** rng.uniform(6, 9.5),
            rtt_s=10 ** rng.uniform(-5, -1.5),
            prompt_len=rng.randint(1, 3000),
            max_tokens=rng.randint(2, 128),
            cloud_load=10 ** rng.uniform(0, 2.7),
            work_queue_u=rng.uniform(0, 5),
            energy_queue_z=rng.uniform(0, 5),
        )
        w = Weights(v=rng.uniform(0.1, 10), w_latency=rng.uniform(0, 1), w_energy=rng.uniform(0, 1), w_accuracy=100.0)
        ctx = _ctx(dims, rng.choice([EDGE, SLOW_EDGE]), weights=w, min_edge_layers=2 if i % 3 == 2 else 0)
        free = SplitwiseDpPlanner(ctx).solve(o)
        model = ctx.cost_model(o)  # least memory: embedding + the private layers
        least = model.fixed_memory(Side.CLOUD) + ctx.min_edge_layers * model.layer_memory(
            9, 3, model.ffn_params("edge"), False
        )
        budget = int(least + rng.uniform(0.05, 0.95) * (free.edge_memory_bytes - least))
        ob = Observation(**{**o.__dict__, "memory_budget_bytes": budget})
        if budget >= free.edge_memory_bytes:
            continue  # the unconstrained optimum already uses the least memory
        res = SplitwiseDpPlanner(ctx).solve(ob)
        assert res.pareto
        assert res.objective == pytest.approx(_reference_pareto(ctx, ob), rel=1e-9), i
        assert ctx.score(res.plan, ob) == pytest.approx(res.objective, rel=1e-9)
        assert res.edge_memory_bytes <= budget
        pareto_runs += 1
    assert pareto_runs == 12
