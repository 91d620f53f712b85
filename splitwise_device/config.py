"""Configuration of the edge agent (``device.toml``), built from the machinery in
:mod:`splitwise_core.config` (strict sections, every problem at once with its dotted path).

Loading (:func:`load_device_config`) never touches the files the config points to; it only parses
and validates. :meth:`DeviceConfig.check_files` is the second step that looks at the file system
(model present, TLS files readable, ...); ``splitwise-device check-config`` runs both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from splitwise_core.config import (
    BrokerConfig,
    ByteSize,
    ConfigPath,
    Identifier,
    LoggingConfig,
    Seconds,
    StrictSection,
    broker_file_problems,
    broker_summary,
    config_path,
    format_size,
    load_toml_model,
    model_problems,
    one_of,
    readable_file_problems,
    show_value,
)
from splitwise_core.profile import profile_file_problems

__all__ = [
    "FIXED_PLANNER",
    "AgentConfig",
    "CloudSection",
    "DeviceConfig",
    "DeviceSection",
    "PlanningConfig",
    "RecoveryConfig",
    "agent_planners",
    "load_device_config",
]


class DeviceSection(StrictSection):
    """``[device]``: who this device is and which model it runs."""

    id: Identifier
    """Device id, used in topics (``splitwise/v1/device/{id}/...``). Required; unique per broker."""
    model: ConfigPath
    """GGUF model file, or a directory of role shards made by ``splitwise-device shard``. Required."""
    threads: int | None = Field(default=None, ge=1, le=256)
    """Compute threads (1-256). Default: all CPUs this process may use."""
    memory_budget: ByteSize | None = Field(default=None, ge=1)
    """Upper bound for memory-mapped model shards (bytes or "512MiB"). Default: no bound."""
    state_dir: ConfigPath = Path("/var/lib/splitwise")
    """Where Lyapunov state snapshots and other persistent state go (systemd: StateDirectory)."""

    @property
    def effective_threads(self) -> int:
        """``threads``, or the number of CPUs this process may run on when it is not set."""
        if self.threads is not None:
            return self.threads
        try:
            return max(1, min(256, len(os.sched_getaffinity(0))))
        except (AttributeError, OSError):  # pragma: no cover - non-Linux
            return max(1, min(256, os.cpu_count() or 1))


def _looks_like_file(plan: str) -> bool:
    return "/" in plan or plan.endswith((".json", ".toml"))


def _plan_reference(value: str, info: ValidationInfo) -> str:
    """A plan file path (contains '/' or ends in .json/.toml) is made relative to the config file."""
    if _looks_like_file(value):
        return str(config_path(value, info))
    return value


Codec = Literal["f32", "f16", "q8_0", "q4_0"]

FIXED_PLANNER = "fixed"
"""``agent.planner`` value that runs ``agent.plan`` for every request instead of a planner."""

LEARNED_PLANNER = "splitwise-rl"
"""The planner that plans with ``planning.policy`` (:class:`policies.planners.learned.LearnedPlanner`)."""


def agent_planners() -> tuple[str, ...]:
    """The values ``agent.planner`` may take: every planner of the registry
    (:data:`policies.planners.registry.PLANNER_NAMES`) and ``fixed``.

    The registry holds exactly the planners the agent can build, so a config that loads (and so passes
    ``check-config``) names a planner that ``splitwise-device run`` can run; nothing else is accepted.
    """
    # Imported here: the registry brings numpy and the planners' cost model, which loading a config
    # (e.g. the cloud worker's) does not otherwise need.
    from policies.planners.registry import PLANNER_NAMES

    return (*PLANNER_NAMES, FIXED_PLANNER)


def _runnable_planner(value: str) -> str:
    names = agent_planners()
    if value not in names:
        raise ValueError(f"must be one of {one_of(names)} (got {show_value(value)})")
    return value


Planner = Annotated[str, AfterValidator(_runnable_planner)]
"""A planner the agent can run: one of :func:`agent_planners`."""


REQUEST_OVERHEAD_BYTES = 512 * 1024
"""What a request payload may hold besides its prompt (see :attr:`AgentConfig.max_request_bytes`)."""


class AgentConfig(StrictSection):
    """``[agent]``: how the device serves requests."""

    queue_size: int = Field(default=16, ge=1, le=100_000)
    """Requests that may wait while one runs; beyond that apps get an ``overloaded`` error."""
    max_prompt_bytes: ByteSize = Field(default=32768, ge=1, le=2**28)
    """Largest accepted prompt (UTF-8 bytes of ``prompt``/``messages``); larger requests are refused.
    It also bounds the whole request payload: see :attr:`max_request_bytes`."""
    max_json_depth: int = Field(default=32, ge=2, le=1000)
    """Deepest nesting of JSON arrays and objects a request may have; deeper payloads are refused
    with a ``bad_request`` error before they are parsed (a valid request nests 4 levels at most)."""
    max_prompt_tokens: int = Field(default=2048, ge=1, le=1_000_000)
    """Longest accepted prompt in tokens (after the chat template); longer requests are refused with
    ``bad_request`` before any compute. Prefill time grows with it: 2048 tokens take seconds on a
    Raspberry Pi class device."""
    max_tokens_limit: int = Field(default=2048, ge=1, le=1_000_000)
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = Field(default=256, ge=1)
    """``max_tokens`` of a request that does not say; at most ``max_tokens_limit``."""
    planner: Planner = "edge-only"
    """Partition planner: one of the registry's (edge-only, cloud-only, layer-split, layer-dp,
    splitwise-dp), or fixed (always run ``plan``)."""
    plan: Annotated[str, Field(min_length=1), AfterValidator(_plan_reference)] | None = None
    """The plan for ``planner = "fixed"``: a built-in plan name or a plan file. Only with that planner."""
    codec: Codec = "q8_0"
    """Codec of activations sent to the cloud: f32, f16, q8_0 or q4_0."""
    status_interval_s: float = Field(default=30.0, ge=1)
    """Seconds between refreshes of the retained status message."""
    drain_timeout_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, seconds to finish running and queued requests before giving up on them. Keep it below
    the unit's TimeoutStopSec."""

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        planner = data.get("planner", cls.model_fields["planner"].default)
        if planner == FIXED_PLANNER and "plan" not in data:
            return ["planner = 'fixed' needs plan"]
        if planner != FIXED_PLANNER and "plan" in data:
            return [f"plan is only used with planner = 'fixed' (planner is {planner!r})"]
        return []

    @property
    def max_request_bytes(self) -> int:
        """Largest request payload the agent reads at all; larger ones are refused unparsed. Room
        for a prompt of ``max_prompt_bytes`` written entirely as JSON escapes (at most 6 bytes per
        UTF-8 byte), plus 512 KiB for the rest (messages, a reply_to of up to 65,535 bytes, an
        inline plan)."""
        return 6 * self.max_prompt_bytes + REQUEST_OVERHEAD_BYTES

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


