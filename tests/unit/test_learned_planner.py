"""The learned planner ``splitwise-rl`` on the device: it plans exactly what a policy file says, keeps
the policy's history between decisions, runs the graph once per decision, and falls back to
``splitwise-dp`` — with the reason in the plan's name, never an exception — on every kind of bad file
or bad plan. The policies are small ONNX graphs built here with ``onnx.helper`` that follow the
contract (:mod:`policies.learned`): constant plans, and a history window that rolls the features in.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from policies.cost import Observation, plan_memory
from policies.featurizer import FEATURIZER_VERSION, N_FEATURES, features
from policies.learned import INPUT_NAMES, OUTPUT_NAMES, PolicyMetadata, profile_digest
from policies.plan import FfnMode, LayerPlan, Plan, Side, edge_only
from policies.planners import learned
from policies.planners.context import Planner, PlanningContext
from policies.planners.dp import SplitwiseDpPlanner
from policies.planners.learned import (
    NO_SHIPPED_POLICY,
    TRAINED_DIR,
    LearnedPlanner,
    policy_file_problems,
    preload_policies,
    shipped_policies,
    shipped_policy,
)
from policies.planners.registry import make_planner
from policies.segments import ModelDims
from splitwise_core.profile import Profile
from splitwise_core.tokenizer import bundled_model_path
from splitwise_device.config import LEARNED_PLANNER, load_device_config
from splitwise_device.controller import NamedPlanner
from splitwise_device.profile_store import ProfileStore
from tests.unit.test_controller import make as make_controller

PROFILE_PATH = Path(__file__).parents[2] / "deploy/profiles/reference-vm.smollm2-135m.profile.json"
PROFILE = Profile.load(PROFILE_PATH)
DIMS = ModelDims(30, 9, 3, 576, 1536, 49152)  # SmolLM2-135M
HISTORY = 2
FAST = Observation(bandwidth_bps=1e9, rtt_s=0.001, prompt_len=64, max_tokens=32)
SLOW = Observation(bandwidth_bps=1e6, rtt_s=0.05, prompt_len=8, max_tokens=16, backlog_requests=3)
CUT_LINK = Observation(bandwidth_bps=0.0, rtt_s=0.001, prompt_len=64, max_tokens=32)


def metadata(dims: ModelDims = DIMS, **changes: Any) -> dict[str, str]:
    meta = PolicyMetadata(
        featurizer_version=FEATURIZER_VERSION,
        dims=dims,
        history=HISTORY,
        edge_machine=PROFILE.machine,
        edge_profile=profile_digest(PROFILE),
        cloud_profile=profile_digest(PROFILE),
        scenario="test",
        seed=0,
        steps=0,
        drift=True,
    ).to_strings()
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = str(value)
    return meta


def _constant(name: str, value: npt.NDArray[Any]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def write_policy(
    path: Path,
    plan: Plan,
    *,
    cut: int = 0,
    meta: Mapping[str, str] | None = None,
    head_cloud: npt.NDArray[np.int64] | None = None,
    input_names: tuple[str, ...] = INPUT_NAMES,
) -> Path:
    """A policy file that answers `plan` (or the raw `head_cloud`) whatever it sees, and whose
    ``history_out`` is ``history`` shifted by one with this decision's features appended."""
    n_layer, n_head = plan.n_layer, plan.n_head
    heads = np.ones((1, n_layer, n_head), dtype=np.int64)
    for ell, lp in enumerate(plan.layers):
        heads[0, ell, list(lp.edge_heads)] = 0
    modes = np.array([[(FfnMode.EDGE, FfnMode.CLOUD, FfnMode.SPLIT).index(lp.ffn) for lp in plan.layers]])
    features_in, history_in, memory_in, privacy_in = input_names
    nodes = [
        _constant("cut", np.array([cut], dtype=np.int64)),
        _constant("head_cloud", heads if head_cloud is None else head_cloud),
        _constant("ffn_mode", modes.astype(np.int64)),
        _constant("lm_head_cloud", np.array([int(plan.lm_head is Side.CLOUD)], dtype=np.int64)),
        _constant("starts", np.array([1], dtype=np.int64)),
        _constant("ends", np.array([HISTORY], dtype=np.int64)),
        _constant("axes", np.array([1], dtype=np.int64)),
        helper.make_node("Slice", [history_in, "starts", "ends", "axes"], ["older"]),
        helper.make_node("Unsqueeze", [features_in, "axes"], ["newest"]),
        helper.make_node("Concat", ["older", "newest"], ["history_out"], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info(features_in, TensorProto.FLOAT, [1, N_FEATURES]),
        helper.make_tensor_value_info(history_in, TensorProto.FLOAT, [1, HISTORY, N_FEATURES]),
        helper.make_tensor_value_info(memory_in, TensorProto.FLOAT, [1, 7]),
        helper.make_tensor_value_info(privacy_in, TensorProto.INT64, [1]),
    ]
    shapes = {node.output[0]: list(node.attribute[0].t.dims) for node in nodes if node.op_type == "Constant"}
    shapes["history_out"] = [1, HISTORY, N_FEATURES]
    outputs = [
        helper.make_tensor_value_info(
            name, TensorProto.FLOAT if name == "history_out" else TensorProto.INT64, shapes[name]
        )
        for name in OUTPUT_NAMES
    ]
    graph = helper.make_graph(nodes, "constant-policy", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime this project supports reads
    helper.set_model_props(model, dict(metadata() if meta is None else meta))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def mixed_plan() -> Plan:
    """8 layers whole on the edge (the policy's cut), then heads 0-2 in the cloud with a split FFN."""
    whole, mixed = LayerPlan(tuple(range(9)), FfnMode.EDGE), LayerPlan((3, 4, 5, 6, 7, 8), FfnMode.SPLIT)
    return Plan(30, 9, (whole,) * 8 + (mixed,) * 22, Side.EDGE)


def cloud_plan() -> Plan:
    return Plan(30, 9, (LayerPlan((), FfnMode.CLOUD),) * 30, Side.CLOUD)


def context(policy: Path | None, min_edge_layers: int = 0) -> PlanningContext:
    return PlanningContext(PROFILE, PROFILE, DIMS, min_edge_layers=min_edge_layers, policy=policy)


def fallback(reason: str) -> str:
    return f"splitwise-dp (splitwise-rl fallback: {reason})"


# ------------------------------------------------------------------ a valid policy


def test_a_valid_policy_plans_exactly_its_outputs_once_per_decision_with_its_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planner = LearnedPlanner(context(write_policy(tmp_path / "p.onnx", mixed_plan(), cut=8)))
    assert planner.problem is None
    policy = planner._policy
    assert policy is not None
    runs: list[dict[str, npt.NDArray[Any]]] = []
    real_run = policy.session.run

    def counting_run(names: list[str], feeds: dict[str, npt.NDArray[Any]]) -> Any:
        runs.append({k: v.copy() for k, v in feeds.items()})
        return real_run(names, feeds)

    monkeypatch.setattr(policy.session, "run", counting_run)
    first = planner.plan(FAST)
    assert first == mixed_plan() and first.name == "splitwise-rl"
    assert len(runs) == 1
    np.testing.assert_array_equal(runs[0]["history"], np.zeros((1, HISTORY, N_FEATURES), np.float32))
    np.testing.assert_array_equal(runs[0]["min_edge_layers"], np.array([0], np.int64))
    second = planner.plan(SLOW)
    assert second == mixed_plan() and len(runs) == 2
    # The second decision got the first one's history_out: [0, features(FAST)].
    np.testing.assert_array_equal(runs[1]["history"][0], np.stack([np.zeros(N_FEATURES), features(FAST)]))
    np.testing.assert_array_equal(planner.history[0], np.stack([features(FAST), features(SLOW)]))
    assert planner.problem is None


def test_the_controller_builds_the_learned_planner_once_per_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_policy(tmp_path / "p.onnx", mixed_plan(), cut=8)
    built: list[str] = []

    def counting_make(name: str, ctx: PlanningContext) -> Planner:
        built.append(name)
        return make_planner(name, ctx)

    monkeypatch.setattr("splitwise_device.controller.make_planner", counting_make)
    controller, _, _ = make_controller(PROFILE, policy=path)
    decisions = [controller.decide(NamedPlanner("splitwise-rl"), 16, 8, 0) for _ in range(3)]
    assert [d.plan.name for d in decisions] == ["splitwise-rl"] * 3
    assert all(d.plan == mixed_plan() and d.planner_s > 0 for d in decisions)
    assert built == ["splitwise-rl"]
    # New profiles make a new context, and so a new planner (its history starts again).
    controller.profiles = ProfileStore(Profile.load(PROFILE_PATH), cloud={"w1": PROFILE})
    controller.decide(NamedPlanner("splitwise-rl"), 16, 8, 0)
    assert built == ["splitwise-rl", "splitwise-rl"]


# ------------------------------------------------------------------ fallbacks


def _bad_file(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A policy file broken in the way `case` says, and the reason the planner must give."""
    path = tmp_path / f"{case}.onnx"
    if case == "missing":
        return path, f"{path} does not exist"
    if case == "garbage":
        path.write_bytes(b"\x00not an onnx model\xff" * 10)
        return path, f"{path} is not a readable ONNX model: "
    if case == "featurizer":
        write_policy(path, mixed_plan(), cut=8, meta=metadata(featurizer_version=FEATURIZER_VERSION + 1))
        return path, (
            f"trained on featurizer version {FEATURIZER_VERSION + 1}, this device computes version {FEATURIZER_VERSION}"
        )
    if case == "model-shape":
        write_policy(path, mixed_plan(), cut=8, meta=metadata(ModelDims(24, 9, 3, 576, 1536, 49152)))
        return (
            path,
            "trained for a model of 24 layers × 9 heads (3 KV groups, d_model 576); this model has 30 × 9 (3, 576)",
        )
    if case == "missing-key":
        write_policy(path, mixed_plan(), cut=8, meta=metadata(edge_machine=None))
        return path, "metadata has no 'edge_machine'"
    if case == "input-names":
        names = ("features", "history", "budget", "min_edge_layers")
        write_policy(path, mixed_plan(), cut=8, input_names=names)
        return path, f"graph inputs are {list(names)}, expected {list(INPUT_NAMES)}"
    if case == "output-shape":
        write_policy(path, mixed_plan(), cut=8, head_cloud=np.zeros((1, 30, 8), dtype=np.int64))
        return path, "output 'head_cloud' is int64 (1, 30, 8), expected shape (1, 30, 9)"
    if case == "output-range":
        write_policy(path, mixed_plan(), cut=8, head_cloud=np.full((1, 30, 9), 2, dtype=np.int64))
        return path, "policy outputs out of range (head bits 0/1, FFN modes 0/1/2, LM head 0/1)"
    if case == "cut":
        write_policy(path, mixed_plan(), cut=7)
        return path, "output 'cut' = 7 is not one of [0, 8, 15, 23, 30]"
    if case == "below-cut":
        write_policy(path, mixed_plan(), cut=15)
        return path, "the plan does not keep the 15 layers below its cut on the edge"
    if case == "run-error":
        # The metadata promises 3 past decisions, the graph takes 2: onnxruntime refuses the input.
        write_policy(path, mixed_plan(), cut=8, meta=metadata(history=3))
        return path, "the policy failed to run: "
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "featurizer",
        "model-shape",
        "missing-key",
        "input-names",
        "output-shape",
        "output-range",
        "cut",
        "below-cut",
        "run-error",
    ],
)
def test_a_bad_policy_file_falls_back_to_splitwise_dp_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    path, reason = _bad_file(tmp_path, case)
    ctx = context(path)
    planner = LearnedPlanner(ctx)
    with caplog.at_level(logging.WARNING, logger=learned.__name__):
        plans = [planner.plan(FAST), planner.plan(FAST)]
    assert plans == [SplitwiseDpPlanner(ctx).plan(FAST)] * 2
    assert all(p.name.startswith(fallback(reason).removesuffix(")")) and p.name.endswith(")") for p in plans)
    if not reason.endswith(": "):  # the messages of onnxruntime's own errors vary between versions
        assert plans[0].name == fallback(reason)
        assert planner.problem == reason
    assert planner.problem is not None and planner.problem.startswith(reason)
    # Once per distinct reason.
    assert [r.getMessage() for r in caplog.records] == [f"splitwise-rl falls back to splitwise-dp: {planner.problem}"]


@pytest.mark.parametrize(
    ("plan", "min_edge_layers", "observation", "reason"),
    [
        (cloud_plan(), 4, FAST, "a layer below min_edge_layers = 4 is not whole on the edge"),
        (cloud_plan(), 0, CUT_LINK, "the link is cut and the plan needs the cloud"),
    ],
    ids=["privacy", "link-cut"],
)
def test_a_plan_that_breaks_a_rule_falls_back(
    tmp_path: Path, plan: Plan, min_edge_layers: int, observation: Observation, reason: str
) -> None:
    ctx = context(write_policy(tmp_path / "p.onnx", plan), min_edge_layers)
    got = LearnedPlanner(ctx).plan(observation)
    assert got == SplitwiseDpPlanner(ctx).plan(observation)
    assert got.name == fallback(reason)
    assert got.layers[0].all_on(Side.EDGE, 9)


def test_a_plan_over_the_memory_budget_falls_back(tmp_path: Path) -> None:
    ctx = context(write_policy(tmp_path / "p.onnx", edge_only(30, 9)))
    needs = plan_memory(edge_only(30, 9), ctx.cost_model(FAST))
    budget = needs - 1
    tight = Observation(bandwidth_bps=1e9, rtt_s=0.001, prompt_len=64, max_tokens=32, memory_budget_bytes=budget)
    got = LearnedPlanner(ctx).plan(tight)
    assert got == SplitwiseDpPlanner(ctx).plan(tight)
    assert got.name == fallback(f"the plan needs {needs} B of edge memory; the budget is {budget} B")
    assert plan_memory(got, ctx.cost_model(tight)) <= budget


def test_the_policy_plans_again_after_a_rejected_plan(tmp_path: Path) -> None:
    planner = LearnedPlanner(context(write_policy(tmp_path / "p.onnx", cloud_plan())))
    assert planner.plan(CUT_LINK).name == fallback("the link is cut and the plan needs the cloud")
    assert planner.problem == "the link is cut and the plan needs the cloud"
    assert planner.plan(FAST) == cloud_plan() and planner.problem is None


def test_a_long_reason_is_cut_to_fit_a_plan_name(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 200) / ("y" * 200) / "policy.onnx"
    name = LearnedPlanner(context(path)).plan(FAST).name
    assert len(name) == 256 and name.startswith(fallback(str(tmp_path))[:-1]) and name.endswith("…)")
    # A name the OS refuses (longer than 255 bytes) is a reason too, not an exception.
    too_long = tmp_path / ("x" * 300)
    assert LearnedPlanner(context(too_long)).problem == f"cannot read {too_long}: File name too long"


# ------------------------------------------------------------------ the shipped policy


def test_the_default_policy_is_the_shipped_one_for_this_model_and_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learned, "TRAINED_DIR", tmp_path)
    assert shipped_policy(DIMS, PROFILE) is None
    planner = LearnedPlanner(context(None))
    assert planner.problem == NO_SHIPPED_POLICY
    assert planner.plan(FAST).name == fallback(NO_SHIPPED_POLICY)

    write_policy(tmp_path / "a-other.smollm2-135m.onnx", cloud_plan(), meta=metadata(edge_machine="other machine"))
    (tmp_path / "b-broken.smollm2-135m.onnx").write_bytes(b"broken")
    write_policy(tmp_path / "c-other-model.onnx", cloud_plan(), meta=metadata(ModelDims(24, 9, 3, 576, 1536, 49152)))
    mine = write_policy(tmp_path / "d-reference-vm.smollm2-135m.onnx", mixed_plan(), cut=8)
    write_policy(tmp_path / "e-reference-vm.smollm2-135m.onnx", cloud_plan())
    assert shipped_policy(DIMS, PROFILE) == mine
    planner = LearnedPlanner(context(None))
    assert planner.path == mine and planner.plan(FAST) == mixed_plan()


# ------------------------------------------------------------------ check-config


def test_policy_file_problems(tmp_path: Path) -> None:
    good = write_policy(tmp_path / "good.onnx", mixed_plan(), cut=8)
    assert policy_file_problems(good, DIMS) == []
    for case in ("missing", "featurizer", "model-shape", "missing-key", "input-names"):
        path, reason = _bad_file(tmp_path, case)
        assert policy_file_problems(path, DIMS) == [reason], case
    garbage, reason = _bad_file(tmp_path, "garbage")
    [problem] = policy_file_problems(garbage, DIMS)
    assert problem.startswith(reason)


def device_toml(tmp_path: Path, model: Path, planning: str, planner: str = "splitwise-rl") -> Path:
    path = tmp_path / "device.toml"
    text = f"""\
        [device]
        id = "dev1"
        model = "{model}"
        [agent]
        planner = "{planner}"
        [planning]
        profile = "{PROFILE_PATH}"
        {planning}
        """
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_check_files_reports_a_bad_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = bundled_model_path()
    assert LearnedPlanner.name == LEARNED_PLANNER
    _, reason = _bad_file(tmp_path, "garbage")
    [problem] = load_device_config(device_toml(tmp_path, model, 'policy = "garbage.onnx"')).check_files()
    assert problem.startswith(f"planning.policy: {reason}")
    _, reason = _bad_file(tmp_path, "model-shape")
    config = load_device_config(device_toml(tmp_path, model, 'policy = "model-shape.onnx"', planner="splitwise-dp"))
    assert config.check_files() == [f"planning.policy: {reason}"]
    write_policy(tmp_path / "good.onnx", mixed_plan(), cut=8)
    assert load_device_config(device_toml(tmp_path, model, 'policy = "good.onnx"')).check_files() == []
    # No key: the shipped policy for this machine, and there is none here.
    monkeypatch.setattr(learned, "TRAINED_DIR", tmp_path / "trained")
    assert load_device_config(device_toml(tmp_path, model, "")).check_files() == [
        f"planning.policy: {NO_SHIPPED_POLICY}"
    ]
    assert load_device_config(device_toml(tmp_path, model, "", planner="splitwise-dp")).check_files() == []
    # Without a model the policy's shape cannot be checked; the other keys still are.
    absent = tmp_path / "absent.gguf"
    config = load_device_config(device_toml(tmp_path, absent, 'policy = "nowhere.onnx"'))
    assert config.check_files() == [
        f"device.model: {absent} does not exist",
        f"planning.policy: {tmp_path / 'nowhere.onnx'} does not exist",
    ]


def test_check_config_command_reports_a_bad_policy(tmp_path: Path) -> None:
    _, reason = _bad_file(tmp_path, "garbage")
    path = device_toml(tmp_path, bundled_model_path(), 'policy = "garbage.onnx"')
    exe = shutil.which("splitwise-device")
    assert exe is not None
    result = subprocess.run([exe, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: planning.policy: {reason}")

    write_policy(tmp_path / "good.onnx", mixed_plan(), cut=8)
    path = device_toml(tmp_path, bundled_model_path(), 'policy = "good.onnx"')
    result = subprocess.run([exe, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"policy={tmp_path / 'good.onnx'}" in result.stdout and "planner=splitwise-rl" in result.stdout


def test_the_shipped_policy_plans_on_the_device_path_by_default() -> None:
    """No [planning] policy: the controller's splitwise-rl uses the policy shipped for the reference VM
    and SmolLM2 (policies/trained/), and its plans are its own, not a fallback."""
    profile = Profile.load(PROFILE_PATH)
    shipped = shipped_policy(DIMS, profile)
    assert shipped is not None and shipped.parent == TRAINED_DIR
    controller, _, _ = make_controller(profile)
    for prompt_len, max_tokens in ((16, 8), (200, 64)):
        decision = controller.decide(NamedPlanner("splitwise-rl"), prompt_len, max_tokens, 0)
        assert decision.plan.name == "splitwise-rl", decision.plan.name
        assert decision.planner == "splitwise-rl" and decision.planner_s > 0
        assert decision.observation is not None
        direct = LearnedPlanner(PlanningContext(profile, profile, DIMS, policy=shipped))
        assert direct.plan(decision.observation) == decision.plan


def test_planners_share_one_session_per_version_of_a_policy_file(tmp_path: Path) -> None:
    """Opening a session takes most of a second; a new planning context (a worker published a new
    profile) must not pay it again, but a rewritten file must be read again."""
    path = write_policy(tmp_path / "p.onnx", mixed_plan(), cut=8)
    first = LearnedPlanner(PlanningContext(PROFILE, PROFILE, DIMS, policy=path))
    second = LearnedPlanner(PlanningContext(PROFILE, PROFILE, DIMS, min_edge_layers=2, policy=path))
    assert first._policy is not None and second._policy is not None
    assert first._policy.session is second._policy.session
    write_policy(path, edge_only(DIMS.n_layer, DIMS.n_head), cut=30)
    third = LearnedPlanner(PlanningContext(PROFILE, PROFILE, DIMS, policy=path))
    assert third._policy is not None and third._policy.session is not first._policy.session
    assert third.plan(FAST) == edge_only(DIMS.n_layer, DIMS.n_head)


def test_preloading_opens_the_policy_once_so_the_first_request_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent preloads at start when its planner is splitwise-rl: afterwards, building the planner
    (at the first request) opens no session; a bad file is only logged there, and falls back later."""
    opened: list[Path] = []
    real_open = learned._open_session
    monkeypatch.setattr(learned, "_open_session", lambda path: opened.append(path) or real_open(path))
    monkeypatch.setattr(learned, "_SESSIONS", learned.OrderedDict())
    path = write_policy(tmp_path / "p.onnx", mixed_plan(), cut=8)
    preload_policies(DIMS, path)
    assert opened == [path]
    LearnedPlanner(PlanningContext(PROFILE, PROFILE, DIMS, policy=path))
    assert opened == [path]

    preload_policies(DIMS, None)  # the shipped policies for this shape, each opened once
    shipped = [p for p, _ in shipped_policies(DIMS)]
    assert shipped and opened == [path, *shipped]
    LearnedPlanner(PlanningContext(PROFILE, PROFILE, DIMS))
    assert opened == [path, *shipped]

    with caplog.at_level(logging.WARNING, logger=learned.__name__):
        preload_policies(DIMS, tmp_path / "missing.onnx")
    assert [r.getMessage() for r in caplog.records] == [
        f"splitwise-rl will fall back to splitwise-dp: {tmp_path / 'missing.onnx'} does not exist"
    ]
