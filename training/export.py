"""Exports a trained :class:`~training.policy.PolicyNet` to the ONNX file the device runs (the contract
of ``policies/learned.py``): the deterministic (argmax) policy, one graph run per decision, the
history window in and out, and the metadata the device checks before trusting the file."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import onnx.compose
import onnxruntime as ort
import torch
from torch import Tensor, nn

from policies.featurizer import N_FEATURES
from policies.learned import INPUT_NAMES, N_MEMORY, NO_BUDGET, OUTPUT_NAMES, PolicyMetadata
from training.policy import PolicyInputs, PolicyNet

__all__ = ["export_onnx"]

OPSET = 17


class _Greedy(nn.Module):
    def __init__(self, net: PolicyNet, budgeted: bool) -> None:
        super().__init__()
        self.net = net
        self.budgeted = budgeted

    def forward(
        self, features: Tensor, history: Tensor, memory: Tensor, min_edge_layers: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x = PolicyInputs(features, history, memory, min_edge_layers)
        a = self.net(x, "greedy").actions if self.budgeted else self.net.greedy_unbudgeted(x)
        history_out = torch.cat([history[:, 1:], features.unsqueeze(1)], dim=1)
        return self.net.cut_layers[a.cut], a.head_cloud, a.ffn_mode, a.lm_head_cloud, history_out


def _trace(net: PolicyNet, budgeted: bool) -> onnx.ModelProto:
    example = (
        torch.zeros(1, N_FEATURES),
        torch.zeros(1, net.history, N_FEATURES),
        torch.zeros(1, N_MEMORY),
        torch.zeros(1, dtype=torch.int64),
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        traced = Path(tmp) / "policy.onnx"
        # The TorchScript exporter (the torch.export one needs onnxscript, which the device does not
        # need and we do not install) warns that it is deprecated, and about LSTM batch sizes: the
        # graph is exported for batch 1, which is how the device runs it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Greedy(net, budgeted),
            example,
            traced,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamo=False,
        )
        # Folded before it becomes an If branch: onnxruntime optimises a main graph more thoroughly
        # than a subgraph (measured: the unbudgeted policy ran ≈ 3× slower as an unfolded branch).
        # Basic level only: its rewrites are portable ONNX, not tuned to this machine's CPU.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(str(traced), options, providers=["CPUExecutionProvider"])
        return onnx.load(Path(tmp) / "folded.onnx")


def _branch(model: onnx.ModelProto, prefix: str) -> onnx.GraphProto:
    """`model`'s graph as an If branch: no inputs of its own (it reads the outer graph's), its
    internal names prefixed so the two branches do not collide, its outputs renamed likewise."""
    keep = set(INPUT_NAMES)
    graph = onnx.compose.add_prefix_graph(
        model.graph, prefix, rename_inputs=False, rename_outputs=True, rename_initializers=True
    )
    if not {i.name for i in graph.input} <= keep:
        raise ValueError(f"traced graph inputs {[i.name for i in graph.input]}, expected {sorted(keep)}")
    del graph.input[:]  # the branch reads the outer graph's inputs, by the same (unprefixed) names
    return graph


def export_onnx(net: PolicyNet, metadata: PolicyMetadata, path: Path) -> None:
    """Writes the greedy policy with `metadata` to `path` (atomically: a reader never sees half a file).

    The file is one graph whose If node runs the unbudgeted policy (``greedy_unbudgeted``: a few nodes
    per layer) unless ``budget_left`` is below NO_BUDGET, and the full masked one otherwise."""
    if metadata.dims != net.dims or metadata.history != net.history:
        raise ValueError("the metadata describes another network (model shape or history length)")
    net.eval()
    full, lean = _trace(net, budgeted=True), _trace(net, budgeted=False)
    then_branch, else_branch = _branch(full, "budget_"), _branch(lean, "free_")
    h = onnx.helper
    threshold = h.make_tensor("no_budget_threshold", onnx.TensorProto.FLOAT, [], [NO_BUDGET / 2])
    nodes = [
        h.make_node("Slice", ["memory", "zero", "one", "one"], ["budget_2d"]),
        h.make_node("ReduceMax", ["budget_2d"], ["budget"], keepdims=0),
        h.make_node("Less", ["budget", "no_budget_threshold"], ["has_budget"]),
        h.make_node("If", ["has_budget"], list(OUTPUT_NAMES), then_branch=then_branch, else_branch=else_branch),
    ]
    inits = [
        threshold,
        h.make_tensor("zero", onnx.TensorProto.INT64, [1], [0]),
        h.make_tensor("one", onnx.TensorProto.INT64, [1], [1]),
    ]
    graph = h.make_graph(nodes, "splitwise_rl", list(full.graph.input), list(full.graph.output), inits)
    model = h.make_model(graph, opset_imports=list(full.opset_import), producer_name="splitwise training")
    model.ir_version = full.ir_version
    for key, value in metadata.to_strings().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
