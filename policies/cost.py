"""Profiles and the one cost model of Splitwise (see ``docs/planners.md``).

- :class:`Profile` — measured per-sub-block costs of one machine for one model shape, its power
  model and codec costs, with a note of what was measured and what was interpolated. JSON via
  :meth:`Profile.load` / :meth:`Profile.save` (pydantic v2, strict, unknown keys rejected).
- :class:`Observation` — what the agent knows at decision time (link, backlog, Lyapunov queues,
  request shape, memory budget).
- :func:`predict` — latency (prefill + per-token decode), device energy, accuracy cost and edge
  memory of a plan, by walking its compiled schedule (:func:`policies.segments.compile_plan`).
- :class:`Weights` / :func:`objective` — the drift-plus-penalty score
  ``V·(w_L·latency + w_E·energy + w_A·accuracy) + U·service_time + Z·energy`` that the planners
  minimise (service time = predicted latency: the edge is busy with this request that long).

The cost of every step is built from the primitives of :class:`CostModel` (edge op, cloud op,
one-way message). The planners' dynamic program uses the same primitives layer by layer, so its
objective equals ``objective(predict(plan))`` up to float rounding.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from policies.plan import FfnMode, Plan, Side
from policies.segments import (
    CloudSegment,
    EdgeOpKind,
    LocalStep,
    ModelDims,
    ParallelSection,
    Reg,
    Schedule,
    compile_plan,
)
from splitwise_core.codecs import codec_size
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.ops import Op, OpKind, frame_bytes
from splitwise_core.profile import Profile

__all__ = [
    "CostModel",
    "Observation",
    "Prediction",
    "StepCtx",
    "Terms",
    "Weights",
    "objective",
    "plan_memory",
    "predict",
    "step_terms",
]

LOGITS_CODEC = "f32"


@dataclass(frozen=True)
class Observation:
    """What the planner knows at decision time.

    `backlog_s`, `arrival_rate` and `backlog_requests` describe the edge queue (the cost model
    does not use them; the Lyapunov work queue `work_queue_u` carries the backlog into the
    objective). `cloud_load` multiplies every cloud compute time (1 = the profiled speed); edge op
    times are multiplied by `edge_op_load[kind]` (keys: `EdgeOpKind` names) or, for kinds it does
    not list, by `edge_load` (the agent measures all of these against the profiles as it serves).
    `memory_budget_bytes` None means unlimited. A link with bandwidth 0 or an infinite RTT is cut.
    """

    bandwidth_bps: float
    rtt_s: float
    prompt_len: int
    max_tokens: int
    backlog_requests: int = 0
    backlog_s: float = 0.0
    arrival_rate: float = 0.0
    cloud_load: float = 1.0
    edge_load: float = 1.0
    edge_op_load: Mapping[str, float] = field(default_factory=dict)
    energy_queue_z: float = 0.0
    work_queue_u: float = 0.0
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("bandwidth_bps", "rtt_s", "backlog_s", "arrival_rate", "cloud_load", "edge_load"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v < 0:
                raise InvalidArgumentError(f"observation.{name}: expected a number ≥ 0, got {v!r}")
        for kind, v in self.edge_op_load.items():
            if kind not in EdgeOpKind.__members__ or not isinstance(v, int | float) or not 0 < v < math.inf:
                raise InvalidArgumentError(f"observation.edge_op_load[{kind!r}]: expected an op kind → number > 0")
        for name in ("energy_queue_z", "work_queue_u"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidArgumentError(f"observation.{name}: expected a finite number ≥ 0, got {v!r}")
        if not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise InvalidArgumentError(f"observation.prompt_len: expected an integer ≥ 1, got {self.prompt_len!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidArgumentError(f"observation.max_tokens: expected an integer ≥ 1, got {self.max_tokens!r}")
        if self.memory_budget_bytes is not None and (
            not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes < 0
        ):
            raise InvalidArgumentError(f"observation.memory_budget_bytes: {self.memory_budget_bytes!r}")

    @property
    def link_up(self) -> bool:
        return self.bandwidth_bps > 0 and math.isfinite(self.rtt_s)

    @property
    def n_decode(self) -> int:
        """Decode steps: the prefill step yields the first token."""
        return self.max_tokens - 1


@dataclass(frozen=True)
class Weights:
    """Drift-plus-penalty weights: V and the penalty weights of latency, energy and accuracy."""

    v: float = 1.0
    w_latency: float = 1.0
    w_energy: float = 0.0
    w_accuracy: float = 0.0

    def __post_init__(self) -> None:
        for name in ("v", "w_latency", "w_energy", "w_accuracy"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidArgumentError(f"weights.{name}: expected a finite number ≥ 0, got {v!r}")


@dataclass(frozen=True)
class StepCtx:
    """One token step: `rows` new tokens at mean context length `ctx`."""

    rows: int
    ctx: float


@dataclass
class Terms:
    """Additive cost terms of (part of) one token step."""

    latency: float = 0.0
    edge_compute: float = 0.0
    # The part of edge_compute spent in model ops (the rest is codec work), by EdgeOpKind name.
    edge_ops_by_kind: dict[str, float] = field(default_factory=dict)
    tx: float = 0.0  # seconds the radio moves bytes (both directions)
    cloud_compute: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    crossings: int = 0  # codec-compressed tensors crossing the link

    def add(self, other: Terms) -> None:
        self.latency += other.latency
        self.edge_compute += other.edge_compute
        for kind, v in other.edge_ops_by_kind.items():
            self.edge_ops_by_kind[kind] = self.edge_ops_by_kind.get(kind, 0.0) + v
        self.tx += other.tx
        self.cloud_compute += other.cloud_compute
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.crossings += other.crossings

    @property
    def edge_ops(self) -> float:
        return sum(self.edge_ops_by_kind.values())


@dataclass(frozen=True)
class Prediction:
    latency_s: float  # prefill_s + n_decode · decode_s_per_token
    prefill_s: float
    decode_s_per_token: float
    energy_j: float
    accuracy_cost: float
    edge_memory_bytes: int
    breakdown: dict[str, float] = field(default_factory=dict)


class CostModel:
    """Cost primitives for one (profiles, dims, codec, observation); shared by predict and the DP."""

    def __init__(
        self,
        observation: Observation,
        edge: Profile,
        cloud: Profile,
        dims: ModelDims,
        codec: str,
        codec_kl: Mapping[str, float] | None = None,
    ) -> None:
        if dims.n_head % dims.n_head_kv:
            raise InvalidArgumentError(f"n_head_kv {dims.n_head_kv} does not divide n_head {dims.n_head}")
        for side, prof in (("edge", edge), ("cloud", cloud)):
            if codec not in prof.codecs:
                raise InvalidArgumentError(f"{side} profile {prof.machine!r} has no cost for codec {codec!r}")
        kl = edge.codec_kl if codec_kl is None else codec_kl
        if codec not in kl:
            raise InvalidArgumentError(f"no accuracy cost (KL per crossing) for codec {codec!r}")
        codec_size(codec, 32)  # rejects unknown codecs
        self.obs = observation
        self.edge = edge
        self.cloud = cloud
        self.dims = dims
        self.codec = codec
        self.kl = float(kl[codec])
        self.link_up = observation.link_up
        self.per_group = dims.n_head // dims.n_head_kv
        p = observation.prompt_len
        self.prefill = StepCtx(rows=p, ctx=(p + 1) / 2)
        self.decode = StepCtx(rows=1, ctx=p + (observation.n_decode + 1) / 2)
        self.kv_len = p + observation.max_tokens
        self._attention_memo: dict[tuple[int, int, int, StepCtx], float] = {}
        self._layer_memo: dict[tuple[int, StepCtx], float] = {}
        self._rows_memo: dict[tuple[int, int], float] = {}

    # -- compute ---------------------------------------------------------------------------------

    def _rows(self, prof: Profile, step: StepCtx) -> float:
        key = (id(prof), step.rows)
        cached = self._rows_memo.get(key)
        if cached is None:
            cached = self._rows_memo[key] = step.rows * prof.prefill.factor(step.rows)
        return cached

    def attention_s(self, prof: Profile, n_heads: int, n_groups: int, step: StepCtx) -> float:
        # Every layer has the same shape: the interpolation is memoised (planners ask it thousands of times).
        key = (id(prof), n_heads, n_groups, step)
        cached = self._attention_memo.get(key)
        if cached is None:
            cached = self._rows(prof, step) * (prof.attention.cost(n_heads, step.ctx) + prof.kv_group_s * n_groups)
            self._attention_memo[key] = cached
        return cached

    def _block_s(self, prof: Profile, kind: str, step: StepCtx) -> float:
        """Per-step cost of a sub-block that is not attention: norm, add, ffn parts, embed."""
        per_token = {
            "norm": prof.norm_s,
            "add": prof.add_s,
            "ffn": prof.ffn_full_s,
            "gate_up": prof.ffn_gate_up_s,
            "down": prof.ffn_down_s,
            "embed": prof.embed_s,
        }[kind]
        return self._rows(prof, step) * per_token

    def layer_s(self, prof: Profile, step: StepCtx) -> float:
        """A whole layer on one side: norm, all heads, add, norm, FFN, add."""
        key = (id(prof), step)
        cached = self._layer_memo.get(key)
        if cached is None:
            cached = (
                self._block_s(prof, "norm", step) * 2
                + self.attention_s(prof, self.dims.n_head, self.dims.n_head_kv, step)
                + self._block_s(prof, "add", step) * 2
                + self._block_s(prof, "ffn", step)
            )
            self._layer_memo[key] = cached
        return cached

    def groups(self, heads: tuple[int, ...]) -> int:
        return len({h // self.per_group for h in heads})

    def edge_op_s(self, kind: EdgeOpKind, heads: tuple[int, ...], n_srcs: int, step: StepCtx) -> float:
        """Edge compute of one op, scaled by the observed edge load."""
        return self._edge_op_profiled_s(kind, heads, n_srcs, step) * self.edge_factor(kind)

    def edge_factor(self, kind: EdgeOpKind) -> float:
        return self.obs.edge_op_load.get(kind.name, self.obs.edge_load)

    def _edge_op_profiled_s(self, kind: EdgeOpKind, heads: tuple[int, ...], n_srcs: int, step: StepCtx) -> float:
        n_heads, n_groups = (len(heads), self.groups(heads)) if kind is EdgeOpKind.ATTN else (0, 0)
        return self.edge_shape_s(kind, n_heads, n_groups, n_srcs, step)

    def edge_shape_s(self, kind: EdgeOpKind, n_heads: int, n_groups: int, n_srcs: int, step: StepCtx) -> float:
        """Profiled edge seconds (no load factor) of an op known by its shape: heads and KV groups
        matter for ATTN only, sources for ADD only."""
        e = self.edge
        if kind is EdgeOpKind.EMBED:
            return self._block_s(e, "embed", step)
        if kind is EdgeOpKind.LAYER:
            return self.layer_s(e, step)
        if kind in (EdgeOpKind.ATTN_NORM, EdgeOpKind.FFN_NORM):
            return self._block_s(e, "norm", step)
        if kind is EdgeOpKind.ATTN:
            return self.attention_s(e, n_heads, n_groups, step)
        if kind is EdgeOpKind.FFN:
            return self._block_s(e, "ffn", step)
        if kind is EdgeOpKind.GATE_UP:
            return self._block_s(e, "gate_up", step)
        if kind is EdgeOpKind.ADD:
            return self._block_s(e, "add", step) * (n_srcs - 1)
        return e.lm_head_s  # LM_HEAD: last row only

    def cloud_op_s(self, kind: OpKind, heads: tuple[int, ...], step: StepCtx) -> float:
        """Cloud compute of one op, already scaled by the observed cloud load."""
        n_heads, n_groups = (len(heads), self.groups(heads)) if kind is OpKind.ATTN_PART else (0, 0)
        return self.cloud_shape_s(kind, n_heads, n_groups, step) * self.obs.cloud_load

    def cloud_shape_s(self, kind: OpKind, n_heads: int, n_groups: int, step: StepCtx) -> float:
        """Profiled cloud seconds (no load factor) of an op known by its shape (heads and KV groups
        matter for ATTN_PART only)."""
        c = self.cloud
        if kind is OpKind.ATTN_PART:
            s = self.attention_s(c, n_heads, n_groups, step)
        elif kind is OpKind.FFN_DOWN:
            s = self._block_s(c, "down", step)
        elif kind is OpKind.FFN:
            s = self._block_s(c, "ffn", step)
        elif kind is OpKind.RESIDUAL_FFN:
            s = self._block_s(c, "norm", step) + self._block_s(c, "ffn", step) + self._block_s(c, "add", step)
        elif kind is OpKind.LAYER:
            s = self.layer_s(c, step)
        else:
            s = c.lm_head_s
        return s

    # -- network ---------------------------------------------------------------------------------

    def payload(self, reg: Reg, step: StepCtx) -> int:
        if reg is Reg.LOGITS:
            return codec_size(LOGITS_CODEC, self.dims.n_vocab)
        return codec_size(self.codec, step.rows * self.dims.cols(reg))

    def wire_s(self, n_bytes: int) -> float:
        bw = self.obs.bandwidth_bps
        return n_bytes * 8.0 / bw if bw > 0 else math.inf

    def message(self, reg: Reg, step: StepCtx, up: bool, frame_bytes: int) -> Terms:
        """One one-way message carrying `reg`: codec work on both ends, RTT/2 and `frame_bytes` on
        the wire. Logits travel as raw f32 (no codec work, no accuracy cost)."""
        payload = self.payload(reg, step)
        src, dst = (self.edge, self.cloud) if up else (self.cloud, self.edge)
        if reg is Reg.LOGITS:
            enc = dec = 0.0
        else:
            enc = payload * src.codecs[self.codec].encode_s_per_byte
            dec = payload * dst.codecs[self.codec].decode_s_per_byte
        load = self.obs.cloud_load
        enc_s, dec_s = (enc, dec * load) if up else (enc * load, dec)
        wire = self.wire_s(frame_bytes)
        return Terms(
            latency=enc_s + self.obs.rtt_s / 2 + wire + dec_s,
            edge_compute=enc_s if up else dec_s,
            tx=wire,
            cloud_compute=dec_s if up else enc_s,
            bytes_up=frame_bytes if up else 0,
            bytes_down=0 if up else frame_bytes,
            crossings=0 if reg is Reg.LOGITS else 1,
        )

    def frame_bytes(self, reg: Reg, step: StepCtx, n_ops: int) -> int:
        return frame_bytes(n_ops, 2, self.payload(reg, step))

    # -- memory ----------------------------------------------------------------------------------

    def layer_memory(self, n_edge_heads: int, n_edge_groups: int, ffn_params: int, all_cloud: bool) -> int:
        """Edge bytes of one layer: weights of its edge heads, KV groups, FFN parts, norms, and KV."""
        if all_cloud:
            return 0
        d = self.dims.d_model
        hd = d // self.dims.n_head
        params = n_edge_heads * 2 * d * hd + n_edge_groups * 2 * d * hd + ffn_params + 2 * d
        kv = n_edge_groups * 2 * hd * self.kv_len * self.edge.kv_bytes_per_value
        return math.ceil(params * self.edge.weight_bytes_per_param + kv)

    def ffn_params(self, mode: str) -> int:
        d, f = self.dims.d_model, self.dims.n_ff
        return {"edge": 3 * d * f, "split": 2 * d * f, "cloud": 0}[mode]

    def fixed_memory(self, lm_head: Side) -> int:
        d, v = self.dims.d_model, self.dims.n_vocab
        params = v * d + (v * d + d if lm_head is Side.EDGE else 0)
        return self.edge.base_memory_bytes + math.ceil(params * self.edge.weight_bytes_per_param)

    # -- totals ----------------------------------------------------------------------------------

    def energy(self, t: Terms) -> float:
        """Device energy of a step: idle power all along, plus the extra of computing and of the radio."""
        p = self.edge.power
        return p.idle_w * t.latency + (p.compute_w - p.idle_w) * t.edge_compute + (p.transmit_w - p.idle_w) * t.tx

    def scalar(self, prefill: Terms, decode: Terms, weights: Weights) -> float:
        """The objective of a plan part from its prefill and decode terms (linear, so additive)."""
        n = self.obs.n_decode
        lat = prefill.latency + n * decode.latency
        en = self.energy(prefill) + n * self.energy(decode)
        acc = self.kl * decode.crossings
        return _objective(lat, en, acc, self.obs, weights)


def _objective(latency: float, energy: float, accuracy: float, obs: Observation, w: Weights) -> float:
    if math.isinf(latency) or math.isinf(energy):
        return math.inf
    return (
        w.v * (w.w_latency * latency + w.w_energy * energy + w.w_accuracy * accuracy)
        + obs.work_queue_u * latency
        + obs.energy_queue_z * energy
    )


def objective(prediction: Prediction, observation: Observation, weights: Weights) -> float:
    """Drift-plus-penalty score of a predicted plan (lower is better); inf when it needs a cut link."""
    return _objective(prediction.latency_s, prediction.energy_j, prediction.accuracy_cost, observation, weights)


def step_terms(schedule: Schedule, model: CostModel, step: StepCtx) -> Terms:
    """Walk one token step of a compiled schedule."""
    total = Terms()
    sizes = {b.segment: b for b in schedule.segment_bytes(model.codec, step.rows, LOGITS_CODEC)}

    def local(ls: LocalStep) -> tuple[float, dict[str, float]]:
        """Edge seconds of a local step, in total and by op kind."""
        by_kind: dict[str, float] = {}
        for op in ls.ops:
            name = op.kind.name
            by_kind[name] = by_kind.get(name, 0.0) + model.edge_op_s(op.kind, op.heads, len(op.srcs), step)
        return sum(by_kind.values()), by_kind

    def remote(seg: CloudSegment) -> tuple[Terms, Terms, float]:
        b = sizes[seg.index]
        up = model.message(seg.input, step, True, b.up)
        down = model.message(seg.output, step, False, b.down)
        work = sum(model.cloud_op_s(op.kind, op.heads, step) for op in seg.ops)
        return up, down, work

    for st in schedule.steps:
        if isinstance(st, LocalStep):
            s, kinds = local(st)
            total.add(Terms(latency=s, edge_compute=s, edge_ops_by_kind=kinds))
            continue
        seg = st if isinstance(st, CloudSegment) else st.remote
        up, down, work = remote(seg)
        part = Terms(cloud_compute=work)
        part.add(up)
        part.add(down)
        if isinstance(st, ParallelSection):
            # The edge encodes and sends, runs its ops, then waits for the reply and decodes it.
            s, kinds = local(st.local)
            enc, dec = up.edge_compute, down.edge_compute
            part.latency = enc + max(s, part.latency - enc - dec + work) + dec
            part.edge_compute += s
            part.add(Terms(edge_ops_by_kind=kinds))
        else:
            part.latency += work
        total.add(part)
    return total


# --- the fast path of predict ---------------------------------------------------------------
#
# The simulator predicts twice per decision (the agent's observation, then the true state) and a
# training run makes millions of decisions, on schedules of hundreds of ops. An op's cost depends
# on it only through its shape (kind; heads and KV groups for attention; sources for ADD), and a
# step's terms, given the profiles, the codec and the StepCtx, are linear in the observation's edge
# loads (per op kind), cloud load, RTT and 1/bandwidth, except one max per parallel section. So
# predict reduces a schedule once to counts of distinct op and segment shapes (_ScheduleShape, per
# schedule object), turns those into the coefficients of that linear form once per profiles, codec
# and StepCtx (_StepCosts), and evaluates the coefficients per observation. step_terms is the
# straightforward walk; the tests hold the two equal on random plans.

_EdgeShape = tuple[EdgeOpKind, int, int, int]  # kind, heads, KV groups (ATTN), sources (ADD)
_CloudShape = tuple[OpKind, int, int]  # kind, heads, KV groups (ATTN_PART)
_SegmentShape = tuple[Reg, Reg, int, tuple[tuple[_CloudShape, int], ...]]  # input, output, n ops, op shape counts
_LayerMemoryShape = tuple[int, int, str, bool]  # edge heads, edge KV groups, FFN mode, all on the cloud


@dataclass(frozen=True)
class _MemoryLayout:
    """What plan_memory needs of a plan: the LM head's side and how many layers of each shape."""

    lm_head: Side
    layers: tuple[tuple[_LayerMemoryShape, int], ...]


