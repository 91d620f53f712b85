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

import bisect
import functools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter, mul
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
from splitwise_core.ops import OP_SIZE, SAMPLING_BLOCK, OpKind, frame_bytes
from splitwise_core.profile import AttentionTable, Profile
from splitwise_core.sampling import SampledToken

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

LOGITS_CODEC = "token"
"""Generation: a worker running the LM head answers with the sampled token, not the logits."""
# The Profile field of each sub-block's per-token seconds.
_BLOCK_COSTS = {
    "norm": "norm_s",
    "add": "add_s",
    "ffn": "ffn_full_s",
    "gate_up": "ffn_gate_up_s",
    "down": "ffn_down_s",
    "embed": "embed_s",
}


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
        per_token: float = getattr(prof, _BLOCK_COSTS[kind])
        return self._rows(prof, step) * per_token

    def layer_s(self, prof: Profile, step: StepCtx) -> float:
        """A whole layer on one side: norm, all heads, add, norm, FFN, add."""
        key = (id(prof), step)
        cached = self._layer_memo.get(key)
        if cached is None:
            attention = self.attention_s(prof, self.dims.n_head, self.dims.n_head_kv, step)
            cached = self._layer_memo[key] = self.whole_layer_s(prof, step, attention)
        return cached

    def whole_layer_s(self, prof: Profile, step: StepCtx, attention_s: float) -> float:
        """layer_s given the attention of all heads (predict's fast path computes that its own way)."""
        return (
            self._block_s(prof, "norm", step) * 2
            + attention_s
            + self._block_s(prof, "add", step) * 2
            + self._block_s(prof, "ffn", step)
        )

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
            # The sampled token; its request's sampling block is counted here too, with the answer
            # it asks for (the planners' tables price a segment's two messages separately).
            return SampledToken.wire_bytes(0) + SAMPLING_BLOCK.size
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
        """Edge bytes of one layer as the engine touches them: the W_q rows of its edge heads, the
        W_k/W_v rows of their KV groups, all of W_o once any head is on the edge (a head's share is
        a column slice, and every row of W_o is shorter than a page), FFN parts, norms, and KV."""
        if all_cloud:
            return 0
        d, hd = self.dims.d_model, self.dims.head_dim
        w_o = d * self.dims.n_head * hd if n_edge_heads else 0
        params = n_edge_heads * d * hd + w_o + n_edge_groups * 2 * d * hd + ffn_params + 2 * d
        kv = n_edge_groups * 2 * hd * self.kv_len * self.edge.kv_bytes_per_value
        return math.ceil(params * self.edge.weight_bytes_per_param + kv)

    def ffn_params(self, mode: str) -> int:
        """Weights of the FFN part a mode keeps on the edge: the split mode keeps W1 (gate and up)."""
        d, f = self.dims.d_model, self.dims.n_ff
        w1 = (2 if self.dims.gated_ffn else 1) * d * f
        return {"edge": w1 + d * f, "split": w1, "cloud": 0}[mode]

    def fixed_memory(self, lm_head: Side) -> int:
        d, v = self.dims.d_model, self.dims.n_vocab
        head = (0 if self.dims.tied_output else v * d) + d  # the output norm, and its own matrix if untied
        params = v * d + (head if lm_head is Side.EDGE else 0)
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
# training run makes millions of decisions; an exploring policy brings a new plan to nearly every
# one. An op's cost depends on it only through its shape (kind; heads and KV groups for attention;
# sources for ADD), a frame's size is linear in its op count, and a step's terms, given the
# profiles, the codec and the StepCtx, are linear in the observation's edge loads (per op kind),
# cloud load, RTT and 1/bandwidth, except one max per parallel section. So predict reduces a plan
# once to counts (_ScheduleShape, per schedule object), turns those into the coefficients of that
# linear form once per profiles, codec and StepCtx (_StepCosts: the counts times the step's prices,
# _StepPrices, which do not depend on the plan), and evaluates the coefficients per observation.
# The counts come from the plan layer by layer, without compiling the schedule: a layer's work
# depends only on its own placement, whether a residual run is open when it starts and whether the
# run can go on after it (_layer_work, memoised), so a fresh plan costs a lookup per layer.
# step_terms is the straightforward walk over the compiled schedule; the tests hold the two equal
# on random plans.

