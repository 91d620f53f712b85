"""Compile a partition plan into the per-token-step schedule the executor runs.

One token step (a prefill of T tokens or a decode of one) runs the same schedule: an ordered list
of steps, each a :class:`LocalStep` (edge work), a :class:`CloudSegment` (one MQTT
request/response) or a :class:`ParallelSection` (edge work and one cloud segment at the same time).

Data flow is through named registers (:class:`Reg`): ``x`` (residual), ``x_norm``, ``attn_edge``,
``attn_cloud`` (attention partials), ``h`` (residual after attention), ``h_norm``, ``ffn_mid``
(SwiGLU intermediate, T×n_ff), ``ffn_out``, ``logits``. Every op names the registers it reads and
the one it writes, so an interpreter needs no knowledge of the rules below.

Rules:

1. The residual x lives on one side. The edge is the MQTT client and the cloud only answers, so
   whenever a layer has work on both sides, x is on the edge; a cloud segment that holds x ends
   by returning it (or the logits).
2. A cloud segment is one request/response: one input tensor, an op list run in order on the
   cloud, one output tensor. Valid op lists (:func:`check_cloud_ops`):

   * ``[ATTN_PART(l, heads)]`` — x_norm → the cloud heads' partial (T×d);
   * ``[FFN_DOWN(l)]`` — SwiGLU intermediate (T×n_ff) → down projection (T×d) (FFN mode split);
   * ``[FFN(l)]`` — h_norm → FFN output (T×d) (FFN on the cloud, x stays on the edge);
   * a residual run ``[RESIDUAL_FFN(l)?, LAYER(l+1), LAYER(l+2), ..., LM_HEAD?]`` on consecutive
     layers, non-empty: input h when it starts with RESIDUAL_FFN (x_c = h + ffn(ffn_norm(h))),
     else x; output x, or the last token's logits (1×vocab) when it ends with LM_HEAD.
3. Per layer, by attention placement (all edge / mixed / all cloud) and FFN mode:

   * all heads and the FFN on the edge: one fused ``LAYER`` edge op;
   * all heads and the FFN on the cloud: ``LAYER(l)`` in a residual run;
   * mixed attention: the edge normalises x, then a parallel section runs the edge heads locally
     and ``ATTN_PART`` with the cloud heads remotely; the edge adds both partials to x;
   * all heads on the cloud but the FFN not: ``ATTN_PART`` with every head, sequentially;
   * FFN split: the edge runs ffn_norm and gate/up, ``FFN_DOWN`` returns the down projection;
   * FFN on the cloud: ``RESIDUAL_FFN(l)`` opening a residual run when the run can go on (the next
     layer is all cloud, or this is the last layer and the LM head is on the cloud), else
     ``FFN(l)`` (both cost one round trip and the same bytes; the run merges later cloud work).
4. The LM head on the cloud joins the residual run that ends at the last layer, else it is a
   run of its own ``[LM_HEAD]`` with input x. The LM head computes the last token's logits only.
5. Round trips are minimal for the op grammar: every cloud sub-block needs a request, and only
   consecutive RESIDUAL_FFN/LAYER/LM_HEAD work can share one; the compiler merges all of those.

Segments are numbered 0.. in schedule order (the frame's segment id within a step).

`run_schedule` is the reference interpreter: it runs a schedule with two callbacks (one per side)
and is what the tests check against a naive layer-by-layer evaluation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from policies.plan import FfnMode, Plan, PlanError, Side
from splitwise_core.codecs import codec_size
from splitwise_core.engine import Model
from splitwise_core.ops import SAMPLING_BLOCK, Op, OpKind, frame_bytes, segment_problem
from splitwise_core.sampling import SampledToken

__all__ = [
    "CloudSegment",
    "EdgeOp",
    "EdgeOpKind",
    "LocalStep",
    "ModelDims",
    "ParallelSection",
    "Reg",
    "Schedule",
    "SegmentBytes",
    "Step",
    "check_cloud_ops",
    "compile_plan",
    "run_schedule",
]


class Reg(StrEnum):
    X = "x"
    X_NORM = "x_norm"
    ATTN_EDGE = "attn_edge"
    ATTN_CLOUD = "attn_cloud"
    H = "h"
    H_NORM = "h_norm"
    FFN_MID = "ffn_mid"
    FFN_OUT = "ffn_out"
    LOGITS = "logits"


class EdgeOpKind(StrEnum):
    EMBED = "embed"  # x ← embed(tokens)
    LAYER = "layer"  # x ← layer_fused(layer, x)
    ATTN_NORM = "attn_norm"  # x_norm ← attn_norm(layer, x)
    ATTN = "attn"  # attn_edge ← attention(layer, heads, x_norm)
    FFN_NORM = "ffn_norm"  # h_norm ← ffn_norm(layer, h)
    FFN = "ffn"  # ffn_out ← ffn(layer, "full", h_norm)
    GATE_UP = "gate_up"  # ffn_mid ← ffn(layer, "gate_up", h_norm)
    ADD = "add"  # dst ← sum(srcs)
    LM_HEAD = "lm_head"  # logits ← output_logits(x[-1:])


@dataclass(frozen=True)
class EdgeOp:
    kind: EdgeOpKind
    dst: Reg
    srcs: tuple[Reg, ...] = ()
    layer: int = -1  # -1 for EMBED, ADD, LM_HEAD
    heads: tuple[int, ...] = ()  # ATTN only


@dataclass(frozen=True)
class LocalStep:
    ops: tuple[EdgeOp, ...]


@dataclass(frozen=True)
class CloudSegment:
    index: int  # segment id within the token step
    ops: tuple[Op, ...]
    input: Reg  # the edge register sent
    output: Reg  # the edge register the reply is written to

    @property
    def reply_rows_are_last_token(self) -> bool:
        """LM_HEAD answers with the last row's logits only (1×vocab); other segments keep T rows."""
        return self.output is Reg.LOGITS


