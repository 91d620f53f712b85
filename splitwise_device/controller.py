"""The agent's control loop: from what the device measures to a plan for each request.

`Controller` keeps the estimates a planner needs (DESIGN §7) and turns them into an
:class:`policies.cost.Observation` per request:

- link: bandwidth and RTT from every cloud transfer (`LinkEstimator`, passive) plus a
  rate-limited active probe when transfers have not refreshed the estimate for a while; the
  link counts as cut while the broker connection is down or nobody answers the probe;
- edge backlog: queued requests times the measured service time per request (EWMA), which is
  also the Lyapunov work queue U (seconds);
- cloud service time: the ratio of the time workers report (`compute_us` + `queue_us`) to the cloud
  profile's prediction for the same segments, as an EWMA → `cloud_load`; likewise the edge's own
  compute time against its profile → `edge_load`, and per op kind → `edge_op_load` (both sides
  calibrated alike);
- energy queue Z(t+1) = max(Z + E − E_budget, 0) with E the chosen plan's predicted energy
  (there is no power sensor to read on most devices);
- arrival rate (`RateEstimator`).

Profiles come from the device's :class:`~splitwise_device.profile_store.ProfileStore`: its own
(configured, or measured once at first need and cached in the state directory) and the cloud's
(published by the pool's workers, or configured as a fallback). Without a cloud profile the device
cannot reason about offloading and plans stay on the edge.

A request's plan comes from a :data:`PlanChoice` (a named planner, a plan spec or an inline plan);
the :class:`Decision` carries the plan compiled once into the schedule the executor runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from policies.cost import Observation, Prediction, Weights, predict
from policies.plan import Plan, parse_plan
from policies.planners.context import Planner, PlanningContext
from policies.planners.registry import COST_MODEL_PLANNERS, make_planner
from policies.segments import ModelDims, Schedule, compile_plan
from splitwise_core.errors import InvalidArgumentError
from splitwise_core.lyapunov import Ewma, QueueBank
from splitwise_core.profile import Profile
from splitwise_device.config import PlanningConfig
from splitwise_device.estimators import LinkEstimator, RateEstimator
from splitwise_device.executor import SplitResult
from splitwise_device.profile_store import ProfileStore

log = logging.getLogger(__name__)


class ProbeSample(Protocol):
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    @property
    def round_trip_s(self) -> float: ...
    @property
    def compute_s(self) -> float: ...


@dataclass(frozen=True)
class NamedPlanner:
    """Run the registry's planner `name` (policies.planners.registry)."""

    name: str

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class PlanSpec:
    """Run one fixed plan given by name (``layer-split:K``, ``heads:N``, ``edge-only``, ...) or, from
    the device's own config only, a plan file (policies.plan.parse_plan)."""

    spec: str

    @property
    def label(self) -> str:
        return self.spec


@dataclass(frozen=True)
class InlinePlan:
    """Run the plan a request carried (already validated for the model)."""

    plan: Plan

    @property
    def label(self) -> str:
        return "request"


PlanChoice = NamedPlanner | PlanSpec | InlinePlan
"""Where a request's plan comes from."""


