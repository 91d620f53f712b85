"""Measures what the cost model needs on this machine: ``splitwise-device profile``.

:func:`measure` times the engine's sub-blocks (attention by head count and context length, the
K/V projections of one KV group, FFN parts, norms, residual add, embedding, LM head, a layer at
several prompt lengths, codec encode/decode at several sizes) and the accuracy cost (KL) of one
residual-stream tensor crossing the link in each codec. Every figure is the median of repeated
runs. The raw result (:class:`Measurement`, documented in ``docs/profiling.md``) is converted by
:func:`to_profile` into exactly :class:`splitwise_core.profile.Profile`, the cost model's input.

All llama layers have the same shapes, so the per-layer figures are measured on one
representative layer (the middle one) and used for every layer; the raw result also carries one
whole-layer time for the first, middle and last layer as a check of that assumption.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from splitwise_core import __version__

__all__ = ["Measurement", "Settings", "machine_info", "measure", "to_profile", "weight_bytes_per_param"]

F32 = npt.NDArray[np.float32]
Progress = Callable[[int, int, str], None]

KL_TEXT = (
    "The history of computing is a story of machines that became smaller, faster and cheaper. "
    "Early computers filled whole rooms and consumed enormous amounts of electricity, while a modern "
    "phone carries more processing power than the systems that guided the first missions to the moon. "
    "Engineers now try to run language models on small devices, sharing the work with servers."
)


@dataclass(frozen=True)
class Settings:
    """What to measure; :meth:`default` and :meth:`quick` are the two presets of the CLI."""

    contexts: tuple[int, ...]
    all_heads: bool  # False: 1, one KV group's worth and all heads only
    prompt_lengths: tuple[int, ...]
    codec_sizes: tuple[int, ...]  # in rows of n_embd values
    reps: int
    kl_boundaries: int  # residual-stream boundaries averaged for the codec KL
    check_layers: bool
    cold_cache: bool = True  # evict the CPU caches before each timed call, as a real forward pass does

    @classmethod
    def default(cls) -> Settings:
        return cls((1, 16, 64, 256, 1024, 2048), True, (1, 8, 32, 128, 512), (1, 8, 64, 512), 31, 3, True)

    @classmethod
    def quick(cls) -> Settings:
        return cls((1, 256, 1024), False, (1, 16, 128), (1, 64), 5, 1, False)


@dataclass
class Measurement:
    """Raw result of :func:`measure` (seconds, medians); the documented ``--raw`` JSON."""

    machine: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    representative_layer: int
    attention_heads: list[int]
    attention_context: list[int]
    attention_s: list[list[float]]  # [heads][context], per query token, K/V reused
    kv_group_s: float
    ffn_s: dict[str, float]  # full, gate_up, down — per token
    norm_s: float
    add_s: float
    embed_s: float
    lm_head_s: float
    layer_decode_s: dict[int, float]  # one row at context c (whole layer)
    prefill_layer_s: dict[int, float]  # whole layer, n rows at positions 0..n-1
    prefill_factor: dict[int, float]
    codec_s: dict[str, list[dict[str, float]]]  # per codec: values, bytes, encode_s, decode_s
    codec_s_per_byte: dict[str, dict[str, float]]  # one-row message time / its bytes (what the Profile gets)
    codec_fit: dict[str, dict[str, float]]  # overhead + per-byte fit over all sizes (the Profile has no overhead)
    codec_kl: dict[str, float]
    layer_check_s: dict[int, float] = field(default_factory=dict)
    forward_decode_s: float = 0.0  # whole model, one token at position 0 (measured)
    predicted_decode_s: float = 0.0  # n_layer × one-row layer + embedding + LM head (for comparison)
    provenance: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds_total: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model (/proc/cpuinfo), logical cores, threads used, date, engine version, OS."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "threads": threads,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "engine_version": __version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KM")) * mult)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


class _Flusher:
    """Reads a buffer twice the size of the last-level cache, evicting the model's weights."""

    def __init__(self, enabled: bool) -> None:
        n = min(max(2 * _llc_bytes(), 16 << 20), 512 << 20) // 8 if enabled else 0
        self.buf = np.ones(n, dtype=np.int64)
        self.enabled = enabled

    def __call__(self) -> None:
        if self.enabled:
            self.buf.sum()


