"""The profile file format: measured per-sub-block costs of one machine for one model shape, its
power model and codec costs, with a note of what was measured and what was interpolated.

The profiler writes it, the worker publishes it (retained), ``check-config`` validates it and the
cost model (``policies.cost``) reads it. JSON via :meth:`Profile.load` / :meth:`Profile.save`
(pydantic v2, strict, unknown keys rejected).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from splitwise_core.errors import InvalidArgumentError

__all__ = [
    "MAX_PROFILE_BYTES",
    "PROFILE_VERSION",
    "AttentionTable",
    "CodecCost",
    "PowerModel",
    "PrefillTable",
    "Profile",
    "Provenance",
    "load_profile_file",
    "profile_file_problems",
    "profile_problems",
]

PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 1 << 20  # a profile is a few KiB; anything this large is not one
Provenance = Literal["measured", "interpolated", "assumed", "synthetic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _increasing(name: str, values: list[int]) -> None:
    if not values or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name} must be non-empty and strictly increasing")


class AttentionTable(_Strict):
    """Seconds per query token for `heads[i]` query heads at context length `context[j]`.

    Covers the heads' Q projection, scores, softmax, weighted sum and their slice of W_o; the
    K/V projections are per KV group (:attr:`Profile.kv_group_s`). Zero heads cost zero. Between
    grid points the cost is bilinear; above the largest context it is extrapolated linearly from
    the last two points, below the smallest it is clamped; head counts above the grid scale
    proportionally from the largest one.
    """

    heads: list[int]
    context: list[int]
    seconds: list[list[float]]

    @model_validator(mode="after")
    def _check(self) -> Self:
        _increasing("attention.heads", self.heads)
        _increasing("attention.context", self.context)
        if self.heads[0] < 1 or self.context[0] < 1:
            raise ValueError("attention.heads and attention.context start at ≥ 1")
        if len(self.seconds) != len(self.heads) or any(len(r) != len(self.context) for r in self.seconds):
            raise ValueError("attention.seconds must be len(heads) rows of len(context) values")
        if any(v < 0 for r in self.seconds for v in r):
            raise ValueError("attention.seconds must be ≥ 0")
        return self

    def cost(self, n_heads: float, ctx: float) -> float:
        if n_heads <= 0:
            return 0.0
        by_heads = [_interp_ctx(self.context, row, ctx) for row in self.seconds]
        hs = self.heads
        if n_heads >= hs[-1]:
            return by_heads[-1] * n_heads / hs[-1]
        xs = [0, *hs]
        ys = [0.0, *by_heads]
        for i in range(1, len(xs)):
            if n_heads <= xs[i]:
                t = (n_heads - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        raise AssertionError("unreachable")  # pragma: no cover


def _interp_ctx(xs: list[int], ys: list[float], x: float) -> float:
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return max(ys[-1] + slope * (x - xs[-1]), 0.0)


class PrefillTable(_Strict):
    """Per-token cost of an n-row step relative to a one-row (decode) step, at `prompt_lengths`.

    Batched matmuls make prefill cheaper per token; the factor is linearly interpolated and
    clamped outside the table. One row is always factor 1.
    """

    prompt_lengths: list[int]
    per_token_factor: list[float]

    @model_validator(mode="after")
    def _check(self) -> Self:
        _increasing("prefill.prompt_lengths", self.prompt_lengths)
        if len(self.per_token_factor) != len(self.prompt_lengths) or any(f <= 0 for f in self.per_token_factor):
            raise ValueError("prefill.per_token_factor: one positive factor per prompt length")
        return self

    def factor(self, rows: int) -> float:
        return 1.0 if rows <= 1 else _interp_ctx(self.prompt_lengths, self.per_token_factor, rows)


class CodecCost(_Strict):
    """Seconds per encoded (wire) byte to encode and to decode a tensor in this codec."""

    encode_s_per_byte: float = Field(ge=0)
    decode_s_per_byte: float = Field(ge=0)


class PowerModel(_Strict):
    """Device power draw in watts while computing, while transmitting/receiving, and idle."""

    compute_w: float = Field(ge=0)
    transmit_w: float = Field(ge=0)
    idle_w: float = Field(ge=0)


class Profile(_Strict):
    """Measured costs of one machine for one model shape (all llama layers share one shape).

    Per-token costs are seconds for one row of a one-row (decode) step; an n-row step costs
    ``n · factor(n)`` times as much (:class:`PrefillTable`). `lm_head_s` is per call (the LM head
    computes the last row only). `provenance` says, per field name, whether the value was
    measured, interpolated, assumed or is synthetic (tests); `note` is free text.
    """

    version: Literal[1] = 1
    machine: str
    model: str
    threads: int = Field(ge=1)
    attention: AttentionTable
    kv_group_s: float = Field(ge=0)
    ffn_full_s: float = Field(ge=0)
    ffn_gate_up_s: float = Field(ge=0)
    ffn_down_s: float = Field(ge=0)
    norm_s: float = Field(ge=0)
    add_s: float = Field(ge=0)
    embed_s: float = Field(ge=0)
    lm_head_s: float = Field(ge=0)
    prefill: PrefillTable
    codecs: dict[str, CodecCost]
    power: PowerModel
    codec_kl: dict[str, float] = Field(default_factory=dict)
    """Accuracy cost (KL divergence, nats per token) of one tensor crossing the link in a codec."""
    weight_bytes_per_param: float = Field(gt=0)
    kv_bytes_per_value: float = Field(gt=0)
    base_memory_bytes: int = Field(default=0, ge=0)
    provenance: dict[str, Provenance] = Field(default_factory=dict)
    note: str = ""

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InvalidArgumentError(f"profile: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(f"profile {path}: {exc}") from exc
        try:
            return cls.from_json(text)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"profile {path}: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def profile_problems(obj: object) -> list[str]:
    """What is wrong with `obj` as a profile's JSON value: one line per problem, empty if it is one."""
    if not isinstance(obj, dict):
        return [f"a profile is a JSON object, got {type(obj).__name__}"]
    try:
        Profile.model_validate(obj)
    except ValidationError as err:
        return [
            f"not a profile: {'.'.join(str(p) for p in e['loc']) or 'profile'}: {e['msg']}"
            for e in err.errors(include_url=False)
        ]
    return []


def load_profile_file(path: str | Path) -> dict[str, Any]:
    """The profile object in `path` (JSON, at most MAX_PROFILE_BYTES, a valid profile);
    InvalidArgumentError saying what is wrong otherwise."""
    file = Path(path)
    try:
        if not file.is_file():
            raise InvalidArgumentError(f"{file} does not exist" if not file.exists() else f"{file} is not a file")
        if file.stat().st_size > MAX_PROFILE_BYTES:
            raise InvalidArgumentError(f"{file} is larger than {MAX_PROFILE_BYTES} bytes; not a profile")
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidArgumentError(f"cannot read {file}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{file} is not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(f"{file} is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidArgumentError(f"{file} is not valid JSON: nested too deeply") from None
    problems = profile_problems(obj)
    if problems:
        raise InvalidArgumentError(f"{file}: {problems[0]}")
    return dict(obj)


def profile_file_problems(path: str | Path) -> list[str]:
    """Why the profile file at `path` cannot be used (missing, unreadable, not a profile), or []."""
    try:
        load_profile_file(path)
    except InvalidArgumentError as err:
        return [str(err)]
    return []