@dataclass(frozen=True)
class Decision:
    """A request's plan, compiled once into the schedule the executor runs, and, when the profiles
    allow it, what the cost model expects of it."""

    choice: PlanChoice
    schedule: Schedule
    observation: Observation | None
    prediction: Prediction | None
    decision_s: float  # the whole decision: link refresh (maybe a probe), observation, planner
    cloud_worker: str | None = None  # whose profile the prediction used
    planner_s: float = 0.0  # the planner's own share

    @property
    def plan(self) -> Plan:
        return self.schedule.plan

    @property
    def planner(self) -> str:
        """How the replies name the choice: the planner, the plan spec, or "request"."""
        return self.choice.label

    def to_json(self, steps: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "planner": self.planner,
            "decision_ms": 1e3 * self.decision_s,
            "planner_ms": 1e3 * self.planner_s,
        }
        obs, pred = self.observation, self.prediction
        if obs is not None:
            out["observation"] = {
                "bandwidth_bps": obs.bandwidth_bps,
                "rtt_ms": 1e3 * obs.rtt_s if math.isfinite(obs.rtt_s) else None,
                "backlog_requests": obs.backlog_requests,
                "backlog_s": obs.backlog_s,
                "arrival_rate": obs.arrival_rate,
                "cloud_load": obs.cloud_load,
                "edge_load": obs.edge_load,
                "edge_op_load": dict(obs.edge_op_load),
                "energy_queue_z": obs.energy_queue_z,
            }
        if pred is not None and math.isfinite(pred.latency_s):
            out["predicted"] = {
                "latency_s": pred.latency_s,
                "prefill_s": pred.prefill_s,
                "decode_ms_per_token": 1e3 * pred.decode_s_per_token,
                "energy_j": pred.energy_j,
                "accuracy_cost": pred.accuracy_cost,
                "edge_memory_bytes": pred.edge_memory_bytes,
                "cloud_profile": self.cloud_worker,
            }
            if steps is not None:
                # Generation may stop early (end of text): the latency the plan predicts for the steps
                # that ran (a step that produced the end-of-text token counts, though it is no token).
                out["predicted"]["latency_s_for_completion"] = (
                    pred.prefill_s + max(steps - 1, 0) * pred.decode_s_per_token
                )
        return out


@dataclass(frozen=True)
class Served:
    """What the controller learns from one finished request: its service time, its token steps, the
    cloud's compute time, whether it fell back to the edge, and the edge's compute time by op kind
    (``SplitResult.edge_compute_by_kind``). The agent makes it from the executor's result; the
    simulator makes it directly, without one timing object per token."""

    service_s: float
    steps: int
    cloud_compute_s: float
    fell_back: bool
    edge_compute_by_kind: Mapping[str, float]

    @classmethod
    def from_result(cls, result: SplitResult) -> Served:
        return cls(
            service_s=sum(step.seconds for step in result.steps),
            steps=len(result.steps),
            cloud_compute_s=result.transfer.cloud_compute_s,
            fell_back=result.fell_back_to_edge,
            edge_compute_by_kind=result.edge_compute_by_kind,
        )


