"""The device, simulated: one scenario realisation served the way the agent serves it, one decision
per request, with the agent's own view of the world.

- **Queue discipline** as in ``splitwise_device.agent``: requests wait in one FIFO queue and are
  served one at a time (one serving thread); the plan is chosen when a request starts (the agent
  decides in its serving thread, after dequeuing).
- **The agent's view is the agent's code**: a real :class:`~splitwise_device.controller.Controller`
  on simulated time builds every observation. Its `LinkEstimator` is fed by the simulated transfers
  (a prefill and a decode segment per request that offloads) and by probes (64 B and 64 KiB at the
  true link, inline when the estimate is stale); its arrival rate, service-time EWMA (the work
  queue U), energy queue Z and edge/cloud load calibration are updated by `Controller.completed`
  exactly as on the device. So a policy learns with the lag and noise it will have.
- **What really happens** is the one cost model (``policies.cost.predict``) evaluated on the *true*
  state at the start of service (link, cloud load, edge slowdown from the scenario), times a
  log-normal noise factor exp(N(0, `noise_sd`)); :data:`MEASURED_NOISE_SD` is the fit to the residuals
  of ``bench/validate_cost_model.py`` (the CLI's default; the class defaults to 0 for exact tests).
  A plan that needs the cloud while the link is cut waits out the recovery budget
  (`fallback_wait_s`) and then runs on the edge, like the executor's edge fallback.
- **Reward** = −(drift-plus-penalty) of what happened, computed by ``policies.cost.objective`` with
  the controller's weights and queues at decision time: the same function the planners minimise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from policies.cost import Observation, Prediction, Weights, objective, predict
from policies.plan import Plan, edge_only
from policies.segments import ModelDims, compile_plan
from splitwise_core.profile import Profile
from splitwise_device.config import PlanningConfig
from splitwise_device.controller import Controller, Decision, InlinePlan, PlanChoice, Served
from splitwise_device.profile_store import ProfileStore
from training.processes import Request, Timeline

__all__ = ["MEASURED_NOISE_SD", "Outcome", "PlanChooser", "Simulator", "fixed", "inline"]

MEASURED_NOISE_SD = 0.078
"""σ of ln(measured / predicted) latency, fitted to the cost-model validation on the testbed
(docs/cost-model-validation.md, 90 random plans on three links: median |error| 5.4 %). For a log-normal
factor, median |ln r| = 0.6745 σ, so σ = ln(1.054) / 0.6745 = 0.078. The same run's P90 |error| (7–24 %
by link) suggests σ ≈ 0.10 in the tails: the measured errors are a little heavier-tailed than this."""

PROBE_SMALL_BYTES = 64
PROBE_LARGE_BYTES = 64 * 1024


PlanChooser = Callable[["Simulator", Request], PlanChoice]
"""What :meth:`Simulator.run` asks per request: a planner name, a plan spec or a learned policy's plan."""


@dataclass(frozen=True)
class Outcome:
    """One served request: what the agent decided and saw, and what happened."""

    request: Request
    started_s: float
    finished_s: float
    decision: Decision
    latency_s: float  # service time (start of service to the last token)
    energy_j: float
    fell_back: bool
    reward: float  # −objective(what happened, the decision's observation, the weights)

    @property
    def response_s(self) -> float:
        """Arrival to the last token: queueing plus service."""
        return self.finished_s - self.request.at_s


@dataclass
class _Queue:
    waiting: list[Request] = field(default_factory=list)
    next_arrival: int = 0