@dataclass(frozen=True)
class ParallelSection:
    """Edge ops and one cloud segment that may run concurrently (they share no written register)."""

    local: LocalStep
    remote: CloudSegment


Step = LocalStep | CloudSegment | ParallelSection


@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_head: int
    n_head_kv: int
    d_model: int
    n_ff: int
    n_vocab: int
    # The LM head is the embedding matrix (one tensor in memory); the FFN has a gate (SwiGLU: three
    # matrices; GPT-2's GELU FFN has two); a head's width (0: d_model / n_head; Qwen3's differs).
    # Not part of equality: they change no tensor that crosses the link, and a policy trained for
    # the shape (its metadata has none of these keys) fits.
    tied_output: bool = field(default=False, compare=False)
    gated_ffn: bool = field(default=True, compare=False)
    head_dim: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.n_head > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_head)

    @classmethod
    def of_model_file(cls, path: str | os.PathLike[str]) -> ModelDims:
        """The shape of the GGUF model at `path`, read from its header: no weights are loaded."""
        return cls.from_config(Model(os.fspath(path), 1, layers=[]).config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelDims:
        """From `splitwise_core.engine.Model.config`."""
        return cls(
            n_layer=int(config["n_layer"]),
            n_head=int(config["n_head"]),
            n_head_kv=int(config["n_head_kv"]),
            d_model=int(config["n_embd"]),
            n_ff=int(config["n_ff"]),
            n_vocab=int(config["n_vocab"]),
            tied_output=bool(config.get("tied_output", False)),
            gated_ffn=config.get("architecture", "llama") != "gpt2",
            head_dim=int(config.get("head_dim", 0)),
        )

    def cols(self, reg: Reg) -> int:
        if reg is Reg.FFN_MID:
            return self.n_ff
        if reg is Reg.LOGITS:
            return self.n_vocab
        return self.d_model


@dataclass(frozen=True)
class SegmentBytes:
    segment: int
    up: int  # request frame bytes (edge → cloud)
    down: int  # response frame bytes (cloud → edge)


@dataclass(frozen=True)
class Schedule:
    """The schedule of `plan` for `dims`. Its steps are compiled when first read: the simulator and
    the cost model need only the plan's round trips and per-layer work, and an exploring policy
    brings a new plan every decision."""

    plan: Plan
    dims: ModelDims

    @functools.cached_property
    def steps(self) -> tuple[Step, ...]:
        return _Compiler(self.plan, self.dims).run()

    @functools.cached_property
    def cloud_segments(self) -> tuple[CloudSegment, ...]:
        """Cached: a schedule is immutable and is asked per decision (round trips, fallbacks)."""
        segs: list[CloudSegment] = []
        for step in self.steps:
            if isinstance(step, CloudSegment):
                segs.append(step)
            elif isinstance(step, ParallelSection):
                segs.append(step.remote)
        return tuple(segs)

    @functools.cached_property
    def cloud_round_trips(self) -> int:
        """Cloud requests per token step, counted from the plan without compiling the steps.

        A layer that is not all on the cloud sends its cloud heads and its FFN (split or on the
        cloud) in one request each; an FFN on the cloud either stands alone or opens the residual
        run that the next layer (or the LM head) joins. A run of all-cloud layers, or the LM head,
        needs a request of its own only when no such run is open, i.e. when the layer before it
        keeps its FFN off the cloud.
        """
        n_head = self.plan.n_head
        trips = 0
        ffn_before_on_cloud = False
        for lp in self.plan.layers:
            heads, ffn = lp.edge_heads, lp.ffn
            if ffn is FfnMode.CLOUD:
                # With edge heads: its cloud heads (if any) and its FFN; without: all on the cloud.
                trips += (len(heads) < n_head) + 1 if heads else not ffn_before_on_cloud
                ffn_before_on_cloud = True
            else:
                trips += (len(heads) < n_head) + (ffn is FfnMode.SPLIT)
                ffn_before_on_cloud = False
        return trips + (self.plan.lm_head is Side.CLOUD and not ffn_before_on_cloud)

    def segment_bytes(self, codec: str, n_tokens: int, logits_codec: str = "token") -> list[SegmentBytes]:
        """Frame sizes of each cloud segment for a step of `n_tokens` rows.

        Requests and tensor responses use `codec`. A segment ending in the LM head answers with
        the sampled token (`logits_codec` "token", as in generation: its request carries the
        sampling block) or with the last row's logits in `logits_codec` (as teacher forcing asks).
        """
        if n_tokens < 1:
            raise PlanError(f"n_tokens must be ≥ 1, got {n_tokens}")
        out = []
        for seg in self.cloud_segments:
            overhead = frame_bytes(len(seg.ops), 2, 0)
            up = overhead + codec_size(codec, n_tokens * self.dims.cols(seg.input))
            if seg.output is Reg.LOGITS and logits_codec == "token":
                up += SAMPLING_BLOCK.size
                down = overhead + SampledToken.wire_bytes(0)
            elif seg.output is Reg.LOGITS:
                down = overhead + codec_size(logits_codec, self.dims.n_vocab)
            else:
                down = overhead + codec_size(codec, n_tokens * self.dims.cols(seg.output))
            out.append(SegmentBytes(segment=seg.index, up=up, down=down))
        return out

    def bytes_per_step(self, codec: str, n_tokens: int, logits_codec: str = "token") -> int:
        return sum(b.up + b.down for b in self.segment_bytes(codec, n_tokens, logits_codec))


def check_cloud_ops(ops: Sequence[Op]) -> None:
    """Raise PlanError unless `ops` is one valid cloud segment (:func:`splitwise_core.ops.segment_problem`)."""
    problem = segment_problem(ops)
    if problem is not None:
        raise PlanError(f"cloud segment: {problem}")


def compile_plan(plan: Plan, dims: ModelDims) -> Schedule:
    """The schedule of one token step for `plan` (see the module docstring for the rules).

    The plan is validated here; its steps are compiled when first read (:class:`Schedule`).
    Memoised: the device and the simulator compile the same few plans over and over, and a
    schedule is immutable. The name is part of the key because equal plans may carry different
    names and a schedule's plan is the one it was compiled from.
    """
    return _compile(plan, plan.name, dims)


@functools.lru_cache(maxsize=256)
def _compile(plan: Plan, _name: str, dims: ModelDims) -> Schedule:
    plan.validate_for(dims.n_layer, dims.n_head)
    plan.kv_groups(Side.EDGE, 0, dims.n_head_kv)  # checks that n_head_kv divides n_head
    return Schedule(plan=plan, dims=dims)


class _Compiler:
    def __init__(self, plan: Plan, dims: ModelDims) -> None:
        self.plan = plan
        self.dims = dims
        self.n_head = plan.n_head
        self.steps: list[Step] = []
        self.local: list[EdgeOp] = []
        self.run_ops: list[Op] = []  # open residual run (x on the cloud)
        self.run_input = Reg.X
        self.n_segments = 0

    def run(self) -> tuple[Step, ...]:
        self.edge(EdgeOp(EdgeOpKind.EMBED, Reg.X))
        n = self.plan.n_layer
        for ell, lp in enumerate(self.plan.layers):
            if lp.all_on(Side.CLOUD, self.n_head):
                if not self.run_ops:
                    self.flush_local()
                    self.run_input = Reg.X
                self.run_ops.append(Op(OpKind.LAYER, ell))
                continue
            self.close_run()
            if lp.all_on(Side.EDGE, self.n_head):
                self.edge(EdgeOp(EdgeOpKind.LAYER, Reg.X, (Reg.X,), ell))
                continue
            self.attention(ell, lp.edge_heads, lp.cloud_heads(self.n_head))
            if lp.ffn is FfnMode.EDGE:
                self.edge(EdgeOp(EdgeOpKind.FFN_NORM, Reg.H_NORM, (Reg.H,), ell))
                self.edge(EdgeOp(EdgeOpKind.FFN, Reg.FFN_OUT, (Reg.H_NORM,), ell))
                self.edge(EdgeOp(EdgeOpKind.ADD, Reg.X, (Reg.H, Reg.FFN_OUT)))
            elif lp.ffn is FfnMode.SPLIT:
                self.edge(EdgeOp(EdgeOpKind.FFN_NORM, Reg.H_NORM, (Reg.H,), ell))
                self.edge(EdgeOp(EdgeOpKind.GATE_UP, Reg.FFN_MID, (Reg.H_NORM,), ell))
                self.remote((Op(OpKind.FFN_DOWN, ell),), Reg.FFN_MID, Reg.FFN_OUT)
                self.edge(EdgeOp(EdgeOpKind.ADD, Reg.X, (Reg.H, Reg.FFN_OUT)))
            else:
                last = ell == n - 1
                run_goes_on = (
                    self.plan.lm_head is Side.CLOUD
                    if last
                    else self.plan.layers[ell + 1].all_on(Side.CLOUD, self.n_head)
                )
                if run_goes_on:
                    self.flush_local()
                    self.run_input = Reg.H
                    self.run_ops.append(Op(OpKind.RESIDUAL_FFN, ell))
                else:
                    self.edge(EdgeOp(EdgeOpKind.FFN_NORM, Reg.H_NORM, (Reg.H,), ell))
                    self.remote((Op(OpKind.FFN, ell),), Reg.H_NORM, Reg.FFN_OUT)
                    self.edge(EdgeOp(EdgeOpKind.ADD, Reg.X, (Reg.H, Reg.FFN_OUT)))
        if self.plan.lm_head is Side.CLOUD:
            if not self.run_ops:
                self.flush_local()
                self.run_input = Reg.X
            self.run_ops.append(Op(OpKind.LM_HEAD))
            self.close_run(Reg.LOGITS)
        else:
            self.close_run()
            self.edge(EdgeOp(EdgeOpKind.LM_HEAD, Reg.LOGITS, (Reg.X,)))
        self.flush_local()
        return tuple(self.steps)

    def attention(self, ell: int, edge_heads: tuple[int, ...], cloud_heads: tuple[int, ...]) -> None:
        self.edge(EdgeOp(EdgeOpKind.ATTN_NORM, Reg.X_NORM, (Reg.X,), ell))
        if not cloud_heads:
            self.edge(EdgeOp(EdgeOpKind.ATTN, Reg.ATTN_EDGE, (Reg.X_NORM,), ell, edge_heads))
            self.edge(EdgeOp(EdgeOpKind.ADD, Reg.H, (Reg.X, Reg.ATTN_EDGE)))
            return
        part = (Op(OpKind.ATTN_PART, ell, cloud_heads),)
        if edge_heads:
            self.flush_local()
            local = LocalStep((EdgeOp(EdgeOpKind.ATTN, Reg.ATTN_EDGE, (Reg.X_NORM,), ell, edge_heads),))
            self.steps.append(ParallelSection(local, self.segment(part, Reg.X_NORM, Reg.ATTN_CLOUD)))
            self.edge(EdgeOp(EdgeOpKind.ADD, Reg.H, (Reg.X, Reg.ATTN_EDGE, Reg.ATTN_CLOUD)))
        else:
            self.remote(part, Reg.X_NORM, Reg.ATTN_CLOUD)
            self.edge(EdgeOp(EdgeOpKind.ADD, Reg.H, (Reg.X, Reg.ATTN_CLOUD)))

    def edge(self, op: EdgeOp) -> None:
        self.local.append(op)

    def flush_local(self) -> None:
        if self.local:
            self.steps.append(LocalStep(tuple(self.local)))
            self.local = []

    def segment(self, ops: tuple[Op, ...], input: Reg, output: Reg) -> CloudSegment:
        check_cloud_ops(ops)
        seg = CloudSegment(index=self.n_segments, ops=ops, input=input, output=output)
        self.n_segments += 1
        return seg

    def remote(self, ops: tuple[Op, ...], input: Reg, output: Reg) -> None:
        self.flush_local()
        self.steps.append(self.segment(ops, input, output))

    def close_run(self, output: Reg = Reg.X) -> None:
        if self.run_ops:
            self.remote(tuple(self.run_ops), self.run_input, output)
            self.run_ops = []


T = TypeVar("T")


def run_schedule(
    schedule: Schedule, edge: Callable[[EdgeOp, Sequence[T]], T], cloud: Callable[[CloudSegment, T], T]
) -> T:
    """Reference interpreter: run one token step, return the logits register.

    `edge(op, inputs)` computes one edge op from its source registers (EMBED gets none; the
    callback knows the step's tokens and positions). `cloud(segment, input)` runs a whole cloud
    segment and returns its output tensor. Parallel sections run sequentially here; a real executor
    sends the remote request first, runs the local ops, then waits.
    """
    regs: dict[Reg, T] = {}

    def local(step: LocalStep) -> None:
        for op in step.ops:
            regs[op.dst] = edge(op, [regs[s] for s in op.srcs])

    for step in schedule.steps:
        if isinstance(step, LocalStep):
            local(step)
        elif isinstance(step, CloudSegment):
            regs[step.output] = cloud(step, regs[step.input])
        else:
            sent = regs[step.remote.input]
            local(step.local)
            regs[step.remote.output] = cloud(step.remote, sent)
    return regs[Reg.LOGITS]
