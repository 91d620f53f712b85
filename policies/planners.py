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
front of (objective, memory), with admissible memory and cost bounds and a Lagrangian incumbent —
still exact, ~25–60 ms for 30 layers × 9 heads instead of ~2 ms.
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

from policies.cost import CostModel, Observation, Profile, StepCtx, Terms, Weights, objective, predict
from policies.plan import FfnMode, LayerPlan, Plan, Side, cloud_only, edge_only, layer_split
from policies.segments import FRAME_OP_BYTES, CloudOpKind, EdgeOpKind, ModelDims, Reg
from splitwise_device.errors import InvalidArgumentError, PlanError

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

PLANNER_NAMES = ("edge-only", "cloud-only", "layer-split", "layer-dp", "splitwise-dp")


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
            wire = m.wire_s(2 * FRAME_OP_BYTES)
            return Terms(latency=wire, tx=wire, bytes_up=FRAME_OP_BYTES, bytes_down=FRAME_OP_BYTES)

        def cloud(kind: CloudOpKind, heads: tuple[int, ...] = ()) -> Callable[[StepCtx], Terms]:
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

        def segment(
            reg_in: Reg, kind: CloudOpKind, reg_out: Reg, heads: tuple[int, ...] = ()
        ) -> Callable[[StepCtx], Terms]:
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
        lm_tail = seq(cloud(CloudOpKind.LM_HEAD), op_share, msg(Reg.LOGITS, False, 0))
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
        self.whole_cloud_cost = sc(seq(cloud(CloudOpKind.LAYER), op_share)) if self.link else inf

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
                        segment(Reg.X_NORM, CloudOpKind.ATTN_PART, Reg.ATTN_CLOUD, ch),
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
                                segment(Reg.FFN_MID, CloudOpKind.FFN_DOWN, Reg.FFN_OUT),
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
                                segment(Reg.H_NORM, CloudOpKind.FFN, Reg.FFN_OUT),
                                edge(EdgeOpKind.ADD),
                            )
                        ),
                        St.E_STAR,
                    ),
                    (
                        FfnMode.CLOUD,
                        sc(seq(msg(Reg.H, True, 0), cloud(CloudOpKind.RESIDUAL_FFN), op_share)),
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
            work = m.cloud_op_s(CloudOpKind.ATTN_PART, ch, step)
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
    back: list[dict[St, tuple[St, _Choice]]] = []
    for ell in range(n_layer):
        table = best_locked if ell < k else best_free
        nxt: dict[St, tuple[float, float]] = {}
        bp: dict[St, tuple[St, _Choice]] = {}
        for (a, b), (pen, cost, ch) in table.items():
            if a in value:
                v = (value[a][0] + pen, value[a][1] + cost)
                if v[0] < nxt.get(b, (math.inf, math.inf))[0]:
                    nxt[b], bp[b] = v, (a, ch)
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
    st = final[2]
    for bp in reversed(back):
        a, ch = bp[st]
        choices.append(ch)
        st = a
    choices.reverse()
    memory = fixed[final[3]] + sum(c.memory for c in choices)
    return _Sol(final[1], tuple(choices), final[3], memory)


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


def _solve_pareto(tab: _Tables, free: Trans, locked: Trans, k: int, n_layer: int, budget: int) -> _Sol:
    """Exact DP under the memory budget: per state the Pareto front of (objective, memory).

    Branch and bound keeps it small: a partial plan is dropped when its memory plus the least
    memory the remaining layers need exceeds the budget, or when its objective plus the
    unconstrained cost-to-go of its state exceeds a feasible solution's objective (found by
    pricing memory, Lagrangian style). Both bounds are admissible, so the result stays exact.
    """
    bound = _lagrangian_bound(tab, free, locked, k, n_layer, budget)
    if bound is None:
        raise PlanError(f"no plan fits the edge memory budget of {budget} bytes")
    incumbent, lam = bound
    ub = incumbent.objective
    slack = 1e-9 * (abs(ub) + lam * budget) + 1e-15
    fr_free: dict[tuple[St, St], list[tuple[float, int, object]]] = {key: _front(v) for key, v in free.items()}
    fr_locked = {key: _front(v) for key, v in locked.items()} if k else fr_free
    min_fixed = min(tab.m.fixed_memory(side) for side in Side)
    # Least memory still to come after layer ell, and per state the least objective + lam·memory
    # still to come (lam = 0 and the incumbent's price). A completion that fits spends at most
    # budget − used memory, so its objective is ≥ togo_lam[s] − lam·(budget − used).
    tail_mem = [0] * (n_layer + 1)
    for ell in range(n_layer - 1, -1, -1):
        trans = locked if ell < k else free
        tail_mem[ell] = tail_mem[ell + 1] + min(c[1] for v in trans.values() for c in v)

    def cost_to_go(price: float) -> list[dict[St, float]]:
        togo: list[dict[St, float]] = [{} for _ in range(n_layer + 1)]
        togo[n_layer] = {s: min(c + price * tab.m.fixed_memory(side) for c, side in opts) for s, opts in tab.lm.items()}
        for ell in range(n_layer - 1, -1, -1):
            trans = locked if ell < k else free
            for (a, b), opts in trans.items():
                if b in togo[ell + 1]:
                    v = min(c[0] + price * c[1] for c in opts) + togo[ell + 1][b]
                    if v < togo[ell].get(a, math.inf):
                        togo[ell][a] = v
        return togo

    togo0, togo_lam = cost_to_go(0.0), cost_to_go(lam)
    # Fronts as numpy arrays; per layer and state, back-pointers (previous state, index, choice).
    choice_list: list[_Choice] = []
    arrays: dict[tuple[bool, St, St], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for lock, table in ((False, fr_free), (True, fr_locked)):
        for (a, b), options in table.items():
            idx = np.arange(len(choice_list), len(choice_list) + len(options))
            choice_list.extend(o[2] for o in options)  # type: ignore[misc]
            oc = np.array([o[0] for o in options], dtype=np.float64)
            om = np.array([o[1] for o in options], dtype=np.int64)
            arrays[(lock, a, b)] = (oc, om, idx)
    fc: dict[St, np.ndarray] = {St.E: np.array([tab.embed])}
    fm: dict[St, np.ndarray] = {St.E: np.array([0], dtype=np.int64)}
    back: list[dict[St, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    for ell in range(n_layer):
        lock = ell < k
        mem_cap = budget - tail_mem[ell + 1] - min_fixed
        parts: dict[St, list[tuple[np.ndarray, ...]]] = {}
        for (lk, a, b), (oc, om, idx) in arrays.items():
            if lk is not lock or a not in fc:
                continue
            cost = (fc[a][:, None] + oc[None, :]).ravel()
            mem = (fm[a][:, None] + om[None, :]).ravel()
            h0 = togo0[ell + 1].get(b, math.inf)
            h_lam = togo_lam[ell + 1].get(b, math.inf)
            ok = (mem <= mem_cap) & (cost + h0 <= ub + slack) & (cost + h_lam - lam * (budget - mem) <= ub + slack)
            if not ok.any():
                continue
            prev_idx = np.repeat(np.arange(len(fc[a])), len(oc))[ok]
            ch_idx = np.tile(idx, len(fc[a]))[ok]
            prev_st = np.full(prev_idx.shape, int(a))
            parts.setdefault(b, []).append((cost[ok], mem[ok], prev_st, prev_idx, ch_idx))
        fc, fm = {}, {}
        bp: dict[St, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for b, plist in parts.items():
            cost, mem, pst, pidx, cidx = (np.concatenate([p[i] for p in plist]) for i in range(5))
            order = np.lexsort((cost, mem))  # memory ascending, then objective
            cs = cost[order]
            keep = np.ones(len(cs), dtype=bool)
            keep[1:] = cs[1:] < np.minimum.accumulate(cs)[:-1]
            sel = order[keep]
            fc[b], fm[b] = cost[sel], mem[sel]
            bp[b] = (pst[sel], pidx[sel], cidx[sel])
        back.append(bp)
    best: tuple[float, int, St, int, Side] | None = None
    for st, costs in fc.items():
        for c, side in tab.lm[st]:
            fixed = tab.m.fixed_memory(side)
            total = np.where(fm[st] + fixed <= budget, costs + c, math.inf)
            i = int(np.argmin(total))
            if total[i] < incumbent.objective and (best is None or total[i] < best[0]):
                best = (float(total[i]), int(fm[st][i]) + fixed, st, i, side)
    if best is None:
        return incumbent
    choices: list[_Choice] = []
    st, i = best[2], best[3]
    for bp in reversed(back):
        pst, pidx, cidx = bp[st]
        choices.append(choice_list[int(cidx[i])])
        st, i = St(int(pst[i])), int(pidx[i])
    choices.reverse()
    return _Sol(best[0], tuple(choices), best[4], best[1])


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


_FACTORIES: dict[str, Callable[[PlanningContext], Planner]] = {
    "edge-only": EdgeOnlyPlanner,
    "cloud-only": CloudOnlyPlanner,
    "layer-split": LayerSplitPlanner,
    "layer-dp": LayerDpPlanner,
    "splitwise-dp": SplitwiseDpPlanner,
}


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
