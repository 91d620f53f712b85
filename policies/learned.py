"""What a learned policy file is (the ``splitwise-rl`` planner's contract between training and the
device): the ONNX graph's inputs, outputs and metadata, the numbers the graph needs to keep a plan
inside the edge memory budget, and how its outputs become a :class:`~policies.plan.Plan`.

Training (``training/``) writes files that follow it; the device's planner
(:mod:`policies.planners.learned`) reads them. Numpy only: neither torch nor onnxruntime is needed here.

**Inputs** (batch 1):

- ``features`` float32 ``[1, N_FEATURES]`` — :func:`policies.featurizer.features` of this decision's
  observation;
- ``history`` float32 ``[1, K, N_FEATURES]`` — the features of the previous K decisions, oldest first
  (zeros before the first ones); K is the file's ``history`` metadata (0: no history);
- ``memory`` float32 ``[1, N_MEMORY]`` — :func:`memory_inputs`;
- ``min_edge_layers`` int64 ``[1]`` — the privacy prefix.

**Outputs**:

- ``cut`` int64 ``[1]`` — the high-level choice: how many leading layers stay whole on the edge
  (one of :func:`cut_options`; the layers below it are forced to the edge);
- ``head_cloud`` int64 ``[1, L, H]`` — 1 where a query head runs in the cloud;
- ``ffn_mode`` int64 ``[1, L]`` — 0 edge, 1 cloud, 2 split (W1 on the edge, W2 in the cloud);
- ``lm_head_cloud`` int64 ``[1]`` — 1 when the LM head runs in the cloud;
- ``history_out`` float32 ``[1, K, N_FEATURES]`` — the ``history`` to pass next time.

The graph applies its masks itself (link cut → everything on the edge; the privacy prefix; the memory
budget through the upper bounds of :func:`memory_inputs`); the device still checks every plan it gets
(:func:`plan_problems`) and never runs one that breaks a rule.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policies.cost import CostModel
from policies.featurizer import FEATURIZER_VERSION
from policies.plan import FfnMode, LayerPlan, Plan, Side
from policies.segments import ModelDims
from splitwise_core.profile import Profile

__all__ = [
    "FFN_MODES",
    "INPUT_NAMES",
    "MEMORY_FIELDS",
    "NO_BUDGET",
    "N_CUTS",
    "N_MEMORY",
    "OUTPUT_NAMES",
    "POLICY_FORMAT",
    "PolicyMetadata",
    "cut_options",
    "memory_inputs",
    "plan_from_outputs",
    "plan_problems",
    "profile_digest",
]

POLICY_FORMAT = "splitwise-rl/1"
"""The ``format`` metadata of every policy file this code reads and writes."""

INPUT_NAMES = ("features", "history", "memory", "min_edge_layers")
OUTPUT_NAMES = ("cut", "head_cloud", "ffn_mode", "lm_head_cloud", "history_out")

FFN_MODES = (FfnMode.EDGE, FfnMode.CLOUD, FfnMode.SPLIT)
"""``ffn_mode`` value → FFN placement."""

N_CUTS = 5
"""The high-level head's choices: cut at 0, ¼, ½, ¾ of the layers, or keep them all on the edge."""

MEMORY_FIELDS = (
    "budget_left",  # budget − memory of the embedding and the base (the least any plan needs); NO_BUDGET if none
    "lm_head",  # extra edge bytes with the LM head on the edge
    "layer_base",  # a layer with anything on the edge: its norms
    "head",  # one more edge head, upper bound (its projections, its KV group's projections and cache)
    "ffn_edge",  # the whole FFN on the edge
    "ffn_split",  # W1 (gate, up) on the edge
    "whole_layer",  # a whole layer on the edge, exactly
)
N_MEMORY = len(MEMORY_FIELDS)

NO_BUDGET = 1e30
"""``budget_left`` without a memory budget (finite: float32 arithmetic in the graph stays exact enough)."""


