"""Configuration of the edge agent (``device.toml``) and the pieces the cloud worker reuses.

Every section is a strict pydantic v2 model: unknown keys are rejected (``extra="forbid"``), TOML
types are not coerced (``threads = "4"`` is an error, not 4), and every problem in a file is
reported at once, one line each, with the file name and the exact dotted path of the key::

    device.toml: broker.tls.ca_fil: unknown key 'ca_fil' (did you mean 'ca_file'?)
    device.toml: agent.queue_size: must be >= 1 (got 0)

Loading (:func:`load_device_config`) never touches the files the config points to; it only parses
and validates. :meth:`DeviceConfig.check_files` is the second step that looks at the file system
(model present, TLS files readable, ...); ``splitwise-device check-config`` runs both.

Relative paths in a config file are taken relative to the directory of that file.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails

from splitwise_device.errors import ConfigError, SplitwiseError

__all__ = [
    "FIXED_PLANNER",
    "AgentConfig",
    "BrokerConfig",
    "ByteSize",
    "Checkable",
    "CloudSection",
    "ConfigError",
    "ConfigPath",
    "DeviceConfig",
    "DeviceSection",
    "Identifier",
    "LoggingConfig",
    "PlanningConfig",
    "RecoveryConfig",
    "Seconds",
    "StrictSection",
    "TlsConfig",
    "agent_planners",
    "broker_file_problems",
    "broker_summary",
    "check_config_command",
    "format_size",
    "load_device_config",
    "load_toml_model",
    "model_problems",
    "parse_size",
]


# --------------------------------------------------------------------------------------------
# Value types shared by the device and the cloud config
# --------------------------------------------------------------------------------------------

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an integer or a size string: ``"256MB"`` (10^6), ``"1GiB"`` (2^30), ``"12 kB"``.

    Units (case-insensitive): B, kB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
    1024). A bare ``K``/``M``/``G``/``T`` is refused as ambiguous. Fractions are allowed when they
    give a whole number of bytes (``"1.5KiB"`` = 1536). Raises :class:`ValueError` otherwise.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes or a string such as '256MB' or '1GiB' (got {_show(value)})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size in bytes or a string such as '256MB' or '1GiB' (got {_show(value)})")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"not a size: expected a number and a unit such as '256MB' or '1GiB' (got {value!r})")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        if unit.lower() in ("k", "m", "g", "t"):
            raise ValueError(
                f"ambiguous size unit {unit!r}: write '{unit.upper()}B' (powers of 1000) "
                f"or '{unit.upper()}iB' (powers of 1024) (got {value!r})"
            )
        raise ValueError(f"unknown size unit {unit!r}: use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB (got {value!r})")
    try:
        amount = Decimal(number) * multiplier
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ValueError(f"not a size (got {value!r})") from None
    if amount != amount.to_integral_value():
        raise ValueError(f"not a whole number of bytes (got {value!r})")
    return int(amount)


def format_size(n: int) -> str:
    """``1073741824`` → ``"1 GiB"``; ``1500000`` → ``"1.43 MiB"``. For summaries, not for parsing."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; TOML may give an integer or a string like ``"256MB"``, ``"1GiB"``, ``"12 kB"``."""

_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _identifier(value: str) -> str:
    if not _IDENTIFIER_RE.match(value):
        raise ValueError(f"must be 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-' (got {value!r})")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
"""A name that goes into MQTT topics: 1-64 characters of ``[A-Za-z0-9_-]``."""


def _path(value: object, info: ValidationInfo) -> Path:
    if isinstance(value, os.PathLike) and not isinstance(value, str):
        value = os.fspath(value)  # a Path given from Python code; TOML only gives strings
    if not isinstance(value, str):
        raise ValueError(f"expected a path string (got {_show(value)})")
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    path = Path(value)
    base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
    if not path.is_absolute() and isinstance(base, Path):
        path = base / path
    return path


ConfigPath = Annotated[Path, BeforeValidator(_path)]
"""A file system path; a relative path is relative to the directory of the config file."""

