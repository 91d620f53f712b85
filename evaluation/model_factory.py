"""Test-model factory: GGUF llama models of every tensor type the engine supports, and of several shapes.

* `dequantized_model(src, dst, dtype)` rewrites a GGUF with every tensor dequantized to F32 (or F16 for
  the 2-D weights; norms stay F32), keeping all metadata (tokenizer arrays, chat template...).
* `quantized_model(src, dst, ftype)` runs llama.cpp's own quantizer (`llama_model_quantize`) on an
  F32/F16 file, for ftype in `FTYPES`.
* `random_llama(dst, ...)` writes a synthetic llama with random weights and SmolLM2's tokenizer.
* `cached_*` wrap these with an on-disk cache under `$SPLITWISE_TEST_MODELS` (default
  `~/.cache/splitwise/test-models/`), keyed by the source file's size and first MiB, `FACTORY_VERSION`
  and the parameters. Every file is written under a temporary name and renamed into place.

What llama.cpp's quantizer (llama-cpp-python 0.3.36) actually writes — read back with gguf.GGUFReader
(`tensor_type_counts`). SmolLM2-135M (d=576, FFN 1536, tied output, 30 layers, 61 norms always F32):

    ftype    token_embd  attn_q/k/v/output (120)   ffn_gate/up (60)   ffn_down (30)
    F32      F32         F32                       F32                F32
    F16      F16         F16                       F16                F16
    BF16     BF16        BF16                      BF16               BF16
    Q8_0     Q8_0        Q8_0                      Q8_0               Q8_0
    Q4_0     Q8_0        Q4_0                      Q4_0               Q4_0
    Q4_1     Q8_0        Q4_1                      Q4_1               Q4_1
    Q5_0     Q8_0        Q5_0                      Q5_0               Q5_0
    Q5_1     Q8_0        Q5_1                      Q5_1               Q5_1
    Q4_K_M   Q8_0        Q5_0 (attn_v: 14 Q8_0)    Q5_0               16 Q4_K, 14 Q6_K
    Q5_K_M   Q8_0        Q5_1 (attn_v: 14 Q8_0)    Q5_1               16 Q5_K, 14 Q6_K
    Q6_K     Q8_0        Q8_0                      Q8_0               Q6_K

(the counts are asserted by tests/unit/test_engine_types.py, `SMOLLM2_TYPES`.) Rows of 576 are
not a multiple of the 256-element K-quant super-block, so for those tensors llama.cpp falls back
(Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0); only ffn_down (rows of 1536) is really K-quantized. No fallback
produced a type outside the engine's set (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q6_K) — `tensor_type_counts` + `ENGINE_TYPES` check that on every file. To exercise K-quants on every
matrix the synthetic shape `k256` (n_embd 512, FFN 1536) has all rows a multiple of 256; its
Q4_K_M / Q5_K_M / Q6_K files contain only K-quant matrices (13 Q4_K + 3 Q6_K, 13 Q5_K + 3 Q6_K,
16 Q6_K; asserted as `RANDOM_K_TYPES` in the tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

FACTORY_VERSION = 2

#: GGML tensor types the Splitwise engine implements.
ENGINE_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})

#: llama.cpp file types we build; "F32" is the dequantized file itself.
FTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K")

_LLAMA_FTYPE_NAMES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

# Keys GGUFWriter writes itself (or that describe the file layout rather than the model).
_WRITER_KEYS = frozenset({"general.architecture", "general.alignment", "general.file_type"})


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    root = os.environ.get("SPLITWISE_TEST_MODELS")
    path = Path(root) if root else Path.home() / ".cache" / "splitwise" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_fingerprint(path: Path) -> str:
    """Size plus SHA-256 of the first MiB: cheap, and changes when the file does."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return f"{path.stat().st_size}-{digest.hexdigest()[:16]}"