_Section = tuple[int, int, int, int]  # a parallel section: edge heads, their KV groups, cloud heads, theirs
_LayerMemoryShape = tuple[int, int, str, bool]  # edge heads, edge KV groups, FFN mode, all on the cloud

# A plan's counts live in one flat list: edge op units by kind, serial cloud segments by the
# register sent and by the register the reply fills, and the ops of serial segments by kind.
_EDGE_SLOT = {kind: i for i, kind in enumerate(EdgeOpKind)}
_INPUT_SLOT = {reg: len(_EDGE_SLOT) + i for i, reg in enumerate(Reg)}
_OUTPUT_SLOT = {reg: len(_EDGE_SLOT) + len(Reg) + i for i, reg in enumerate(Reg)}
_OP_SLOT = {kind: len(_EDGE_SLOT) + 2 * len(Reg) + i for i, kind in enumerate(OpKind)}
# A layer's share of that list is packed into one int, _SLOT_BITS bits per slot, so that adding up a
# plan's layers is one C-level sum(). A layer adds at most 3 to a slot and a plan has at most 2**16
# layers, so no slot overflows into the next.
_SLOT_BITS = 20
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_ATTN_NAME = EdgeOpKind.ATTN.name  # the key of the ATTN load (an enum's .name is slow to read)


@dataclass(frozen=True)
class _MemoryLayout:
    """What plan_memory needs of a plan: the LM head's side and how many layers of each shape."""

    lm_head: Side
    layers: tuple[tuple[_LayerMemoryShape, int], ...]


@dataclass(frozen=True)
class _ScheduleShape:
    """A schedule as counts, in schedule order (dicts keep first appearance, so the breakdown lists op
    kinds in the order the walk meets them).

    Outside parallel sections an ATTN edge op and an ATTN_PART cloud op always run every head (a
    layer with heads on both sides runs them in a section), and an ADD costs one unit per source
    beyond the first."""

    kinds: tuple[EdgeOpKind, ...]  # edge op kinds, in order of first appearance
    kind_names: tuple[str, ...]  # their names, the breakdown's keys (an enum's .name is slow to read)
    serial_edge_units: dict[EdgeOpKind, int]  # edge ops outside parallel sections
    segment_inputs: dict[Reg, int]  # cloud segments outside parallel sections, by the register sent
    segment_outputs: dict[Reg, int]  # the same segments, by the register the reply fills
    serial_cloud_ops: dict[OpKind, int]  # the ops of those segments
    sections: dict[_Section, int]  # parallel sections: edge ATTN ‖ one ATTN_PART from x_norm
    cloud_round_trips: int
    crossings: int  # codec-compressed tensors crossing the link per step
    memory: _MemoryLayout


@dataclass(frozen=True)
class _LayerWork:
    """One layer's share of a schedule's counts."""

    kinds: dict[EdgeOpKind, None]  # its edge op kinds, in schedule order
    packed_counts: int  # its share of the flat count list, packed (_SLOT_BITS)
    section: _Section | None
    memory: _LayerMemoryShape


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
    # Per distinct parallel section: how many, its edge attention seconds (× the ATTN load) and its
    # remote side's cloud seconds; every section moves the same frame bytes, both ways together.
    sections: tuple[tuple[int, float, float], ...]
    section_wire_bytes: int


@dataclass(frozen=True)
class _StepPrices:
    """What one token step's ops and messages cost under given profiles, codec and dims, whatever
    the plan: profiled seconds (before the observation's load factors) and bytes."""

    edge_unit_s: dict[EdgeOpKind, float]  # an ATTN runs every head; an ADD per source beyond the first
    cloud_op_s: dict[OpKind, float]  # an ATTN_PART runs every head
    # Attention of any head subset: rows_s · (by_head_count[n] + kv_group_s · groups), per side.
    edge_rows_s: float
    edge_attention_by_head_count: list[float]
    edge_kv_group_s: float
    cloud_rows_s: float
    cloud_attention_by_head_count: list[float]
    cloud_kv_group_s: float
    # Per register: the edge's and the cloud's codec seconds and the payload bytes of sending it
    # (request) and of receiving it (reply); logits come back raw.
    request: dict[Reg, tuple[float, float, int]]
    reply: dict[Reg, tuple[float, float, int]]


