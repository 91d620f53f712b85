"""Training the learned planner: imitation of ``splitwise-dp`` (optional warm start), then PPO with
clipping, GAE and two critics, in the simulator (``training/env.py``).

**Two cost streams, two critics.** Every served request costs the drift-plus-penalty objective
``penalty + drift`` with ``penalty = V·(w_L·latency + w_E·energy + w_A·accuracy)`` and
``drift = U·latency + Z·energy`` (U, Z: the agent's work and energy queues at decision time; the same
``policies.cost.objective`` the planners minimise, so ``penalty = objective − drift``). One value head
predicts the discounted penalty cost-to-go, the other the drift cost-to-go; each has its own GAE
advantage, and the policy's advantage is their sum, negated (costs, not rewards) and then normalised
over the batch. Summing keeps the objective's own weighting (V against the queues); separate heads
let each critic fit a stream of its own scale — the drift stream is near 0 while the queue is empty
and dominates when it builds up. Without the drift term (the Lyapunov ablation) the drift stream is
dropped from the return and the imitated expert is splitwise-dp with the queues zeroed: the policy then
learns the penalty alone.

Costs are divided by a fixed scale (the mean per-request cost of the first batch) so the critics'
targets are O(1), and capped at COST_CLIP of those units; the scale is kept in the checkpoint.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from policies.cost import CostModel, Observation
from policies.featurizer import N_FEATURES
from policies.learned import cut_options, memory_inputs
from policies.plan import FfnMode, Plan, Side
from policies.planners.context import PlanningContext
from policies.planners.dp import SplitwiseDpPlanner
from policies.segments import ModelDims
from training.env import SplitwiseEnv
from training.policy import Actions, PolicyInputs, PolicyNet

__all__ = ["EvalResult", "TrainConfig", "Trainer", "actions_of_plan"]

_IMPOSSIBLE = -1e6  # a log-probability below this includes a masked choice

COST_CLIP = 50.0
"""Per-request cost cap, in units of the first batch's mean cost."""

_FFN_INDEX = {FfnMode.EDGE: 0, FfnMode.CLOUD: 1, FfnMode.SPLIT: 2}


@dataclass
class TrainConfig:
    steps: int = 20_000  # PPO decisions (imitation decisions come on top)
    envs: int = 4
    rollout: int = 128  # decisions per environment per update
    epochs: int = 4
    minibatch: int = 256
    lr: float = 3e-4
    gamma: float = 0.95
    lam: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.001
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    layer_temperature: float = 0.25  # PPO explores mostly at the high level (see PolicyNet.forward)
    history: int = 8
    imitation_steps: int = 2_000  # decisions of splitwise-dp to imitate first (0: none)
    imitation_epochs: int = 30
    imitation_lr: float = 1e-3  # supervised: a larger step than PPO's
    imitation_rounds: int = 4  # the first follows the expert, the others the policy (DAgger)
    drift: bool = True  # False: the penalty-only ablation
    seed: int = 0


@dataclass
class EvalResult:
    """A policy (or a planner) served over held-out realisations."""

    objective: float  # mean per-request drift-plus-penalty (what the planners minimise)
    latency_mean_s: float  # service time
    latency_p95_s: float
    response_p95_s: float  # arrival to last token
    requests: int
    backlog: list[int] = field(default_factory=list)  # queue length seen at each decision, in order


def actions_of_plan(plan: Plan, dims: ModelDims) -> tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    """A plan in the policy's action terms: (cut index, head_cloud [L, H], ffn_mode [L], lm_head_cloud).
    The cut is the largest cut option whose layers are all whole on the edge in the plan."""
    heads = np.ones((dims.n_layer, dims.n_head), dtype=np.int64)
    modes = np.zeros(dims.n_layer, dtype=np.int64)
    for ell, lp in enumerate(plan.layers):
        heads[ell, list(lp.edge_heads)] = 0
        modes[ell] = _FFN_INDEX[lp.ffn]
    whole_edge = [lp.all_on(Side.EDGE, plan.n_head) for lp in plan.layers]
    leading = next((i for i, e in enumerate(whole_edge) if not e), dims.n_layer)
    if plan.lm_head is Side.CLOUD and leading == dims.n_layer:
        leading = dims.n_layer - 1  # all layers on the edge but the LM head in the cloud: not the all-edge cut
    cut = max(i for i, c in enumerate(cut_options(dims.n_layer)) if c <= leading)
    return cut, heads, modes, int(plan.lm_head is Side.CLOUD)


