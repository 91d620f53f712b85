"""The dynamic program's model: its states, one decision's per-layer transition tables, and the
DP pass over (layer, state) that minimises objective + price·memory (see ``docs/planners.md``).

The state between layers is where the residual stream x is, refined by what the segment compiler
forces next:

* ``E`` — x on the edge; ``E*`` — x on the edge after a layer whose FFN ran on the cloud as a
  stand-alone ``FFN`` segment (the compiler only does that when the next layer is *not* entirely
  on the cloud, and the LM head is then on the edge);
* ``C`` — x on the cloud after a whole cloud layer; ``C*`` — x on the cloud after a
  ``RESIDUAL_FFN`` (the next layer must be entirely on the cloud, or the LM head on the cloud).

Every plan compiles to exactly one state path, and each cost term of the compiled schedule
(local ops, messages, cloud ops, the max of a parallel section) belongs to one layer given the
states on both sides of it: the up message of a residual run to the layer that opens it, the
down message to the sub-block that closes it, frame op bytes to their op. So the objective is a
sum of per-layer costs and the DP over (layer, state) is exact. Layers share one shape and one
profile, so the per-layer transition table (:class:`Tables`) is computed once per decision.

GQA: a layer's cost and edge memory depend on its head placement only through (edge heads,
edge KV groups, cloud KV groups) — heads are interchangeable within a KV group and a split
group is computed and cached on both sides — so the DP enumerates multisets of per-group edge
head counts (at most C(G + H/G, G) of them), not 2^H masks.

:func:`dp` with price 0 is the unconstrained optimum; with a positive price of memory it is the
Lagrangian step the memory-budgeted search (:mod:`policies.planners.pareto`) builds on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from policies.cost import CostModel, Observation, StepCtx, Terms
from policies.plan import FfnMode, Side
from policies.planners.context import PlanningContext
from policies.segments import EdgeOpKind, Reg
from splitwise_core.ops import OP_SIZE, OpKind

__all__ = ["Choice", "Sol", "St", "Tables", "Trans", "dp"]


class St(IntEnum):
    E = 0  # x on the edge
    E_STAR = 1  # x on the edge after a stand-alone cloud FFN segment: no cloud layer / LM head next
    C = 2  # x on the cloud after a whole cloud layer
    C_STAR = 3  # x on the cloud after RESIDUAL_FFN: the next layer / LM head must be on the cloud


@dataclass(frozen=True)
class Choice:
    edge_heads: tuple[int, ...]
    ffn: FfnMode
    kind: str  # "edge" (whole layer), "cloud" (whole layer), "mixed"
    memory: int


class Tables:
    """Per-layer transition costs for one decision: cost[s_in][s_out] lists of (objective, memory, choice)."""

    def __init__(self, ctx: PlanningContext, obs: Observation, heads_granular: bool) -> None:
        self.ctx = ctx
        self.obs = obs
        m = self.m = ctx.cost_model(obs)
        d = ctx.dims
        self.link = m.link_up
        steps = (m.prefill, m.decode)
        w = ctx.weights

        def sc(fn: Callable[[StepCtx], Terms]) -> float:
            pre, dec = fn(steps[0]), fn(steps[1])
            return m.scalar(pre, dec, w)

        def comp(seconds: Callable[[StepCtx], float]) -> Callable[[StepCtx], Terms]:
            def f(step: StepCtx) -> Terms:
                s = seconds(step)
                return Terms(latency=s, edge_compute=s)

            return f

        def msg(reg: Reg, up: bool, n_ops: int) -> Callable[[StepCtx], Terms]:
            return lambda step: m.message(reg, step, up, m.frame_bytes(reg, step, n_ops))

        def op_share(step: StepCtx) -> Terms:
            # The op's 11 bytes in both frames of the residual run it belongs to.
            wire = m.wire_s(2 * OP_SIZE)
            return Terms(latency=wire, tx=wire, bytes_up=OP_SIZE, bytes_down=OP_SIZE)

        def cloud(kind: OpKind, heads: tuple[int, ...] = ()) -> Callable[[StepCtx], Terms]:
            def f(step: StepCtx) -> Terms:
                s = m.cloud_op_s(kind, heads, step)
                return Terms(latency=s, cloud_compute=s)

            return f

        def seq(*parts: Callable[[StepCtx], Terms]) -> Callable[[StepCtx], Terms]:
            def f(step: StepCtx) -> Terms:
                t = Terms()
                for p in parts:
                    t.add(p(step))
                return t

            return f

        def segment(reg_in: Reg, kind: OpKind, reg_out: Reg, heads: tuple[int, ...] = ()) -> Callable[[StepCtx], Terms]:
            return seq(msg(reg_in, True, 1), cloud(kind, heads), msg(reg_out, False, 1))

        def edge(kind: EdgeOpKind, heads: tuple[int, ...] = (), n_srcs: int = 2) -> Callable[[StepCtx], Terms]:
            return comp(lambda step: m.edge_op_s(kind, heads, n_srcs, step))

        self.embed = sc(edge(EdgeOpKind.EMBED))
        # Closing a residual run at a layer boundary: the reply carrying x.
        self.close = sc(msg(Reg.X, False, 0)) if self.link else math.inf
        self.open = sc(msg(Reg.X, True, 0)) if self.link else math.inf
        inf = math.inf
        H, G = d.n_head, d.n_head_kv
        per = H // G

        # LM head, from each state: (objective, lm side)
        lm_edge = sc(edge(EdgeOpKind.LM_HEAD))
        lm_tail = seq(cloud(OpKind.LM_HEAD), op_share, msg(Reg.LOGITS, False, 0))
        lm_cloud_tail = sc(lm_tail) if self.link else inf
        self.lm: dict[St, list[tuple[float, Side]]] = {
            St.E: [(lm_edge, Side.EDGE), (self.open + lm_cloud_tail, Side.CLOUD)],
            St.E_STAR: [(lm_edge, Side.EDGE)],
            St.C: [(self.close + lm_edge, Side.EDGE), (lm_cloud_tail, Side.CLOUD)],
            St.C_STAR: [(lm_cloud_tail, Side.CLOUD)],
        }

        # Whole-layer choices.
        self.whole_edge = Choice(
            tuple(range(H)), FfnMode.EDGE, "edge", m.layer_memory(H, G, m.ffn_params("edge"), False)
        )
        self.whole_cloud = Choice((), FfnMode.CLOUD, "cloud", 0)
        self.whole_edge_cost = sc(edge(EdgeOpKind.LAYER, (), 1))
        self.whole_cloud_cost = sc(seq(cloud(OpKind.LAYER), op_share)) if self.link else inf

        # Mixed choices: attention part (x on the edge) + FFN part (h on the edge) → out state.
        self.mixed: list[tuple[Choice, float, St]] = []
        if heads_granular:
            attn: list[tuple[tuple[int, ...], float, int, int]] = []  # (edge heads, cost, n_e, g_e)
            seen: set[tuple[int, int, int]] = set()
            for counts in itertools.combinations_with_replacement(range(per, -1, -1), G):
                n_e = sum(counts)
                g_e = sum(c > 0 for c in counts)
                g_c = sum(c < per for c in counts)
                if (n_e, g_e, g_c) in seen:
                    continue
                seen.add((n_e, g_e, g_c))
                eh = tuple(g * per + i for g, c in enumerate(counts) for i in range(c))
                ch = tuple(h for h in range(H) if h not in set(eh))
                if not ch:
                    f = seq(edge(EdgeOpKind.ATTN_NORM), edge(EdgeOpKind.ATTN, eh), edge(EdgeOpKind.ADD, (), 2))
                    cost = sc(f)
                elif not self.link:
                    cost = inf
                elif not eh:
                    f = seq(
                        edge(EdgeOpKind.ATTN_NORM),
                        segment(Reg.X_NORM, OpKind.ATTN_PART, Reg.ATTN_CLOUD, ch),
                        edge(EdgeOpKind.ADD, (), 2),
                    )
                    cost = sc(f)
                else:
                    cost = sc(
                        seq(
                            edge(EdgeOpKind.ATTN_NORM),
                            self._parallel(m, eh, ch),
                            edge(EdgeOpKind.ADD, (), 3),
                        )
                    )
                attn.append((eh, cost, n_e, g_e))
            ffn_parts: list[tuple[FfnMode, float, St]] = [
                (FfnMode.EDGE, sc(seq(edge(EdgeOpKind.FFN_NORM), edge(EdgeOpKind.FFN), edge(EdgeOpKind.ADD))), St.E)
            ]
            if self.link:
                ffn_parts += [
                    (
                        FfnMode.SPLIT,
                        sc(
                            seq(
                                edge(EdgeOpKind.FFN_NORM),
                                edge(EdgeOpKind.GATE_UP),
                                segment(Reg.FFN_MID, OpKind.FFN_DOWN, Reg.FFN_OUT),
                                edge(EdgeOpKind.ADD),
                            )
                        ),
                        St.E,
                    ),
                    (
                        FfnMode.CLOUD,
                        sc(
                            seq(
                                edge(EdgeOpKind.FFN_NORM),
                                segment(Reg.H_NORM, OpKind.FFN, Reg.FFN_OUT),
                                edge(EdgeOpKind.ADD),
                            )
                        ),
                        St.E_STAR,
                    ),
                    (
                        FfnMode.CLOUD,
                        sc(seq(msg(Reg.H, True, 0), cloud(OpKind.RESIDUAL_FFN), op_share)),
                        St.C_STAR,
                    ),
                ]
            for (eh, a_cost, n_e, g_e), (mode, f_cost, out) in itertools.product(attn, ffn_parts):
                if (n_e == H and mode is FfnMode.EDGE) or (n_e == 0 and mode is FfnMode.CLOUD):
                    continue  # whole-layer choices, compiled as fused ops
                mem = m.layer_memory(n_e, g_e, m.ffn_params(mode.value), False)
                self.mixed.append((Choice(eh, mode, "mixed", mem), a_cost + f_cost, out))

    @staticmethod
    def _parallel(m: CostModel, eh: tuple[int, ...], ch: tuple[int, ...]) -> Callable[[StepCtx], Terms]:
        def f(step: StepCtx) -> Terms:
            up = m.message(Reg.X_NORM, step, True, m.frame_bytes(Reg.X_NORM, step, 1))
            down = m.message(Reg.ATTN_CLOUD, step, False, m.frame_bytes(Reg.ATTN_CLOUD, step, 1))
            work = m.cloud_op_s(OpKind.ATTN_PART, ch, step)
            local = m.edge_op_s(EdgeOpKind.ATTN, eh, 1, step)
            t = Terms(cloud_compute=work)
            t.add(up)
            t.add(down)
            enc, dec = up.edge_compute, down.edge_compute
            t.latency = enc + max(local, t.latency - enc - dec + work) + dec
            t.edge_compute += local
            return t

        return f

    def transitions(self, edge_only_layer: bool) -> dict[tuple[St, St], list[tuple[float, int, Choice]]]:
        """All (s_in, s_out) → [(cost, memory, choice)] for one layer."""
        out: dict[tuple[St, St], list[tuple[float, int, Choice]]] = {}

        def put(a: St, b: St, cost: float, ch: Choice) -> None:
            if cost < math.inf:
                out.setdefault((a, b), []).append((cost, ch.memory, ch))

        we = self.whole_edge
        put(St.E, St.E, self.whole_edge_cost, we)
        put(St.E_STAR, St.E, self.whole_edge_cost, we)
        put(St.C, St.E, self.close + self.whole_edge_cost, we)
        if edge_only_layer:
            return out
        wc = self.whole_cloud
        put(St.E, St.C, self.open + self.whole_cloud_cost, wc)
        put(St.C, St.C, self.whole_cloud_cost, wc)
        put(St.C_STAR, St.C, self.whole_cloud_cost, wc)
        for ch, cost, s_out in self.mixed:
            put(St.E, s_out, cost, ch)
            put(St.E_STAR, s_out, cost, ch)
            put(St.C, s_out, self.close + cost, ch)
        return out


Trans = dict[tuple[St, St], list[tuple[float, int, Choice]]]


@dataclass(frozen=True)
class Sol:
    objective: float
    choices: tuple[Choice, ...]
    lm: Side
    memory: int
    states: tuple[St, ...] = ()  # state after each layer (when known)
    costs: tuple[float, ...] = ()  # objective of each layer (when known)


def dp(tab: Tables, free: Trans, locked: Trans, k: int, n_layer: int, lam: float = 0.0) -> Sol | None:
    """Unconstrained DP minimising objective + lam·memory (lam = 0: the plain objective)."""
    fixed = {side: tab.m.fixed_memory(side) for side in Side}

    def best(trans: Trans) -> dict[tuple[St, St], tuple[float, float, Choice]]:
        out = {}
        for key, opts in trans.items():
            c = min(opts, key=lambda o: o[0] + lam * o[1])
            out[key] = (c[0] + lam * c[1], c[0], c[2])
        return out

    best_free = best(free)
    best_locked = best(locked) if k else best_free
    # value[s] = (penalised, true objective); back-pointers per layer
    value: dict[St, tuple[float, float]] = {St.E: (tab.embed, tab.embed)}
    back: list[dict[St, tuple[St, Choice, float]]] = []
    for ell in range(n_layer):
        table = best_locked if ell < k else best_free
        nxt: dict[St, tuple[float, float]] = {}
        bp: dict[St, tuple[St, Choice, float]] = {}
        for (a, b), (pen, cost, ch) in table.items():
            if a in value:
                v = (value[a][0] + pen, value[a][1] + cost)
                if v[0] < nxt.get(b, (math.inf, math.inf))[0]:
                    nxt[b], bp[b] = v, (a, ch, cost)
        value = nxt
        back.append(bp)
    final: tuple[float, float, St, Side] = (math.inf, math.inf, St.E, Side.EDGE)
    for s, (pen, cost) in value.items():
        for c, side in tab.lm[s]:
            if pen + c + lam * fixed[side] < final[0]:
                final = (pen + c + lam * fixed[side], cost + c, s, side)
    if final[0] == math.inf:
        return None
    choices: list[Choice] = []
    states: list[St] = []
    costs: list[float] = []
    st = final[2]
    for bp in reversed(back):
        a, ch, cost = bp[st]
        choices.append(ch)
        states.append(st)
        costs.append(cost)
        st = a
    choices.reverse()
    states.reverse()
    costs.reverse()
    memory = fixed[final[3]] + sum(c.memory for c in choices)
    return Sol(final[1], tuple(choices), final[3], memory, tuple(states), tuple(costs))