class Controller:
    def __init__(
        self,
        planning: PlanningConfig,
        dims: ModelDims,
        *,
        codec: str,
        profiles: ProfileStore,
        link_up: Callable[[], bool],
        probe: Callable[[], Sequence[ProbeSample] | None] | None = None,
        memory_budget_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_in_background: bool = True,
    ) -> None:
        if planning.min_edge_layers > dims.n_layer:
            raise InvalidArgumentError(
                f"planning.min_edge_layers = {planning.min_edge_layers} but the model has {dims.n_layer} layers"
            )
        self.planning = planning
        self.dims = dims
        self.codec = codec
        self.weights = Weights(planning.v, planning.w_latency, planning.w_energy, planning.w_accuracy)
        self.profiles = profiles
        self._link_up = link_up
        self._probe = probe
        self.memory_budget_bytes = memory_budget_bytes
        self._clock = clock
        # The simulator runs on simulated time: its probes must happen inline, in order.
        self._probe_in_background = probe_in_background
        self.link = LinkEstimator(planning.link_half_life_s, clock=clock)
        self.arrivals = RateEstimator()
        self.cloud_load = Ewma(planning.link_half_life_s)
        self.edge_load = Ewma(planning.link_half_life_s)
        self.edge_op_load: dict[str, Ewma] = {}
        self.service_s = Ewma(5.0)  # seconds per request, weighted per request
        self.queues = QueueBank(["energy"])
        self._lock = threading.Lock()
        self._context_cache: tuple[Profile, Profile, PlanningContext] | None = None
        # The planners built for one context, by name: a planner may keep state between decisions
        # (the learned one: its ONNX session and history window), so it lives as long as its context.
        self._planners: tuple[PlanningContext | None, dict[str, Planner]] = (None, {})
        self._probe_thread: threading.Thread | None = None

    # --- inputs ---------------------------------------------------------------------------------

    def arrival(self, at: float | None = None) -> None:
        """A request arrived (now, or at clock time `at`: the simulator admits arrivals in bulk)."""
        with self._lock:
            self.arrivals.arrival(self._clock() if at is None else at)

    def refresh_link(self) -> None:
        """Probes the link when real transfers have not refreshed the estimate lately.

        In the background when an estimate exists (a request never waits for a probe: on a slow
        link a probe pair takes a round trip plus 64 KiB each way), inline only when there is none
        yet (the first plan would otherwise see no link at all).
        """
        if self._probe is None or not self._link_up():
            return
        last = self.link.refreshed_at
        if last is not None and self._clock() - last < self.planning.probe_interval_s:
            return
        if self.link.rtt_s is None or self.link.bandwidth_bps is None or not self._probe_in_background:
            self._run_probe()
            return
        with self._lock:
            if self._probe_thread is not None and self._probe_thread.is_alive():
                return
            self._probe_thread = threading.Thread(target=self._run_probe, name="link-probe", daemon=True)
            self._probe_thread.start()

    def join_probe(self, timeout: float | None = None) -> None:
        """Waits for a background probe to finish (tests, shutdown)."""
        thread = self._probe_thread
        if thread is not None:
            thread.join(timeout)

    def _run_probe(self) -> None:
        assert self._probe is not None
        for s in self._probe() or ():
            self.link.observe(s.bytes_up, s.bytes_down, s.round_trip_s, min(s.compute_s, s.round_trip_s))

    def completed(self, decision: Decision, served: Served) -> None:
        """Feeds one finished request back: service time, edge and cloud load, energy queue."""
        steps, cloud_compute_s, fell_back = served.steps, served.cloud_compute_s, served.fell_back
        with self._lock:
            self.service_s.update(served.service_s)
            pred, obs = decision.prediction, decision.observation
            if pred is None or obs is None or not math.isfinite(pred.latency_s):
                return
            budget = self.planning.energy_budget_j
            if budget is not None:
                self.queues.step([pred.energy_j], [budget])
            if fell_back:
                return
            b = pred.breakdown
            decodes = max(steps - 1, 0)
            # Each prediction already had the loads applied; compare against the profiled speeds.
            # Both sides are calibrated alike, so a profile that is pessimistic on both machines
            # does not tilt plans towards the side that happens to be measured.
            cloud = b.get("prefill_cloud_compute_s", 0.0) + decodes * b.get("decode_cloud_compute_s", 0.0)
            if cloud > 0 and cloud_compute_s > 0 and obs.cloud_load > 0:
                self.cloud_load.update(cloud_compute_s / (cloud / obs.cloud_load))
            # The executor times the edge's model ops; codec work happens inside the transfers.
            measured = served.edge_compute_by_kind
            edge = b.get("prefill_edge_ops_s", 0.0) + decodes * b.get("decode_edge_ops_s", 0.0)
            edge_compute_s = sum(measured.values())
            if edge > 0 and edge_compute_s > 0 and obs.edge_load > 0:
                self.edge_load.update(edge_compute_s / (edge / obs.edge_load))
            self._calibrate_ops(pred, obs, decodes, measured)

    def _calibrate_ops(self, pred: Prediction, obs: Observation, decodes: int, measured: Mapping[str, float]) -> None:
        """Per op kind: the profile's error differs between kinds (short ops suffer most from how
        they were timed), and plans differ in their mix of kinds, so one factor cannot fit all."""
        b = pred.breakdown
        profiled: dict[str, float] = {}  # predicted seconds at load 1, by kind
        for key, value in b.items():
            phase, _, kind = key.partition("_edge_s.")
            if kind and phase in ("prefill", "decode"):
                factor = obs.edge_op_load.get(kind, obs.edge_load)
                weight = 1 if phase == "prefill" else decodes
                profiled[kind] = profiled.get(kind, 0.0) + weight * value / factor
        for kind, seconds in measured.items():
            # A whole local forward pass is the edge-only schedule: embedding, fused layers, LM head.
            kinds = [k for k in ("EMBED", "LAYER", "LM_HEAD") if k in profiled] if kind == "FORWARD" else [kind]
            expected = sum(profiled.get(k, 0.0) for k in kinds)
            if expected > 0 and seconds > 0:
                for k in kinds:
                    self.edge_op_load.setdefault(k, Ewma(self.planning.link_half_life_s)).update(seconds / expected)

    # --- decisions ------------------------------------------------------------------------------

    def observation(self, prompt_len: int, max_tokens: int, backlog_requests: int) -> Observation:
        with self._lock:
            service = self.service_s.value or 0.0
            backlog_s = backlog_requests * service
            up = self._link_up()
            bandwidth, rtt = self.link.bandwidth_bps, self.link.rtt_s
            return Observation(
                bandwidth_bps=(bandwidth or 0.0) if up else 0.0,
                rtt_s=rtt if up and rtt is not None else math.inf,
                prompt_len=prompt_len,
                max_tokens=max_tokens,
                backlog_requests=backlog_requests,
                backlog_s=backlog_s,
                arrival_rate=self.arrivals.per_second,
                cloud_load=self.cloud_load.value or 1.0,
                edge_load=self.edge_load.value or 1.0,
                edge_op_load={k: v.value for k, v in self.edge_op_load.items() if v.value},
                energy_queue_z=self.queues["energy"],
                work_queue_u=backlog_s,
                memory_budget_bytes=self.memory_budget_bytes,
            )

    def _context(self) -> tuple[PlanningContext, str] | None:
        profiles = self.profiles.cloud()
        if not profiles:
            return None
        # Workers of a pool are expected to be alike; cloud_load absorbs the difference.
        worker = min(profiles)
        edge, cloud = self.profiles.edge(), profiles[worker]
        cached = self._context_cache
        if cached is None or cached[0] is not edge or cached[1] is not cloud:
            ctx = PlanningContext(
                edge,
                cloud,
                self.dims,
                self.codec,
                self.weights,
                self.planning.min_edge_layers,
                policy=self.planning.policy,
            )
            self._context_cache = cached = (edge, cloud, ctx)
        return cached[2], worker

    def _planner(self, name: str, ctx: PlanningContext) -> Planner:
        """The planner `name` for `ctx`, built at its first use and again when the context changes
        (new profiles)."""
        with self._lock:
            built_for, planners = self._planners
            if built_for is not ctx:
                planners = {}
                self._planners = (ctx, planners)
            planner = planners.get(name)
            if planner is None:
                planner = planners[name] = make_planner(name, ctx)
            return planner

    def decide(self, choice: PlanChoice, prompt_len: int, max_tokens: int, backlog_requests: int) -> Decision:
        """The plan for one request and its prediction: a named planner plans (with the cost model
        when it needs one and the profiles allow); a plan spec or an inline plan is only predicted."""
        started = time.perf_counter()
        plan: Plan | None = None
        if isinstance(choice, InlinePlan):
            plan = choice.plan
        elif isinstance(choice, PlanSpec):
            plan = parse_plan(choice.spec, self.dims.n_layer, self.dims.n_head)
        elif choice.name not in COST_MODEL_PLANNERS:
            plan = parse_plan(choice.name, self.dims.n_layer, self.dims.n_head)
        if plan is None or not plan.is_edge_only():
            self.refresh_link()
        context = self._context()
        obs = self.observation(prompt_len, max_tokens, backlog_requests)
        if context is None:
            if plan is None:
                log.info("no cloud profile yet (no worker has published one): %s plans edge-only", choice.label)
                plan = parse_plan("edge-only", self.dims.n_layer, self.dims.n_head)
            return Decision(choice, compile_plan(plan, self.dims), obs, None, time.perf_counter() - started)
        ctx, worker = context
        planner_s = 0.0
        if plan is None:
            assert isinstance(choice, NamedPlanner)
            planning_started = time.perf_counter()
            plan = self._planner(choice.name, ctx).plan(obs)
            planner_s = time.perf_counter() - planning_started
        schedule = compile_plan(plan, self.dims)
        prediction = predict(schedule, obs, ctx.edge_profile, ctx.cloud_profile, self.dims, self.codec)
        return Decision(choice, schedule, obs, prediction, time.perf_counter() - started, worker, planner_s)