Seconds = Annotated[float, Field(gt=0)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class StrictSection(BaseModel):
    """Base of every config section: unknown keys rejected, no type coercion, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,  # str(ValidationError) must not echo a password; .errors() keeps inputs
    )

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        """Problems visible from which keys are present (e.g. mutually exclusive keys).

        Unlike an ``after`` model validator, these are reported together with the errors of the
        section's fields, so one run of check-config lists everything.
        """
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _with_key_problems(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        extra = []
        if isinstance(data, Mapping):
            extra = [
                InitErrorDetails(type="value_error", loc=(), input=data, ctx={"error": ValueError(problem)})
                for problem in cls._key_problems(data)
            ]
        try:
            result = handler(data)
        except ValidationError as err:
            if not extra:
                raise
            details = [
                InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
                for e in err.errors()
            ]
            raise ValidationError.from_exception_data(err.title, [*details, *extra]) from None
        if extra:
            raise ValidationError.from_exception_data(cls.__name__, extra)
        return result


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


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


class TlsConfig(StrictSection):
    """``[broker.tls]``: TLS settings for an ``mqtts://`` broker."""

    ca_file: ConfigPath | None = None
    """PEM file of the CA(s) that signed the broker's certificate. Default: the system trust store."""
    cert_file: ConfigPath | None = None
    """Client certificate (PEM) for mutual TLS; needs ``key_file``."""
    key_file: ConfigPath | None = None
    """Private key (PEM, unencrypted) of ``cert_file``."""
    insecure: bool = False
    """Skip the check that the certificate matches the broker's host name. For tests only."""

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        if ("cert_file" in data) != ("key_file" in data):
            return ["cert_file and key_file must be given together"]
        return []


_MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def _broker_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"not a broker URL ({err}) (got {value!r})") from None
    if parts.scheme not in _MQTT_DEFAULT_PORTS:
        raise ValueError(f"must start with mqtt:// or mqtts:// (got {value!r})")
    if not parts.hostname:
        raise ValueError(f"has no host name (got {value!r})")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials; use broker.username and broker.password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be just scheme://host[:port] (got {value!r})")
    if port == 0:
        raise ValueError(f"port must be 1-65535 (got {value!r})")
    return value


class BrokerConfig(StrictSection):
    """``[broker]``: the MQTT v5 broker (shared by the device and the cloud config)."""

    url: Annotated[str, AfterValidator(_broker_url)] = "mqtt://localhost:1883"
    """``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (TLS, default port 8883)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """MQTT client id. Default: ``splitwise-device-{device.id}`` / ``splitwise-cloud-{worker.id}``."""
    username: str | None = Field(default=None, min_length=1)
    """User name for the broker. Default: connect anonymously."""
    password: SecretStr | None = None
    """Password (needs ``username``). Prefer ``password_file``, which keeps the secret out of this file."""
    password_file: ConfigPath | None = None
    """File whose first line is the password (e.g. a systemd credential). Excludes ``password``."""
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    """MQTT keep-alive interval in whole seconds (5-65535)."""
    reconnect_min_s: Seconds = 1.0
    """First delay before reconnecting after the connection is lost; it doubles on each failure..."""
    reconnect_max_s: Seconds = 60.0
    """...up to this delay."""
    tls: TlsConfig | None = None
    """``[broker.tls]``; only with ``mqtts://``. An ``mqtts://`` URL without it uses the system trust store."""

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # checked by the validator
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or _MQTT_DEFAULT_PORTS[parts.scheme]

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    def read_password(self) -> str | None:
        """The password, from ``password`` or the first line of ``password_file`` (read now)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {_os_reason(err)}") from err
            return lines[0] if lines else ""
        return None

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        problems = []
        if "password" in data and "password_file" in data:
            problems.append("password and password_file are mutually exclusive; give one")
        if ("password" in data or "password_file" in data) and "username" not in data:
            problems.append("a password needs a username")
        url = data.get("url", cls.model_fields["url"].default)
        if "tls" in data and isinstance(url, str) and url.startswith("mqtt://"):
            problems.append("[broker.tls] is given but url uses mqtt:// (plain TCP); use mqtts://")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s:g}) must be >= reconnect_min_s ({self.reconnect_min_s:g})"
            )
        return self


def _looks_like_file(plan: str) -> bool:
    return "/" in plan or plan.endswith((".json", ".toml"))


def _plan_reference(value: str, info: ValidationInfo) -> str:
    """A plan file path (contains '/' or ends in .json/.toml) is made relative to the config file."""
    if _looks_like_file(value):
        return str(_path(value, info))
    return value


Codec = Literal["f32", "f16", "q8_0", "q4_0"]

FIXED_PLANNER = "fixed"
"""``agent.planner`` value that runs ``agent.plan`` for every request instead of a planner."""


def agent_planners() -> tuple[str, ...]:
    """The values ``agent.planner`` may take: every planner of the registry
    (:data:`policies.planners.PLANNER_NAMES`) and ``fixed``.

    The registry holds exactly the planners the agent can build, so a config that loads (and so passes
    ``check-config``) names a planner that ``splitwise-device run`` can run; nothing else is accepted.
    """
    # Imported here: the registry brings numpy and the planners' cost model, which loading a config
    # (e.g. the cloud worker's) does not otherwise need.
    from policies.planners import PLANNER_NAMES

    return (*PLANNER_NAMES, FIXED_PLANNER)


def _one_of(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``, the way pydantic lists the values of a Literal."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _runnable_planner(value: str) -> str:
    names = agent_planners()
    if value not in names:
        raise ValueError(f"must be one of {_one_of(names)} (got {_show(value)})")
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
    """``[planning]``: what the cost-model planners (layer-split, layer-dp, splitwise-dp) need."""

    profile: ConfigPath | None = None
    """This device's measured profile (``splitwise-device profile``). Default: measure a quick profile at
    start (a few seconds) and keep it in ``state_dir`` for later starts."""
    cloud_profile: ConfigPath | None = None
    """A cloud worker profile to plan with until a worker of the pool publishes its own (workers publish
    theirs at start). Without either, plans stay on the edge."""
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


class LoggingConfig(StrictSection):
    """``[logging]``."""

    level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (any case). Logs go to stderr (the journal under systemd)."""


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
            problems += [f"agent.plan: {p}" for p in _readable_file_problems(plan)]
        for key in ("profile", "cloud_profile"):
            path = getattr(self.planning, key)
            if path is not None:
                problems += [f"planning.{key}: {p}" for p in _profile_problems(path)]
        return problems

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
            f"V={p.v:g} w=({p.w_latency:g}, {p.w_energy:g}, {p.w_accuracy:g}) min_edge_layers={p.min_edge_layers} "
            f"energy_budget={'none' if p.energy_budget_j is None else f'{p.energy_budget_j:g} J'}",
            f"logging   level={self.logging.level}",
        ]