_FLUSH = _Flusher(False)


def _median(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of `fn` over `reps` runs after one warm-up; `setup` and the cache flush
    run untimed before each."""
    times = []
    for i in range(reps + 1):
        if setup is not None:
            setup()
        _FLUSH()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
    return statistics.median(times)


def _fit_affine(sizes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``seconds ≈ overhead + per_byte · bytes``; both clamped at ≥ 0."""
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean() / x.mean()) if x.size and x.mean() > 0 else 0.0
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(float(slope), 0.0)
    return max(float(intercept), 0.0), slope


def _kl(ref: F32, other: F32) -> float:
    """Mean KL(ref ‖ other) over rows of logits, in nats."""
    a = ref.astype(np.float64)
    b = other.astype(np.float64)
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return float(max((np.exp(la) * (la - lb)).sum(axis=1).mean(), 0.0))


def _kl_tokens(model_path: Path, n_vocab: int, n: int) -> list[int]:
    try:
        from splitwise_core.tokenizer import Tokenizer

        tokens = Tokenizer(model_path).encode(KL_TEXT, special=False)
    except Exception:  # no tokenizer (e.g. a shard directory without vocabulary): fixed ids
        tokens = []
    if len(tokens) < 8:
        tokens = [(17 * i + 3) % n_vocab for i in range(n)]
    return tokens[:n]


