"""Plans: named plans, JSON round trip, validation messages that name the bad path, KV groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.plan import (
    FfnMode,
    LayerPlan,
    Plan,
    PlanError,
    Side,
    cloud_only,
    edge_only,
    heads_plan,
    layer_split,
    parse_plan,
)
from splitwise_core.errors import SplitwiseError


def test_edge_only() -> None:
    plan = parse_plan("edge-only", 30, 9)
    assert plan == edge_only(30, 9)
    assert plan.is_edge_only()
    assert all(lp.edge_heads == tuple(range(9)) and lp.ffn is FfnMode.EDGE for lp in plan.layers)
    assert plan.lm_head is Side.EDGE
    assert plan.summary() == {
        "name": "edge-only",
        "n_layer": 30,
        "n_head": 9,
        "edge_heads": 270,
        "cloud_heads": 0,
        "ffn": {"edge": 30, "cloud": 0, "split": 0},
        "layers": {"edge": 30, "cloud": 0, "mixed": 0},
        "lm_head": "edge",
    }


def test_cloud_only() -> None:
    plan = parse_plan("cloud-only", 30, 9)
    assert plan == cloud_only(30, 9)
    assert not plan.is_edge_only()
    summary = plan.summary()
    assert (summary["edge_heads"], summary["cloud_heads"], summary["lm_head"]) == (0, 270, "cloud")
    assert summary["layers"] == {"edge": 0, "cloud": 30, "mixed": 0}


@pytest.mark.parametrize("k", [0, 1, 12, 29, 30])
def test_layer_split(k: int) -> None:
    plan = parse_plan(f"layer-split:{k}", 30, 9)
    assert plan == layer_split(k, 30, 9)
    assert plan.name == f"layer-split:{k}"
    assert all(lp.all_on(Side.EDGE, 9) for lp in plan.layers[:k])
    assert all(lp.all_on(Side.CLOUD, 9) for lp in plan.layers[k:])
    assert plan.lm_head is (Side.EDGE if k == 30 else Side.CLOUD)
    assert plan.is_edge_only() == (k == 30)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 8, 9])
def test_heads_plan(n: int) -> None:
    plan = parse_plan(f"heads:{n}", 30, 9)
    assert plan == heads_plan(n, 30, 9)
    assert all(lp.edge_heads == tuple(range(n)) and lp.ffn is FfnMode.EDGE for lp in plan.layers)
    assert plan.lm_head is Side.EDGE
    assert plan.summary()["edge_heads"] == 30 * n
    # The first N heads fill whole KV groups first: at most one group is split.
    edge_groups = set(plan.kv_groups(Side.EDGE, 0, 3))
    cloud_groups = set(plan.kv_groups(Side.CLOUD, 0, 3))
    assert len(edge_groups & cloud_groups) == (0 if n % 3 == 0 else 1)
    assert edge_groups | cloud_groups == {0, 1, 2}


def test_kv_groups() -> None:
    plan = Plan(1, 9, (LayerPlan((0, 1, 2, 4), FfnMode.EDGE),), Side.EDGE)
    assert plan.kv_groups(Side.EDGE, 0, 3) == (0, 1)
    assert plan.kv_groups(Side.CLOUD, 0, 3) == (1, 2)
    assert plan.kv_groups(Side.EDGE, 0, 9) == (0, 1, 2, 4)
    assert plan.kv_groups(Side.CLOUD, 0, 1) == (0,)
    with pytest.raises(PlanError, match="n_head_kv"):
        plan.kv_groups(Side.EDGE, 0, 2)
    with pytest.raises(PlanError, match="layer 1 out of range"):
        plan.kv_groups(Side.EDGE, 1, 3)


@pytest.mark.parametrize(
    "spec", ["layer-split:31", "heads:10", "heads", "layer-split", "edge-only:3", "nope", "heads:-1", ""]
)
def test_bad_named_plans(spec: str) -> None:
    with pytest.raises(PlanError):
        parse_plan(spec, 30, 9)


@st.composite
def any_plan(draw: st.DrawFn) -> Plan:
    n_head = draw(st.integers(1, 64))
    n_layer = draw(st.integers(1, 8))
    layers = tuple(
        LayerPlan(tuple(sorted(draw(st.sets(st.integers(0, n_head - 1))))), draw(st.sampled_from(list(FfnMode))))
        for _ in range(n_layer)
    )
    return Plan(n_layer, n_head, layers, draw(st.sampled_from(list(Side))), name=draw(st.text(max_size=20)))


@given(any_plan())
def test_json_round_trip(plan: Plan) -> None:
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.name == plan.name
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_json_form() -> None:
    plan = heads_plan(3, 2, 9)
    assert json.loads(plan.to_json()) == {
        "version": 1,
        "name": "heads:3",
        "n_layer": 2,
        "n_head": 9,
        "layers": [{"edge_heads": [0, 1, 2], "ffn": "edge"}] * 2,
        "lm_head": "edge",
    }
    # name is optional, and edge heads may come in any order
    doc = {
        "version": 1,
        "n_layer": 1,
        "n_head": 9,
        "layers": [{"edge_heads": [2, 0], "ffn": "split"}],
        "lm_head": "cloud",
    }
    plan = Plan.from_dict(doc)
    assert plan.layers[0] == LayerPlan((0, 2), FfnMode.SPLIT) and plan.name == "custom"


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(heads_plan(3, 4, 9).to_json())
    doc.update(changes)
    return doc


def _bad_layer(index: int, layer: Any) -> dict[str, Any]:
    doc = _doc()
    doc["layers"][index] = layer
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_bad_layer(3, {"edge_heads": [0, 11], "ffn": "edge"}), "layers[3].edge_heads: head 11 out of range 0..8"),
        (_bad_layer(1, {"edge_heads": [0, 0], "ffn": "edge"}), "layers[1].edge_heads: duplicate head 0"),
        (_bad_layer(1, {"edge_heads": [-1], "ffn": "edge"}), "layers[1].edge_heads: head -1 out of range 0..8"),
        (_bad_layer(0, {"edge_heads": [True], "ffn": "edge"}), "layers[0].edge_heads: head True is not an integer"),
        (_bad_layer(0, {"edge_heads": "0,1", "ffn": "edge"}), "layers[0].edge_heads: expected a list"),
        (_bad_layer(2, {"edge_heads": [], "ffn": "gpu"}), "layers[2].ffn: expected one of edge, cloud, split"),
        (_bad_layer(2, {"edge_heads": []}), "layers[2]: missing key(s) ffn"),
        (_bad_layer(2, {"edge_heads": [], "ffn": "edge", "x": 1}), "layers[2]: unknown key(s) x"),
        (_bad_layer(0, [0, 1]), "layers[0]: expected an object"),
        (_doc(layers=[]), "layers: 0 entries, n_layer is 4"),
        (_doc(n_layer=0), "n_layer: expected an integer in 1..65536"),
        (_doc(n_head=65), "n_head: expected an integer in 1..64"),
        (_doc(version=2), "version: unsupported plan version 2"),
        (_doc(lm_head="both"), "lm_head: expected one of edge, cloud"),
        (_doc(extra=1), "plan: unknown key(s) extra"),
        ({"version": 1}, "plan: missing key(s) layers, lm_head, n_head, n_layer"),
        ([], "plan: expected an object"),
    ],
)
def test_validation_messages_name_the_path(doc: Any, message: str) -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_dict(doc)
    assert message in str(info.value)
    assert isinstance(info.value, SplitwiseError) and isinstance(info.value, ValueError)


def test_bad_json_text() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(b"\xff")


def test_constructor_validates() -> None:
    with pytest.raises(PlanError, match=r"layers\[0\].edge_heads: head 9 out of range"):
        Plan(1, 9, (LayerPlan((9,), FfnMode.EDGE),), Side.EDGE)
    with pytest.raises(PlanError, match="sorted"):
        Plan(1, 9, (LayerPlan((2, 1), FfnMode.EDGE),), Side.EDGE)
    with pytest.raises(PlanError, match="layers: 2 entries"):
        Plan(1, 9, (LayerPlan((), FfnMode.EDGE),) * 2, Side.EDGE)


def test_validate_for() -> None:
    plan = edge_only(30, 9)
    assert plan.validate_for(30, 9) is plan
    with pytest.raises(PlanError, match="plan has 30 layers, the model has 22"):
        plan.validate_for(22, 9)
    with pytest.raises(PlanError, match="plan has 9 heads per layer, the model has 32"):
        plan.validate_for(30, 32)


def test_parse_plan_from_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plan = Plan(2, 9, (LayerPlan((0, 4), FfnMode.SPLIT), LayerPlan((), FfnMode.CLOUD)), Side.CLOUD, name="mine")
    path.write_text(plan.to_json())
    loaded = parse_plan(str(path), 2, 9)
    assert loaded == plan and loaded.name == "mine"
    with pytest.raises(PlanError, match=rf"plan file {path}: n_layer: plan has 2 layers, the model has 30"):
        parse_plan(str(path), 30, 9)
    path.write_text("[]")
    with pytest.raises(PlanError, match="plan: expected an object"):
        parse_plan(str(path), 2, 9)
    with pytest.raises(PlanError, match="not a named plan"):
        parse_plan(str(tmp_path / "missing.json"), 2, 9)


def test_parse_plan_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(
        'version = 1\nn_layer = 2\nn_head = 9\nlm_head = "cloud"\n'
        '[[layers]]\nedge_heads = [0, 1, 2]\nffn = "split"\n'
        '[[layers]]\nedge_heads = []\nffn = "cloud"\n'
    )
    plan = parse_plan(str(path), 2, 9)
    assert plan.layers == (LayerPlan((0, 1, 2), FfnMode.SPLIT), LayerPlan((), FfnMode.CLOUD))
    assert plan.lm_head is Side.CLOUD
    path.write_text("version = ")
    with pytest.raises(PlanError, match="not valid TOML"):
        parse_plan(str(path), 2, 9)