def _cached(prefix: str, key: dict[str, Any], build: Callable[[Path], Path]) -> Path:
    key = {"factory_version": FACTORY_VERSION, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{prefix}-{digest}.gguf"
    if not path.is_file():
        build(path)
        path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def _atomic_output(dst: Path) -> Iterator[Path]:
    """Yields a temporary path next to `dst`; renames it onto `dst` only if the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def default_source() -> Path:
    from splitwise_core.tokenizer import bundled_model_path

    return bundled_model_path()


# -------------------------------------------------------------------------------------------- metadata


def _field_value(field: Any) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """(value, type, array sub-type) of a GGUFReader field, strings as raw bytes (no UTF-8 round trip)."""
    types = list(field.types)
    main = types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if len(types) != 2:
            raise ValueError(f"{field.name}: nested arrays are not supported")
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return field.contents(), main, sub
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]), main, None
    return field.contents(), main, None


def _copy_metadata(
    reader: gguf.GGUFReader, writer: gguf.GGUFWriter, keep: Callable[[str], bool] = lambda _key: True
) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _WRITER_KEYS or not keep(key):
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(key, value, vtype, sub)


def _write_streaming(
    writer: gguf.GGUFWriter, dst: Path, specs: list[tuple[str, tuple[int, ...], np.dtype[Any]]], produce: Any
) -> None:
    """Declares every tensor first, then writes them one by one (`produce(i)` → array), so at most one
    tensor is in memory at a time."""
    for name, shape, dtype in specs:
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file(path=dst)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape, dtype) in enumerate(specs):
        array = np.ascontiguousarray(produce(i), dtype=dtype)
        if array.shape != shape:
            raise AssertionError(f"{name}: produced {array.shape}, declared {shape}")
        writer.write_tensor_data(array)
    writer.close()


# ---------------------------------------------------------------------------------------- dequantized


def dequantized_model(src: Path, dst: Path, dtype: str = "f32") -> Path:
    """`src` with every tensor dequantized to F32 (dtype="f32") or 2-D weights in F16 (dtype="f16")."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    specs: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml order → numpy order
        out = np.dtype(np.float16) if dtype == "f16" and len(shape) >= 2 else np.dtype(np.float32)
        specs.append((t.name, shape, out))

    def produce(i: int) -> np.ndarray[Any, Any]:
        t = reader.tensors[i]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(specs[i][1])

    with _atomic_output(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(reader, writer)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        _write_streaming(writer, tmp, specs, produce)
    return Path(dst)


# ------------------------------------------------------------------------------------------ quantized


@contextlib.contextmanager
def _captured_native_output() -> Iterator[Callable[[], str]]:
    """Redirects fds 1 and 2 (llama.cpp logs from C) into a temp file; yields a reader of it."""
    with tempfile.TemporaryFile() as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)

            def read() -> str:
                log.seek(0)
                return log.read().decode(errors="replace")

            yield read
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def quantized_model(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer on `src` (an F32/F16 GGUF), output type `ftype` (one of `FTYPES`), in a
    child process like every llama.cpp call of the tests (evaluation.oracle)."""
    from evaluation.oracle import isolated

    if ftype not in _LLAMA_FTYPE_NAMES:
        raise ValueError(f"unknown ftype {ftype!r}; one of {FTYPES}")
    with _atomic_output(dst) as tmp:
        isolated(_quantize, str(src), str(tmp), ftype, threads, label=f"quantize {Path(src).name} to {ftype}")
    return Path(dst)


def _quantize(src: str, dst: str, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPE_NAMES[ftype])
    params.nthread = threads
    with _captured_native_output() as log:
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        text = log()
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama_model_quantize({src}, {ftype}) returned {rc}:\n{text[-4000:]}")


# ------------------------------------------------------------------------------------------- inspect


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name → GGML type name, as stored in the file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def tensor_type_counts(path: Path) -> dict[str, int]:
    return dict(sorted(Counter(tensor_types(path).values()).items()))


def unsupported_types(path: Path) -> set[str]:
    return set(tensor_types(path).values()) - ENGINE_TYPES


# --------------------------------------------------------------------------------------- random llama


@dataclass(frozen=True)
class Shape:
    """A synthetic model shape (head_dim = n_embd / n_head) of one of ARCHITECTURES."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    tied_output: bool
    seed: int = 0
    logit_scale: float = 2.5
    row_norm_spread: float = 0.3
    architecture: str = "llama"


#: What random_llama writes besides a llama layer: Qwen2's Q/K/V biases, Qwen3's per-head Q/K norms;
#: GPT-2's layer instead (see _gpt2_layout).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")
CONTEXT_LENGTH = 2048


def write_hyperparameters(
    writer: gguf.GGUFWriter,
    architecture: str,
    shape: tuple[int, int, int, int, int, int],
    context_length: int,
    rope_theta: float,
) -> None:
    """The `<architecture>.*` keys of a generated file; `shape` is (n_layer, n_embd, n_head,
    n_head_kv, n_ff, n_vocab). GPT-2 has a LayerNorm epsilon and no RoPE keys."""
    a = architecture
    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab = shape
    writer.add_uint32(f"{a}.block_count", n_layer)
    writer.add_uint32(f"{a}.context_length", context_length)
    writer.add_uint32(f"{a}.embedding_length", n_embd)
    writer.add_uint32(f"{a}.feed_forward_length", n_ff)
    writer.add_uint32(f"{a}.attention.head_count", n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", n_head_kv)
    if a == "gpt2":
        writer.add_float32(f"{a}.attention.layer_norm_epsilon", 1e-5)
    else:
        writer.add_float32(f"{a}.rope.freq_base", rope_theta)
        writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        writer.add_uint32(f"{a}.rope.dimension_count", n_embd // n_head)
    writer.add_uint32(f"{a}.vocab_size", n_vocab)


def _gpt2_layout(
    n_layer: int, n_embd: int, n_ff: int, mat: np.dtype[Any], embd_std: float
) -> list[tuple[str, tuple[int, ...], np.dtype[Any], float, float]]:
    """GPT-2's tensors besides the token embedding and the LM head: learned position embeddings
    (half the token embedding's std, so the token still dominates), LayerNorms with bias, the
    fused Q/K/V matrix (MHA: n_embd rows each), biases after every linear map (std 0.1), a
    non-gated FFN."""
    f32 = np.dtype(np.float32)
    layout = [
        ("position_embd.weight", (CONTEXT_LENGTH, n_embd), f32, 0.5 * embd_std, 0.0),
        ("output_norm.bias", (n_embd,), f32, 0.1, 0.0),
    ]
    for i in range(n_layer):
        b = f"blk.{i}."
        layout += [
            (b + "attn_norm.weight", (n_embd,), f32, 0.1, 1.0),
            (b + "attn_norm.bias", (n_embd,), f32, 0.1, 0.0),
            (b + "attn_qkv.weight", (3 * n_embd, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "attn_qkv.bias", (3 * n_embd,), f32, 0.1, 0.0),
            (b + "attn_output.weight", (n_embd, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "attn_output.bias", (n_embd,), f32, 0.1, 0.0),
            (b + "ffn_norm.weight", (n_embd,), f32, 0.1, 1.0),
            (b + "ffn_norm.bias", (n_embd,), f32, 0.1, 0.0),
            (b + "ffn_up.weight", (n_ff, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "ffn_up.bias", (n_ff,), f32, 0.1, 0.0),
            (b + "ffn_down.weight", (n_embd, n_ff), mat, 1.5 / np.sqrt(n_ff), 0.0),
            (b + "ffn_down.bias", (n_embd,), f32, 0.1, 0.0),
        ]
    return layout


#: The shapes the agreement tests use (all 49152-token SmolLM2 vocabulary).
SHAPES: dict[str, Shape] = {
    # no GQA, 6 heads (not a power of two), tied output
    "mha_h6": Shape(n_layer=2, n_embd=384, n_head=6, n_head_kv=6, n_ff=1024, tied_output=True, seed=1),
    # GQA 4:1 with 12 heads of 32, tied output
    "gqa4_h12": Shape(n_layer=2, n_embd=384, n_head=12, n_head_kv=3, n_ff=1024, tied_output=True, seed=2),
    # SmolLM2's block shape (9 heads, GQA 3:1) with a separate output.weight
    "untied_h9": Shape(n_layer=3, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, tied_output=False, seed=3),
    # every row a multiple of 256 → K-quants without fallback; GQA 4:1, untied output
    "k256": Shape(n_layer=2, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, tied_output=False, seed=4),
    # the other architectures, GQA 4:1: Qwen2 (Q/K/V biases) tied, Qwen3 (Q/K norms) untied
    "qwen2_gqa4": Shape(
        n_layer=2, n_embd=384, n_head=12, n_head_kv=3, n_ff=1024, tied_output=True, seed=5, architecture="qwen2"
    ),
    "qwen3_gqa4": Shape(
        n_layer=2, n_embd=384, n_head=12, n_head_kv=3, n_ff=1024, tied_output=False, seed=6, architecture="qwen3"
    ),
    # GPT-2 (MHA). Untied: tied (as the released GPT-2 models are) its small random embedding let the
    # GELU FFN's common offset dominate (42 distinct top-1 of 256; tied outputs run in qwen2_gqa4)
    "gpt2_h6": Shape(
        n_layer=2, n_embd=384, n_head=6, n_head_kv=6, n_ff=1536, tied_output=False, seed=7, architecture="gpt2"
    ),
}


def random_llama(
    dst: Path,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    tied_output: bool,
    seed: int,
    dtype: str = "f32",
    logit_scale: float = 2.5,
    row_norm_spread: float = 0.3,
    architecture: str = "llama",
    tokenizer_source: Path | None = None,
) -> Path:
    """A llama GGUF with random weights and the tokenizer (vocabulary, merges, template) of
    `tokenizer_source` (default: the bundled SmolLM2); `architecture` "qwen2" adds Q/K/V biases
    (std 0.1), "qwen3" per-head Q/K norm weights, and either names its keys after itself.

    Scales: every matrix that reads a normalised vector has std 1/sqrt(fan_in), so q, k, v, gate and
    up have unit-scale entries (attention scores ~N(0,1), neither uniform nor one-hot) and each block
    adds about unit RMS to the residual. Output rows are random directions with RMS length
    `logit_scale` and a log-normal spread of lengths (`row_norm_spread`; like real LM heads, where
    frequent tokens have longer rows). Purely Gaussian logits (spread 0) are either nearly flat or,
    scaled up, full of near-ties among 49152 candidates, so 1% noise already flips ~5% of argmaxes;
    with spread 0.3 and scale 2.5 the mean entropy is ~2.4 nats (SmolLM2 on English: ~2.3; uniform:
    ln 49152 = 10.8) and top-1 is about twice as robust, so KL and top-1 mean something. With a tied
    output the token embedding is that matrix, so the embedding is small next to the block outputs
    and the input token does not dominate its own prediction. Norm weights are 1 + N(0, 0.1²).
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture == "gpt2" and n_head_kv != n_head:
        raise ValueError("gpt2 has no grouped-query attention: n_head_kv must equal n_head")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    head_dim = n_embd // n_head
    source = gguf.GGUFReader(tokenizer_source or default_source())
    n_vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    f32 = np.dtype(np.float32)
    mat = np.dtype(np.float16) if dtype == "f16" else f32
    out_std = logit_scale / np.sqrt(n_embd)
    embd_std = out_std if tied_output else 1.0
    row_norms = np.exp(row_norm_spread * rng.standard_normal(n_vocab))
    row_norms = (row_norms / np.sqrt(np.mean(row_norms**2)))[:, None].astype(np.float32)

    # name, numpy shape (out, in), dtype, std, mean
    layout: list[tuple[str, tuple[int, ...], np.dtype[Any], float, float]] = [
        ("token_embd.weight", (n_vocab, n_embd), mat, embd_std, 0.0),
        ("output_norm.weight", (n_embd,), f32, 0.1, 1.0),
    ]
    if not tied_output:
        layout.append(("output.weight", (n_vocab, n_embd), mat, out_std, 0.0))
    if architecture == "gpt2":
        layout += _gpt2_layout(n_layer, n_embd, n_ff, mat, embd_std)
    for i in range(n_layer if architecture != "gpt2" else 0):
        b = f"blk.{i}."
        layout += [
            (b + "attn_norm.weight", (n_embd,), f32, 0.1, 1.0),
            (b + "attn_q.weight", (n_embd, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "attn_k.weight", (n_head_kv * head_dim, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "attn_v.weight", (n_head_kv * head_dim, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "attn_output.weight", (n_embd, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "ffn_norm.weight", (n_embd,), f32, 0.1, 1.0),
            (b + "ffn_gate.weight", (n_ff, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "ffn_up.weight", (n_ff, n_embd), mat, 1 / np.sqrt(n_embd), 0.0),
            (b + "ffn_down.weight", (n_embd, n_ff), mat, 1.5 / np.sqrt(n_ff), 0.0),
        ]
        if architecture == "qwen2":
            kv = n_head_kv * head_dim
            layout += [
                (b + "attn_q.bias", (n_embd,), f32, 0.1, 0.0),
                (b + "attn_k.bias", (kv,), f32, 0.1, 0.0),
                (b + "attn_v.bias", (kv,), f32, 0.1, 0.0),
            ]
        if architecture == "qwen3":
            layout += [
                (b + "attn_q_norm.weight", (head_dim,), f32, 0.1, 1.0),
                (b + "attn_k_norm.weight", (head_dim,), f32, 0.1, 1.0),
            ]

    def produce(i: int) -> np.ndarray[Any, Any]:
        name, shape, _dtype, std, mean = layout[i]
        values = mean + std * rng.standard_normal(shape, dtype=np.float32)
        if name == ("token_embd.weight" if tied_output else "output.weight"):
            values *= row_norms
        return values.astype(np.float32)

    with _atomic_output(dst) as tmp:
        a = architecture
        writer = gguf.GGUFWriter(tmp, a)
        writer.add_name(f"splitwise-random-{a}-L{n_layer}-d{n_embd}-h{n_head}-kv{n_head_kv}-ff{n_ff}-s{seed}")
        write_hyperparameters(
            writer, a, (n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab), CONTEXT_LENGTH, rope_theta=100000.0
        )
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
        _copy_metadata(source, writer, keep=lambda key: key.startswith("tokenizer."))
        _write_streaming(writer, tmp, [(n, s, d) for n, s, d, _std, _mean in layout], produce)
    return Path(dst)


# ---------------------------------------------------------------------------------------- cached API


def cached_dequantized(dtype: str = "f32", src: Path | None = None) -> Path:
    src = Path(src or default_source())
    key = {"kind": "dequantized", "source": source_fingerprint(src), "dtype": dtype}
    return _cached(f"{src.stem}-{dtype}", key, lambda dst: dequantized_model(src, dst, dtype))


def cached_quantized(ftype: str, src: Path | None = None) -> Path:
    """The (default: bundled SmolLM2) model dequantized to F32, then quantized by llama.cpp to `ftype`."""
    base = cached_dequantized("f32", src)
    if ftype == "F32":
        return base
    key = {"kind": "quantized", "base": base.name, "ftype": ftype}
    return _cached(f"{Path(src or default_source()).stem}-{ftype}", key, lambda dst: quantized_model(base, dst, ftype))


def cached_random_llama(shape: Shape | str, ftype: str = "F32") -> Path:
    """A random llama of `shape` (a `Shape` or a key of `SHAPES`), F32, then quantized to `ftype`."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    tok = default_source()
    key = {"kind": "random", "shape": asdict(shape), "tokenizer": source_fingerprint(tok)}
    arch = "" if shape.architecture == "llama" else f"-{shape.architecture}"
    tag = f"random{arch}-L{shape.n_layer}-d{shape.n_embd}-h{shape.n_head}-kv{shape.n_head_kv}"
    base = _cached(f"{tag}-F32", key, lambda dst: random_llama(dst, tokenizer_source=tok, **asdict(shape)))
    if ftype == "F32":
        return base
    qkey = {"kind": "quantized", "base": base.name, "ftype": ftype}
    return _cached(f"{tag}-{ftype}", qkey, lambda dst: quantized_model(base, dst, ftype))
