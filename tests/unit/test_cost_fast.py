"""predict's fast path (counts read from the plan layer by layer, per-step coefficients, cached)
equals the straightforward walk (step_terms over the compiled schedule, plan_memory layer by layer)
on fresh random plans, loads, links and GQA shapes; its caches stay bounded."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from policies import cost
from policies.cost import CostModel, Observation, Prediction, plan_memory, predict, step_terms
from policies.plan import (
    FfnMode,
    LayerPlan,
    Plan,
    Side,
    cloud_only,
    edge_only,
    heads_plan,
    layer_split,
    random_plan,
)
from policies.segments import ModelDims, Reg, Schedule, compile_plan
from splitwise_core.profile import AttentionTable, Profile
from tests.unit.test_cost import CLOUD, EDGE, SMOL, obs, synthetic_profile

REL = 1e-9
KINDS = ("EMBED", "LAYER", "ATTN_NORM", "ATTN", "FFN_NORM", "FFN", "GATE_UP", "ADD", "LM_HEAD")


def walked_memory(plan: Plan, model: CostModel) -> int:
    total = model.fixed_memory(plan.lm_head)
    for ell, lp in enumerate(plan.layers):
        g = len(plan.kv_groups(Side.EDGE, ell, model.dims.n_head_kv))
        total += model.layer_memory(
            len(lp.edge_heads), g, model.ffn_params(lp.ffn.value), lp.all_on(Side.CLOUD, plan.n_head)
        )
    return total


def walked(
    plan: Plan, observation: Observation, edge: Profile, cloud: Profile, dims: ModelDims, codec: str
) -> Prediction:
    """predict as it was before the fast path: walk every op of the schedule, twice."""
    m = CostModel(observation, edge, cloud, dims, codec)
    schedule = compile_plan(plan, dims)
    memory = walked_memory(plan, m)
    if schedule.cloud_round_trips and not m.link_up:
        crossings = sum(1 + (seg.output is not Reg.LOGITS) for seg in schedule.cloud_segments)
        return Prediction(
            latency_s=math.inf,
            prefill_s=math.inf,
            decode_s_per_token=math.inf,
            energy_j=math.inf,
            accuracy_cost=m.kl * crossings,
            edge_memory_bytes=memory,
            breakdown={"cloud_round_trips_per_step": float(schedule.cloud_round_trips), "link_up": 0.0},
        )
    pre, dec = step_terms(schedule, m, m.prefill), step_terms(schedule, m, m.decode)
    n = observation.n_decode
    return Prediction(
        latency_s=pre.latency + n * dec.latency,
        prefill_s=pre.latency,
        decode_s_per_token=dec.latency,
        energy_j=m.energy(pre) + n * m.energy(dec),
        accuracy_cost=m.kl * dec.crossings,
        edge_memory_bytes=memory,
        breakdown={
            "cloud_round_trips_per_step": float(schedule.cloud_round_trips),
            "prefill_edge_compute_s": pre.edge_compute,
            "prefill_edge_ops_s": pre.edge_ops,
            "prefill_cloud_compute_s": pre.cloud_compute,
            "prefill_tx_s": pre.tx,
            "prefill_bytes_up": float(pre.bytes_up),
            "prefill_bytes_down": float(pre.bytes_down),
            "decode_edge_compute_s": dec.edge_compute,
            "decode_edge_ops_s": dec.edge_ops,
            "decode_cloud_compute_s": dec.cloud_compute,
            "decode_tx_s": dec.tx,
            "decode_bytes_up": float(dec.bytes_up),
            "decode_bytes_down": float(dec.bytes_down),
            "crossings_per_step": float(dec.crossings),
            "prefill_energy_j": m.energy(pre),
            "decode_energy_j_per_token": m.energy(dec),
            "link_up": 1.0,
            **{f"prefill_edge_s.{kind}": v for kind, v in pre.edge_ops_by_kind.items()},
            **{f"decode_edge_s.{kind}": v for kind, v in dec.edge_ops_by_kind.items()},
        },
    )


def assert_same(fast: Prediction, slow: Prediction) -> None:
    for name in ("latency_s", "prefill_s", "decode_s_per_token", "energy_j", "accuracy_cost"):
        assert getattr(fast, name) == pytest.approx(getattr(slow, name), rel=REL, abs=0), name
    assert fast.edge_memory_bytes == slow.edge_memory_bytes
    assert list(fast.breakdown) == list(slow.breakdown)  # op kinds in the order the walk meets them
    for key, value in slow.breakdown.items():
        assert fast.breakdown[key] == pytest.approx(value, rel=REL, abs=0), key


def assert_same_as_walk(
    plan: Plan, observation: Observation, edge: Profile, cloud: Profile, dims: ModelDims, codec: str
) -> None:
    fast = predict(plan, observation, edge, cloud, dims, codec)
    assert_same(fast, walked(plan, observation, edge, cloud, dims, codec))


def random_observation(rng: np.random.Generator) -> Observation:
    loads = {str(k): float(rng.uniform(0.3, 4.0)) for k in rng.choice(KINDS, size=rng.integers(0, 4), replace=False)}
    return Observation(
        bandwidth_bps=float(10 ** rng.uniform(5, 9)),
        rtt_s=float(rng.uniform(0.0, 0.2)),
        prompt_len=int(rng.integers(1, 600)),
        max_tokens=int(rng.integers(1, 300)),
        cloud_load=float(rng.uniform(0.0, 5.0)),
        edge_load=float(rng.uniform(0.2, 5.0)),
        edge_op_load=loads,
    )


@pytest.mark.parametrize("codec", ["q8_0", "f16", "q4_0"])
def test_random_plans_and_observations_match_the_walk(codec: str) -> None:
    rng = np.random.default_rng(7)
    for i in range(60):
        plan = random_plan(rng, SMOL.n_layer, SMOL.n_head, i)
        observation = random_observation(rng)
        assert_same_as_walk(plan, observation, EDGE, CLOUD, SMOL, codec)
        # The agent's and the true view of the same request share cached step costs: still exact.
        assert_same_as_walk(plan, replace(observation, cloud_load=2.5, rtt_s=0.001), EDGE, CLOUD, SMOL, codec)


@pytest.mark.parametrize(
    "dims",
    [
        ModelDims(n_layer=6, n_head=8, n_head_kv=2, d_model=256, n_ff=688, n_vocab=1000),
        ModelDims(n_layer=4, n_head=12, n_head_kv=4, d_model=384, n_ff=1024, n_vocab=32000),
        ModelDims(n_layer=5, n_head=6, n_head_kv=6, d_model=192, n_ff=512, n_vocab=500),  # no GQA
        ModelDims(n_layer=3, n_head=4, n_head_kv=1, d_model=64, n_ff=128, n_vocab=100),  # one KV group
    ],
)
def test_gqa_shapes_match_the_walk(dims: ModelDims) -> None:
    rng = np.random.default_rng(dims.n_head)
    edge = synthetic_profile("edge", 1.0, n_head=dims.n_head, attn_curve=2.0)
    cloud = synthetic_profile("cloud", 8.0, n_head=dims.n_head)
    plans = [edge_only(dims.n_layer, dims.n_head), cloud_only(dims.n_layer, dims.n_head)]
    plans += [heads_plan(n, dims.n_layer, dims.n_head) for n in range(1, dims.n_head)]
    plans += [layer_split(k, dims.n_layer, dims.n_head) for k in range(dims.n_layer + 1)]
    plans += [random_plan(rng, dims.n_layer, dims.n_head, i) for i in range(30)]
    for plan in plans:
        assert_same_as_walk(plan, random_observation(rng), edge, cloud, dims, "q8_0")


def test_a_cut_link_matches_the_walk() -> None:
    rng = np.random.default_rng(3)
    cut = [obs(bandwidth_bps=0.0), obs(rtt_s=math.inf), obs(bandwidth_bps=0.0, rtt_s=math.inf)]
    plans = [edge_only(30, 9), cloud_only(30, 9), heads_plan(4, 30, 9)] + [
        random_plan(rng, 30, 9, i) for i in range(20)
    ]
    for plan in plans:
        for observation in cut:
            assert_same_as_walk(plan, observation, EDGE, CLOUD, SMOL, "q8_0")
    assert math.isfinite(predict(edge_only(30, 9), cut[0], EDGE, CLOUD, SMOL, "q8_0").latency_s)


def test_a_parallel_section_takes_whichever_side_is_slower() -> None:
    plan = heads_plan(4, 30, 9)
    # A slow link makes the remote side the longer one; a heavily loaded edge attention the local one.
    for observation in (obs(bandwidth_bps=1e5), obs(edge_op_load={"ATTN": 500.0}), obs(edge_load=0.0)):
        assert_same_as_walk(plan, observation, EDGE, CLOUD, SMOL, "q8_0")


def test_a_schedule_and_a_prepared_model_give_the_same_answer() -> None:
    plan = random_plan(np.random.default_rng(5), 30, 9)
    observation = obs(edge_load=1.7, cloud_load=3.0)
    model = CostModel(observation, EDGE, CLOUD, SMOL, "q8_0")
    by_plan = predict(plan, observation, EDGE, CLOUD, SMOL, "q8_0")
    assert predict(compile_plan(plan, SMOL), observation, EDGE, CLOUD, SMOL, "q8_0") == by_plan
    assert predict(plan, observation, EDGE, CLOUD, SMOL, "q8_0", model=model) == by_plan
    assert plan_memory(plan, model) == walked_memory(plan, model) == by_plan.edge_memory_bytes


def test_the_caches_are_bounded() -> None:
    rng = np.random.default_rng(11)
    n = 3 * max(cost._SHAPES.maxsize, cost._STEP_COSTS.maxsize, cost._MEMORY.maxsize)
    for i in range(n):
        plan = random_plan(rng, 4, 9, i)
        dims = replace(SMOL, n_layer=4)
        predict(plan, obs(prompt_len=int(rng.integers(1, 500))), EDGE, CLOUD, dims, "q8_0")
    for lru in (cost._SHAPES, cost._STEP_COSTS, cost._MEMORY):
        assert len(lru) <= lru.maxsize
    for memoised in (cost._memory_layout, cost._layer_work, cost._kv_group_count):
        info = memoised.cache_info()
        assert info.maxsize is not None and info.currsize <= info.maxsize


def run_heavy_plan(rng: np.random.Generator, n_layer: int, n_head: int) -> Plan:
    """Mostly layers all on the cloud or with their FFN there, so that residual runs open, go on
    through several layers, end at a layer or at the LM head, on either side."""
    layers = []
    for _ in range(n_layer):
        kind = rng.integers(5)
        if kind <= 1:
            layers.append(LayerPlan(edge_heads=(), ffn=FfnMode.CLOUD))
        else:
            n_edge = int(rng.integers(0, n_head + 1))
            heads = tuple(sorted(int(h) for h in rng.choice(n_head, size=n_edge, replace=False)))
            layers.append(LayerPlan(edge_heads=heads, ffn=FfnMode.CLOUD if kind <= 3 else FfnMode.SPLIT))
    lm_head = Side.CLOUD if rng.integers(2) else Side.EDGE
    return Plan(n_layer=n_layer, n_head=n_head, layers=tuple(layers), lm_head=lm_head, name="run-heavy")


@pytest.mark.parametrize(
    "dims", [SMOL, ModelDims(n_layer=7, n_head=8, n_head_kv=2, d_model=256, n_ff=688, n_vocab=999)]
)
def test_fresh_plans_with_residual_runs_match_the_walk(dims: ModelDims) -> None:
    rng = np.random.default_rng(dims.n_layer)
    edge = synthetic_profile("edge", 1.0, n_head=dims.n_head, attn_curve=2.0)
    cloud = synthetic_profile("cloud", 8.0, n_head=dims.n_head)
    for _ in range(40):
        plan = run_heavy_plan(rng, dims.n_layer, dims.n_head)
        assert_same_as_walk(plan, random_observation(rng), edge, cloud, dims, "q8_0")


def test_round_trips_are_counted_from_the_plan_without_compiling_the_steps() -> None:
    rng = np.random.default_rng(13)
    for dims in (SMOL, ModelDims(n_layer=3, n_head=4, n_head_kv=1, d_model=64, n_ff=128, n_vocab=100)):
        plans = [random_plan(rng, dims.n_layer, dims.n_head, i) for i in range(40)]
        plans += [run_heavy_plan(rng, dims.n_layer, dims.n_head) for _ in range(40)]
        for plan in plans:
            schedule = Schedule(plan=plan, dims=dims)
            trips = schedule.cloud_round_trips
            assert "steps" not in vars(schedule)  # not compiled to count them
            assert trips == len(schedule.cloud_segments)


@pytest.mark.parametrize(
    "table",
    [
        AttentionTable(
            heads=[1, 2, 4, 8], context=[1, 16, 64], seconds=[[1e-6, 2e-6, 5e-6]] * 2 + [[3e-6, 4e-6, 9e-6]] * 2
        ),
        # Falling with the context: the extrapolation above the grid reaches 0 and is clamped there.
        AttentionTable(heads=[2, 3], context=[10, 20], seconds=[[4e-6, 3e-6], [5e-6, 1e-6]]),
        AttentionTable(heads=[1, 2, 3, 4, 5, 6, 7, 8, 9], context=[32], seconds=[[h * 1e-6] for h in range(1, 10)]),
    ],
)
def test_attention_by_head_count_is_the_tables_own_cost(table: AttentionTable) -> None:
    contexts = [0.5, 1, 7.5, 10, 16, 17.25, 20, 21, 32, 63.5, 64, 65, 300.5, 10_000]
    for ctx in contexts:
        by_count = cost._attention_by_head_count(table, ctx, 12)
        assert by_count == [table.cost(n, ctx) for n in range(13)]  # bit for bit


def test_a_sparse_attention_grid_matches_the_walk() -> None:
    rng = np.random.default_rng(17)
    sparse = AttentionTable(
        heads=[1, 2, 4, 8],
        context=[1, 64, 512],
        seconds=[[h * 1e-6, h * 3e-6, h * 2e-5] for h in (1, 2, 4, 8)],
    )
    edge = EDGE.model_copy(update={"attention": sparse})
    for i in range(20):
        plan = random_plan(rng, SMOL.n_layer, SMOL.n_head, i)
        assert_same_as_walk(plan, random_observation(rng), edge, CLOUD, SMOL, "q8_0")


def test_memory_follows_the_request_length_for_the_same_plan() -> None:
    plan = random_plan(np.random.default_rng(19), 30, 9)
    for prompt_len, max_tokens in ((1, 1), (500, 200), (1, 1), (37, 5)):
        assert_same_as_walk(plan, obs(prompt_len=prompt_len, max_tokens=max_tokens), EDGE, CLOUD, SMOL, "q8_0")