class Simulator:
    """Serves one realisation of a scenario (`timeline`). Drive it with :meth:`run` (a planner choice
    per request) or step by step: :meth:`next_request` then :meth:`serve`."""

    def __init__(
        self,
        timeline: Timeline,
        edge_profile: Profile,
        cloud_profile: Profile,
        dims: ModelDims,
        *,
        codec: str = "q8_0",
        planning: PlanningConfig | None = None,
        memory_budget_bytes: int | None = None,
        noise_sd: float = 0.0,
        fallback_wait_s: float = 20.0,
        seed: int = 0,
    ) -> None:
        self.timeline = timeline
        self.dims = dims
        self.codec = codec
        self.edge_profile, self.cloud_profile = edge_profile, cloud_profile
        self.planning = planning or PlanningConfig()
        self.noise_sd = noise_sd
        self.fallback_wait_s = fallback_wait_s
        self._noise = np.random.default_rng(seed)
        self.now = 0.0
        self.controller = Controller(
            self.planning,
            dims,
            codec=codec,
            profiles=ProfileStore(edge_profile, cloud={"sim": cloud_profile}),
            link_up=lambda: math.isfinite(self.timeline.link.at(self.now)[1]),
            probe=self._probe,
            memory_budget_bytes=memory_budget_bytes,
            clock=lambda: self.now,
            probe_in_background=False,
        )
        self.weights: Weights = self.controller.weights  # the agent's, not a copy
        self._queue = _Queue()
        self._edge_only = compile_plan(edge_only(dims.n_layer, dims.n_head), dims)

    # --- the world ----------------------------------------------------------------------------------

    def true_observation(self, request: Request) -> Observation:
        """The state the request really meets at the start of its service."""
        bandwidth, rtt = self.timeline.link.at(self.now)
        return Observation(
            bandwidth_bps=bandwidth,
            rtt_s=rtt,
            prompt_len=request.prompt_len,
            max_tokens=request.max_tokens,
            cloud_load=self.timeline.cloud_load.at(self.now),
            edge_load=self.timeline.edge_load.at(self.now),
        )

    def _probe(self) -> list[_Sample]:
        bandwidth, rtt = self.timeline.link.at(self.now)
        if not math.isfinite(rtt):
            return []
        return [
            _Sample(size, PROBE_SMALL_BYTES, rtt + 8 * (size + PROBE_SMALL_BYTES) / bandwidth, 0.0)
            for size in (PROBE_SMALL_BYTES, PROBE_LARGE_BYTES)
        ]

    # --- serving ------------------------------------------------------------------------------------

    def _admit_arrivals(self, until: float) -> None:
        requests, q = self.timeline.requests, self._queue
        while q.next_arrival < len(requests) and requests[q.next_arrival].at_s <= until:
            arrival = requests[q.next_arrival]
            self.controller.arrival(arrival.at_s)
            q.waiting.append(arrival)
            q.next_arrival += 1

    def next_request(self) -> Request | None:
        """The request served next (the device idles until it arrives), or None at the end."""
        q, requests = self._queue, self.timeline.requests
        if not q.waiting:
            if q.next_arrival >= len(requests):
                return None
            self.now = max(self.now, requests[q.next_arrival].at_s)
        self._admit_arrivals(self.now)
        return q.waiting[0]

    @property
    def backlog(self) -> int:
        """Requests waiting behind the one about to be served."""
        return max(len(self._queue.waiting) - 1, 0)

    def decide(self, choice: PlanChoice) -> Decision:
        """The controller's decision for the next request, as the agent makes it."""
        request = self._queue.waiting[0]
        return self.controller.decide(choice, request.prompt_len, request.max_tokens, self.backlog)

    def observe(self) -> Observation:
        """The agent's observation for the next request, without deciding (for a learned policy)."""
        request = self._queue.waiting[0]
        return self.controller.observation(request.prompt_len, request.max_tokens, self.backlog)

    def serve(self, decision: Decision) -> Outcome:
        """Serves the next request under `decision`: time passes, the controller learns."""
        request = self._queue.waiting.pop(0)
        started = self.now
        truth = self.true_observation(request)
        schedule = decision.schedule
        fell_back = bool(schedule.cloud_round_trips) and not truth.link_up
        actual = predict(
            self._edge_only if fell_back else schedule,
            truth,
            self.edge_profile,
            self.cloud_profile,
            self.dims,
            self.codec,
        )
        noise = float(np.exp(self._noise.normal(0.0, self.noise_sd))) if self.noise_sd > 0 else 1.0
        latency = actual.latency_s * noise + (self.fallback_wait_s if fell_back else 0.0)
        energy = actual.energy_j * noise
        if schedule.cloud_round_trips and not fell_back:
            self._feed_transfers(actual, truth)
        self.now = started + latency
        self.controller.completed(decision, _served(request, actual, latency, noise, fell_back))
        happened = replace(actual, latency_s=latency, energy_j=energy)
        reward = -objective(happened, decision.observation, self.weights) if decision.observation else 0.0
        self._admit_arrivals(self.now)
        return Outcome(request, started, self.now, decision, latency, energy, fell_back, reward)

    def _feed_transfers(self, actual: Prediction, truth: Observation) -> None:
        """One prefill and one decode segment, at the true link, into the agent's link estimator."""
        b = actual.breakdown
        trips = max(b.get("cloud_round_trips_per_step", 1.0), 1.0)
        for phase in ("prefill", "decode"):
            up = int(b.get(f"{phase}_bytes_up", 0.0) / trips)
            down = int(b.get(f"{phase}_bytes_down", 0.0) / trips)
            network = truth.rtt_s + 8 * (up + down) / truth.bandwidth_bps
            self.controller.link.observe(up, down, network, 0.0, now=self.now)

    def run(self, choose: PlanChooser) -> Iterator[Outcome]:
        """Serves every request of the timeline, asking `choose` for each one's plan choice."""
        while (request := self.next_request()) is not None:
            yield self.serve(self.decide(choose(self, request)))


def fixed(choice: PlanChoice) -> PlanChooser:
    """Always the same choice: a registry planner, a plan spec, or an inline plan."""
    return lambda _sim, _request: choice


def inline(plan: Plan) -> PlanChooser:
    return fixed(InlinePlan(plan))


@dataclass(frozen=True)
class _Sample:
    bytes_up: int
    bytes_down: int
    round_trip_s: float
    compute_s: float


def _served(request: Request, actual: Prediction, latency: float, noise: float, fell_back: bool) -> Served:
    """What the agent's controller learns from this request (as from the executor's result)."""
    b, decodes = actual.breakdown, request.max_tokens - 1
    by_kind: dict[str, float] = {}
    for key, value in b.items():
        phase, _, kind = key.partition("_edge_s.")
        if kind and phase in ("prefill", "decode"):
            by_kind[kind] = by_kind.get(kind, 0.0) + value * noise * (1 if phase == "prefill" else decodes)
    if fell_back:
        by_kind = {"FORWARD": sum(by_kind.values())}
    cloud = (b.get("prefill_cloud_compute_s", 0.0) + decodes * b.get("decode_cloud_compute_s", 0.0)) * noise
    return Served(
        service_s=latency,
        steps=request.max_tokens,
        cloud_compute_s=0.0 if fell_back else cloud,
        fell_back=fell_back,
        edge_compute_by_kind=by_kind,
    )