def cut_options(n_layer: int) -> tuple[int, ...]:
    """The cut choices of the high-level head, in order: ``round(i·L/4)`` for i = 0..4 (the last is L)."""
    return tuple(math.floor(i * n_layer / (N_CUTS - 1) + 0.5) for i in range(N_CUTS))


def memory_inputs(model: CostModel) -> npt.NDArray[np.float32]:
    """The ``memory`` input for a decision (shape ``(N_MEMORY,)``): the budget left after what every
    plan needs, and the edge bytes of each part of a layer. The per-part figures are upper bounds (each
    rounds up separately; an edge head is charged its own KV group), so a plan that the graph keeps
    within ``budget_left`` fits the budget by :func:`policies.cost.plan_memory`."""
    d = model.dims
    base = model.layer_memory(0, 0, 0, False)
    budget = model.obs.memory_budget_bytes
    fixed = model.fixed_memory(Side.CLOUD)
    values = (
        NO_BUDGET if budget is None else float(budget - fixed),
        float(model.fixed_memory(Side.EDGE) - fixed),
        float(base),
        float(model.layer_memory(1, 1, 0, False) - base + 1),
        float(model.layer_memory(0, 0, model.ffn_params("edge"), False) - base + 1),
        float(model.layer_memory(0, 0, model.ffn_params("split"), False) - base + 1),
        float(model.layer_memory(d.n_head, d.n_head_kv, model.ffn_params("edge"), False)),
    )
    # float32 rounds large byte counts to within 1 part in 2^24: pad the costs so they stay upper bounds.
    out = np.array(values, dtype=np.float64)
    out[1:] = out[1:] * (1 + 2**-20) + 1
    return out.astype(np.float32)


def plan_from_outputs(
    head_cloud: npt.ArrayLike, ffn_mode: npt.ArrayLike, lm_head_cloud: int, dims: ModelDims, name: str
) -> Plan:
    """The plan a policy's outputs stand for (shapes ``[L, H]`` and ``[L]``; raises PlanError or
    ValueError when they do not fit the model)."""
    heads = np.asarray(head_cloud)
    modes = np.asarray(ffn_mode)
    if heads.shape != (dims.n_layer, dims.n_head) or modes.shape != (dims.n_layer,):
        raise ValueError(
            f"policy outputs of shapes {heads.shape} and {modes.shape}; the model needs "
            f"({dims.n_layer}, {dims.n_head}) and ({dims.n_layer},)"
        )
    if not (_within(heads, 1) and _within(modes, 2)) or lm_head_cloud not in (0, 1):
        raise ValueError("policy outputs out of range (head bits 0/1, FFN modes 0/1/2, LM head 0/1)")
    layers = tuple(_layer(tuple(bits), mode) for bits, mode in zip(heads.tolist(), modes.tolist(), strict=True))
    lm = Side.CLOUD if lm_head_cloud else Side.EDGE
    return Plan(dims.n_layer, dims.n_head, layers, lm, name=name).validate_for(dims.n_layer, dims.n_head)


def _within(values: npt.NDArray[Any], high: int) -> bool:
    return values.size == 0 or (int(values.min()) >= 0 and int(values.max()) <= high)


@functools.lru_cache(maxsize=4096)
def _layer(head_cloud: tuple[int, ...], ffn_mode: int) -> LayerPlan:
    # Layers repeat across plans and decisions: building each once keeps a decision under a millisecond.
    return LayerPlan(tuple(h for h, bit in enumerate(head_cloud) if bit == 0), FFN_MODES[ffn_mode])


def plan_problems(plan: Plan, model: CostModel, min_edge_layers: int, edge_memory_bytes: int) -> list[str]:
    """Why the device must not run `plan` (empty when it may): the link is cut and the plan needs the
    cloud, a privacy layer is not whole on the edge, or the plan does not fit the memory budget."""
    problems = []
    if not model.link_up and not plan.is_edge_only():
        problems.append("the link is cut and the plan needs the cloud")
    if any(not lp.all_on(Side.EDGE, plan.n_head) for lp in plan.layers[:min_edge_layers]):
        problems.append(f"a layer below min_edge_layers = {min_edge_layers} is not whole on the edge")
    budget = model.obs.memory_budget_bytes
    if budget is not None and edge_memory_bytes > budget:
        problems.append(f"the plan needs {edge_memory_bytes} B of edge memory; the budget is {budget} B")
    return problems


