"""Cost model: profiles (JSON round trip, validation) and predict() on compiled schedules.

Profiles here are synthetic (made-up but plausible numbers); the profiler that measures real ones
is a separate task.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from policies.cost import CostModel, Observation, Prediction, Weights, objective, predict
from policies.plan import FfnMode, LayerPlan, Plan, Side, cloud_only, edge_only, heads_plan, layer_split
from policies.segments import ModelDims, compile_plan
from splitwise_core.codecs import codec_size
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.lyapunov import QueueBank
from splitwise_core.ops import SAMPLING_BLOCK, frame_bytes
from splitwise_core.profile import Profile
from splitwise_core.sampling import SampledToken

SMOL = ModelDims(n_layer=30, n_head=9, n_head_kv=3, d_model=576, n_ff=1536, n_vocab=49152)
KL = {"f32": 0.0, "f16": 1e-6, "q8_0": 1e-4, "q4_0": 3e-3}


def synthetic_profile(
    machine: str = "edge",
    speed: float = 1.0,
    n_head: int = 9,
    power: tuple[float, float, float] = (6.0, 3.0, 2.0),
    attn_curve: float = 1.0,
) -> Profile:
    """A plausible profile; `speed` divides every compute time (a cloud is ~10× faster)."""
    heads = list(range(1, n_head + 1))
    context = [16, 256, 2048]
    seconds = [[h * (2e-6 + attn_curve * 4e-9 * c) / speed + 1e-7 * (h % 2) for c in context] for h in heads]
    codec = {"encode_s_per_byte": 2e-9 / speed, "decode_s_per_byte": 1e-9 / speed}
    return Profile.model_validate(
        {
            "machine": machine,
            "model": "synthetic",
            "threads": 4,
            "attention": {"heads": heads, "context": context, "seconds": seconds},
            "kv_group_s": 3e-6 / speed,
            "ffn_full_s": 60e-6 / speed,
            "ffn_gate_up_s": 40e-6 / speed,
            "ffn_down_s": 20e-6 / speed,
            "norm_s": 1e-6 / speed,
            "add_s": 0.5e-6 / speed,
            "embed_s": 0.3e-6 / speed,
            "lm_head_s": 900e-6 / speed,
            "prefill": {"prompt_lengths": [1, 16, 128, 512], "per_token_factor": [1.0, 0.5, 0.3, 0.35]},
            "codecs": {name: codec for name in ("f32", "f16", "q8_0", "q4_0")},
            "power": {"compute_w": power[0], "transmit_w": power[1], "idle_w": power[2]},
            "codec_kl": KL,
            "weight_bytes_per_param": 34 / 32,
            "kv_bytes_per_value": 2.0,
            "base_memory_bytes": 1 << 20,
            "provenance": {"attention": "synthetic"},
            "note": "synthetic profile for tests",
        }
    )


EDGE = synthetic_profile("edge", 1.0)
CLOUD = synthetic_profile("cloud", 10.0)


def obs(**kw: object) -> Observation:
    base: dict[str, object] = {"bandwidth_bps": 50e6, "rtt_s": 0.02, "prompt_len": 32, "max_tokens": 16}
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def test_profile_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    EDGE.save(path)
    assert Profile.load(path) == EDGE
    assert json.loads(path.read_text())["provenance"] == {"attention": "synthetic"}


def test_profile_rejects_unknown_keys_bad_tables_and_coercion(tmp_path: Path) -> None:
    good = json.loads(EDGE.to_json())
    for mutate in (
        lambda d: d.update(extra=1),
        lambda d: d["attention"].update(context=[256, 16, 2048]),
        lambda d: d["attention"]["seconds"].pop(),
        lambda d: d.update(threads="4"),
        lambda d: d["power"].update(idle_w=-1.0),
        lambda d: d["provenance"].update(ffn_full_s="guessed"),
        lambda d: d["prefill"].update(per_token_factor=[1.0]),
    ):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        with pytest.raises(InvalidArgumentError):
            Profile.from_json(json.dumps(doc))
    with pytest.raises(InvalidArgumentError, match=r"missing\.json"):
        Profile.load(tmp_path / "missing.json")


def test_attention_interpolation_and_extrapolation() -> None:
    table = EDGE.attention
    assert table.cost(0, 100) == 0.0
    exact = table.seconds[2][1]
    assert table.cost(3, 256) == pytest.approx(exact)
    mid = table.cost(3, 136)
    assert mid == pytest.approx((table.seconds[2][0] + table.seconds[2][1]) / 2)
    # above the grid: linear extrapolation from the last two context points
    slope = (table.seconds[0][2] - table.seconds[0][1]) / (2048 - 256)
    assert table.cost(1, 4096) == pytest.approx(table.seconds[0][2] + slope * 2048)
    assert table.cost(1, 1) == pytest.approx(table.seconds[0][0])


def test_observation_validation() -> None:
    for bad in ({"bandwidth_bps": -1.0}, {"prompt_len": 0}, {"max_tokens": 0}, {"energy_queue_z": math.inf}):
        with pytest.raises(InvalidArgumentError):
            obs(**bad)
    assert not obs(bandwidth_bps=0.0).link_up and not obs(rtt_s=math.inf).link_up and obs().link_up


def _pred(plan: Plan, o: Observation | None = None, dims: ModelDims = SMOL, codec: str = "q8_0") -> Prediction:
    return predict(plan, o or obs(), EDGE, CLOUD, dims, codec)


def test_edge_only_matches_hand_computation() -> None:
    o = obs(prompt_len=16, max_tokens=9)
    p = _pred(edge_only(SMOL.n_layer, SMOL.n_head), o)
    e = EDGE

    def layer(rows: int, ctx: float, factor: float) -> float:
        attn = e.attention.cost(9, ctx) + 3 * e.kv_group_s
        return rows * factor * (2 * e.norm_s + attn + 2 * e.add_s + e.ffn_full_s)

    pre = 16 * 0.5 * e.embed_s + 30 * layer(16, 8.5, 0.5) + e.lm_head_s
    ctx_dec = 16 + (8 + 1) / 2
    dec = e.embed_s + 30 * layer(1, ctx_dec, 1.0) + e.lm_head_s
    assert p.prefill_s == pytest.approx(pre, rel=1e-12)
    assert p.decode_s_per_token == pytest.approx(dec, rel=1e-12)
    assert p.latency_s == pytest.approx(pre + 8 * dec, rel=1e-12)
    assert p.energy_j == pytest.approx(6.0 * p.latency_s, rel=1e-12)  # computing all the time
    assert p.accuracy_cost == 0.0 and p.breakdown["cloud_round_trips_per_step"] == 0


def test_cloud_only_message_costs_use_segment_bytes() -> None:
    o = obs(prompt_len=8, max_tokens=1, bandwidth_bps=10e6, rtt_s=0.04)
    plan = cloud_only(SMOL.n_layer, SMOL.n_head)
    p = _pred(plan, o)
    sched = compile_plan(plan, SMOL)
    (b,) = sched.segment_bytes("q8_0", 8)
    # The LM head's request carries the sampling block; its answer is the sampled token.
    assert b.up == frame_bytes(31, 2, codec_size("q8_0", 8 * 576)) + SAMPLING_BLOCK.size
    assert b.down == frame_bytes(31, 2, SampledToken.wire_bytes(0))
    c, e = CLOUD, EDGE
    f = 1.0 + (8 - 1) / 15 * (0.5 - 1.0)  # per-token factor at 8 rows: between 1 (1 row) and 0.5 (16)
    layer = 8 * f * (2 * c.norm_s + c.attention.cost(9, 4.5) + 3 * c.kv_group_s + 2 * c.add_s + c.ffn_full_s)
    payload = codec_size("q8_0", 8 * 576)
    expected = (
        8 * f * e.embed_s
        + payload * e.codecs["q8_0"].encode_s_per_byte
        + 0.04
        + (b.up + b.down) * 8 / 10e6
        + payload * c.codecs["q8_0"].decode_s_per_byte
        + 30 * layer
        + c.lm_head_s
    )
    assert p.prefill_s == pytest.approx(expected, rel=1e-12)
    assert p.latency_s == p.prefill_s  # max_tokens 1: no decode step
    assert p.accuracy_cost == pytest.approx(KL["q8_0"])  # x goes up once; logits come back as f32
    assert p.breakdown["prefill_bytes_up"] == b.up and p.breakdown["prefill_bytes_down"] == b.down


def test_parallel_section_takes_the_max_of_both_sides() -> None:
    dims = ModelDims(n_layer=1, n_head=4, n_head_kv=2, d_model=64, n_ff=128, n_vocab=100)
    plan = Plan(1, 4, (LayerPlan((0, 1), FfnMode.EDGE),), Side.EDGE)  # group 0 edge, group 1 cloud
    # remote path dominates: every extra second of RTT is an extra second of the step
    one, two = _pred(plan, obs(rtt_s=1.0), dims), _pred(plan, obs(rtt_s=2.0), dims)
    assert two.decode_s_per_token - one.decode_s_per_token == pytest.approx(1.0, rel=1e-12)
    # local side dominates (free, instant cloud and link): the step is the edge's work plus codec work
    o = obs(rtt_s=0.0, bandwidth_bps=1e18, cloud_load=0.0, prompt_len=10, max_tokens=2)
    p = _pred(plan, o, dims)
    e = EDGE
    ctx = 10 + 1.0
    payload = codec_size("q8_0", 64)
    codec_s = payload * (e.codecs["q8_0"].encode_s_per_byte + e.codecs["q8_0"].decode_s_per_byte)
    local = e.attention.cost(2, ctx) + e.kv_group_s
    rest = e.embed_s + 2 * e.norm_s + 2 * e.add_s + e.ffn_full_s + e.add_s + e.lm_head_s
    wire = 2 * frame_bytes(1, 2, payload) * 8 / 1e18
    assert p.decode_s_per_token == pytest.approx(rest + codec_s + max(local, wire), rel=1e-12)
    # the cloud load scales only the cloud side
    loaded = _pred(plan, obs(rtt_s=0.0, cloud_load=1000.0), dims)
    assert loaded.decode_s_per_token > _pred(plan, obs(rtt_s=0.0), dims).decode_s_per_token


def test_link_cut_makes_cloud_plans_infinite_and_edge_only_finite() -> None:
    for o in (obs(bandwidth_bps=0.0), obs(rtt_s=math.inf)):
        assert math.isinf(_pred(cloud_only(30, 9), o).latency_s)
        assert math.isinf(objective(_pred(heads_plan(3, 30, 9), o), o, Weights(w_latency=0.0, w_energy=0.0)))
        assert math.isfinite(_pred(edge_only(30, 9), o).latency_s)


def test_energy_model_charges_compute_radio_and_idle() -> None:
    o = obs(prompt_len=4, max_tokens=4)
    p = _pred(layer_split(10, 30, 9), o)
    b = p.breakdown
    tx = b["prefill_tx_s"] + 3 * b["decode_tx_s"]
    comp = b["prefill_edge_compute_s"] + 3 * b["decode_edge_compute_s"]
    assert p.energy_j == pytest.approx(2.0 * p.latency_s + 4.0 * comp + 1.0 * tx, rel=1e-12)


def test_edge_memory_counts_weights_and_kv_groups() -> None:
    o = obs(prompt_len=10, max_tokens=6)
    d, hd = 576, 64
    wb = 34 / 32
    fixed = (1 << 20) + math.ceil((49152 * d) * wb)  # embedding; LM head on the cloud
    assert _pred(cloud_only(30, 9), o).edge_memory_bytes == fixed
    # heads:4 → heads 0..3 = group 0 whole + group 1 split: 4 W_q heads, 2 KV groups on the edge, and
    # all of W_o (the engine reads a head's column slice of every row)
    w_o = d * 9 * hd
    layer = math.ceil((4 * d * hd + w_o + 2 * 2 * d * hd + 3 * d * 1536 + 2 * d) * wb + 2 * 2 * hd * 16 * 2.0)
    lm = math.ceil((2 * 49152 * d + d) * wb)  # embedding + LM head (+ final norm) on the edge
    assert _pred(heads_plan(4, 30, 9), o).edge_memory_bytes == (1 << 20) + lm + 30 * layer
    # FFN split keeps gate/up only; a whole-cloud layer costs nothing on the edge
    plan = Plan(2, 9, (LayerPlan((), FfnMode.CLOUD), LayerPlan((0,), FfnMode.SPLIT)), Side.CLOUD)
    dims = ModelDims(n_layer=2, n_head=9, n_head_kv=3, d_model=d, n_ff=1536, n_vocab=49152)
    one = math.ceil((1 * d * hd + w_o + 1 * 2 * d * hd + 2 * d * 1536 + 2 * d) * wb + 1 * 2 * hd * 16 * 2.0)
    assert _pred(plan, o, dims).edge_memory_bytes == fixed + one
    # A tied LM head is the embedding: on the edge it adds the final norm only
    tied = ModelDims(n_layer=2, n_head=9, n_head_kv=3, d_model=d, n_ff=1536, n_vocab=49152, tied_output=True)
    on_edge = Plan(2, 9, plan.layers, Side.EDGE)
    assert _pred(on_edge, o, tied).edge_memory_bytes == (1 << 20) + math.ceil((49152 * d + d) * wb) + one
    # GPT-2's FFN has no gate: the split mode keeps W1 alone on the edge
    gpt2 = ModelDims(n_layer=2, n_head=9, n_head_kv=3, d_model=d, n_ff=1536, n_vocab=49152, gated_ffn=False)
    one_gpt2 = math.ceil((1 * d * hd + w_o + 1 * 2 * d * hd + d * 1536 + 2 * d) * wb + 1 * 2 * hd * 16 * 2.0)
    assert _pred(plan, o, gpt2).edge_memory_bytes == fixed + one_gpt2
    # Qwen3-like heads wider than d_model / n_head: W_q, W_o, W_k/W_v and K/V scale with head_dim
    wide = ModelDims(n_layer=2, n_head=9, n_head_kv=3, d_model=d, n_ff=1536, n_vocab=49152, head_dim=2 * hd)
    wide_hd = 2 * hd
    one_wide = math.ceil(
        (d * wide_hd + d * 9 * wide_hd + 2 * d * wide_hd + 2 * d * 1536 + 2 * d) * wb + 2 * wide_hd * 16 * 2.0
    )
    assert _pred(plan, o, wide).edge_memory_bytes == fixed + one_wide
    assert ModelDims(n_layer=2, n_head=9, n_head_kv=3, d_model=d, n_ff=1536, n_vocab=49152).head_dim == hd


def test_objective_equals_queue_bank_drift_plus_penalty() -> None:
    o = obs(work_queue_u=3.0, energy_queue_z=0.7)
    w = Weights(v=5.0, w_latency=1.0, w_energy=0.2, w_accuracy=10.0)
    plans = [edge_only(30, 9), cloud_only(30, 9), heads_plan(5, 30, 9), layer_split(12, 30, 9)]
    preds = [_pred(p, o) for p in plans]
    bank = QueueBank(["u", "z"])
    bank.set_backlog([o.work_queue_u, o.energy_queue_z])
    penalty = np.array(
        [w.w_latency * p.latency_s + w.w_energy * p.energy_j + w.w_accuracy * p.accuracy_cost for p in preds]
    )
    arrivals = np.array([[p.latency_s, p.energy_j] for p in preds])
    dpp = bank.drift_plus_penalty(w.v, penalty, arrivals, np.zeros_like(arrivals))
    np.testing.assert_allclose(dpp, [objective(p, o, w) for p in preds], rtol=1e-12)


def test_cost_model_rejects_unknown_codec_and_missing_accuracy() -> None:
    with pytest.raises(InvalidArgumentError):
        CostModel(obs(), EDGE, CLOUD, SMOL, "q2_k")
    with pytest.raises(InvalidArgumentError, match="KL"):
        CostModel(obs(), EDGE, CLOUD, SMOL, "q8_0", codec_kl={"f32": 0.0})