class _History:
    """The last K feature vectors, as the device keeps them."""

    def __init__(self, k: int) -> None:
        self.window = np.zeros((k, N_FEATURES), dtype=np.float32)

    def push(self, features: npt.NDArray[np.float32]) -> None:
        self.window = np.concatenate([self.window[1:], features[None]], axis=0)


@dataclass
class _Slot:
    """One environment being stepped, with the inputs of its next decision."""

    env: SplitwiseEnv
    history: _History
    features: npt.NDArray[np.float32]
    observation: Observation
    episode_objectives: list[float] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        make_env: Callable[[], SplitwiseEnv],
        dims: ModelDims,
        config: TrainConfig,
        *,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.dims = dims
        self.progress = progress
        # One thread: the networks are small, and torch's default (every core) oversubscribes a machine
        # that also runs the simulator or other jobs, which slows training many-fold.
        torch.set_num_threads(1)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.net = PolicyNet(dims, config.history)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.make_env = make_env
        self.slots = [self._start(make_env()) for _ in range(config.envs)]
        self.scale: float | None = None
        self.steps_done = 0
        self.updates = 0
        self.log_rows: list[dict[str, float]] = []
        env = self.slots[0].env
        assert env.sim is not None
        self._ctx = PlanningContext(
            env.edge_profile, env.cloud_profile, dims, env.codec, env.sim.weights, env.planning.min_edge_layers
        )
        self._expert = SplitwiseDpPlanner(self._ctx)

    # --- environments -------------------------------------------------------------------------------

    def _start(self, env: SplitwiseEnv, seed: int | None = None) -> _Slot:
        draw = int(self.rng.integers(2**62)) if seed is None else seed
        features, info = env.reset(seed=draw)
        return _Slot(env, _History(self.config.history), features, info["observation"])

    def _inputs(self, slots: Sequence[_Slot]) -> PolicyInputs:
        memory = [memory_inputs(self._model(s)) for s in slots]
        return PolicyInputs(
            torch.from_numpy(np.stack([s.features for s in slots])),
            torch.from_numpy(np.stack([s.history.window for s in slots])),
            torch.from_numpy(np.stack(memory)),
            torch.tensor([s.env.planning.min_edge_layers for s in slots], dtype=torch.int64),
        )

    def _model(self, slot: _Slot) -> CostModel:
        env = slot.env
        return CostModel(slot.observation, env.edge_profile, env.cloud_profile, env.dims, env.codec)

    def _step(
        self, slot: _Slot, head_cloud: npt.NDArray[np.int64], ffn: npt.NDArray[np.int64], lm: int
    ) -> tuple[float, float, bool]:
        """Serves the slot's request under the action; (penalty cost, drift cost, episode over)."""
        action = np.concatenate([head_cloud.reshape(-1), ffn, [lm]]).astype(np.int64)
        features, reward, terminated, truncated, info = slot.env.step(action)
        outcome = slot.env.last_outcome
        assert outcome is not None and outcome.decision.observation is not None
        obs = outcome.decision.observation
        drift = obs.work_queue_u * outcome.latency_s + obs.energy_queue_z * outcome.energy_j
        penalty = -reward - drift
        slot.episode_objectives.append(-reward)
        slot.history.push(slot.features)
        done = terminated or truncated
        if done:
            fresh = self._start(slot.env)
            slot.history, slot.features, slot.observation = fresh.history, fresh.features, fresh.observation
        else:
            slot.features, slot.observation = features, info["observation"]
        return penalty, drift, done

    # --- imitation --------------------------------------------------------------------------------

    def imitate(self) -> float:
        """Imitation of splitwise-dp, DAgger style; returns the final mean negative log-likelihood.

        Round 1 follows the expert; later rounds follow the policy being trained (sampling) and label
        the states it reaches with the expert's plan, so the policy also learns what the expert does
        in the states its own mistakes lead to (a queue built up, a link it misjudged). Every round
        trains on all labels so far."""
        cfg = self.config
        if cfg.imitation_steps <= 0:
            return math.nan
        inputs: list[PolicyInputs] = []
        targets: list[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64], int]] = []
        costs: list[float] = []
        rounds = max(1, min(cfg.imitation_rounds, cfg.imitation_steps // len(self.slots)))
        bar = _bar(cfg.imitation_steps, "imitating splitwise-dp", self.progress)
        loss_value = math.nan
        for round_index in range(rounds):
            goal = cfg.imitation_steps * (round_index + 1) // rounds
            round_start = len(costs)
            while len(targets) < goal:
                x = self._inputs(self.slots)
                if round_index:
                    with torch.no_grad():
                        acted: Actions | None = self.net(x, "sample", layer_temperature=cfg.layer_temperature).actions
                else:
                    acted = None
                for i, slot in enumerate(self.slots):
                    target = actions_of_plan(self._expert.plan(self._expert_view(slot.observation)), self.dims)
                    inputs.append(x.index(torch.tensor([i])))
                    targets.append(target)
                    if acted is None:
                        head, ffn, lm = target[1], target[2], target[3]
                    else:
                        head, ffn = acted.head_cloud[i].numpy(), acted.ffn_mode[i].numpy()
                        lm = int(acted.lm_head_cloud[i])
                    penalty, drift, _ = self._step(slot, head, ffn, lm)
                    costs.append(penalty + drift)
                    bar.update(1)
            if self.scale is None:
                self.scale = max(float(np.mean(costs)), 1e-9)  # the expert's cost: what the policy should reach
            loss_value = self._fit(inputs, targets)
            bar.set_postfix(nll=f"{loss_value:.3f}", round_cost=f"{np.mean(costs[round_start:]):.3g}")
        bar.close()
        return loss_value

    def _expert_view(self, observation: Observation) -> Observation:
        """What the imitated planner sees: the agent's observation, without the queues when training
        without the drift term (the expert is then the penalty-only splitwise-dp)."""
        if self.config.drift:
            return observation
        return replace(observation, work_queue_u=0.0, energy_queue_z=0.0)

    def _fit(
        self,
        inputs: Sequence[PolicyInputs],
        targets: Sequence[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64], int]],
    ) -> float:
        cfg = self.config
        x = _cat_inputs(inputs)
        given = Actions(
            torch.tensor([t[0] for t in targets]),
            torch.from_numpy(np.stack([t[1] for t in targets])),
            torch.from_numpy(np.stack([t[2] for t in targets])),
            torch.tensor([t[3] for t in targets]),
        )
        n = len(targets)
        losses: list[float] = []
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.imitation_lr
        for _ in range(cfg.imitation_epochs):
            losses = []
            order = torch.randperm(n)
            for start in range(0, n, cfg.minibatch):
                idx = order[start : start + cfg.minibatch]
                out = self.net(x.index(idx), "evaluate", given.index(idx), cfg.layer_temperature)
                # An expert choice the policy's memory mask forbids has log-probability ≈ −1e9: such a
                # label is left out (a cap would do too, but a cap on the sum also stops the gradient of
                # every good label below it — at the start a whole plan has log-probability ≈ −200).
                possible = out.log_prob > _IMPOSSIBLE
                loss = -torch.where(possible, out.log_prob, torch.zeros_like(out.log_prob)).mean()
                self.optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                losses.append(float(loss.detach()))
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr
        return float(np.mean(losses))

    # --- PPO --------------------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One rollout of `rollout` decisions per environment, then `epochs` of PPO on it."""
        cfg = self.config
        started = time.perf_counter()
        T, N = cfg.rollout, len(self.slots)
        inputs: list[PolicyInputs] = []
        actions: list[Actions] = []
        log_probs = torch.zeros(T, N)
        values = torch.zeros(2, T + 1, N)
        costs = torch.zeros(2, T, N)
        dones = torch.zeros(T, N)
        objectives: list[float] = []
        for t in range(T):
            x = self._inputs(self.slots)
            with torch.no_grad():
                out = self.net(x, "sample", layer_temperature=cfg.layer_temperature)
            inputs.append(x)
            actions.append(out.actions)
            log_probs[t] = out.log_prob
            values[0, t], values[1, t] = out.value_penalty, out.value_drift
            for i, slot in enumerate(self.slots):
                a = out.actions
                penalty, drift, done = self._step(
                    slot, a.head_cloud[i].numpy(), a.ffn_mode[i].numpy(), int(a.lm_head_cloud[i])
                )
                costs[0, t, i], costs[1, t, i] = penalty, drift if cfg.drift else 0.0
                objectives.append(penalty + drift)
                dones[t, i] = float(done)
        with torch.no_grad():
            last = self.net(self._inputs(self.slots), "greedy")
        values[0, T], values[1, T] = last.value_penalty, last.value_drift
        if self.scale is None:
            self.scale = max(float(np.mean(objectives)), 1e-9)
        # Clipped so that one overloaded stretch (the drift term grows with the queue) cannot dominate a batch.
        costs = (costs / self.scale).clamp(max=COST_CLIP)
        advantages = torch.zeros(2, T, N)
        for stream in range(2):
            advantages[stream] = _gae(costs[stream], values[stream], dones, cfg.gamma, cfg.lam)
        returns = advantages + values[:, :T]
        advantage = -(advantages[0] + advantages[1])
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)

        x_all = _cat_inputs(inputs)
        a_all = _cat_actions(actions)
        flat = {
            "log_prob": log_probs.reshape(-1),
            "advantage": advantage.reshape(-1),
            "return_penalty": returns[0].reshape(-1),
            "return_drift": returns[1].reshape(-1),
        }
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac")
        }
        n = T * N
        for _ in range(cfg.epochs):
            order = torch.randperm(n)
            for start in range(0, n, cfg.minibatch):
                idx = order[start : start + cfg.minibatch]
                out = self.net(x_all.index(idx), "evaluate", a_all.index(idx), cfg.layer_temperature)
                ratio = torch.exp(out.log_prob - flat["log_prob"][idx])
                adv = flat["advantage"][idx]
                policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
                value_loss = 0.5 * (
                    (out.value_penalty - flat["return_penalty"][idx]).pow(2).mean()
                    + (out.value_drift - flat["return_drift"][idx]).pow(2).mean()
                )
                entropy = out.entropy.mean()
                loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(float(policy_loss))
                    stats["value_loss"].append(float(value_loss))
                    stats["entropy"].append(float(entropy))
                    stats["approx_kl"].append(float((flat["log_prob"][idx] - out.log_prob).mean()))
                    stats["clip_frac"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
        self.steps_done += n
        self.updates += 1
        row = {
            "update": float(self.updates),
            "steps": float(self.steps_done),
            "objective": float(np.mean(objectives)),
            **{k: float(np.mean(v)) for k, v in stats.items()},
            "seconds": time.perf_counter() - started,
        }
        self.log_rows.append(row)
        return row

    def train(self, log_csv: Path | None = None, checkpoint: Path | None = None) -> None:
        """PPO updates until `steps` decisions, logging each update and checkpointing after it."""
        cfg = self.config
        per_update = cfg.rollout * cfg.envs
        bar = _bar(cfg.steps, "PPO", self.progress, initial=self.steps_done)
        while self.steps_done < cfg.steps:
            row = self.update()
            bar.update(per_update)
            bar.set_postfix(objective=f"{row['objective']:.3f}", kl=f"{row['approx_kl']:.3f}")
            if log_csv is not None:
                _write_csv(log_csv, self.log_rows)
            if checkpoint is not None:
                self.save(checkpoint)
        bar.close()

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, env: SplitwiseEnv, seeds: Sequence[int], chooser: str = "policy") -> EvalResult:
        """Serves held-out realisations greedily with the policy (or ``"splitwise-dp"``)."""
        objectives: list[float] = []
        latencies: list[float] = []
        responses: list[float] = []
        backlog: list[int] = []
        for seed in seeds:
            slot = self._start(env, seed)
            done = False
            while not done:
                backlog.append(slot.observation.backlog_requests)
                if chooser == "policy":
                    with torch.no_grad():
                        a = self.net(self._inputs([slot]), "greedy").actions
                    head, ffn, lm = a.head_cloud[0].numpy(), a.ffn_mode[0].numpy(), int(a.lm_head_cloud[0])
                else:
                    _, head, ffn, lm = actions_of_plan(self._expert.plan(slot.observation), self.dims)
                before = len(slot.episode_objectives)
                _, _, done = self._step(slot, head, ffn, lm)
                objectives.append(slot.episode_objectives[before])
                outcome = env.last_outcome
                assert outcome is not None
                latencies.append(outcome.latency_s)
                responses.append(outcome.response_s)
        return EvalResult(
            float(np.mean(objectives)),
            float(np.mean(latencies)),
            float(np.percentile(latencies, 95)),
            float(np.percentile(responses, 95)),
            len(objectives),
            backlog,
        )

    # --- checkpoints ------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        state = {
            "config": asdict(self.config),
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scale": self.scale,
            "steps_done": self.steps_done,
            "updates": self.updates,
            "log_rows": self.log_rows,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state,
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint

    def load(self, path: Path) -> None:
        """Resumes from a checkpoint written by :meth:`save` with the same settings (ValueError if not)."""
        state: dict[str, Any] = torch.load(path, weights_only=False)
        saved = dict(state["config"])
        current = asdict(self.config)
        different = sorted(k for k in current if k != "steps" and saved.get(k) != current[k])
        if different:
            raise ValueError(
                f"checkpoint {path} was written with other settings: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in different)
            )
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scale = state["scale"]
        self.steps_done = int(state["steps_done"])
        self.updates = int(state["updates"])
        self.log_rows = list(state["log_rows"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.bit_generator.state = state["numpy_rng"]


def _gae(costs: Tensor, values: Tensor, dones: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates of a cost stream ([T, N]; values [T+1, N]); an episode's end
    does not bootstrap from the next episode's first state."""
    T = costs.shape[0]
    out = torch.zeros_like(costs)
    running = torch.zeros(costs.shape[1])
    for t in reversed(range(T)):
        keep = 1.0 - dones[t]
        delta = costs[t] + gamma * values[t + 1] * keep - values[t]
        running = delta + gamma * lam * keep * running
        out[t] = running
    return out


def _cat_inputs(parts: Sequence[PolicyInputs]) -> PolicyInputs:
    return PolicyInputs(
        torch.cat([p.features for p in parts]),
        torch.cat([p.history for p in parts]),
        torch.cat([p.memory for p in parts]),
        torch.cat([p.min_edge_layers for p in parts]),
    )


def _cat_actions(parts: Sequence[Actions]) -> Actions:
    return Actions(
        torch.cat([p.cut for p in parts]),
        torch.cat([p.head_cloud for p in parts]),
        torch.cat([p.ffn_mode for p in parts]),
        torch.cat([p.lm_head_cloud for p in parts]),
    )


def _write_csv(path: Path, rows: Sequence[dict[str, float]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _bar(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, unit="decision", dynamic_ncols=True)