_V = TypeVar("_V")
_K = TypeVar("_K")


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


# A simulator needs 1 shape per decision, 1 pair of step costs per (decision, profiles) and 1 memory
# size; planners that score candidates need a few dozen. Bounded so a long run with ever-new plans
# stays flat.
_SHAPES: _IdentityLru[_ScheduleShape] = _IdentityLru(maxsize=128)
_STEP_COSTS: _IdentityLru[tuple[_StepCosts, _StepCosts]] = _IdentityLru(maxsize=256)
_MEMORY: _IdentityLru[int] = _IdentityLru(maxsize=256)
# Prices depend on the request's lengths, not on the plan: a scenario's lengths recur, and every
# plan tried on a request shares them.
_STEP_PRICES: _IdentityLru[_StepPrices] = _IdentityLru(maxsize=1024)
# The op kinds whose cost is a sub-block's (CostModel.edge_shape_s, cloud_shape_s), not attention's.
_WITH_ATTENTION = (EdgeOpKind.ATTN, EdgeOpKind.LAYER, OpKind.ATTN_PART, OpKind.LAYER)
_PRICED_BY_BLOCK: tuple[EdgeOpKind, ...] = tuple(kind for kind in EdgeOpKind if kind not in _WITH_ATTENTION)
_PRICED_BY_BLOCK_ON_CLOUD: tuple[OpKind, ...] = tuple(kind for kind in OpKind if kind not in _WITH_ATTENTION)


