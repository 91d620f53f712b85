"""Partition plans: which side runs each attention head, each FFN and the LM head.

A plan is fixed for one request (it decides where KV lives). For each layer it holds the set of
query heads that run on the edge (the others run on the cloud) and an FFN mode:

* ``edge`` — the whole FFN on the edge;
* ``cloud`` — the whole FFN on the cloud;
* ``split`` — gate/up projections and SwiGLU on the edge, the down projection on the cloud.

plus where the LM head (final norm + logits) runs. The embedding always runs on the edge.

JSON form (``Plan.to_json`` / ``Plan.from_json``)::

    {"version": 1, "n_layer": 30, "n_head": 9, "name": "heads:3",
     "layers": [{"edge_heads": [0, 1, 2], "ffn": "edge"}, ...], "lm_head": "edge"}

``name`` is optional (informational). Unknown keys are rejected; every error names the path of
the bad value, e.g. ``layers[3].edge_heads: head 11 out of range 0..8``.

Named plans (``parse_plan``):

* ``edge-only`` — everything on the edge;
* ``cloud-only`` — every head, FFN and the LM head on the cloud (only the embedding on the edge);
* ``layer-split:K`` — layers 0..K-1 entirely on the edge, K.. entirely on the cloud; the LM head
  on the cloud unless K == n_layer (then it is edge-only);
* ``heads:N`` — heads 0..N-1 of every layer on the edge, the rest on the cloud, FFN and LM head
  on the edge. With GQA, heads are grouped contiguously (head h reads KV group
  h // (n_head / n_head_kv)), so the first N heads fill whole KV groups before starting a new
  one: at most one group per layer is split (and cached on both sides). The FFN stays on the edge
  because the edge must hold the residual anyway to add the two attention partials; sending the
  FFN to the cloud as well would cost a second round trip per layer.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from splitwise_core.errors import PlanError

__all__ = [
    "PLAN_VERSION",
    "FfnMode",
    "LayerPlan",
    "Plan",
    "PlanError",
    "Side",
    "cloud_only",
    "edge_only",
    "heads_plan",
    "layer_split",
    "parse_plan",
    "random_plan",
]

PLAN_VERSION = 1
_E = TypeVar("_E", bound=StrEnum)
# The frame protocol carries head sets as a u64 bitmask.
MAX_HEADS = 64


class Side(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


class FfnMode(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"
    SPLIT = "split"


@dataclass(frozen=True)
class LayerPlan:
    """One layer: the query heads run on the edge (sorted, unique) and the FFN mode."""

    edge_heads: tuple[int, ...]
    ffn: FfnMode

    def cloud_heads(self, n_head: int) -> tuple[int, ...]:
        edge = set(self.edge_heads)
        return tuple(h for h in range(n_head) if h not in edge)

    def heads(self, side: Side, n_head: int) -> tuple[int, ...]:
        return self.edge_heads if side is Side.EDGE else self.cloud_heads(n_head)

    def all_on(self, side: Side, n_head: int) -> bool:
        """True when every head and the whole FFN of this layer run on `side`."""
        ffn_side = FfnMode.EDGE if side is Side.EDGE else FfnMode.CLOUD
        return self.ffn is ffn_side and len(self.heads(side, n_head)) == n_head


@dataclass(frozen=True)
class Plan:
    n_layer: int
    n_head: int
    layers: tuple[LayerPlan, ...]
    lm_head: Side
    # Informational only: two plans with the same placement are equal whatever their names.
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        _check_count("n_layer", self.n_layer, 1, 1 << 16)
        _check_count("n_head", self.n_head, 1, MAX_HEADS)
        if len(self.layers) != self.n_layer:
            raise PlanError(f"layers: {len(self.layers)} entries, n_layer is {self.n_layer}")
        for i, layer in enumerate(self.layers):
            _check_heads(f"layers[{i}].edge_heads", layer.edge_heads, self.n_head, require_sorted=True)
            if not isinstance(layer.ffn, FfnMode):
                raise PlanError(f"layers[{i}].ffn: expected an FfnMode, got {layer.ffn!r}")
        if not isinstance(self.lm_head, Side):
            raise PlanError(f"lm_head: expected a Side, got {self.lm_head!r}")

    # -- queries ---------------------------------------------------------------------------------

    def validate_for(self, n_layer: int, n_head: int) -> Plan:
        """Raise PlanError unless the plan has the model's layer and head counts; returns self."""
        if self.n_layer != n_layer:
            raise PlanError(f"n_layer: plan has {self.n_layer} layers, the model has {n_layer}")
        if self.n_head != n_head:
            raise PlanError(f"n_head: plan has {self.n_head} heads per layer, the model has {n_head}")
        return self

    def heads(self, side: Side, layer: int) -> tuple[int, ...]:
        return self._layer(layer).heads(side, self.n_head)

    def kv_groups(self, side: Side, layer: int, n_head_kv: int) -> tuple[int, ...]:
        """KV groups whose cache `side` keeps for `layer`: those with at least one head there.

        A group whose heads are split is in both answers (both sides compute and cache it).
        """
        if not isinstance(n_head_kv, int) or n_head_kv < 1 or self.n_head % n_head_kv:
            raise PlanError(f"n_head_kv: {n_head_kv!r} does not divide n_head {self.n_head}")
        per_group = self.n_head // n_head_kv
        return tuple(sorted({h // per_group for h in self.heads(side, layer)}))

    def edge_layers(self) -> tuple[int, ...]:
        """The layers with any work on the edge (a head or a part of the FFN): the layers whose
        weights the device must hold."""
        return tuple(i for i, lp in enumerate(self.layers) if lp.edge_heads or lp.ffn is not FfnMode.CLOUD)

    def is_edge_only(self) -> bool:
        return self.lm_head is Side.EDGE and all(lp.all_on(Side.EDGE, self.n_head) for lp in self.layers)

    def summary(self) -> dict[str, Any]:
        """Counts for replies and logs: heads per side, FFN modes, layer kinds, LM head side."""
        ffn = Counter(lp.ffn.value for lp in self.layers)
        edge_heads = sum(len(lp.edge_heads) for lp in self.layers)
        all_edge = sum(lp.all_on(Side.EDGE, self.n_head) for lp in self.layers)
        all_cloud = sum(lp.all_on(Side.CLOUD, self.n_head) for lp in self.layers)
        return {
            "name": self.name,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "edge_heads": edge_heads,
            "cloud_heads": self.n_layer * self.n_head - edge_heads,
            "ffn": {mode.value: ffn.get(mode.value, 0) for mode in FfnMode},
            "layers": {"edge": all_edge, "cloud": all_cloud, "mixed": self.n_layer - all_edge - all_cloud},
            "lm_head": self.lm_head.value,
        }

    def _layer(self, layer: int) -> LayerPlan:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layer:
            raise PlanError(f"layer {layer!r} out of range 0..{self.n_layer - 1}")
        return self.layers[layer]

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "name": self.name,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layers": [{"edge_heads": list(lp.edge_heads), "ffn": lp.ffn.value} for lp in self.layers],
            "lm_head": self.lm_head.value,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        if not isinstance(obj, Mapping):
            raise PlanError(f"plan: expected an object, got {type(obj).__name__}")
        required = {"version", "n_layer", "n_head", "layers", "lm_head"}
        missing = sorted(required - obj.keys())
        if missing:
            raise PlanError(f"plan: missing key(s) {', '.join(missing)}")
        unknown = sorted(str(k) for k in obj.keys() - required - {"name"})
        if unknown:
            raise PlanError(f"plan: unknown key(s) {', '.join(unknown)}")
        if _strict_int(obj["version"]) != PLAN_VERSION:
            raise PlanError(f"version: unsupported plan version {obj['version']!r} (supported: {PLAN_VERSION})")
        n_layer = _check_count("n_layer", obj["n_layer"], 1, 1 << 16)
        n_head = _check_count("n_head", obj["n_head"], 1, MAX_HEADS)
        name = obj.get("name", "custom")
        if not isinstance(name, str) or len(name) > 256:
            raise PlanError("name: expected a string of at most 256 characters")
        raw_layers = obj["layers"]
        if not isinstance(raw_layers, list):
            raise PlanError(f"layers: expected a list, got {type(raw_layers).__name__}")
        if len(raw_layers) != n_layer:
            raise PlanError(f"layers: {len(raw_layers)} entries, n_layer is {n_layer}")
        layers = tuple(_layer_from_dict(f"layers[{i}]", raw, n_head) for i, raw in enumerate(raw_layers))
        lm_head = _enum_value("lm_head", obj["lm_head"], Side)
        return cls(n_layer=n_layer, n_head=n_head, layers=layers, lm_head=lm_head, name=name)


def _strict_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_count(path: str, value: Any, lo: int, hi: int) -> int:
    v = _strict_int(value)
    if v is None or not lo <= v <= hi:
        raise PlanError(f"{path}: expected an integer in {lo}..{hi}, got {value!r}")
    return v


def _check_heads(path: str, heads: Any, n_head: int, *, require_sorted: bool) -> tuple[int, ...]:
    if not isinstance(heads, list | tuple):
        raise PlanError(f"{path}: expected a list of head indices, got {type(heads).__name__}")
    seen: set[int] = set()
    for h in heads:
        v = _strict_int(h)
        if v is None:
            raise PlanError(f"{path}: head {h!r} is not an integer")
        if not 0 <= v < n_head:
            raise PlanError(f"{path}: head {v} out of range 0..{n_head - 1}")
        if v in seen:
            raise PlanError(f"{path}: duplicate head {v}")
        seen.add(v)
    result = tuple(sorted(seen))
    if require_sorted and tuple(heads) != result:
        raise PlanError(f"{path}: heads must be sorted ascending, got {list(heads)}")
    return result


def _enum_value(path: str, value: Any, enum: type[_E]) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise PlanError(f"{path}: expected one of {allowed}, got {value!r}") from None


def _layer_from_dict(path: str, raw: Any, n_head: int) -> LayerPlan:
    if not isinstance(raw, Mapping):
        raise PlanError(f"{path}: expected an object, got {type(raw).__name__}")
    keys = set(raw.keys())
    if keys != {"edge_heads", "ffn"}:
        missing = sorted({"edge_heads", "ffn"} - keys)
        unknown = sorted(str(k) for k in keys - {"edge_heads", "ffn"})
        problem = f"missing key(s) {', '.join(missing)}" if missing else f"unknown key(s) {', '.join(unknown)}"
        raise PlanError(f"{path}: {problem}")
    heads = _check_heads(f"{path}.edge_heads", raw["edge_heads"], n_head, require_sorted=False)
    return LayerPlan(edge_heads=heads, ffn=_enum_value(f"{path}.ffn", raw["ffn"], FfnMode))


# -- named plans ---------------------------------------------------------------------------------


def _uniform(name: str, n_layer: int, n_head: int, edge_heads: Iterable[int], ffn: FfnMode, lm_head: Side) -> Plan:
    layer = LayerPlan(edge_heads=tuple(edge_heads), ffn=ffn)
    return Plan(n_layer=n_layer, n_head=n_head, layers=(layer,) * n_layer, lm_head=lm_head, name=name)


def edge_only(n_layer: int, n_head: int) -> Plan:
    return _uniform("edge-only", n_layer, n_head, range(n_head), FfnMode.EDGE, Side.EDGE)


def cloud_only(n_layer: int, n_head: int) -> Plan:
    return _uniform("cloud-only", n_layer, n_head, (), FfnMode.CLOUD, Side.CLOUD)


def layer_split(k: int, n_layer: int, n_head: int) -> Plan:
    _check_count("layer-split:K", k, 0, n_layer)
    edge = LayerPlan(edge_heads=tuple(range(n_head)), ffn=FfnMode.EDGE)
    cloud = LayerPlan(edge_heads=(), ffn=FfnMode.CLOUD)
    return Plan(
        n_layer=n_layer,
        n_head=n_head,
        layers=(edge,) * k + (cloud,) * (n_layer - k),
        lm_head=Side.EDGE if k == n_layer else Side.CLOUD,
        name=f"layer-split:{k}",
    )


def heads_plan(n: int, n_layer: int, n_head: int) -> Plan:
    _check_count("heads:N", n, 0, n_head)
    return _uniform(f"heads:{n}", n_layer, n_head, range(n), FfnMode.EDGE, Side.EDGE)


def random_plan(rng: np.random.Generator, n_layer: int, n_head: int, index: int = 0) -> Plan:
    """A plan drawn uniformly per layer from {all heads on the edge, all on the cloud, a random proper
    subset on the edge} × {FFN edge, cloud, split}, LM head on either side: the test and validation
    workload that exercises every segment shape."""
    layers = []
    for _ in range(n_layer):
        kind = rng.integers(4)
        if kind == 0:
            edge: tuple[int, ...] = tuple(range(n_head))
        elif kind == 1:
            edge = ()
        else:
            edge = tuple(sorted(int(h) for h in rng.choice(n_head, size=rng.integers(1, n_head), replace=False)))
        layers.append(LayerPlan(edge_heads=edge, ffn=FfnMode(str(rng.choice(["edge", "cloud", "split"])))))
    return Plan(
        n_layer=n_layer,
        n_head=n_head,
        layers=tuple(layers),
        lm_head=Side(str(rng.choice(["edge", "cloud"]))),
        name=f"random-{index}",
    )


_NAMED = re.compile(r"(?P<name>edge-only|cloud-only|layer-split|heads)(?::(?P<arg>[0-9]{1,6}))?")
NAMED_PLAN_PATTERN = r"^(edge-only|cloud-only|layer-split:[0-9]{1,6}|heads:[0-9]{1,6})$"


def parse_plan(spec: str, n_layer: int, n_head: int) -> Plan:
    """A named plan (see the module docstring) or the path of a plan file, for this model.

    Files hold the JSON form; a ``.toml`` file holds the same keys (``[[layers]]`` tables).
    """
    m = _NAMED.fullmatch(spec.strip())
    if m is not None:
        name, arg = m["name"], m["arg"]
        if name in ("edge-only", "cloud-only"):
            if arg is not None:
                raise PlanError(f"plan {spec!r}: {name} takes no argument")
            return edge_only(n_layer, n_head) if name == "edge-only" else cloud_only(n_layer, n_head)
        if arg is None:
            raise PlanError(f"plan {spec!r}: {name} needs an argument, e.g. {name}:1")
        if name == "layer-split":
            return layer_split(int(arg), n_layer, n_head)
        return heads_plan(int(arg), n_layer, n_head)
    path = Path(spec)
    if not path.is_file():
        raise PlanError(
            f"plan {spec!r}: not a named plan (edge-only, cloud-only, layer-split:K, heads:N) nor a plan JSON file"
        )
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"plan file {spec}: {exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            try:
                doc = tomllib.loads(text.decode("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise PlanError(f"plan is not valid TOML: {exc}") from exc
            return Plan.from_dict(doc).validate_for(n_layer, n_head)
        return Plan.from_json(text).validate_for(n_layer, n_head)
    except PlanError as exc:
        raise PlanError(f"plan file {spec}: {exc}") from exc