# --------------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------------


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower() if err.strerror[:1].isupper() and err.strerror[1:2].islower() else err.strerror
    return str(err)


_CREDENTIALS_ROOT = Path("/run/credentials")


def _is_unavailable_credential(path: Path) -> bool:
    """A systemd credential path (``LoadCredential=``) checked outside the service, where it does
    not exist; it is checked again when ``check-config`` runs inside the unit (ExecStartPre)."""
    return path.is_relative_to(_CREDENTIALS_ROOT) and "CREDENTIALS_DIRECTORY" not in os.environ and not path.exists()


def _readable_file_problems(path: Path) -> list[str]:
    if _is_unavailable_credential(path):
        return []
    if not path.exists():
        return [f"{path} does not exist"]
    if not path.is_file():
        return [f"{path} is not a regular file"]
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        return [f"cannot read {path}: {_os_reason(err)}"]
    return []


def _profile_problems(path: Path) -> list[str]:
    problems = _readable_file_problems(path)
    if problems:
        return problems
    from policies.cost import Profile  # the device's own planner profile format

    try:
        Profile.load(path)
    except SplitwiseError as err:
        return [str(err)]
    return []


def model_problems(path: Path) -> list[str]:
    if not path.exists():
        return [f"{path} does not exist"]
    if path.is_dir():
        if not any(p.suffix == ".gguf" and p.is_file() for p in path.iterdir()):
            return [f"{path} is a directory without .gguf shards"]
        return []
    problems = _readable_file_problems(path)
    if problems:
        return problems
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return [f"{path} is not a GGUF file (it does not start with 'GGUF')"]
    return []


def broker_file_problems(broker: BrokerConfig) -> list[str]:
    problems = []
    if broker.password_file is not None:
        problems += [f"broker.password_file: {p}" for p in _readable_file_problems(broker.password_file)]
    if broker.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(broker.tls, key)
            if path is not None:
                problems += [f"broker.tls.{key}: {p}" for p in _readable_file_problems(path)]
    return problems


def broker_summary(broker: BrokerConfig, client_id: str) -> str:
    auth = "anonymous"
    if broker.username is not None:
        secret = "password" if broker.password is not None else f"password_file={broker.password_file}"
        auth = f"user={broker.username}" + (f" ({secret})" if broker.password or broker.password_file else "")
    tls = ""
    if broker.use_tls:
        t = broker.tls or TlsConfig()
        extras = (" client-cert" if t.cert_file else "") + (" INSECURE" if t.insecure else "")
        tls = f" tls(ca={t.ca_file or 'system'}{extras})"
    return f"{broker.url} client_id={client_id} {auth}{tls} keepalive={broker.keepalive_s}s"


# --------------------------------------------------------------------------------------------
# Loading and error messages
# --------------------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", bound=BaseModel)