@dataclass(frozen=True)
class _ScheduleShape:
    """A schedule as counts of distinct shapes, in schedule order (dicts keep first appearance, so
    the breakdown lists op kinds in the order the walk meets them)."""

    kinds: tuple[EdgeOpKind, ...]  # edge op kinds, in order of first appearance
    serial_ops: dict[_EdgeShape, int]  # edge ops outside parallel sections
    serial_segments: dict[_SegmentShape, int]  # cloud segments outside parallel sections
    sections: dict[tuple[tuple[_EdgeShape, ...], _SegmentShape], int]  # parallel sections
    cloud_round_trips: int
    crossings: int  # codec-compressed tensors crossing the link per step
    memory: _MemoryLayout


@dataclass(frozen=True)
class _StepCosts:
    """One token step of a schedule under given profiles and codec: profiled seconds (before the
    observation's load factors) and bytes, the coefficients of the step's terms."""

    kinds: tuple[str, ...]  # EdgeOpKind names, in order of first appearance
    edge_ops_s: tuple[float, ...]  # per kind of `kinds`: all edge ops
    serial_edge_ops_s: tuple[float, ...]  # per kind of `kinds`: edge ops outside parallel sections
    edge_codec_s: float  # the edge's encoding and decoding (not scaled by edge loads)
    cloud_s: float  # cloud ops and the cloud's codec work (× cloud load)
    serial_cloud_s: float  # the part of cloud_s outside parallel sections
    serial_round_trips: int  # segments outside parallel sections (an RTT each)
    serial_wire_bytes: int  # frame bytes of those segments, both ways
    bytes_up: int
    bytes_down: int
    crossings: int
    # Per distinct parallel section: how many, its edge ops as (index in `kinds`, seconds), its
    # remote side's cloud seconds and frame bytes both ways.
    sections: tuple[tuple[int, tuple[tuple[int, float], ...], float, int], ...]