def profile_digest(profile: Profile) -> str:
    """A short fingerprint of a profile's content (which profiles a policy was trained on)."""
    return hashlib.sha256(profile.model_dump_json().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyMetadata:
    """A policy file's metadata: what it was trained for and on."""

    featurizer_version: int
    dims: ModelDims
    history: int
    edge_machine: str
    edge_profile: str  # profile_digest of the edge profile
    cloud_profile: str
    scenario: str
    seed: int
    steps: int
    drift: bool  # trained with the drift term (False: the penalty-only ablation)

    def to_strings(self) -> dict[str, str]:
        d = self.dims
        return {
            "format": POLICY_FORMAT,
            "featurizer_version": str(self.featurizer_version),
            "n_layer": str(d.n_layer),
            "n_head": str(d.n_head),
            "n_head_kv": str(d.n_head_kv),
            "d_model": str(d.d_model),
            "n_ff": str(d.n_ff),
            "n_vocab": str(d.n_vocab),
            "history": str(self.history),
            "edge_machine": self.edge_machine,
            "edge_profile": self.edge_profile,
            "cloud_profile": self.cloud_profile,
            "scenario": self.scenario,
            "seed": str(self.seed),
            "steps": str(self.steps),
            "drift": "true" if self.drift else "false",
        }

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> PolicyMetadata:
        """Parses a file's metadata map; ValueError naming the first bad or missing key."""
        fmt = meta.get("format")
        if fmt != POLICY_FORMAT:
            raise ValueError(f"metadata format is {fmt!r}, expected {POLICY_FORMAT!r}")

        def integer(key: str, low: int) -> int:
            raw = meta.get(key)
            if raw is None:
                raise ValueError(f"metadata has no {key!r}")
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"metadata {key!r} = {raw!r} is not an integer") from None
            if value < low:
                raise ValueError(f"metadata {key!r} = {value} is below {low}")
            return value

        def text(key: str) -> str:
            raw = meta.get(key)
            if raw is None:
                raise ValueError(f"metadata has no {key!r}")
            return raw

        n_layer, n_head, n_head_kv, d_model, n_ff, n_vocab = (
            integer(k, 1) for k in ("n_layer", "n_head", "n_head_kv", "d_model", "n_ff", "n_vocab")
        )
        dims = ModelDims(n_layer, n_head, n_head_kv, d_model, n_ff, n_vocab)
        drift = text("drift")
        if drift not in ("true", "false"):
            raise ValueError(f"metadata 'drift' = {drift!r} is not true/false")
        return cls(
            featurizer_version=integer("featurizer_version", 1),
            dims=dims,
            history=integer("history", 0),
            edge_machine=text("edge_machine"),
            edge_profile=text("edge_profile"),
            cloud_profile=text("cloud_profile"),
            scenario=text("scenario"),
            seed=integer("seed", 0),
            steps=integer("steps", 0),
            drift=drift == "true",
        )

    def mismatch(self, dims: ModelDims) -> str | None:
        """Why this policy cannot plan for a model of shape `dims` here (None when it can)."""
        if self.featurizer_version != FEATURIZER_VERSION:
            return (
                f"trained on featurizer version {self.featurizer_version}, this device computes version "
                f"{FEATURIZER_VERSION}"
            )
        if self.dims != dims:
            d = self.dims
            return (
                f"trained for a model of {d.n_layer} layers × {d.n_head} heads ({d.n_head_kv} KV groups, "
                f"d_model {d.d_model}); this model has {dims.n_layer} × {dims.n_head} "
                f"({dims.n_head_kv}, {dims.d_model})"
            )
        return None