@functools.lru_cache(maxsize=4096)
def _kv_group_count(heads: tuple[int, ...], per_group: int) -> int:
    """KV groups that `heads` touch; memoised because a few head sets recur across every plan."""
    return len({h // per_group for h in heads})


def _layer_memory_shape(edge_heads: tuple[int, ...], ffn: FfnMode, per_group: int) -> _LayerMemoryShape:
    # Plan.kv_groups and LayerPlan.all_on, without building tuples: this runs once per new layer.
    all_cloud = ffn is FfnMode.CLOUD and not edge_heads
    return len(edge_heads), _kv_group_count(edge_heads, per_group), ffn.value, all_cloud


@functools.lru_cache(maxsize=256)
def _memory_layout(plan: Plan, n_head_kv: int) -> _MemoryLayout:
    plan.kv_groups(Side.EDGE, 0, n_head_kv)  # checks that n_head_kv divides n_head
    per_group = plan.n_head // n_head_kv
    layers = Counter(_layer_memory_shape(lp.edge_heads, lp.ffn, per_group) for lp in plan.layers)
    return _MemoryLayout(plan.lm_head, tuple(layers.items()))


def _layout_memory(layout: _MemoryLayout, model: CostModel) -> int:
    ffn_params = {mode.value: model.ffn_params(mode.value) for mode in FfnMode}
    total = model.fixed_memory(layout.lm_head)
    for (edge_heads, groups, ffn, all_cloud), count in layout.layers:
        total += count * model.layer_memory(edge_heads, groups, ffn_params[ffn], all_cloud)
    return total


def _memory_bytes(layout: _MemoryLayout, model: CostModel) -> int:
    """Memoised: the agent's prediction and the true outcome of a request ask for the same."""
    return _MEMORY.get((layout, model.edge, model.dims), (model.kv_len,), lambda: _layout_memory(layout, model))


def plan_memory(plan: Plan, model: CostModel) -> int:
    """Edge memory of a plan: resident weights (embedding, LM head if on the edge, edge heads with
    their KV-group projections, FFN parts) plus the KV cache of every KV group with an edge head."""
    return _memory_bytes(_memory_layout(plan, model.dims.n_head_kv), model)


def _schedule_shape(schedule: Schedule, model: CostModel) -> _ScheduleShape:
    per_group = model.per_group
    return _SHAPES.get((schedule,), (per_group,), lambda: _make_shape(schedule.plan, per_group))


@functools.lru_cache(maxsize=8192)
def _layer_work(
    edge_heads: tuple[int, ...], ffn: FfnMode, run_open: bool, run_goes_on: bool, n_head: int, per_group: int
) -> _LayerWork:
    """The compiler's rules (policies/segments.py) for one layer, as counts. `run_open`: a residual
    run is open when the layer starts; `run_goes_on`: the next layer is all on the cloud (or, for
    the last layer, the LM head is); it matters only to a layer whose FFN is on the cloud. Keyed by
    the layer's fields rather than its LayerPlan, whose hash and equality run in Python."""
    kinds: list[EdgeOpKind] = []
    packed_counts = 0
    section: _Section | None = None

    def count(slot: int, amount: int = 1) -> None:
        nonlocal packed_counts
        packed_counts += _packed(slot, amount)

    def edge(kind: EdgeOpKind, units: int = 1) -> None:
        kinds.append(kind)
        count(_EDGE_SLOT[kind], units)

    def segment(input: Reg, op: OpKind, output: Reg | None) -> None:
        count(_INPUT_SLOT[input])
        count(_OP_SLOT[op])
        if output is not None:
            count(_OUTPUT_SLOT[output])

    memory = _layer_memory_shape(edge_heads, ffn, per_group)
    n_edge, edge_groups, _, all_cloud = memory
    if all_cloud:
        if run_open:
            count(_OP_SLOT[OpKind.LAYER])
        else:
            segment(Reg.X, OpKind.LAYER, None)  # the run's reply is counted where it ends
    else:
        if run_open:
            count(_OUTPUT_SLOT[Reg.X])  # this layer closes the run
        if n_edge == n_head and ffn is FfnMode.EDGE:
            edge(EdgeOpKind.LAYER)
        else:
            edge(EdgeOpKind.ATTN_NORM)
            if n_edge == n_head:
                edge(EdgeOpKind.ATTN)
                edge(EdgeOpKind.ADD)
            elif n_edge:
                cloud_heads = tuple(h for h in range(n_head) if h not in edge_heads)
                section = (n_edge, edge_groups, len(cloud_heads), _kv_group_count(cloud_heads, per_group))
                kinds.append(EdgeOpKind.ATTN)
                edge(EdgeOpKind.ADD, 2)  # x + both partials
            else:
                segment(Reg.X_NORM, OpKind.ATTN_PART, Reg.ATTN_CLOUD)
                edge(EdgeOpKind.ADD)
            if ffn is FfnMode.EDGE:
                edge(EdgeOpKind.FFN_NORM)
                edge(EdgeOpKind.FFN)
                edge(EdgeOpKind.ADD)
            elif ffn is FfnMode.SPLIT:
                edge(EdgeOpKind.FFN_NORM)
                edge(EdgeOpKind.GATE_UP)
                segment(Reg.FFN_MID, OpKind.FFN_DOWN, Reg.FFN_OUT)
                edge(EdgeOpKind.ADD)
            elif run_goes_on:
                segment(Reg.H, OpKind.RESIDUAL_FFN, None)  # the run's reply is counted where it ends
            else:
                edge(EdgeOpKind.FFN_NORM)
                segment(Reg.H_NORM, OpKind.FFN, Reg.FFN_OUT)
                edge(EdgeOpKind.ADD)
    return _LayerWork(dict.fromkeys(kinds), packed_counts, section, memory)


def _make_shape(plan: Plan, per_group: int) -> _ScheduleShape:
    n_head, layers = plan.n_head, plan.layers
    lm_on_cloud = plan.lm_head is Side.CLOUD
    # Backwards first, where a layer knows whether the next one is all on the cloud; then forwards,
    # where it knows whether a run is open. run_goes_on stays False where it does not matter (the
    # FFN is not on the cloud), so that such layers share memo entries.
    next_all_cloud = lm_on_cloud
    layer_keys = []
    for lp in reversed(layers):
        edge_heads, ffn = lp.edge_heads, lp.ffn
        ffn_on_cloud = ffn is FfnMode.CLOUD
        layer_keys.append((edge_heads, ffn, ffn_on_cloud and next_all_cloud))
        next_all_cloud = ffn_on_cloud and not edge_heads
    works = []
    run_open = False
    for edge_heads, ffn, run_goes_on in reversed(layer_keys):
        works.append(_layer_work(edge_heads, ffn, run_open, run_goes_on, n_head, per_group))
        # A residual run stays open after a layer all on the cloud, or after one whose FFN opens it.
        run_open = run_goes_on or (ffn is FfnMode.CLOUD and not edge_heads)
    packed = sum(map(attrgetter("packed_counts"), works), _packed(_EDGE_SLOT[EdgeOpKind.EMBED]))
    if lm_on_cloud:
        if not run_open:
            packed += _packed(_INPUT_SLOT[Reg.X])
        packed += _packed(_OP_SLOT[OpKind.LM_HEAD]) + _packed(_OUTPUT_SLOT[Reg.LOGITS])
    else:
        if run_open:
            packed += _packed(_OUTPUT_SLOT[Reg.X])
        packed += _packed(_EDGE_SLOT[EdgeOpKind.LM_HEAD])
    serial_edge_units = _unpacked(packed, _EDGE_SLOT)
    segment_inputs = _unpacked(packed, _INPUT_SLOT)
    segment_outputs = _unpacked(packed, _OUTPUT_SLOT)
    sections = Counter(filter(None, map(attrgetter("section"), works)))
    # The layers run every kind with a count but the LM head's, and a section's ATTN (its heads are
    # counted in `sections`).
    n_kinds = len(serial_edge_units) - (EdgeOpKind.LM_HEAD in serial_edge_units)
    n_kinds += bool(sections) and EdgeOpKind.ATTN not in serial_edge_units
    kinds = {EdgeOpKind.EMBED: None}
    for work in works:  # usually every kind has appeared after a few layers
        kinds.update(work.kinds)
        if len(kinds) == n_kinds:
            break
    if not lm_on_cloud:
        kinds[EdgeOpKind.LM_HEAD] = None
    n_sections = sum(sections.values())
    coded_outputs = sum(n for reg, n in segment_outputs.items() if reg is not Reg.LOGITS)
    return _ScheduleShape(
        kinds=tuple(kinds),
        kind_names=tuple(kind.name for kind in kinds),
        serial_edge_units=serial_edge_units,
        segment_inputs=segment_inputs,
        segment_outputs=segment_outputs,
        serial_cloud_ops=_unpacked(packed, _OP_SLOT),
        sections=sections,
        cloud_round_trips=sum(segment_inputs.values()) + n_sections,
        crossings=sum(segment_inputs.values()) + coded_outputs + 2 * n_sections,
        memory=_MemoryLayout(plan.lm_head, tuple(Counter(map(attrgetter("memory"), works)).items())),
    )


def _packed(slot: int, amount: int = 1) -> int:
    return amount << (_SLOT_BITS * slot)


def _unpacked(packed: int, slots: dict[_K, int]) -> dict[_K, int]:
    """The non-zero counts of `slots` in a packed count list."""
    return {key: n for key, slot in slots.items() if (n := (packed >> (_SLOT_BITS * slot)) & _SLOT_MASK)}


def _attention_by_head_count(table: AttentionTable, ctx: float, n_max: int) -> list[float]:
    """`table.cost(n, ctx)` for n = 0..n_max, bit for bit: the same arithmetic, but the context is
    located once for all rows of the table instead of once per row and per call."""
    xs, rows = table.context, table.seconds
    if len(xs) == 1 or ctx <= xs[0]:
        by_heads = [row[0] for row in rows]
    elif ctx <= xs[-1]:
        i = bisect.bisect_left(xs, ctx)
        t = (ctx - xs[i - 1]) / (xs[i] - xs[i - 1])
        by_heads = [row[i - 1] + t * (row[i] - row[i - 1]) for row in rows]
    else:
        dx, beyond = xs[-1] - xs[-2], ctx - xs[-1]
        by_heads = [max(row[-1] + (row[-1] - row[-2]) / dx * beyond, 0.0) for row in rows]
    hs = table.heads
    costs = [0.0]
    for n in range(1, n_max + 1):
        if n >= hs[-1]:
            costs.append(by_heads[-1] * n / hs[-1])
            continue
        j = bisect.bisect_left(hs, n)
        below_heads, below_s = (hs[j - 1], by_heads[j - 1]) if j else (0, 0.0)
        t = (n - below_heads) / (hs[j] - below_heads)
        costs.append(below_s + t * (by_heads[j] - below_s))
    return costs


def _step_prices(model: CostModel, step: StepCtx) -> _StepPrices:
    return _STEP_PRICES.get(
        (model.edge, model.cloud, model.dims), (model.codec, step), lambda: _make_step_prices(model, step)
    )


def _make_step_prices(model: CostModel, step: StepCtx) -> _StepPrices:
    edge, cloud, n_head, n_head_kv = model.edge, model.cloud, model.dims.n_head, model.dims.n_head_kv
    edge_rows_s, cloud_rows_s = model._rows(edge, step), model._rows(cloud, step)
    edge_by_heads = _attention_by_head_count(edge.attention, step.ctx, n_head)
    cloud_by_heads = _attention_by_head_count(cloud.attention, step.ctx, n_head)
    edge_attention_s = edge_rows_s * (edge_by_heads[n_head] + edge.kv_group_s * n_head_kv)
    cloud_attention_s = cloud_rows_s * (cloud_by_heads[n_head] + cloud.kv_group_s * n_head_kv)
    edge_unit_s = {kind: model.edge_shape_s(kind, 0, 0, 2, step) for kind in _PRICED_BY_BLOCK}
    edge_unit_s[EdgeOpKind.ATTN] = edge_attention_s
    edge_unit_s[EdgeOpKind.LAYER] = model.whole_layer_s(edge, step, edge_attention_s)
    cloud_op_s = {kind: model.cloud_shape_s(kind, 0, 0, step) for kind in _PRICED_BY_BLOCK_ON_CLOUD}
    cloud_op_s[OpKind.ATTN_PART] = cloud_attention_s
    cloud_op_s[OpKind.LAYER] = model.whole_layer_s(cloud, step, cloud_attention_s)
    codec_edge, codec_cloud = edge.codecs[model.codec], cloud.codecs[model.codec]
    request, reply = {}, {}
    for reg in Reg:
        payload = model.payload(reg, step)
        request[reg] = (payload * codec_edge.encode_s_per_byte, payload * codec_cloud.decode_s_per_byte, payload)
        coded = 0 if reg is Reg.LOGITS else payload
        reply[reg] = (coded * codec_edge.decode_s_per_byte, coded * codec_cloud.encode_s_per_byte, payload)
    return _StepPrices(
        edge_unit_s=edge_unit_s,
        cloud_op_s=cloud_op_s,
        edge_rows_s=edge_rows_s,
        edge_attention_by_head_count=edge_by_heads,
        edge_kv_group_s=edge.kv_group_s,
        cloud_rows_s=cloud_rows_s,
        cloud_attention_by_head_count=cloud_by_heads,
        cloud_kv_group_s=cloud.kv_group_s,
        request=request,
        reply=reply,
    )


def _step_costs(shape: _ScheduleShape, model: CostModel) -> tuple[_StepCosts, _StepCosts]:
    """The prefill's and the decode step's: always asked together, so one cache entry."""
    return _STEP_COSTS.get(
        (shape, model.edge, model.cloud),
        (model.codec, model.prefill, model.decode),
        lambda: (
            _make_step_costs(shape, _step_prices(model, model.prefill)),
            _make_step_costs(shape, _step_prices(model, model.decode)),
        ),
    )


def _make_step_costs(shape: _ScheduleShape, prices: _StepPrices) -> _StepCosts:
    units, unit_s = shape.serial_edge_units, prices.edge_unit_s
    serial_edge_ops = [units.get(kind, 0) * unit_s[kind] for kind in shape.kinds]
    edge_ops = list(serial_edge_ops)

    # Serial segments: their requests, replies and ops add up separately (every frame has two
    # tensor dimensions and its size grows by OP_SIZE per op).
    edge_codec_s = serial_cloud_s = 0.0
    bytes_up = bytes_down = serial_round_trips = 0
    for reg, count in shape.segment_inputs.items():
        edge_s, cloud_s, payload = prices.request[reg]
        edge_codec_s += count * edge_s
        serial_cloud_s += count * cloud_s
        bytes_up += count * payload
        serial_round_trips += count
    for reg, count in shape.segment_outputs.items():
        edge_s, cloud_s, payload = prices.reply[reg]
        edge_codec_s += count * edge_s
        serial_cloud_s += count * cloud_s
        sampling_block = SAMPLING_BLOCK.size if reg is Reg.LOGITS else 0  # travels up in the request
        bytes_down += count * (payload - sampling_block)
        bytes_up += count * sampling_block
    n_ops = 0
    for op, count in shape.serial_cloud_ops.items():
        serial_cloud_s += count * prices.cloud_op_s[op]
        n_ops += count
    overhead = serial_round_trips * frame_bytes(0, 2, 0) + OP_SIZE * n_ops
    bytes_up += overhead
    bytes_down += overhead
    serial_wire_bytes = bytes_up + bytes_down
    cloud_s = serial_cloud_s

    # Parallel sections all send x_norm with one ATTN_PART and get the cloud heads' partial back:
    # they differ only in how the heads are split.
    sections = []
    section_wire_bytes = 0
    if shape.sections:
        up_edge_s, up_cloud_s, up = prices.request[Reg.X_NORM]
        down_edge_s, down_cloud_s, down = prices.reply[Reg.ATTN_CLOUD]
        frame = frame_bytes(1, 2, 0)
        section_wire_bytes = 2 * frame + up + down
        codec_cloud_s = up_cloud_s + down_cloud_s
        edge_rows_s, edge_by_heads, edge_kv_s = (
            prices.edge_rows_s,
            prices.edge_attention_by_head_count,
            prices.edge_kv_group_s,
        )
        cloud_rows_s, cloud_by_heads, cloud_kv_s = (
            prices.cloud_rows_s,
            prices.cloud_attention_by_head_count,
            prices.cloud_kv_group_s,
        )
        edge_attention = cloud_attention = 0.0
        for (n_edge, edge_groups, n_cloud, cloud_groups), count in shape.sections.items():
            local_s = edge_rows_s * (edge_by_heads[n_edge] + edge_kv_s * edge_groups)
            remote_s = cloud_rows_s * (cloud_by_heads[n_cloud] + cloud_kv_s * cloud_groups) + codec_cloud_s
            edge_attention += count * local_s
            cloud_attention += count * remote_s
            sections.append((count, local_s, remote_s))
        n_sections = shape.cloud_round_trips - serial_round_trips
        edge_ops[shape.kinds.index(EdgeOpKind.ATTN)] += edge_attention
        edge_codec_s += n_sections * (up_edge_s + down_edge_s)
        cloud_s += cloud_attention
        bytes_up += n_sections * (frame + up)
        bytes_down += n_sections * (frame + down)
    return _StepCosts(
        kinds=shape.kind_names,
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
        section_wire_bytes=section_wire_bytes,
    )


def _evaluate(costs: _StepCosts, obs: Observation) -> Terms:
    """The step's terms under `obs` (the link must be up if the step has cloud segments)."""
    loads, default = obs.edge_op_load, obs.edge_load
    factors = [loads.get(kind, default) for kind in costs.kinds]
    # map(mul, …) multiplies and sum adds in C, in the same order as a Python loop would.
    by_kind = dict(zip(costs.kinds, map(mul, costs.edge_ops_s, factors), strict=True))
    latency = costs.edge_codec_s + sum(map(mul, costs.serial_edge_ops_s, factors))
    tx = cloud_compute = 0.0
    if costs.serial_round_trips or costs.sections:
        # Only touched with cloud segments: a cut link's bandwidth is 0 and an edge-only plan never pays it.
        load, rtt, s_per_byte = obs.cloud_load, obs.rtt_s, 8.0 / obs.bandwidth_bps
        latency += load * costs.serial_cloud_s + costs.serial_round_trips * rtt + costs.serial_wire_bytes * s_per_byte
        if costs.sections:
            attention_load = loads.get(_ATTN_NAME, default)
            link_s = rtt + costs.section_wire_bytes * s_per_byte
            latency += sum(
                count * max(local_s * attention_load, load * remote_s + link_s)
                for count, local_s, remote_s in costs.sections
            )
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
    memory = _memory_bytes(shape.memory, m)
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
    prefill_costs, decode_costs = _step_costs(shape, m)
    pre, dec = _evaluate(prefill_costs, m.obs), _evaluate(decode_costs, m.obs)
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