_TOML_POSITION_RE = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot read: {_os_reason(err)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{label}: line {line}: not valid UTF-8 (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _TOML_POSITION_RE.match(message)
        if match is None:
            raise ConfigError(f"{label}: invalid TOML: {message}") from None
        line, col = int(match["line"]), int(match["col"])
        lines = text.splitlines()
        excerpt = ""
        if 1 <= line <= len(lines):
            excerpt = f"\n    {line} | {lines[line - 1]}\n    {' ' * len(str(line))} | {' ' * (col - 1)}^"
        first = f"{label}: line {line}, column {col}: invalid TOML: {match['msg']}"
        raise ConfigError(first + excerpt, [first]) from None


def load_toml_model(path: str | os.PathLike[str], model: type[ModelT]) -> ModelT:
    """Reads the TOML file at ``path`` and validates it as ``model``; raises :class:`ConfigError`.

    Relative paths inside the file are resolved against the file's directory.
    """
    file = Path(path)
    label = os.fspath(path)
    data = _read_toml(file, label)
    base_dir = file.absolute().parent
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        problems = [f"{label}: {line}" for line in format_validation_errors(err, model)]
        raise ConfigError("\n".join(problems), problems) from None


def load_device_config(path: str | os.PathLike[str]) -> DeviceConfig:
    """Loads and validates ``device.toml``; every problem is reported in one :class:`ConfigError`."""
    return load_toml_model(path, DeviceConfig)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "...'"
    if isinstance(value, SecretStr):
        return "'**********'"
    return repr(value)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close and len(key) >= 3:
        close = [name for name in known if name.startswith(key)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain_number(value: object) -> object:
    """``1.0`` → ``1`` for messages about bounds (the bound of a float key is stored as a float)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _field_type(model: type[BaseModel], loc: tuple[int | str, ...]) -> object:
    """The annotation of the field at ``loc``, walking nested models; None when unknown."""
    current: object = model
    for part in loc:
        cls = _model_class(current)
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        current = cls.model_fields[part].annotation
    return current


def _model_class(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_BOUND_MESSAGES: dict[str, tuple[str, str]] = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_TYPE_MESSAGES: dict[str, str] = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "finite_number": "must be a finite number",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
}


def format_validation_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One ``"dotted.path: message"`` line per problem in ``err`` (without the file name)."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        ctx = e.get("ctx") or {}
        value = e.get("input")
        secret = bool(loc) and loc[-1] == "password"
        got = "" if secret else f" (got {_show(value)})"
        path = _dotted(loc)
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = _model_class(_field_type(model, loc[:-1]))
            hint = ""
            if parent is not None:
                hint = _did_you_mean(key, list(parent.model_fields))
            message = f"unknown key '{key}'{hint}"
        elif kind == "missing":
            is_table = _model_class(_field_type(model, loc)) is not None
            message = f"missing required table [{path}]" if is_table else "missing required key"
        elif kind in _BOUND_MESSAGES:
            op, name = _BOUND_MESSAGES[kind]
            message = f"must be {op} {_show(_plain_number(ctx.get(name)))}{got}"
        elif kind in _TYPE_MESSAGES:
            message = _TYPE_MESSAGES[kind] + got
        elif kind == "literal_error":
            message = f"must be one of {ctx.get('expected')}{got}"
        elif kind == "string_too_short":
            message = "must not be empty" if ctx.get("min_length") == 1 else f"too short{got}"
        elif kind == "string_too_long":
            message = f"must be at most {ctx.get('max_length')} characters{got}"
        elif kind in ("value_error", "assertion_error") and "error" in ctx:
            message = str(ctx["error"])
        else:
            message = e["msg"] + got
        lines.append(f"{path}: {message}")
    return lines


# --------------------------------------------------------------------------------------------
# check-config
# --------------------------------------------------------------------------------------------


class Checkable(Protocol):
    """What ``check-config`` needs of a loaded config."""

    def check_files(self) -> list[str]: ...

    def summary(self) -> list[str]: ...


def check_config_command(
    path: str | os.PathLike[str],
    load: Callable[[str | os.PathLike[str]], Checkable],
    *,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> int:
    """Loads ``path`` with ``load``, checks the files it names, reports; 0 if all is well, else 1."""
    label = os.fspath(path)
    try:
        config = load(path)
    except ConfigError as error:
        for line in str(error).splitlines():
            err(line)
        return 1
    problems = config.check_files()
    if problems:
        for problem in problems:
            err(f"{label}: {problem}")
        return 1
    out(f"{label}: OK")
    for line in config.summary():
        out(f"  {line}")
    return 0
