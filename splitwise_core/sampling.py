"""Choosing the next token from logits, the same way on every side.

The device samples when it runs the LM head; a worker samples when the plan puts the LM head on
the cloud, and then sends back the token (and, when asked, the top alternatives' log-probabilities)
instead of a vocabulary of f32 logits. Both must pick the same token from the same logits, so a
draw depends only on (seed, index of the generated token) — never on how many draws came before
on that side, which a failover or a fallback to the edge would change.

The rule (documented in docs/protocol.md):

1. temperature 0: the arg-max (the lowest token id among equal logits).
2. Otherwise candidates are ordered by logit, highest first, ties by token id (by token id alone
   when neither top_k nor top_p is set: the order then changes nothing but the cost); `top_k` > 0
   keeps the first k; probabilities are softmax(logit / temperature) over those; `top_p` < 1 keeps the
   shortest prefix whose probability reaches top_p. With u uniform in [0, 1) from
   `numpy.random.default_rng((seed, index))`, the token is the first candidate whose cumulative
   probability exceeds u times the kept total.

Reported log-probabilities are the model's own (log-softmax of the raw logits, temperature 1),
whatever the sampling settings: the chosen token's, and the `logprobs` most likely tokens'.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from splitwise_core.errors import InvalidArgumentError

__all__ = ["MAX_LOGPROBS", "MAX_TEMPERATURE", "SampledToken", "Sampling", "sample"]

MAX_TEMPERATURE = 10.0
MAX_LOGPROBS = 20
_ENTRY = struct.Struct("<If")  # token id, log-probability


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to choose a token. `seed` is a u64; `logprobs` is how many alternatives to report."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = 0

    def __post_init__(self) -> None:
        # The frame carries them as f32: both sides must sample with exactly the values sent.
        object.__setattr__(self, "temperature", _f32(self.temperature))
        object.__setattr__(self, "top_p", _f32(self.top_p))
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidArgumentError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not 0 <= self.top_k < 1 << 32:
            raise InvalidArgumentError(f"top_k must be 0 (no limit) or a positive count, got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.seed < 1 << 64:
            raise InvalidArgumentError(f"seed must be in 0..2^64-1, got {self.seed!r}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgumentError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")


@dataclass(frozen=True, slots=True)
class SampledToken:
    """The chosen token, its log-probability and the `logprobs` most likely (token, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_bytes(self) -> bytes:
        """The wire form: (1 + len(top)) entries of (u32 token, f32 logprob), the chosen one first."""
        return b"".join(_ENTRY.pack(t, lp) for t, lp in ((self.token, self.logprob), *self.top))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SampledToken:
        """Inverse of `to_bytes`; InvalidArgumentError for a length that is not whole entries,
        more than MAX_LOGPROBS alternatives, or a log-probability that is NaN or above 0."""
        if len(data) == 0 or len(data) % _ENTRY.size or len(data) // _ENTRY.size > 1 + MAX_LOGPROBS:
            raise InvalidArgumentError(
                f"a sampled token takes 1..{1 + MAX_LOGPROBS} entries of {_ENTRY.size} bytes, got {len(data)} bytes"
            )
        entries = [(int(t), float(lp)) for t, lp in _ENTRY.iter_unpack(data)]
        if any(not (lp <= 0.0) for _, lp in entries):  # also rejects NaN
            raise InvalidArgumentError("a log-probability is NaN or above 0")
        (token, logprob), *top = entries
        return cls(token, logprob, tuple(top))

    @staticmethod
    def wire_bytes(logprobs: int) -> int:
        return _ENTRY.size * (1 + logprobs)


def _f32(value: float) -> float:
    return float(np.float32(value)) if isinstance(value, int | float) else value


def _log_softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - logits.max()
    result: npt.NDArray[np.float64] = shifted - math.log(float(np.exp(shifted).sum()))
    return result


def _ranked(values: npt.NDArray[np.float64], limit: int) -> npt.NDArray[np.intp]:
    """Indices of the `limit` largest values (all if limit is 0 or too large), highest first,
    ties by index."""
    n = values.size
    candidates = np.arange(n) if limit <= 0 or limit >= n else np.argpartition(-values, limit - 1)[:limit]
    if 0 < limit < n:
        # argpartition splits ties at the boundary arbitrarily: take every index tied with the k-th.
        kth = values[candidates].min()
        candidates = np.flatnonzero(values >= kth)
    order = np.lexsort((candidates, -values[candidates]))
    ranked: npt.NDArray[np.intp] = candidates[order]
    return ranked[:limit] if limit > 0 else ranked


def sample(logits: npt.NDArray[np.floating], sampling: Sampling, index: int) -> SampledToken:
    """The token for generated position `index` (0 for the first generated token)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if z.size == 0 or not np.all(np.isfinite(z)):
        raise InvalidArgumentError("logits must be a non-empty vector of finite numbers")
    logprobs = _log_softmax(z)
    if sampling.temperature == 0.0:
        token = int(np.argmax(z))
    else:
        unlimited = sampling.top_k == 0 and sampling.top_p == 1.0
        candidates = np.arange(z.size) if unlimited else _ranked(z, sampling.top_k)
        weights = np.exp(_log_softmax(z[candidates] / sampling.temperature))
        cumulative = np.cumsum(weights)
        if sampling.top_p < 1.0:
            kept = int(np.searchsorted(cumulative, sampling.top_p * cumulative[-1], side="left")) + 1
            cumulative = cumulative[: min(kept, candidates.size)]
        u = float(np.random.default_rng((sampling.seed, index)).random())
        chosen = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
        token = int(candidates[min(chosen, cumulative.size - 1)])
    # Rounded to f32 as the wire carries them, so a token is the same value on both sides.
    top = tuple((int(t), _f32(logprobs[t])) for t in _ranked(z, sampling.logprobs)) if sampling.logprobs else ()
    return SampledToken(token, _f32(logprobs[token]), top)
