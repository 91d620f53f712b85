"""The random processes of a scenario, drawn once per seed: request arrivals and lengths, the link's
bandwidth and RTT (Markov-modulated, with scripted events on top), cloud load and edge slowdown.

Every process has its own random stream (`numpy.random.SeedSequence(scenario.seed).spawn`), so
changing one (say, the link) leaves the arrivals of the same seed as they were.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from splitwise_core.errors import InvalidArgumentError
from training.scenario import LinkSection, LoadSection, MmppArrivals, PoissonArrivals, Scenario, TraceArrivals

__all__ = ["LinkTimeline", "Request", "StepFunction", "Timeline", "load_trace", "markov_path"]

MAX_TRACE_BYTES = 64 << 20
_STREAMS = ("arrivals", "lengths", "link", "cloud_load", "edge_load")


@dataclass(frozen=True, slots=True)
class Request:
    at_s: float
    prompt_len: int
    max_tokens: int


@dataclass(frozen=True)
class StepFunction:
    """A piecewise-constant function of time: `values[i]` from `starts[i]` (the first start is 0)."""

    starts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    # The same as Python floats: the simulator asks for one time at a time, several times per
    # request, and bisect on a list answers that several times faster than numpy.
    _starts: list[float] = field(init=False, repr=False, compare=False)
    _values: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", self.starts.tolist())
        object.__setattr__(self, "_values", self.values.tolist())

    def at(self, t: float) -> float:
        return self._values[max(bisect.bisect_right(self._starts, t) - 1, 0)]

    @classmethod
    def constant(cls, value: float) -> StepFunction:
        return cls(np.zeros(1), np.array([value], dtype=np.float64))


def markov_path(
    levels: list[float], mean_dwell_s: list[float], duration_s: float, rng: np.random.Generator
) -> StepFunction:
    """A continuous-time Markov chain over `levels`: level i lasts an exponential time of mean
    `mean_dwell_s[i]`, then one of the other levels follows, chosen uniformly. Starts in a level drawn
    in proportion to the dwell times (the chain's stationary distribution)."""
    if len(levels) == 1:
        return StepFunction.constant(levels[0])
    dwell = np.asarray(mean_dwell_s, dtype=np.float64)
    state = int(rng.choice(len(levels), p=dwell / dwell.sum()))
    starts, values, t = [0.0], [levels[state]], 0.0
    while True:
        t += float(rng.exponential(dwell[state]))
        if t >= duration_s:
            break
        state = int((state + 1 + rng.integers(len(levels) - 1)) % len(levels))
        starts.append(t)
        values.append(levels[state])
    return StepFunction(np.array(starts), np.array(values, dtype=np.float64))


def _load(section: LoadSection, duration_s: float, rng: np.random.Generator) -> StepFunction:
    return markov_path(list(section.levels), list(section.mean_dwell_s), duration_s, rng)


class LinkTimeline:
    """Bandwidth (bit/s) and RTT (s) over time: the Markov-modulated states, then every scripted event
    active at that time, in file order. A cut link has bandwidth 0 and an infinite RTT."""

    def __init__(self, section: LinkSection, duration_s: float, rng: np.random.Generator) -> None:
        index = markov_path([float(i) for i in range(len(section.states))], list(section.mean_dwell_s), duration_s, rng)
        self._state = index
        self._states = section.states
        self._events = section.events

    def at(self, t: float) -> tuple[float, float]:
        state = self._states[int(self._state.at(t))]
        bandwidth, rtt = state.bandwidth_mbps * 1e6, state.rtt_ms / 1e3
        for event in self._events:
            end = math.inf if event.duration_s is None else event.at_s + event.duration_s
            if not event.at_s <= t < end:
                continue
            if event.kind == "outage":
                return 0.0, math.inf
            if event.kind == "set":
                bandwidth = bandwidth if event.bandwidth_mbps is None else event.bandwidth_mbps * 1e6
                rtt = rtt if event.rtt_ms is None else event.rtt_ms / 1e3
            else:  # rtt_spike
                assert event.rtt_ms is not None
                rtt += event.rtt_ms / 1e3
        return bandwidth, rtt

    def state_changes(self) -> list[float]:
        """Times at which the link may change (Markov jumps and event edges), for tests and plots."""
        edges = {float(s) for s in self._state.starts[1:]}
        for event in self._events:
            edges.add(event.at_s)
            if event.duration_s is not None:
                edges.add(event.at_s + event.duration_s)
        return sorted(edges)


class Timeline:
    """One seed's draw of a scenario: the requests, the link, cloud load and edge slowdown."""

    def __init__(self, scenario: Scenario, seed: int | None = None) -> None:
        streams = dict(
            zip(
                _STREAMS,
                np.random.SeedSequence(scenario.seed if seed is None else seed).spawn(len(_STREAMS)),
                strict=True,
            )
        )
        rng = {name: np.random.default_rng(s) for name, s in streams.items()}
        self.scenario = scenario
        self.requests = _requests(scenario, rng["arrivals"], rng["lengths"])
        self.link = LinkTimeline(scenario.link, scenario.duration_s, rng["link"])
        self.cloud_load = _load(scenario.cloud_load, scenario.duration_s, rng["cloud_load"])
        self.edge_load = _load(scenario.edge_load, scenario.duration_s, rng["edge_load"])


def _requests(scenario: Scenario, arrivals_rng: np.random.Generator, lengths_rng: np.random.Generator) -> list[Request]:
    arrivals, duration = scenario.arrivals, scenario.duration_s
    if isinstance(arrivals, TraceArrivals):
        return [r for r in load_trace(arrivals.file) if r.at_s < duration]
    if isinstance(arrivals, PoissonArrivals):
        times = _poisson_times(arrivals.rate_per_s, 0.0, duration, arrivals_rng)
    else:
        times = _mmpp_times(arrivals, duration, arrivals_rng)
    lengths = scenario.lengths
    prompts = lengths_rng.integers(lengths.prompt_len.low, lengths.prompt_len.high + 1, size=len(times))
    tokens = lengths_rng.integers(lengths.max_tokens.low, lengths.max_tokens.high + 1, size=len(times))
    return [Request(float(t), int(p), int(m)) for t, p, m in zip(times, prompts, tokens, strict=True)]


def _poisson_times(rate: float, start: float, end: float, rng: np.random.Generator) -> list[float]:
    if rate <= 0:
        return []
    out: list[float] = []
    t = start
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= end:
            return out
        out.append(t)


def _mmpp_times(arrivals: MmppArrivals, duration: float, rng: np.random.Generator) -> list[float]:
    phases = markov_path(list(arrivals.rates_per_s), list(arrivals.mean_dwell_s), duration, rng)
    ends = [*phases.starts[1:].tolist(), duration]
    times: list[float] = []
    for start, end, rate in zip(phases.starts.tolist(), ends, phases.values.tolist(), strict=True):
        times += _poisson_times(rate, start, end, rng)
    return times


def load_trace(path: str | Path) -> list[Request]:
    """A request trace: CSV with the header ``at_s,prompt_len,max_tokens`` or a JSON list of objects
    with those keys. Sorted by arrival; InvalidArgumentError naming the file and row otherwise."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_TRACE_BYTES:
            raise InvalidArgumentError(f"{file}: larger than {MAX_TRACE_BYTES} bytes")
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidArgumentError(f"{file}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{file}: not UTF-8 text") from None
    if file.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise InvalidArgumentError(f"{file}: not valid JSON: {err}") from None
        if not isinstance(rows, list):
            raise InvalidArgumentError(f"{file}: a JSON trace is a list of requests")
        labelled = [(f"{file}: request {i}", row) for i, row in enumerate(rows)]
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or set(reader.fieldnames) != {"at_s", "prompt_len", "max_tokens"}:
            raise InvalidArgumentError(f"{file}: a CSV trace has the header at_s,prompt_len,max_tokens")
        labelled = [(f"{file}: line {i + 2}", row) for i, row in enumerate(reader)]
    requests = [_trace_request(where, row) for where, row in labelled]
    return sorted(requests, key=lambda r: r.at_s)


def _trace_request(where: str, row: object) -> Request:
    if not isinstance(row, dict) or set(row) != {"at_s", "prompt_len", "max_tokens"}:
        raise InvalidArgumentError(f"{where}: needs exactly at_s, prompt_len and max_tokens")
    try:
        if any(isinstance(value, bool) for value in row.values()):
            raise ValueError("not a plain number")
        counts = (row["prompt_len"], row["max_tokens"])
        if any(isinstance(count, float) and not count.is_integer() for count in counts):
            raise ValueError("a count with a fraction")
        at_s = float(row["at_s"])
        prompt_len, max_tokens = int(row["prompt_len"]), int(row["max_tokens"])
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{where}: at_s is a number, prompt_len and max_tokens integers") from None
    if not math.isfinite(at_s) or at_s < 0 or prompt_len < 1 or max_tokens < 1:
        raise InvalidArgumentError(f"{where}: at_s ≥ 0, prompt_len ≥ 1 and max_tokens ≥ 1 (got {row})")
    return Request(at_s, prompt_len, max_tokens)
