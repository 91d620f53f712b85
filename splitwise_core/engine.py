"""The GGUF sub-block engine, from Python.

`Model` (from the Rust core) exposes the unit of partitioning: per layer, `attention` for any
set of query heads (their contribution after their slice of W_o; partials of disjoint head sets
add up), `ffn` as a whole or in two parts (`gate_up`, `down`), the norms, the embedding and the
LM head, plus `layer_fused` for the all-local case and `forward` for a whole pass. `Engine` adds
the tokenizer, sampling, generation and perplexity on top, all on this device.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# SIMD_LEVELS: the kernel families, slowest first; simd_level() names the one the engine runs,
# which the environment variable SPLITWISE_SIMD may lower (for side-by-side benchmarks).
from splitwise_core._core import SIMD_LEVELS, Model, Session, simd_level
from splitwise_core.errors import InvalidArgumentError, ModelFileError
from splitwise_core.sampling import MAX_TEMPERATURE, Sampling, sample
from splitwise_core.tokenizer import Tokenizer

__all__ = [
    "MAX_TEMPERATURE",
    "SIMD_LEVELS",
    "Engine",
    "Generation",
    "Model",
    "Perplexity",
    "Session",
    "random_seed",
    "sample_token",
    "simd_level",
]


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stop_reason: str  # "eos" | "max_tokens" | "context"
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Perplexity:
    tokens: int
    perplexity: float
    mean_nll: float
    seconds: float


def sample_token(logits: npt.NDArray[np.float32], temperature: float, seed: int, index: int) -> int:
    """The token for generated position `index` under `splitwise_core.sampling.sample`'s rule."""
    return sample(logits, Sampling(temperature=temperature, seed=seed), index).token


def random_seed() -> int:
    """A seed for a request that gave none: both sides of a split plan must draw with the same one."""
    return secrets.randbits(63)


def check_generation_args(max_tokens: int, temperature: float) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not (isinstance(temperature, int | float) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidArgumentError(f"temperature must be a number in [0, {MAX_TEMPERATURE}], got {temperature!r}")


class Engine:
    """A model plus its tokenizer, running every sub-block on this device."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        threads: int = 1,
        *,
        memory_budget_bytes: int | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        """`model_path`: a GGUF file, the first file of a gguf-split set, or a shard directory
        (``splitwise-device shard``). `memory_budget_bytes` caps the weight files kept mapped
        (layer shards are evicted least-recently-used first and mapped again on demand);
        `layers` restricts the instance to those layers (others are never read)."""
        self.path = Path(model_path)
        if memory_budget_bytes is not None and (isinstance(memory_budget_bytes, bool) or memory_budget_bytes <= 0):
            raise InvalidArgumentError(f"memory_budget_bytes must be a positive integer, got {memory_budget_bytes!r}")
        self.tokenizer = Tokenizer(self.path)
        self.model = Model(
            str(self.path),
            threads,
            memory_budget_bytes=memory_budget_bytes,
            layers=None if layers is None else list(layers),
        )
        self.config: dict[str, Any] = dict(self.model.config)

    def prompt_tokens(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidArgumentError("give exactly one of prompt or messages")
        text = prompt if prompt is not None else self.tokenizer.apply_chat_template(messages or [])
        tokens = self.tokenizer.encode(text)
        if not tokens:
            raise InvalidArgumentError("the prompt is empty")
        return tokens

    def stream(
        self, prompt_tokens: Sequence[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None
    ) -> Iterator[int]:
        """Yields generated token ids; stops after EOS (not yielded), max_tokens or the context."""
        check_generation_args(max_tokens, temperature)
        context = int(self.config["context_length"])
        if len(prompt_tokens) >= context:
            raise InvalidArgumentError(f"prompt has {len(prompt_tokens)} tokens; the context holds {context}")
        seed = random_seed() if seed is None else seed
        session = self.model.new_session()
        positions = list(range(len(prompt_tokens)))
        logits = self.model.forward(session, list(prompt_tokens), positions)[-1]
        position = len(prompt_tokens)
        for index in range(max_tokens):
            token = sample_token(logits, temperature, seed, index)
            if token == self.tokenizer.eos_id:
                return
            yield token
            if position >= context:
                return
            logits = self.model.forward(session, [token], [position])[-1]
            position += 1

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generation:
        prompt_tokens = self.prompt_tokens(prompt, messages)
        start = time.perf_counter()
        first_token_at = None
        tokens: list[int] = []
        for token in self.stream(prompt_tokens, max_tokens, temperature, seed):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            tokens.append(token)
        end = time.perf_counter()
        prefill_s = (first_token_at or end) - start
        decode_s = end - (first_token_at or end)
        if len(tokens) == max_tokens:
            reason = "max_tokens"
        elif len(prompt_tokens) + len(tokens) >= int(self.config["context_length"]):
            reason = "context"
        else:
            reason = "eos"
        return Generation(
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            text=self.tokenizer.decode(tokens),
            stop_reason=reason,
            timings={
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "prefill_tokens_per_s": len(prompt_tokens) / prefill_s if prefill_s > 0 else math.inf,
                "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            },
        )

    def token_logits(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits after every token of `tokens` (T × vocab), in one prefill."""
        session = self.model.new_session()
        return self.model.forward(session, list(tokens), list(range(len(tokens))), all_logits=True)

    def perplexity(self, tokens: Sequence[int]) -> Perplexity:
        if len(tokens) < 2:
            raise InvalidArgumentError("perplexity needs at least 2 tokens")
        context = int(self.config["context_length"])
        if len(tokens) > context:
            raise InvalidArgumentError(f"{len(tokens)} tokens do not fit the context of {context}")
        start = time.perf_counter()
        logits = self.token_logits(tokens)
        nll = mean_nll(logits[:-1], np.asarray(tokens[1:]))
        return Perplexity(len(tokens), math.exp(nll), nll, time.perf_counter() - start)


def log_softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    result: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return result


def mean_nll(logits: npt.NDArray[np.floating[Any]], targets: npt.NDArray[np.integer[Any]]) -> float:
    """Mean negative log-likelihood of `targets[i]` under `logits[i]`."""
    logp = log_softmax(logits)
    return float(-logp[np.arange(targets.size), targets].mean())


_FINGERPRINTS: dict[tuple[str, int, int], bytes] = {}


def model_sha256(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a model file, the identity both sides of a split check before they cooperate.
    For a shard directory it is the source file's hash recorded by ``splitwise-device shard`` (the
    loader verifies every shard against it), so shards and the plain file are the same model.
    Cached per (path, size, mtime) so a service pays for hashing once."""
    import hashlib
    import json

    p = Path(path)
    if p.is_dir():
        from splitwise_core.shards import MANIFEST_FILE

        try:
            return bytes.fromhex(json.loads((p / MANIFEST_FILE).read_text())["source_sha256"])
        except (OSError, ValueError, KeyError) as err:
            raise ModelFileError(f"{p / MANIFEST_FILE}: cannot read the source hash ({err})") from err
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _FINGERPRINTS[key] = digest.digest()
    return _FINGERPRINTS[key]