class CloudSection(StrictSection):
    """``[cloud]``: the pool of cloud workers this device offloads to."""

    pool: Identifier = "default"
    """Worker pool id: segments go to ``splitwise/v1/cloud/{pool}/segment``."""
    segment_timeout_s: Seconds = 5.0
    """Deadline of one cloud segment (also its MQTT message expiry); then recovery retries it."""
    session_ttl_s: Seconds = 300.0
    """How long an idle session's KV stays pinned to its worker."""


class RecoveryConfig(StrictSection):
    """``[recovery]``: retries, bans and partition checkpoints (DESIGN §6)."""

    base_s: Seconds = 0.2
    """First retry delay of a segment that missed its deadline."""
    factor: float = Field(default=2.0, ge=1)
    """Each further retry waits ``factor`` times longer..."""
    cap_s: Seconds = 5.0
    """...but never longer than this."""
    max_tries: int = Field(default=4, ge=1, le=100)
    """Attempts per segment (the first one included) before the worker counts as silent."""
    jitter: float = Field(default=0.2, ge=0, le=1)
    """Random spread of each delay, as a fraction (0.2 = ±20 %)."""
    ban_s: float = Field(default=30.0, ge=0)
    """How long a silent worker is avoided; its sessions move to another worker."""
    checkpoint_budget_bytes: ByteSize = Field(default=64 * 2**20, ge=0)
    """Memory for the tensors kept to rebuild a lost worker's KV (bytes or "64MiB"); 0 = keep none."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.cap_s < self.base_s:
            raise ValueError(f"cap_s ({self.cap_s:g}) must be >= base_s ({self.base_s:g})")
        return self


class PlanningConfig(StrictSection):
    """``[planning]``: what the cost-model planners (layer-split, layer-dp, splitwise-dp, splitwise-rl) need."""

    profile: ConfigPath | None = None
    """This device's measured profile (``splitwise-device profile``). Default: measure a quick profile at
    start (a few seconds) and keep it in ``state_dir`` for later starts."""
    cloud_profile: ConfigPath | None = None
    """A cloud worker profile to plan with until a worker of the pool publishes its own (workers publish
    theirs at start). Without either, plans stay on the edge."""
    policy: ConfigPath | None = None
    """The learned policy (ONNX) ``splitwise-rl`` plans with. Default: the shipped policy for this model and
    this device's profile (``policies/trained/``). Whenever the policy cannot plan (no such file, trained for
    another model, a plan that breaks a rule, ...) the decision falls back to ``splitwise-dp``."""
    min_edge_layers: int = Field(default=0, ge=0)
    """Privacy: layers ``0..min_edge_layers-1`` always run entirely on the device."""
    v: float = Field(default=1.0, ge=0)
    """Lyapunov trade-off V: weight of the penalty against the queue (drift) terms."""
    w_latency: float = Field(default=1.0, ge=0)
    """Penalty weight of predicted latency (per second)."""
    w_energy: float = Field(default=0.0, ge=0)
    """Penalty weight of predicted device energy (per joule)."""
    w_accuracy: float = Field(default=0.0, ge=0)
    """Penalty weight of the codecs' accuracy cost (per nat of KL)."""
    energy_budget_j: float | None = Field(default=None, gt=0)
    """Device energy budget per request (joules); above it the energy queue Z grows and steers plans to
    spend less. Default: no budget (Z stays 0)."""
    probe_interval_s: float = Field(default=10.0, ge=0.1)
    """At most one active link probe per this many seconds, sent only when real transfers have not
    refreshed the link estimate for that long."""
    link_half_life_s: float = Field(default=10.0, gt=0)
    """Half-life (seconds) of the bandwidth/RTT and cloud-load averages."""


