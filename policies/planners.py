"""Planners: ``plan(observation) -> Plan``, all scored by the one cost model (:mod:`policies.cost`).

- ``edge-only``, ``cloud-only`` — fixed baselines (they ignore the memory budget and privacy);
- ``layer-split`` — the best single cut ``layer-split:K`` (Neurosurgeon style) by the objective;
- ``layer-dp`` — the best plan whose layers are each entirely on one side, any number of cuts
  (EdgeShard style), by the dynamic program below restricted to whole layers;
- ``splitwise-dp`` — the exact dynamic program at head and FFN granularity.

The dynamic program (see ``docs/planners.md``). The state between layers is where the residual
stream x is, refined by what the segment compiler forces next:

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
profile, so the per-layer transition table is computed once per decision.

GQA: a layer's cost and edge memory depend on its head placement only through (edge heads,
edge KV groups, cloud KV groups) — heads are interchangeable within a KV group and a split
group is computed and cached on both sides — so the DP enumerates multisets of per-group edge
head counts (at most C(G + H/G, G) of them), not 2^H masks.

The edge memory budget is a knapsack constraint. The DP first solves without it; if the optimum
fits (or there is no budget) it is the answer. Otherwise it reruns keeping, per state, the Pareto
front of (objective, memory), pruned by admissible memory and Lagrangian cost bounds against a
spliced Lagrangian incumbent (:func:`_solve_pareto`) — still exact, ~4–16 ms for 30 layers × 9
heads instead of ~1.5 ms.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import numpy as np

from policies.cost import CostModel, Observation, StepCtx, Terms, Weights, objective, predict
from policies.plan import FfnMode, LayerPlan, Plan, Side, cloud_only, edge_only, layer_split
from policies.segments import EdgeOpKind, ModelDims, Reg
from splitwise_core.errors import InvalidArgumentError, PlanError
from splitwise_core.ops import OP_SIZE, OpKind
from splitwise_core.profile import Profile

__all__ = [
    "PLANNER_NAMES",
    "CloudOnlyPlanner",
    "DpResult",
    "EdgeOnlyPlanner",
    "LayerDpPlanner",
    "LayerSplitPlanner",
    "Planner",
    "PlanningContext",
    "SplitwiseDpPlanner",
    "benchmark_dp",
    "make_planner",
]


@dataclass(frozen=True)
class PlanningContext:
    """Everything a planner needs besides the observation."""

    edge_profile: Profile
    cloud_profile: Profile
    dims: ModelDims
    codec: str = "q8_0"
    weights: Weights = field(default_factory=Weights)
    min_edge_layers: int = 0  # privacy: layers 0..k-1 run entirely on the edge
    codec_kl: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.min_edge_layers, int) or not 0 <= self.min_edge_layers <= self.dims.n_layer:
            raise InvalidArgumentError(
                f"min_edge_layers: expected an integer in 0..{self.dims.n_layer}, got {self.min_edge_layers!r}"
            )

    def cost_model(self, observation: Observation) -> CostModel:
        return CostModel(
            observation, self.edge_profile, self.cloud_profile, self.dims, self.codec, codec_kl=self.codec_kl
        )

    def score(self, plan: Plan, observation: Observation, model: CostModel | None = None) -> float:
        """The objective of `plan` (inf when infeasible: link cut, over budget, privacy broken)."""
        m = model or self.cost_model(observation)
        pred = predict(
            plan,
            observation,
            self.edge_profile,
            self.cloud_profile,
            self.dims,
            self.codec,
            codec_kl=self.codec_kl,
            model=m,
        )
        budget = observation.memory_budget_bytes
        if budget is not None and pred.edge_memory_bytes > budget:
            return math.inf
        if any(not lp.all_on(Side.EDGE, plan.n_head) for lp in plan.layers[: self.min_edge_layers]):
            return math.inf
        return objective(pred, observation, self.weights)


class Planner(Protocol):
    name: str

    def plan(self, observation: Observation) -> Plan: ...


class EdgeOnlyPlanner:
    name = "edge-only"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        return edge_only(self.ctx.dims.n_layer, self.ctx.dims.n_head)


class CloudOnlyPlanner:
    name = "cloud-only"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        return cloud_only(self.ctx.dims.n_layer, self.ctx.dims.n_head)


class LayerSplitPlanner:
    """Best ``layer-split:K`` by the objective; K = n_layer (edge-only) when nothing else is feasible."""

    name = "layer-split"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def plan(self, observation: Observation) -> Plan:
        d = self.ctx.dims
        model = self.ctx.cost_model(observation)
        best, best_score = layer_split(d.n_layer, d.n_layer, d.n_head), math.inf
        for k in range(self.ctx.min_edge_layers, d.n_layer + 1):
            cand = layer_split(k, d.n_layer, d.n_head)
            s = self.ctx.score(cand, observation, model)
            if s < best_score:
                best, best_score = cand, s
        return best


# -- the dynamic program -------------------------------------------------------------------------


class St(IntEnum):
    E = 0  # x on the edge
    E_STAR = 1  # x on the edge after a stand-alone cloud FFN segment: no cloud layer / LM head next
    C = 2  # x on the cloud after a whole cloud layer
    C_STAR = 3  # x on the cloud after RESIDUAL_FFN: the next layer / LM head must be on the cloud


@dataclass(frozen=True)
class _Choice:
    edge_heads: tuple[int, ...]
    ffn: FfnMode
    kind: str  # "edge" (whole layer), "cloud" (whole layer), "mixed"
    memory: int


@dataclass(frozen=True)
class DpResult:
    plan: Plan
    objective: float  # equals objective(predict(plan)) up to rounding
    edge_memory_bytes: int
    pareto: bool  # the memory budget was binding and the Pareto-front DP ran
    seconds: float  # planning time


class _Tables:
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
        self.whole_edge = _Choice(
            tuple(range(H)), FfnMode.EDGE, "edge", m.layer_memory(H, G, m.ffn_params("edge"), False)
        )
        self.whole_cloud = _Choice((), FfnMode.CLOUD, "cloud", 0)
        self.whole_edge_cost = sc(edge(EdgeOpKind.LAYER, (), 1))
        self.whole_cloud_cost = sc(seq(cloud(OpKind.LAYER), op_share)) if self.link else inf

        # Mixed choices: attention part (x on the edge) + FFN part (h on the edge) → out state.
        self.mixed: list[tuple[_Choice, float, St]] = []
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
                self.mixed.append((_Choice(eh, mode, "mixed", mem), a_cost + f_cost, out))

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

    def transitions(self, edge_only_layer: bool) -> dict[tuple[St, St], list[tuple[float, int, _Choice]]]:
        """All (s_in, s_out) → [(cost, memory, choice)] for one layer."""
        out: dict[tuple[St, St], list[tuple[float, int, _Choice]]] = {}

        def put(a: St, b: St, cost: float, ch: _Choice) -> None:
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


Trans = dict[tuple[St, St], list[tuple[float, int, _Choice]]]


@dataclass(frozen=True)
class _Sol:
    objective: float
    choices: tuple[_Choice, ...]
    lm: Side
    memory: int
    states: tuple[St, ...] = ()  # state after each layer (when known)
    costs: tuple[float, ...] = ()  # objective of each layer (when known)


def _dp(tab: _Tables, free: Trans, locked: Trans, k: int, n_layer: int, lam: float = 0.0) -> _Sol | None:
    """Unconstrained DP minimising objective + lam·memory (lam = 0: the plain objective)."""
    fixed = {side: tab.m.fixed_memory(side) for side in Side}

    def best(trans: Trans) -> dict[tuple[St, St], tuple[float, float, _Choice]]:
        out = {}
        for key, opts in trans.items():
            c = min(opts, key=lambda o: o[0] + lam * o[1])
            out[key] = (c[0] + lam * c[1], c[0], c[2])
        return out

    best_free = best(free)
    best_locked = best(locked) if k else best_free
    # value[s] = (penalised, true objective); back-pointers per layer
    value: dict[St, tuple[float, float]] = {St.E: (tab.embed, tab.embed)}
    back: list[dict[St, tuple[St, _Choice, float]]] = []
    for ell in range(n_layer):
        table = best_locked if ell < k else best_free
        nxt: dict[St, tuple[float, float]] = {}
        bp: dict[St, tuple[St, _Choice, float]] = {}
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
    choices: list[_Choice] = []
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
    return _Sol(final[1], tuple(choices), final[3], memory, tuple(states), tuple(costs))


def _splice(
    head: _Sol, tail: _Sol, budget: int, fixed: Mapping[Side, int], step_cost: Callable[[int, St, St, _Choice], float]
) -> _Sol | None:
    """The best plan that fits made of `head`'s first j layers and `tail`'s other layers and LM
    head, over every j (the first tail layer re-priced for the state `head` leaves it in)."""
    n = len(head.choices)
    if len(head.states) != n or len(tail.states) != n:
        return None
    rest = tail.objective - sum(tail.costs)  # embedding and LM head
    best: _Sol | None = None
    c_head = 0.0
    m_head = 0
    c_tail, m_tail = sum(tail.costs), sum(ch.memory for ch in tail.choices)
    for j in range(n + 1):
        obj, costs = rest + c_head + c_tail, head.costs[:j] + tail.costs[j:]
        if j == n and head.states[j - 1] != tail.states[j - 1]:
            break  # the LM head's cost depends on the state it starts from
        if 0 < j < n and head.states[j - 1] != tail.states[j - 1]:
            c = step_cost(j, head.states[j - 1], tail.states[j], tail.choices[j])
            obj += c - tail.costs[j]
            costs = (*head.costs[:j], c, *tail.costs[j + 1 :])
        mem = m_head + m_tail + fixed[tail.lm]
        if mem <= budget and obj < (best.objective if best is not None else math.inf):
            best = _Sol(
                obj, head.choices[:j] + tail.choices[j:], tail.lm, mem, head.states[:j] + tail.states[j:], costs
            )
        if j < n:
            c_head += head.costs[j]
            m_head += head.choices[j].memory
            c_tail -= tail.costs[j]
            m_tail -= tail.choices[j].memory
    return best


def _lagrangian_bound(
    tab: _Tables, free: Trans, locked: Trans, k: int, n_layer: int, budget: int
) -> tuple[_Sol, float] | None:
    """A good feasible solution (an upper bound for the exact search) and the memory price that
    found it: bisect the price of memory until the priced optimum just fits."""
    lo, hi, found = 0.0, 1e-15, None
    for _ in range(80):  # grow the price until the plan fits
        sol = _dp(tab, free, locked, k, n_layer, hi)
        if sol is not None and sol.memory <= budget:
            found = sol
            break
        lo, hi = hi, hi * 4
    if found is None:
        return None
    for _ in range(20):
        mid = (lo + hi) / 2
        sol = _dp(tab, free, locked, k, n_layer, mid)
        if sol is not None and sol.memory <= budget:
            hi = mid
            if sol.objective < found.objective:
                found = sol
        else:
            lo = mid
    return found, hi


def _solve(ctx: PlanningContext, obs: Observation, heads_granular: bool, name: str) -> DpResult:
    t0 = time.perf_counter()
    tab = _Tables(ctx, obs, heads_granular)
    d = ctx.dims
    k = ctx.min_edge_layers
    free = tab.transitions(False)
    locked = tab.transitions(True) if k else free
    sol = _dp(tab, free, locked, k, d.n_layer)
    assert sol is not None  # the all-edge plan is always possible
    budget = obs.memory_budget_bytes
    pareto = budget is not None and sol.memory > budget
    if pareto:
        assert budget is not None
        sol = _solve_pareto(tab, free, locked, k, d.n_layer, budget)
    plan = Plan(
        n_layer=d.n_layer,
        n_head=d.n_head,
        layers=tuple(LayerPlan(edge_heads=c.edge_heads, ffn=c.ffn) for c in sol.choices),
        lm_head=sol.lm,
        name=name,
    )
    return DpResult(plan, sol.objective, sol.memory, pareto, time.perf_counter() - t0)


def _front(entries: Sequence[tuple[float, int, object]]) -> list[tuple[float, int, object]]:
    """Pareto front in (cost, memory), sorted by memory ascending with costs strictly falling."""
    out: list[tuple[float, int, object]] = []
    for e in sorted(entries, key=lambda x: (x[1], x[0])):
        if not out or e[0] < out[-1][0]:
            out.append(e)
    return out


_N_ST = len(St)
_E, _E_STAR, _C, _C_STAR = int(St.E), int(St.E_STAR), int(St.C), int(St.C_STAR)
_STATE_OFFSET = 1 << 48  # above any memory in bytes


class _Options:
    """One layer's transitions as arrays: options grouped by in-state, each group sorted later by
    its priced cost-to-go. Only Pareto-optimal options per (in, out) state pair are kept (a
    dominated option never helps: the same completion with the dominating one is as good)."""

    def __init__(self, trans: Trans, choices: list[_Choice]) -> None:
        self.start = np.zeros(_N_ST + 1, dtype=np.int64)
        cost: list[float] = []
        mem: list[int] = []
        out: list[int] = []
        idx: list[int] = []
        self.fronts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for a in St:
            for (ka, kb), opts in trans.items():
                if ka is not a:
                    continue
                fr = _front(opts)
                self.fronts[(int(ka), int(kb))] = (
                    np.array([o[0] for o in fr], dtype=np.float64),
                    np.array([o[1] for o in fr], dtype=np.float64),
                )
                for c, m_, ch in fr:
                    cost.append(c)
                    mem.append(m_)
                    out.append(int(kb))
                    idx.append(len(choices))
                    choices.append(ch)  # type: ignore[arg-type]
            self.start[int(a) + 1] = len(cost)
        self.cost = np.array(cost, dtype=np.float64)
        self.mem = np.array(mem, dtype=np.int64)
        self.out = np.array(out, dtype=np.int64)
        self.idx = np.array(idx, dtype=np.int64)

    def priced(self, lams: np.ndarray) -> np.ndarray:
        """M[a, b, k]: the least cost + lams[k]·memory of one layer from state a to state b."""
        m = np.full((_N_ST, _N_ST, len(lams)), math.inf)
        for (a, b), (c, mem) in self.fronts.items():
            m[a, b] = (c[:, None] + mem[:, None] * lams[None, :]).min(axis=0)
        return m

    def slopes(self) -> list[float]:
        """Prices at which a (in, out) pair's best option changes: the front's trade-off rates."""
        out: list[float] = []
        for c, mem in self.fronts.values():
            if len(c) > 1:
                out.extend(((c[:-1] - c[1:]) / (mem[1:] - mem[:-1])).tolist())
        return out


def _solve_pareto(tab: _Tables, free: Trans, locked: Trans, k: int, n_layer: int, budget: int) -> _Sol:
    """Exact DP under the memory budget: per state the Pareto front of (objective, memory).

    Branch and bound. Lower bounds: for a memory price lam, togo_lam[l][s] is the least
    objective + lam·memory still to come after layer l in state s (one backward pass for a grid
    of prices at once). A completion of a partial plan (objective c, memory u) that fits spends
    at most budget − u, so its objective is ≥ togo_lam − lam·(budget − u); at the price that
    maximises the whole problem's bound (the Lagrangian dual, LB) and at price 0 (togo_0, the
    unconstrained cost to go). Upper bound U: the priced optimum at the least grid price whose
    plan fits, improved by splicing it with the priced optima just below the best price (too much
    memory): the first j layers of one and the rest of the other, for every j.

    The exact search (:class:`_FrontSearch`) keeps per state the Pareto front of (objective,
    memory) and drops a partial plan when its memory plus the least memory the remaining layers
    need exceeds the budget or a bound exceeds U. The bounds are admissible, so every plan with
    objective ≤ U survives (or one that dominates it does) and the result is exact. Memory is
    never rounded: pruning and dominance compare exact byte counts.
    """
    choice_list: list[_Choice] = []
    opt_free = _Options(free, choice_list)
    opt_locked = _Options(locked, choice_list) if k else opt_free
    fixed = {side: tab.m.fixed_memory(side) for side in Side}
    min_fixed = min(fixed.values())
    # LM head per state: (objective, fixed memory) arrays
    lm_c = np.full((_N_ST, 2), math.inf)
    lm_m = np.zeros((_N_ST, 2))
    lm_side: list[list[Side]] = [[Side.EDGE, Side.EDGE] for _ in St]
    for s, opts in tab.lm.items():
        for j, (c, side) in enumerate(opts):
            lm_c[int(s), j], lm_m[int(s), j], lm_side[int(s)][j] = c, fixed[side], side

    # Price grid from the options' own trade-off rates, plus 0; backward pass for all prices.
    slopes = [x for x in opt_free.slopes() + opt_locked.slopes() if x > 0 and math.isfinite(x)]
    fd = fixed[Side.EDGE] - fixed[Side.CLOUD]  # the LM head on the edge costs memory
    for opts in tab.lm.values():
        by_side = {side: c for c, side in opts}
        if len(by_side) == 2 and fd > 0:
            slopes.append((by_side[Side.CLOUD] - by_side[Side.EDGE]) / fd)
    slopes = [x for x in slopes if x > 0 and math.isfinite(x)] or [1e-9]
    lams = np.concatenate(([0.0], np.geomspace(min(slopes) / 2, max(slopes) * 2, 48)))
    togo = np.empty((n_layer + 1, _N_ST, len(lams)))
    togo[n_layer] = (lm_c[:, :, None] + lm_m[:, :, None] * lams[None, None, :]).min(axis=1)
    pr_free = opt_free.priced(lams)
    pr_locked = opt_locked.priced(lams) if k else pr_free
    tail_mem = np.zeros(n_layer + 1)
    mem_free, mem_locked = float(opt_free.mem.min()), float(opt_locked.mem.min())
    for ell in range(n_layer - 1, -1, -1):
        pr = pr_locked if ell < k else pr_free
        togo[ell] = (pr + togo[ell + 1][None, :, :]).min(axis=1)
        tail_mem[ell] = tail_mem[ell + 1] + (mem_locked if ell < k else mem_free)
    dual = tab.embed + togo[0, int(St.E)] - lams * budget
    kbest = int(np.argmax(dual))
    lower = float(dual[kbest])

    # A feasible plan: the priced optimum at the least grid price (≥ the best) whose plan fits,
    # improved by splicing it with the priced optima just below, which use too much memory (the
    # first j layers of one, the rest of the other: memory in between).
    incumbent: _Sol | None = None
    over: list[_Sol] = []
    for kk in range(max(kbest - 2, 0), len(lams)):
        if kk > kbest + 2 and kk < len(lams) - 1:
            continue  # past the best price: the plan fits soon after it, or only at the top
        sol = _dp(tab, free, locked, k, n_layer, float(lams[kk]))
        if sol is not None and sol.memory <= budget:
            incumbent = sol
            break
        if sol is not None:
            over.append(sol)
    if incumbent is not None:
        lookup = [{(a, b, id(o[2])): o[0] for (a, b), opts in t.items() for o in opts} for t in (free, locked)]

        def step_cost(ell: int, a: St, b: St, ch: _Choice) -> float:
            return lookup[1 if ell < k else 0].get((a, b, id(ch)), math.inf)

        for x in over:
            for head, tail in ((x, incumbent), (incumbent, x)):
                sp = _splice(head, tail, budget, fixed, step_cost)
                if sp is not None and sp.objective < incumbent.objective:
                    incumbent = sp
    if incumbent is None:
        bound = _lagrangian_bound(tab, free, locked, k, n_layer, budget)
        if bound is None:
            raise PlanError(f"no plan fits the edge memory budget of {budget} bytes")
        incumbent = bound[0]
    if incumbent.objective <= lower * (1 + 1e-12) + 1e-15:
        return incumbent  # meets the dual bound: optimal

    searcher = _FrontSearch(tab, opt_free, opt_locked, k, n_layer, budget, togo, lams, kbest, tail_mem, min_fixed)
    # Exact search with the incumbent's objective as the upper bound: every plan at least as
    # good survives the pruning, so the best plan found (if better than the incumbent) is optimal.
    found = searcher.run(incumbent.objective, lm_c, lm_m)
    if found is None or found[0] >= incumbent.objective:
        return incumbent
    obj, mem, path, lm_j, st = found
    return _Sol(obj, tuple(choice_list[j] for j in path), lm_side[st][lm_j], mem)


class _FrontSearch:
    """The Pareto-front DP of :func:`_solve_pareto` for one upper bound, vectorised per layer.

    Fronts of all states live in one array, grouped by state. A layer step pairs each front
    entry with the options of its state, but only the pairs that pass the priced bound: the
    options of a state are sorted by c + lam·m + togo_lam (per layer, once), so the options an
    entry may take are a prefix (one searchsorted per state); the work is proportional to the
    surviving pairs, not to front size × options. The new fronts: sort by (state, objective),
    keep an entry when its memory is below every cheaper one's of its state, then drop E*
    entries dominated by an E entry and C* entries dominated by a C entry (E allows every step
    E* allows at the same cost, C every step C* allows).
    """

    def __init__(
        self,
        tab: _Tables,
        opt_free: _Options,
        opt_locked: _Options,
        k: int,
        n_layer: int,
        budget: int,
        togo: np.ndarray,
        lams: np.ndarray,
        kbest: int,
        tail_mem: np.ndarray,
        min_fixed: int,
    ) -> None:
        self.tab, self.k, self.n_layer, self.budget = tab, k, n_layer, budget
        self.opts = (opt_free, opt_locked)
        self.lam = float(lams[kbest])
        self.togo_lam = togo[:, :, kbest]
        self.togo0 = togo[:, :, 0]
        self.mem_cap = budget - tail_mem - min_fixed
        # per layer and in-state: options sorted by their priced value incl. the cost to go
        # (rows: layers; the in-state groups keep their places [start[a], start[a + 1]) in `flat`)
        tables = []
        for o in (opt_free, opt_locked):
            ws, flats = [], []
            for a in range(_N_ST):
                lo, hi = int(o.start[a]), int(o.start[a + 1])
                w = (o.cost[lo:hi] + self.lam * o.mem[lo:hi])[None, :] + self.togo_lam[1:, o.out[lo:hi]]
                order = np.argsort(w, axis=1, kind="stable")
                ws.append(np.take_along_axis(w, order, axis=1))
                flats.append(order + lo)
            tables.append((ws, np.concatenate(flats, axis=1)))
        self.sorted = [tables[1] if ell < k else tables[0] for ell in range(n_layer)]

    def run(self, ub: float, lm_c: np.ndarray, lm_m: np.ndarray) -> tuple[float, int, list[int], int, int] | None:
        """The best plan whose objective may be ≤ `ub` (objective, memory, option per layer, LM
        option, final state), or None; every plan with objective ≤ `ub` is considered."""
        lam, budget = self.lam, self.budget
        slack = 1e-9 * (abs(ub) + lam * budget) + 1e-15
        limit = ub + slack + lam * budget  # priced bound: c + lam·u + togo_lam ≤ limit
        fc = np.array([self.tab.embed])
        fm = np.array([0], dtype=np.int64)
        starts = np.zeros(_N_ST + 1, dtype=np.int64)
        starts[1:] = 1  # one entry, in state E
        parents: list[np.ndarray] = []
        picks: list[np.ndarray] = []
        for ell in range(self.n_layer):
            o = self.opts[1] if ell < self.k else self.opts[0]
            fp = fc + lam * fm
            counts = np.zeros(len(fc), dtype=np.int64)
            first = np.zeros(len(fc), dtype=np.int64)
            ws, flats = self.sorted[ell]
            for a in range(_N_ST):
                lo, hi = int(starts[a]), int(starts[a + 1])
                if lo < hi:
                    counts[lo:hi] = np.searchsorted(ws[a][ell], limit - fp[lo:hi], side="right")
                    first[lo:hi] = o.start[a]
            total = int(counts.sum())
            if total == 0:
                return None
            flat = flats[ell]
            parent = np.repeat(np.arange(len(fc)), counts)
            offs = np.cumsum(counts) - counts
            j = flat[np.arange(total) - np.repeat(offs - first, counts)]
            cost = fc[parent] + o.cost[j]
            mem = fm[parent] + o.mem[j]
            out = o.out[j]
            ok = (mem <= self.mem_cap[ell + 1]) & (cost + self.togo0[ell + 1][out] <= ub + slack)
            if not ok.all():
                cost, mem, out, parent, j = cost[ok], mem[ok], out[ok], parent[ok], j[ok]
                if not len(cost):
                    return None
            # Pareto filter per out-state: order by (state, objective); keep an entry when its
            # memory is below that of every cheaper entry of its state (a running minimum of
            # memory, offset per state so that a state never inherits the minimum of another).
            order = np.argsort(cost)
            order = order[np.argsort(out[order].astype(np.int8), kind="stable")]
            v = (_N_ST - 1 - out[order]) * _STATE_OFFSET + mem[order]
            keep = np.ones(len(v), dtype=bool)
            keep[1:] = v[1:] < np.minimum.accumulate(v)[:-1]
            sel = order[keep]
            # E allows every step E* allows at the same cost, and C every step of C*: an E entry
            # also dominates E* entries, a C entry C* entries.
            st = np.searchsorted(out[sel], np.arange(_N_ST + 1))
            drop = np.zeros(len(sel), dtype=bool)
            for big, small in ((_E, _E_STAR), (_C, _C_STAR)):
                blo, bhi, slo, shi = st[big], st[big + 1], st[small], st[small + 1]
                if blo == bhi or slo == shi:
                    continue
                pos = np.searchsorted(cost[sel[blo:bhi]], cost[sel[slo:shi]], side="right") - 1
                bm = mem[sel[blo:bhi]]
                drop[slo:shi] = (pos >= 0) & (bm[np.maximum(pos, 0)] <= mem[sel[slo:shi]])
            if drop.any():
                sel = sel[~drop]
            fc, fm, out_s = cost[sel], mem[sel], out[sel]
            parents.append(parent[sel])
            picks.append(o.idx[j[sel]])
            starts = np.searchsorted(out_s, np.arange(_N_ST + 1), side="left")
        best: tuple[float, int, int, int, int] | None = None
        for s in range(_N_ST):
            lo, hi = int(starts[s]), int(starts[s + 1])
            for jj in range(2):
                if lo == hi or not math.isfinite(lm_c[s, jj]):
                    continue
                total_c = np.where(fm[lo:hi] + lm_m[s, jj] <= budget, fc[lo:hi] + lm_c[s, jj], math.inf)
                i = int(np.argmin(total_c))
                if math.isfinite(total_c[i]) and (best is None or total_c[i] < best[0]):
                    best = (float(total_c[i]), int(fm[lo + i] + lm_m[s, jj]), lo + i, jj, s)
        if best is None:
            return None
        path: list[int] = []
        i = best[2]
        for par, pk in zip(reversed(parents), reversed(picks), strict=True):
            path.append(int(pk[i]))
            i = int(par[i])
        path.reverse()
        return best[0], best[1], path, best[3], best[4]


class SplitwiseDpPlanner:
    """Exact head/FFN-granular DP (module docstring). `solve` also returns objective and timing."""

    name = "splitwise-dp"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def solve(self, observation: Observation) -> DpResult:
        return _solve(self.ctx, observation, True, self.name)

    def plan(self, observation: Observation) -> Plan:
        return self.solve(observation).plan


class LayerDpPlanner:
    """The same DP with whole layers only (each layer entirely on one side)."""

    name = "layer-dp"

    def __init__(self, ctx: PlanningContext) -> None:
        self.ctx = ctx

    def solve(self, observation: Observation) -> DpResult:
        return _solve(self.ctx, observation, False, self.name)

    def plan(self, observation: Observation) -> Plan:
        return self.solve(observation).plan


# The planner registry: every list of planner names (device config, CLI, docs, tests) derives from it.
_FACTORIES: dict[str, Callable[[PlanningContext], Planner]] = {
    "edge-only": EdgeOnlyPlanner,
    "cloud-only": CloudOnlyPlanner,
    "layer-split": LayerSplitPlanner,
    "layer-dp": LayerDpPlanner,
    "splitwise-dp": SplitwiseDpPlanner,
}
PLANNER_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""The planners there are, in the registry's order."""


def make_planner(name: str, ctx: PlanningContext) -> Planner:
    try:
        return _FACTORIES[name](ctx)
    except KeyError:
        raise InvalidArgumentError(f"unknown planner {name!r}; known: {', '.join(PLANNER_NAMES)}") from None


def benchmark_dp(ctx: PlanningContext, observation: Observation, repeats: int = 20) -> dict[str, float]:
    """Planning time of splitwise-dp in milliseconds (min, median, max over `repeats` runs)."""
    planner = SplitwiseDpPlanner(ctx)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        planner.plan(observation)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"min_ms": times[0], "median_ms": times[len(times) // 2], "max_ms": times[-1]}