_V = TypeVar("_V")


class _IdentityLru(Generic[_V]):
    """A bounded LRU map keyed by objects' identities plus hashable extras, for objects whose hash is
    costly (schedules: hundreds of nested dataclasses) or absent (profiles hold dicts). An entry
    holds its key objects, so no other object can take their ids while it lives."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[object, ...], tuple[tuple[object, ...], _V]] = OrderedDict()
        # The device predicts from more than one thread; an eviction between a hit and its move to
        # the end would raise. Values are made outside the lock (two threads may both make one).
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, objects: tuple[object, ...], extra: tuple[object, ...], make: Callable[[], _V]) -> _V:
        key = (*map(id, objects), *extra)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        value = make()
        with self._lock:
            self._entries[key] = (objects, value)
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value


# A simulator needs 1 shape per decision and 2 step costs per (decision, profiles); planners that
# score candidates need a few dozen. Bounded so a long run with ever-new plans stays flat.
_SHAPES: _IdentityLru[_ScheduleShape] = _IdentityLru(maxsize=128)
_STEP_COSTS: _IdentityLru[_StepCosts] = _IdentityLru(maxsize=256)


@functools.lru_cache(maxsize=256)
def _memory_layout(plan: Plan, n_head_kv: int) -> _MemoryLayout:
    plan.kv_groups(Side.EDGE, 0, n_head_kv)  # checks that n_head_kv divides n_head
    per_group = plan.n_head // n_head_kv
    layers: Counter[_LayerMemoryShape] = Counter()
    for lp in plan.layers:
        # Plan.kv_groups and LayerPlan.all_on, without building tuples: this runs once per new plan.
        groups = _kv_group_count(lp.edge_heads, per_group)
        all_cloud = lp.ffn is FfnMode.CLOUD and not lp.edge_heads
        layers[(len(lp.edge_heads), groups, lp.ffn.value, all_cloud)] += 1
    return _MemoryLayout(plan.lm_head, tuple(layers.items()))


def _layout_memory(layout: _MemoryLayout, model: CostModel) -> int:
    total = model.fixed_memory(layout.lm_head)
    for (edge_heads, groups, ffn, all_cloud), count in layout.layers:
        total += count * model.layer_memory(edge_heads, groups, model.ffn_params(ffn), all_cloud)
    return total


def plan_memory(plan: Plan, model: CostModel) -> int:
    """Edge memory of a plan: resident weights (embedding, LM head if on the edge, edge heads with
    their KV-group projections, FFN parts) plus the KV cache of every KV group with an edge head."""
    return _layout_memory(_memory_layout(plan, model.dims.n_head_kv), model)


def _schedule_shape(schedule: Schedule, model: CostModel) -> _ScheduleShape:
    per_group, n_head_kv = model.per_group, model.dims.n_head_kv
    return _SHAPES.get((schedule,), (per_group, n_head_kv), lambda: _make_shape(schedule, per_group, n_head_kv))


@functools.lru_cache(maxsize=4096)
def _kv_group_count(heads: tuple[int, ...], per_group: int) -> int:
    """KV groups that `heads` touch; memoised because a few head sets recur across every plan."""
    return len({h // per_group for h in heads})


def _make_shape(schedule: Schedule, per_group: int, n_head_kv: int) -> _ScheduleShape:
    kinds: dict[EdgeOpKind, None] = {}

    def groups(heads: tuple[int, ...]) -> int:
        return _kv_group_count(heads, per_group)

    def edge_shapes(ls: LocalStep) -> list[_EdgeShape]:
        shapes: list[_EdgeShape] = []
        for op in ls.ops:
            kinds[op.kind] = None
            if op.kind is EdgeOpKind.ATTN:
                shapes.append((op.kind, len(op.heads), groups(op.heads), 0))
            else:
                shapes.append((op.kind, 0, 0, len(op.srcs) if op.kind is EdgeOpKind.ADD else 0))
        return shapes

    def op_shape(op: Op) -> _CloudShape:
        return (op.kind, len(op.heads), groups(op.heads)) if op.kind is OpKind.ATTN_PART else (op.kind, 0, 0)

    def segment_shape(seg: CloudSegment) -> _SegmentShape:
        if len(seg.ops) == 1:  # most segments: skip the Counter
            return seg.input, seg.output, 1, ((op_shape(seg.ops[0]), 1),)
        return seg.input, seg.output, len(seg.ops), tuple(Counter(map(op_shape, seg.ops)).items())

    serial_ops: Counter[_EdgeShape] = Counter()
    serial_segments: Counter[_SegmentShape] = Counter()
    sections: Counter[tuple[tuple[_EdgeShape, ...], _SegmentShape]] = Counter()
    crossings = round_trips = 0
    for st in schedule.steps:
        if isinstance(st, LocalStep):
            serial_ops.update(edge_shapes(st))
            continue
        seg = st if isinstance(st, CloudSegment) else st.remote
        round_trips += 1
        crossings += (seg.input is not Reg.LOGITS) + (seg.output is not Reg.LOGITS)
        if isinstance(st, ParallelSection):
            sections[(tuple(edge_shapes(st.local)), segment_shape(seg))] += 1
        else:
            serial_segments[segment_shape(seg)] += 1
    return _ScheduleShape(
        kinds=tuple(kinds),
        serial_ops=dict(serial_ops),
        serial_segments=dict(serial_segments),
        sections=dict(sections),
        cloud_round_trips=round_trips,
        crossings=crossings,
        memory=_memory_layout(schedule.plan, n_head_kv),
    )


def _step_costs(shape: _ScheduleShape, model: CostModel, step: StepCtx) -> _StepCosts:
    return _STEP_COSTS.get(
        (shape, model.edge, model.cloud), (model.codec, step), lambda: _make_step_costs(shape, model, step)
    )


def _make_step_costs(shape: _ScheduleShape, model: CostModel, step: StepCtx) -> _StepCosts:
    index = {kind: i for i, kind in enumerate(shape.kinds)}
    edge_ops = [0.0] * len(index)
    serial_edge_ops = [0.0] * len(index)
    for (kind, n_heads, n_groups, n_srcs), count in shape.serial_ops.items():
        s = count * model.edge_shape_s(kind, n_heads, n_groups, n_srcs, step)
        edge_ops[index[kind]] += s
        serial_edge_ops[index[kind]] += s
    enc_edge, dec_edge = (
        model.edge.codecs[model.codec].encode_s_per_byte,
        model.edge.codecs[model.codec].decode_s_per_byte,
    )
    enc_cloud, dec_cloud = (
        model.cloud.codecs[model.codec].encode_s_per_byte,
        model.cloud.codecs[model.codec].decode_s_per_byte,
    )

    def segment(seg: _SegmentShape) -> tuple[float, float, int, int]:
        """Edge codec seconds, cloud seconds (ops and codec), frame bytes up and down, as message() counts them."""
        input, output, n_ops, ops = seg
        up, down = model.payload(input, step), model.payload(output, step)
        coded_up, coded_down = (0 if reg is Reg.LOGITS else n for reg, n in ((input, up), (output, down)))
        work = sum(
            count * model.cloud_shape_s(kind, n_heads, n_groups, step) for (kind, n_heads, n_groups), count in ops
        )
        overhead = frame_bytes(n_ops, 2, 0)
        edge_s = coded_up * enc_edge + coded_down * dec_edge
        cloud_s = work + coded_up * dec_cloud + coded_down * enc_cloud
        return edge_s, cloud_s, overhead + up, overhead + down

    edge_codec_s = serial_cloud_s = cloud_s = 0.0
    serial_wire_bytes = bytes_up = bytes_down = serial_round_trips = 0
    for seg, count in shape.serial_segments.items():
        edge_s, seg_cloud_s, up, down = segment(seg)
        edge_codec_s += count * edge_s
        serial_cloud_s += count * seg_cloud_s
        serial_wire_bytes += count * (up + down)
        bytes_up += count * up
        bytes_down += count * down
        serial_round_trips += count
    cloud_s = serial_cloud_s
    sections = []
    for (ops, seg), count in shape.sections.items():
        local: dict[int, float] = {}
        for kind, n_heads, n_groups, n_srcs in ops:
            s = model.edge_shape_s(kind, n_heads, n_groups, n_srcs, step)
            local[index[kind]] = local.get(index[kind], 0.0) + s
            edge_ops[index[kind]] += count * s
        edge_s, seg_cloud_s, up, down = segment(seg)
        edge_codec_s += count * edge_s
        cloud_s += count * seg_cloud_s
        bytes_up += count * up
        bytes_down += count * down
        sections.append((count, tuple(local.items()), seg_cloud_s, up + down))
    return _StepCosts(
        kinds=tuple(kind.name for kind in shape.kinds),
        edge_ops_s=tuple(edge_ops),
        serial_edge_ops_s=tuple(serial_edge_ops),
        edge_codec_s=edge_codec_s,
        cloud_s=cloud_s,
        serial_cloud_s=serial_cloud_s,
        serial_round_trips=serial_round_trips,
        serial_wire_bytes=serial_wire_bytes,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        crossings=shape.crossings,
        sections=tuple(sections),
    )


def _evaluate(costs: _StepCosts, obs: Observation) -> Terms:
    """The step's terms under `obs` (the link must be up if the step has cloud segments)."""
    loads, default = obs.edge_op_load, obs.edge_load
    factors = [loads.get(kind, default) for kind in costs.kinds]
    by_kind = {kind: s * f for kind, s, f in zip(costs.kinds, costs.edge_ops_s, factors, strict=True)}
    latency = costs.edge_codec_s + sum(s * f for s, f in zip(costs.serial_edge_ops_s, factors, strict=True))
    tx = cloud_compute = 0.0
    if costs.serial_round_trips or costs.sections:
        # Only touched with cloud segments: a cut link's bandwidth is 0 and an edge-only plan never pays it.
        load, rtt, s_per_byte = obs.cloud_load, obs.rtt_s, 8.0 / obs.bandwidth_bps
        latency += load * costs.serial_cloud_s + costs.serial_round_trips * rtt + costs.serial_wire_bytes * s_per_byte
        for count, local, cloud_s, wire_bytes in costs.sections:
            local_s = sum(s * factors[i] for i, s in local)
            latency += count * max(local_s, load * cloud_s + rtt + wire_bytes * s_per_byte)
        tx = (costs.bytes_up + costs.bytes_down) * s_per_byte
        cloud_compute = load * costs.cloud_s
    return Terms(
        latency=latency,
        edge_compute=costs.edge_codec_s + sum(by_kind.values()),
        edge_ops_by_kind=by_kind,
        tx=tx,
        cloud_compute=cloud_compute,
        bytes_up=costs.bytes_up,
        bytes_down=costs.bytes_down,
        crossings=costs.crossings,
    )


