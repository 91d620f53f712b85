"""What a learned policy sees of an :class:`~policies.cost.Observation`: a fixed-length vector of
normalised features, the same function in training (the simulator) and on the device (the ONNX
planner). Any change to the features is a new :data:`FEATURIZER_VERSION`; a policy trained on
another version is refused.

Every feature is a monotone squashing of one observation field into roughly [-1, 1] (logarithms
for the heavy-tailed ones), clipped to [-2, 2] so that no observation can leave the policy's input
range: a link cut shows as bandwidth 0, RTT 1 and ``link_up`` 0; no memory
budget shows as ``budget_gib`` 1 and ``has_budget`` 0.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from policies.cost import Observation

__all__ = ["FEATURE_NAMES", "FEATURIZER_VERSION", "N_FEATURES", "features"]

FEATURIZER_VERSION = 1

FEATURE_NAMES: tuple[str, ...] = (
    "link_up",
    "bandwidth",  # log10(bit/s) / 10: 1 Gbit/s ≈ 0.9
    "rtt",  # log10(1 + ms) / 3: 1 s ≈ 1
    "backlog_requests",  # ln(1 + n) / ln(65)
    "backlog_s",  # ln(1 + s) / ln(61)
    "arrival_rate",  # ln(1 + req/s) / ln(11)
    "cloud_load",  # ln(load) / ln(10), clipped to [-1, 1]
    "edge_load",
    "energy_queue_z",  # ln(1 + J) / ln(101)
    "work_queue_u",  # ln(1 + s) / ln(61)
    "prompt_len",  # ln(1 + tokens) / ln(8193)
    "max_tokens",
    "has_budget",
    "budget_gib",  # ln(1 + GiB) / ln(65); 1 without a budget
)
N_FEATURES = len(FEATURE_NAMES)


def _log_ratio(value: float, scale: float) -> float:
    return math.log1p(max(value, 0.0)) / math.log1p(scale)


def _load(load: float) -> float:
    return max(-1.0, min(1.0, math.log10(load))) if load > 0 else -1.0


def features(obs: Observation) -> npt.NDArray[np.float32]:
    """The policy's input for `obs` (shape (N_FEATURES,), float32)."""
    up = obs.link_up
    budget = obs.memory_budget_bytes
    values = (
        1.0 if up else 0.0,
        math.log10(max(obs.bandwidth_bps, 1.0)) / 10 if up else 0.0,
        math.log10(1 + 1e3 * obs.rtt_s) / 3 if up else 1.0,
        _log_ratio(obs.backlog_requests, 64),
        _log_ratio(obs.backlog_s, 60),
        _log_ratio(obs.arrival_rate, 10),
        _load(obs.cloud_load),
        _load(obs.edge_load),
        _log_ratio(obs.energy_queue_z, 100),
        _log_ratio(obs.work_queue_u, 60),
        _log_ratio(obs.prompt_len, 8192),
        _log_ratio(obs.max_tokens, 8192),
        0.0 if budget is None else 1.0,
        1.0 if budget is None else _log_ratio(budget / 2**30, 64),
    )
    return np.clip(np.array(values, dtype=np.float32), -2.0, 2.0)
