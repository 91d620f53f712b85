"""Scenario files: what the simulator replays — arrivals, request lengths, the link, cloud load and
edge slowdown over time — as strict TOML (``training/scenarios/*.toml``; docs/simulator.md).

Every section is a :class:`~splitwise_core.config.StrictSection`: unknown keys are refused with their
exact dotted path, types are not coerced, and every problem in a file is reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from splitwise_core.config import ConfigPath, StrictSection, load_toml_model
from splitwise_device.config import PlanningConfig

__all__ = [
    "Arrivals",
    "IntRange",
    "LinkEvent",
    "LinkSection",
    "LinkState",
    "LoadSection",
    "MmppArrivals",
    "PoissonArrivals",
    "RequestLengths",
    "Scenario",
    "TraceArrivals",
    "load_scenario",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PoissonArrivals(StrictSection):
    """Requests arrive as a Poisson process of `rate_per_s`."""

    kind: Literal["poisson"]
    rate_per_s: PositiveFloat


class MmppArrivals(StrictSection):
    """A Markov-modulated Poisson process (bursty arrivals): in state i requests arrive at
    `rates_per_s[i]`; the state lasts an exponential time of mean `mean_dwell_s[i]`, then moves to one
    of the other states, chosen uniformly."""

    kind: Literal["mmpp"]
    rates_per_s: Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]], Field(min_length=2)]
    mean_dwell_s: Annotated[list[PositiveFloat], Field(min_length=2)]

    @model_validator(mode="after")
    def _same_length(self) -> Self:
        if len(self.rates_per_s) != len(self.mean_dwell_s):
            raise ValueError("rates_per_s and mean_dwell_s need one value per state")
        if not any(rate > 0 for rate in self.rates_per_s):
            raise ValueError("at least one state must have a rate > 0")
        return self


class TraceArrivals(StrictSection):
    """Requests replayed from a trace file (CSV with the header ``at_s,prompt_len,max_tokens``, or a JSON
    list of objects with those keys); relative to the scenario file. Its lengths override [lengths]."""

    kind: Literal["trace"]
    file: ConfigPath


Arrivals = Annotated[PoissonArrivals | MmppArrivals | TraceArrivals, Field(discriminator="kind")]


class IntRange(StrictSection):
    """A length drawn uniformly from ``low..high`` (both included)."""

    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class RequestLengths(StrictSection):
    """``[lengths]``: prompt tokens and tokens to generate per request."""

    prompt_len: IntRange = IntRange(low=16, high=128)
    max_tokens: IntRange = IntRange(low=8, high=64)


class LinkState(StrictSection):
    bandwidth_mbps: PositiveFloat
    rtt_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LinkEvent(StrictSection):
    """A scripted change from `at_s` for `duration_s` (to the end when omitted): ``set`` replaces the
    bandwidth and/or RTT (e.g. a 100 → 10 Mbit/s drop), ``outage`` cuts the link, ``rtt_spike`` adds
    `rtt_ms` to the RTT."""

    at_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    duration_s: PositiveFloat | None = None
    kind: Literal["set", "outage", "rtt_spike"]
    bandwidth_mbps: PositiveFloat | None = None
    rtt_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Self:
        if self.kind == "outage" and (self.bandwidth_mbps is not None or self.rtt_ms is not None):
            raise ValueError("an outage takes no bandwidth_mbps or rtt_ms")
        if self.kind == "set" and self.bandwidth_mbps is None and self.rtt_ms is None:
            raise ValueError("a set event needs bandwidth_mbps and/or rtt_ms")
        if self.kind == "rtt_spike" and (self.rtt_ms is None or self.bandwidth_mbps is not None):
            raise ValueError("an rtt_spike event takes rtt_ms (added to the RTT) and nothing else")
        return self


def _check_dwell(n_states: int, mean_dwell_s: list[float], what: str) -> None:
    """A Markov-modulated section has one mean dwell time per state, and none for a single state."""
    if n_states > 1 and len(mean_dwell_s) != n_states:
        raise ValueError(f"mean_dwell_s needs one value per {what} when there are several {what}s")
    if n_states == 1 and mean_dwell_s:
        raise ValueError(f"a single {what} has no dwell time")


class LinkSection(StrictSection):
    """``[link]``: a Markov-modulated link (state i lasts an exponential time of mean
    `mean_dwell_s[i]`, then another state is chosen uniformly; one state = a fixed link), plus
    scripted `events` applied on top, in order."""

    states: Annotated[list[LinkState], Field(min_length=1)]
    mean_dwell_s: list[PositiveFloat] = Field(default_factory=list)
    events: list[LinkEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dwell_per_state(self) -> Self:
        _check_dwell(len(self.states), self.mean_dwell_s, "state")
        return self


class LoadSection(StrictSection):
    """A load factor over time (1 = the profiled speed; 2 = everything takes twice as long), Markov
    modulated like the link: `levels[i]` for an exponential time of mean `mean_dwell_s[i]`."""

    levels: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)
    mean_dwell_s: list[PositiveFloat] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dwell_per_level(self) -> Self:
        _check_dwell(len(self.levels), self.mean_dwell_s, "level")
        return self


class ObjectiveSection(StrictSection):
    """``[objective]``: the drift-plus-penalty weights the agent runs with in this scenario (the
    ``[planning]`` keys of a device config, same defaults)."""

    v: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    w_latency: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    w_energy: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    w_accuracy: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class Scenario(StrictSection):
    """The whole scenario file."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    seed: int = Field(ge=0, lt=2**63)
    """Seed of every random process of the scenario (the simulator derives one stream per process)."""
    duration_s: PositiveFloat
    """Simulated time; requests arriving later are not generated."""
    arrivals: Arrivals
    lengths: RequestLengths = RequestLengths()
    link: LinkSection
    cloud_load: LoadSection = LoadSection()
    """Cloud congestion: multiplies the workers' compute times."""
    edge_load: LoadSection = LoadSection()
    """Edge slowdown (thermal throttling, other load): multiplies the device's compute times."""
    objective: ObjectiveSection = ObjectiveSection()
    """The agent's objective weights (policies.cost.objective)."""

    def planning(self, min_edge_layers: int = 0, policy: Path | None = None) -> PlanningConfig:
        """The device's ``[planning]`` section for this scenario: its objective weights (and the
        privacy prefix and learned policy given)."""
        o = self.objective
        return PlanningConfig(
            min_edge_layers=min_edge_layers,
            v=o.v,
            w_latency=o.w_latency,
            w_energy=o.w_energy,
            w_accuracy=o.w_accuracy,
            policy=policy,
        )


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Reads and validates a scenario file; every problem in one ConfigError, with its dotted path."""
    return load_toml_model(path, Scenario)