def predict(
    plan: Plan | Schedule,
    observation: Observation,
    edge_profile: Profile,
    cloud_profile: Profile,
    dims: ModelDims,
    codec: str,
    *,
    codec_kl: Mapping[str, float] | None = None,
    model: CostModel | None = None,
) -> Prediction:
    """Predicted cost of running `plan` for one request under `observation` (see module docstring).

    A plan that needs the cloud while the link is cut predicts infinite latency and energy.
    `codec_kl` overrides the edge profile's accuracy table; `model` reuses a prepared CostModel.
    A plan is compiled (and so validated) here; a schedule compiled for `dims` is used as it is.
    """
    m = model or CostModel(observation, edge_profile, cloud_profile, dims, codec, codec_kl)
    if isinstance(plan, Schedule):
        if plan.dims != dims:
            raise InvalidArgumentError(f"the schedule was compiled for {plan.dims}, not {dims}")
        schedule = plan
    else:
        schedule = compile_plan(plan, dims)
    shape = _schedule_shape(schedule, m)
    memory = _layout_memory(shape.memory, m)
    if shape.cloud_round_trips and not m.link_up:
        return Prediction(
            latency_s=math.inf,
            prefill_s=math.inf,
            decode_s_per_token=math.inf,
            energy_j=math.inf,
            accuracy_cost=m.kl * shape.crossings,
            edge_memory_bytes=memory,
            breakdown={"cloud_round_trips_per_step": float(shape.cloud_round_trips), "link_up": 0.0},
        )
    pre = _evaluate(_step_costs(shape, m, m.prefill), m.obs)
    dec = _evaluate(_step_costs(shape, m, m.decode), m.obs)
    n = observation.n_decode
    latency = pre.latency + n * dec.latency
    energy = m.energy(pre) + n * m.energy(dec)
    return Prediction(
        latency_s=latency,
        prefill_s=pre.latency,
        decode_s_per_token=dec.latency,
        energy_j=energy,
        accuracy_cost=m.kl * dec.crossings,
        edge_memory_bytes=memory,
        breakdown={
            "cloud_round_trips_per_step": float(shape.cloud_round_trips),
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