def measure(
    model_path: str | os.PathLike[str],
    threads: int = 1,
    settings: Settings | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """Profiles `model_path` with `threads` compute threads (see module docstring)."""
    from splitwise_core import codecs
    from splitwise_core.engine import Model, model_sha256

    global _FLUSH
    started = time.perf_counter()
    s = settings or Settings.default()
    _FLUSH = _Flusher(s.cold_cache)
    path = Path(model_path)
    model = Model(path, threads)
    cfg = model.config
    n_layer, n_head, n_kv = int(cfg["n_layer"]), int(cfg["n_head"]), int(cfg["n_head_kv"])
    d, n_vocab = int(cfg["n_embd"]), int(cfg["n_vocab"])
    ctx_max = int(cfg["context_length"])
    contexts = sorted({c for c in s.contexts if 1 <= c <= ctx_max})
    heads = list(range(1, n_head + 1)) if s.all_heads else sorted({1, max(1, n_head // n_kv), n_head})
    prompt_lengths = sorted({p for p in s.prompt_lengths if 1 <= p <= ctx_max} | {1})
    layer = n_layer // 2
    rng = np.random.default_rng(0)
    n_rows = max(max(contexts), max(prompt_lengths))
    tokens = [int(t) for t in rng.integers(0, n_vocab, n_rows)]
    x_all = model.embed(tokens, list(range(len(tokens))))
    xn_all = model.attn_norm(layer, x_all)

    steps: list[tuple[str, Callable[[], None]]] = []
    m = Measurement(
        machine=machine_info(threads),
        model={
            "path": str(path),
            "sha256": model_sha256(path).hex(),
            "config": {k: v for k, v in cfg.items() if isinstance(v, int | float | str | bool)},
        },
        settings=asdict(s),
        representative_layer=layer,
        attention_heads=heads,
        attention_context=contexts,
        attention_s=[[0.0] * len(contexts) for _ in heads],
        kv_group_s=0.0,
        ffn_s={},
        norm_s=0.0,
        add_s=0.0,
        embed_s=0.0,
        lm_head_s=0.0,
        layer_decode_s={},
        prefill_layer_s={},
        prefill_factor={},
        codec_s={},
        codec_s_per_byte={},
        codec_fit={},
        codec_kl={},
    )

    # -- attention: fill the middle layer's KV once to the largest context, then shrink ---------
    attn_session = model.new_session()
    model.attention(attn_session, layer, list(range(n_head)), xn_all[: max(contexts)], list(range(max(contexts))))

    def attention_at(ci: int, c: int, hi: int, h: int) -> None:
        attn_session.truncate(c)  # cache holds positions 0..c-1; the query at c-1 reuses its K/V
        q, pos = xn_all[c - 1 : c], [c - 1]
        m.attention_s[hi][ci] = _median(partial(model.attention, attn_session, layer, list(range(h)), q, pos), s.reps)

    for ci in reversed(range(len(contexts))):  # longest context first: truncating only shrinks the cache
        for hi, h in enumerate(heads):
            c = contexts[ci]
            steps.append((f"attention {h} heads ctx {c}", partial(attention_at, ci, c, hi, h)))

    def kv_group() -> None:
        c = contexts[0]
        q, pos = xn_all[c - 1 : c], [c - 1]
        every = list(range(n_head))
        # Each rep times the call that computes K/V and, right after, the same call reusing them;
        # the difference of the fastest of each. The K/V of one row is tens of microseconds, less
        # than what preemption adds to a call on a busy machine: the difference of two medians
        # (and the median of paired differences) came out 0 in most quick profiles with two
        # competing processes on 2 cores, while preemption only ever adds to a minimum. Interleaved,
        # hence not `_median`'s loop: the fastest of two separate series gave 0 in 2 of 6 such runs.
        computes, reuses = [], []
        for i in range(s.reps + 1):
            attn_session.truncate(c - 1)
            _FLUSH()
            start = time.perf_counter()
            model.attention(attn_session, layer, every, q, pos)
            compute = time.perf_counter() - start
            _FLUSH()
            start = time.perf_counter()
            model.attention(attn_session, layer, every, q, pos)
            reuse = time.perf_counter() - start
            if i:
                computes.append(compute)
                reuses.append(reuse)
        m.kv_group_s = max(min(computes) - min(reuses), 0.0) / n_kv

    steps.append(("K/V projections per KV group", kv_group))

    # -- the other sub-blocks, one row -------------------------------------------------------
    x1 = x_all[:1]

    def blocks() -> None:
        gate_up = model.ffn(layer, "gate_up", x1)
        m.ffn_s = {
            "full": _median(lambda: model.ffn(layer, "full", x1), s.reps),
            "gate_up": _median(lambda: model.ffn(layer, "gate_up", x1), s.reps),
            "down": _median(lambda: model.ffn(layer, "down", gate_up), s.reps),
        }
        m.norm_s = statistics.median(
            [_median(lambda: model.attn_norm(layer, x1), s.reps), _median(lambda: model.ffn_norm(layer, x1), s.reps)]
        )
        y1 = x_all[1:2].copy()
        m.add_s = _median(lambda: np.add(x1, y1), s.reps)
        m.embed_s = _median(lambda: model.embed(tokens[:1], [0]), s.reps)
        m.lm_head_s = _median(lambda: model.output_logits(x1), s.reps)

    steps.append(("ffn, norms, add, embedding, LM head", blocks))

    # -- whole layer: decode at mean context (n+1)/2 and prefill of n rows -------------------
    layer_session = model.new_session()
    fill = max(prompt_lengths)
    model.layer_fused(layer_session, layer, x_all[:fill].copy(), list(range(fill)))

    def layer_at(n: int) -> None:
        mid = max((n + 1) // 2, 1)
        xd = x_all[mid - 1 : mid].copy()
        m.layer_decode_s[n] = _median(
            lambda: model.layer_fused(layer_session, layer, xd, [mid - 1]),
            s.reps,
            setup=lambda: layer_session.truncate(mid - 1),
        )
        xp = x_all[:n].copy()
        m.prefill_layer_s[n] = _median(
            lambda: model.layer_fused(layer_session, layer, xp, list(range(n))),
            max(3, s.reps // (1 + n // 128)),
            setup=lambda: layer_session.truncate(0),
        )
        m.prefill_factor[n] = 1.0 if n == 1 else m.prefill_layer_s[n] / (n * m.layer_decode_s[n])

    for n in prompt_lengths:
        steps.append((f"layer prefill {n} rows", partial(layer_at, n)))

    # -- codecs ------------------------------------------------------------------------------
    def codec_costs(name: str) -> None:
        rows = []
        for r in sorted(set(s.codec_sizes) | {1}):
            x = rng.standard_normal(r * d).astype(np.float32)
            buf = codecs.encode(x, name)
            rows.append(
                {
                    "values": float(x.size),
                    "bytes": float(len(buf)),
                    "encode_s": _median(partial(codecs.encode, x, name), s.reps),
                    "decode_s": _median(partial(codecs.decode, buf, name, x.shape), s.reps),
                }
            )
        m.codec_s[name] = rows
        sizes = [int(r["bytes"]) for r in rows]
        small = rows[0]  # the smallest message: one row, what every decode step sends
        m.codec_s_per_byte[name] = {
            "encode": small["encode_s"] / small["bytes"],
            "decode": small["decode_s"] / small["bytes"],
        }
        fit: dict[str, float] = {}
        for op in ("encode", "decode"):
            fit[f"{op}_overhead_s"], fit[f"{op}_s_per_byte"] = _fit_affine(sizes, [r[f"{op}_s"] for r in rows])
        m.codec_fit[name] = fit

    for name in codecs.CODECS:
        steps.append((f"codec {name} encode/decode", partial(codec_costs, name)))

    # -- codec accuracy: KL of the logits when the residual stream crosses once ---------------
    def codec_kl() -> None:
        kl_tokens = _kl_tokens(path, n_vocab, 48)
        pos = list(range(len(kl_tokens)))
        bounds = sorted({max(1, round(n_layer * (i + 1) / (s.kl_boundaries + 1))) for i in range(s.kl_boundaries)})
        ref_session = model.new_session()
        x = model.embed(kl_tokens, pos)
        states: dict[int, F32] = {}
        for ell in range(n_layer):
            if ell in bounds:
                states[ell] = x.copy()
            x = model.layer_fused(ref_session, ell, x, pos)
        ref = model.output_logits(x)
        kls: dict[str, list[float]] = {name: [] for name in codecs.CODECS}
        for b in bounds:
            for name in codecs.CODECS:
                xs = states[b]
                y = codecs.decode(codecs.encode(np.ascontiguousarray(xs), name), name, xs.shape)
                sess = model.new_session()
                for ell in range(b, n_layer):
                    y = model.layer_fused(sess, ell, y, pos)
                kls[name].append(_kl(ref, model.output_logits(y)))
        m.codec_kl = {name: statistics.mean(v) for name, v in kls.items()}
        m.notes.append(
            f"codec_kl: mean KL (nats/token) of the logits over {len(kl_tokens)} tokens of a fixed English text when "
            f"the residual stream crosses the link once, before layer(s) {bounds}"
        )

    steps.append(("codec accuracy (KL)", codec_kl))

    # -- checks: other layers share the shape; whole-model decode step ------------------------
    if s.check_layers:

        def check() -> None:
            sess = model.new_session()
            for ell in sorted({0, layer, n_layer - 1}):
                m.layer_check_s[ell] = _median(
                    partial(model.layer_fused, sess, ell, x1.copy(), [0]), s.reps, setup=sess.clear
                )
            fs = model.new_session()
            m.forward_decode_s = _median(lambda: model.forward(fs, tokens[:1], [0]), s.reps, setup=fs.clear)
            m.predicted_decode_s = n_layer * m.layer_decode_s[1] + m.embed_s + m.lm_head_s

        steps.append(("layer check (first, middle, last) and full decode step", check))

    for i, (label, run) in enumerate(steps, 1):
        if progress is not None:
            progress(i, len(steps), label)
        run()

    measured = ["attention", "kv_group_s", "ffn_full_s", "ffn_gate_up_s", "ffn_down_s", "norm_s", "add_s"]
    m.provenance = {k: "measured" for k in [*measured, "embed_s", "lm_head_s", "prefill", "codecs", "codec_kl"]}
    m.provenance.update(
        {"power": "assumed", "weight_bytes_per_param": "measured", "kv_bytes_per_value": "assumed"},
    )
    m.notes.extend(
        [
            f"per-layer costs measured on layer {layer} only and used for every layer (all {n_layer} layers share "
            "one shape; layer_check_s compares first/middle/last whole layers in the default run)",
            f"attention measured at head counts {heads} (heads 0..n-1) and contexts {contexts}; other head counts "
            "and contexts are interpolated by the cost model (bilinear, linear extrapolation above the grid)",
            "kv_group_s = (all heads with K/V computed − all heads with K/V reused) / n_head_kv at the smallest "
            "context",
            "prefill factor = whole-layer time for n rows / (n × one-row layer time at context (n+1)/2)",
            f"codec seconds/byte = time / bytes of a one-row message ({d} values, what a decode step sends); "
            "the codecs have a fixed per-call overhead the Profile cannot express, so larger (prefill) messages "
            "are over-predicted — the raw codec_fit has overhead + per-byte",
            "power NOT measured: this machine exposes no power sensor (a VM); power is 0 W as a placeholder, "
            "take it from a deploy/profiles device file",
            "kv_bytes_per_value = 4: the engine keeps K/V in float32",
            (
                f"cold cache: a {_FLUSH.buf.nbytes >> 20} MiB buffer was read before every timed call so weights "
                "come from memory as in a real forward pass"
                if s.cold_cache
                else "warm cache: the same weights were reused call after call (optimistic)"
            ),
        ]
    )
    m.seconds_total = time.perf_counter() - started
    return m


def weight_bytes_per_param(path: Path, cfg: dict[str, Any]) -> float:
    """The model files' bytes per weight (a type mix averaged over every tensor): what the cost
    model multiplies a plan's parameter count by to predict the device's resident weights."""
    size = sum(p.stat().st_size for p in path.glob("*.gguf")) if path.is_dir() else path.stat().st_size
    return size / _param_count(cfg)


def _param_count(cfg: dict[str, Any]) -> int:
    d, f, v = int(cfg["n_embd"]), int(cfg["n_ff"]), int(cfg["n_vocab"])
    hd = int(cfg.get("head_dim", d // int(cfg["n_head"])))
    q, kv = int(cfg["n_head"]) * hd, int(cfg["n_head_kv"]) * hd
    ffn = (2 if cfg.get("architecture") == "gpt2" else 3) * d * f  # GPT-2's FFN has no gate
    per_layer = 2 * d * q + 2 * d * kv + ffn + 2 * d
    output = 0 if cfg.get("tied_output", False) else v * d
    return v * d + int(cfg["n_layer"]) * per_layer + d + output


def to_profile(m: Measurement) -> Any:
    """The measurement as :class:`splitwise_core.profile.Profile` (validated)."""
    from splitwise_core.profile import Profile

    cfg = m.model["config"]
    path = Path(m.model["path"])
    lengths = sorted(m.prefill_factor)
    info = m.machine
    machine = f"{info['cpu_model']} ({info['logical_cores']} logical cores, {info['threads']} threads)"
    note = "; ".join(
        [
            f"measured {info['date']} by splitwise-device {info['engine_version']} on {info['platform']}",
            f"model sha256 {m.model['sha256']}",
            *m.notes,
        ]
    )
    return Profile.model_validate(
        {
            "machine": machine,
            "model": f"{path.name} sha256:{m.model['sha256'][:16]}",
            "threads": int(info["threads"]),
            "attention": {"heads": m.attention_heads, "context": m.attention_context, "seconds": m.attention_s},
            "kv_group_s": m.kv_group_s,
            "ffn_full_s": m.ffn_s["full"],
            "ffn_gate_up_s": m.ffn_s["gate_up"],
            "ffn_down_s": m.ffn_s["down"],
            "norm_s": m.norm_s,
            "add_s": m.add_s,
            "embed_s": m.embed_s,
            "lm_head_s": m.lm_head_s,
            "prefill": {"prompt_lengths": lengths, "per_token_factor": [m.prefill_factor[n] for n in lengths]},
            "codecs": {
                k: {"encode_s_per_byte": v["encode"], "decode_s_per_byte": v["decode"]}
                for k, v in m.codec_s_per_byte.items()
            },
            "power": {"compute_w": 0.0, "transmit_w": 0.0, "idle_w": 0.0},
            "codec_kl": m.codec_kl,
            "weight_bytes_per_param": weight_bytes_per_param(path, cfg),
            "kv_bytes_per_value": 4.0,
            "base_memory_bytes": 0,
            "provenance": m.provenance,
            "note": note,
        }
    )


def stderr_progress(i: int, n: int, label: str) -> None:
    """The CLI's progress bar: ``[i/n] label`` on stderr."""
    width = 20
    done = math.floor(width * (i - 1) / n)
    print(f"[{i}/{n}] [{'#' * done}{'.' * (width - done)}] {label}", file=sys.stderr, flush=True)