class DeviceConfig(StrictSection):
    """The whole ``device.toml``."""

    device: DeviceSection
    broker: BrokerConfig = BrokerConfig()
    agent: AgentConfig = AgentConfig()
    cloud: CloudSection = CloudSection()
    recovery: RecoveryConfig = RecoveryConfig()
    planning: PlanningConfig = PlanningConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"splitwise-device-{self.device.id}"

    def check_files(self) -> list[str]:
        """Problems with the files this config points to (model, TLS, password, state dir).

        Each problem is ``"dotted.path: what is wrong"``; an empty list means all is well.
        """
        problems = [f"device.model: {p}" for p in model_problems(self.device.model)]
        problems += broker_file_problems(self.broker)
        state = self.device.state_dir
        if state.exists() and not state.is_dir():
            problems.append(f"device.state_dir: {state} exists and is not a directory")
        if self.agent.plan is not None and _looks_like_file(self.agent.plan):
            plan = Path(self.agent.plan)
            problems += [f"agent.plan: {p}" for p in readable_file_problems(plan)]
        for key in ("profile", "cloud_profile"):
            path = getattr(self.planning, key)
            if path is not None:
                problems += [f"planning.{key}: {p}" for p in profile_file_problems(path)]
        if self.agent.planner == LEARNED_PLANNER or self.planning.policy is not None:
            problems += [f"planning.policy: {p}" for p in self._policy_problems()]
        return problems

    def _policy_problems(self) -> list[str]:
        """Why ``splitwise-rl`` would fall back for want of a usable policy file (the checks the planner
        makes). They need the model's shape: without a readable model only the file itself is checked."""
        # Imported here: onnxruntime and the engine are only needed for this check.
        from policies.planners.learned import NO_SHIPPED_POLICY, policy_file_problems, shipped_policies, shipped_policy
        from policies.segments import ModelDims
        from splitwise_core.errors import SplitwiseError
        from splitwise_core.profile import Profile

        p = self.planning
        if model_problems(self.device.model):
            return [] if p.policy is None else readable_file_problems(p.policy)
        try:
            dims = ModelDims.of_model_file(self.device.model)
        except SplitwiseError as err:
            return [f"cannot check it: the model's shape is unknown ({err})"]
        if p.policy is not None:
            return policy_file_problems(p.policy, dims)
        if p.profile is None:
            # The device's profile is measured at start: any shipped policy for this model may fit it.
            return [] if shipped_policies(dims) else [NO_SHIPPED_POLICY]
        if profile_file_problems(p.profile):
            return []  # reported under planning.profile
        return [] if shipped_policy(dims, Profile.load(p.profile)) else [NO_SHIPPED_POLICY]

    def summary(self) -> list[str]:
        """A few human-readable lines about the effective settings (for ``check-config``)."""
        d, b, a, c, r, p = self.device, self.broker, self.agent, self.cloud, self.recovery, self.planning
        threads = f"{d.threads}" if d.threads is not None else f"auto ({d.effective_threads})"
        budget = format_size(d.memory_budget) if d.memory_budget is not None else "unbounded"
        planner = f"{a.planner} ({a.plan})" if a.plan else a.planner
        return [
            f"device    id={d.id} model={d.model} threads={threads} memory_budget={budget} state_dir={d.state_dir}",
            f"broker    {broker_summary(b, self.client_id)}",
            f"agent     planner={planner} codec={a.codec} queue_size={a.queue_size} "
            f"max_tokens={a.default_max_tokens}/{a.max_tokens_limit} max_prompt={format_size(a.max_prompt_bytes)} "
            f"max_prompt_tokens={a.max_prompt_tokens} "
            f"max_request={format_size(a.max_request_bytes)} max_json_depth={a.max_json_depth} "
            f"drain={a.drain_timeout_s:g}s",
            f"cloud     pool={c.pool} segment_timeout={c.segment_timeout_s:g}s session_ttl={c.session_ttl_s:g}s",
            f"recovery  backoff {r.base_s:g}s x{r.factor:g} up to {r.cap_s:g}s (jitter {r.jitter:g}), "
            f"{r.max_tries} tries, ban {r.ban_s:g}s, checkpoints {format_size(r.checkpoint_budget_bytes)}",
            f"planning  profile={p.profile or 'measured at start'} cloud_profile={p.cloud_profile or 'from workers'} "
            f"policy={p.policy or 'shipped'} "
            f"V={p.v:g} w=({p.w_latency:g}, {p.w_energy:g}, {p.w_accuracy:g}) min_edge_layers={p.min_edge_layers} "
            f"energy_budget={'none' if p.energy_budget_j is None else f'{p.energy_budget_j:g} J'}",
            f"logging   level={self.logging.level}",
        ]


def load_device_config(path: str | os.PathLike[str]) -> DeviceConfig:
    """Loads and validates ``device.toml``; every problem is reported in one :class:`ConfigError`."""
    return load_toml_model(path, DeviceConfig)
