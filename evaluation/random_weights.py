"""Random llama GGUFs at the paper's sizes, written directly in a quantized type (no F32 detour).

`model_factory.random_llama` writes F32 and lets llama.cpp quantize: fine for test shapes, but a
13B F32 file would be 52 GB. Here every 2-D weight is written as raw GGML blocks made of random
bytes (`numpy.random.default_rng(seed)`), one tensor in memory at a time; only the f16 scale fields
of each block are fixed, so that dequantized weights have std ≈ 1/sqrt(fan_in) (the output matrix:
`LOGIT_SCALE`/sqrt(n_embd); an untied token embedding: 1) and logits stay finite with a spread of a
few units. Speed does not depend on the values, so these files time an engine as real ones would.

* `BENCH_SHAPES`: smollm2, tinyllama-1.1b, gpt2-1.5b, llama-7b, llama-13b (see `BenchShape`).
  Every file carries the bundled SmolLM2's tokenizer, so the vocabulary is 49152 for every shape
  (the real TinyLlama/Llama-2 have 32000, GPT-2 50257): only token_embd and output.weight differ in
  size from the real model's. gpt2-1.5b is a GPT-2 architecture file of GPT-2 XL's sizes (LayerNorm
  with bias, 1024 learned positions in F32, fused attn_qkv, biases in F32, a non-gated FFN, untied
  output); the others are llama files.
* `write_random_quantized(dst, shape, qtype, seed)` writes one file; `cached_bench_model(name,
  qtype, seed)` caches it under `model_factory.cache_dir()` (key: `RANDOM_WEIGHTS_VERSION`, shape,
  type mix, seed, tokenizer), written under a temporary name and renamed into place.
* `tensor_plan(shape, qtype, n_vocab)` is the type mix, tensor by tensor:

      mix      token_embd   output.weight   attn_q/k/output, ffn_gate/up   attn_v, ffn_down   attn_qkv
      q8_0     Q8_0         Q8_0            Q8_0                           Q8_0               Q8_0
      q4_0     Q4_0         Q4_0            Q4_0                           Q4_0               Q4_0
      q4_k_m   Q4_K         Q6_K            Q4_K                           Q6_K in the layers Q5_K
                                                                           `use_more_bits` picks,
                                                                           else Q4_K

  q4_k_m approximates llama.cpp's Q4_K_M rule: `use_more_bits(i, n)` is true for the first n/8
  layers, the last n/8 and every third layer between (i − n/8 ≡ 2 mod 3). A tied model's
  token_embd is its output matrix and follows the output.weight rule. K-quants need rows (the
  fan-in, GGML's ne0) that are a multiple of 256; where they are not (d=576 for smollm2, d=1600 for
  gpt2-1.5b: every matrix but ffn_down) the tensor falls back as llama.cpp's quantizer does
  (model_factory's docstring): Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0. On smollm2 this reproduces the counts of
  llama.cpp's own SmolLM2 Q4_K_M exactly (tests/unit/test_engine_types.py `SMOLLM2_TYPES`). The q4_0
  mix is pure Q4_0, output and token_embd included (llama.cpp's Q4_0 ftype would keep output.weight
  in Q6_K). Norm weights are F32, 1 + N(0, 0.1²); GPT-2's biases N(0, 0.1²) and position
  embeddings N(0, 0.5²), F32.

Block contents: all quant bytes random, then the f16 `d` (and Q4_K's `dmin`) of every block set to
one magnitude per tensor with a random sign per block (one sign everywhere would give every Q4_0
matrix the same rank-one component, as its codes have mean −0.5, and every position the same
prediction). The packed 6-bit scales/mins of Q4_K and the int8 scales of Q6_K stay random;
Q4_K's `dmin` is 7.5·`d` so that a block's mean is zero on average. The value of `d` is calibrated on
a sample of blocks dequantized with gguf-py. For Q6_K and Q4_K with a large fan-in that `d` is an f16
subnormal (e.g. ~6e-6 for Q6_K at fan-in 13824): still finite and exact to a few bits, which is all
random weights need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from evaluation.model_factory import (
    _atomic_output,
    _cached,
    _field_value,
    default_source,
    source_fingerprint,
    write_hyperparameters,
)

RANDOM_WEIGHTS_VERSION = 1

#: Type mixes (`--type` of bench/engine.py).
QTYPES = ("q4_k_m", "q4_0", "q8_0")

#: RMS length of the output matrix's rows: logits have a std of about this.
LOGIT_SCALE = 2.5

Q = gguf.GGMLQuantizationType
_FILE_TYPES = {
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
#: llama.cpp's fallback for rows that are not a multiple of the 256-element super-block.
_K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
#: Byte offsets of the f16 scale fields in a block: (d, the offset field or None), and the offset
#: as a multiple of d that makes a block's mean zero on average.
_SCALE_FIELDS: dict[gguf.GGMLQuantizationType, tuple[int, int | None, float]] = {
    Q.Q4_0: (0, None, 0.0),
    Q.Q5_0: (0, None, 0.0),
    Q.Q8_0: (0, None, 0.0),
    Q.Q5_1: (0, 2, -15.5),  # value = d·q + m with q ∈ 0..31
    Q.Q4_K: (0, 2, 7.5),  # value = d·sc·q − dmin·m with q ∈ 0..15 and sc, m ∈ 0..63 (mean 31.5 each)
    Q.Q5_K: (0, 2, 15.5),  # the same with q ∈ 0..31
    Q.Q6_K: (208, None, 0.0),
}


@dataclass(frozen=True)
class BenchShape:
    """A model shape (head_dim = n_embd / n_head); the vocabulary is the tokenizer's."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    tied_output: bool
    architecture: str = "llama"  # or "gpt2"


BENCH_SHAPES: dict[str, BenchShape] = {
    "smollm2": BenchShape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, tied_output=True),
    "tinyllama-1.1b": BenchShape(n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632, tied_output=False),
    # GPT-2 XL
    "gpt2-1.5b": BenchShape(
        n_layer=48, n_embd=1600, n_head=25, n_head_kv=25, n_ff=6400, tied_output=False, architecture="gpt2"
    ),
    "llama-7b": BenchShape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, tied_output=False),
    "llama-13b": BenchShape(n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824, tied_output=False),
}


def use_more_bits(layer: int, n_layer: int) -> bool:
    """The layers whose attn_v and ffn_down get Q6_K in a Q4_K_M file: the first and last eighth,
    and every third layer between."""
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * n_layer // 8 or (layer - eighth) % 3 == 2


def _fit(qtype: gguf.GGMLQuantizationType, fan_in: int) -> gguf.GGMLQuantizationType:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if fan_in % block == 0:
        return qtype
    fallback = _K_FALLBACK.get(qtype)
    if fallback is None or fan_in % gguf.GGML_QUANT_SIZES[fallback][0]:
        raise ValueError(f"rows of {fan_in} are not a multiple of {qtype.name}'s block of {block}")
    return fallback


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, fan_in) for a matrix
    qtype: gguf.GGMLQuantizationType
    std: float  # target std of the dequantized values (matrices)
    mean: float = 1.0  # of an F32 tensor: 1 for norm weights, 0 for biases and position embeddings

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def tensor_plan(shape: BenchShape, qtype: str, n_vocab: int) -> list[TensorSpec]:
    """Every tensor of the file in write order, with its GGML type (the mix in the module docstring)."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown type mix {qtype!r}; one of {QTYPES}")
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head of n_head_kv")
    d, ff = shape.n_embd, shape.n_ff
    kv = shape.n_head_kv * (d // shape.n_head)

    def pick(role: str, layer: int = 0) -> gguf.GGMLQuantizationType:
        if qtype == "q8_0":
            return Q.Q8_0
        if qtype == "q4_0":
            return Q.Q4_0
        if role == "output" or (role == "more_bits" and use_more_bits(layer, shape.n_layer)):
            return Q.Q6_K
        if role == "qkv":
            return Q.Q5_K
        return Q.Q4_K

    out_std = LOGIT_SCALE / np.sqrt(d)
    f32 = Q.F32
    plan = [
        TensorSpec("token_embd.weight", (n_vocab, d), _fit(pick("output" if shape.tied_output else "embd"), d),
                   out_std if shape.tied_output else 1.0),
        TensorSpec("output_norm.weight", (d,), f32, 0.1),
    ]  # fmt: skip
    if not shape.tied_output:
        plan.append(TensorSpec("output.weight", (n_vocab, d), _fit(pick("output"), d), out_std))
    if shape.architecture == "gpt2":
        return plan + _gpt2_layers(shape, pick)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [
            TensorSpec(b + "attn_norm.weight", (d,), f32, 0.1),
            TensorSpec(b + "attn_q.weight", (d, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "attn_k.weight", (kv, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "attn_v.weight", (kv, d), _fit(pick("more_bits", i), d), 1 / np.sqrt(d)),
            TensorSpec(b + "attn_output.weight", (d, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "ffn_norm.weight", (d,), f32, 0.1),
            TensorSpec(b + "ffn_gate.weight", (ff, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "ffn_up.weight", (ff, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "ffn_down.weight", (d, ff), _fit(pick("more_bits", i), ff), 1 / np.sqrt(ff)),
        ]
    return plan


GPT2_CONTEXT = 1024


def _gpt2_layers(shape: BenchShape, pick: Callable[..., gguf.GGMLQuantizationType]) -> list[TensorSpec]:
    """GPT-2's position embeddings, output-norm bias and layers (the type mix's roles: attn_qkv is
    Q5_K in q4_k_m, as llama.cpp's rule makes it)."""
    d, ff, f32 = shape.n_embd, shape.n_ff, Q.F32
    plan = [
        TensorSpec("position_embd.weight", (GPT2_CONTEXT, d), f32, 0.5, mean=0.0),
        TensorSpec("output_norm.bias", (d,), f32, 0.1, mean=0.0),
    ]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [
            TensorSpec(b + "attn_norm.weight", (d,), f32, 0.1),
            TensorSpec(b + "attn_norm.bias", (d,), f32, 0.1, mean=0.0),
            TensorSpec(b + "attn_qkv.weight", (3 * d, d), _fit(pick("qkv"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "attn_qkv.bias", (3 * d,), f32, 0.1, mean=0.0),
            TensorSpec(b + "attn_output.weight", (d, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "attn_output.bias", (d,), f32, 0.1, mean=0.0),
            TensorSpec(b + "ffn_norm.weight", (d,), f32, 0.1),
            TensorSpec(b + "ffn_norm.bias", (d,), f32, 0.1, mean=0.0),
            TensorSpec(b + "ffn_up.weight", (ff, d), _fit(pick("plain"), d), 1 / np.sqrt(d)),
            TensorSpec(b + "ffn_up.bias", (ff,), f32, 0.1, mean=0.0),
            TensorSpec(b + "ffn_down.weight", (d, ff), _fit(pick("more_bits", i), ff), 1 / np.sqrt(ff)),
            TensorSpec(b + "ffn_down.bias", (d,), f32, 0.1, mean=0.0),
        ]
    return plan


def _set_scales(blocks: np.ndarray[Any, Any], qtype: gguf.GGMLQuantizationType, d: float) -> None:
    """Writes ±`d` as f16 (and the offset field, same sign) into every block (rows of `blocks`), in place.
    The sign is the low bit of the random byte that `d` overwrites: Q4_0/Q5_0/Q8_0 codes have a mean
    of −0.5, so one sign everywhere would add the same rank-one term to every matrix, which the
    residual stream amplifies until every position predicts the same token."""
    d_at, dmin_at, dmin_over_d = _SCALE_FIELDS[qtype]
    negative = (blocks[:, d_at] & 1).astype(bool)
    for at, value in ((d_at, d), (dmin_at, d * dmin_over_d)):
        if at is None:
            continue
        blocks[:, at : at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
        blocks[negative, at + 1] |= 0x80  # f16 sign bit (little-endian high byte)


def unit_scale_std(qtype: gguf.GGMLQuantizationType) -> float:
    """Std of the dequantized values of random blocks whose d is 1 (calibration, fixed sample)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.random.default_rng(12345).integers(0, 256, (4096, size), dtype=np.uint8)
    _set_scales(blocks, qtype, 1.0)
    values = gguf.quants.dequantize(blocks.reshape(-1), qtype)
    return float(np.std(values.astype(np.float64)))


def random_blocks(
    rng: np.random.Generator, spec: TensorSpec, unit_std: Callable[[gguf.GGMLQuantizationType], float]
) -> np.ndarray[Any, Any]:
    """The tensor's bytes, shape (rows, bytes per row): random, then the scale fields set."""
    block, size = gguf.GGML_QUANT_SIZES[spec.qtype]
    rows, fan_in = spec.shape
    data = np.frombuffer(rng.bytes(rows * fan_in // block * size), np.uint8).reshape(-1, size).copy()
    _set_scales(data, spec.qtype, spec.std / unit_std(spec.qtype))
    return data.reshape(rows, fan_in // block * size)


@lru_cache(maxsize=2)
def _tokenizer_fields(path: Path) -> tuple[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]:
    """The tokenizer.* metadata of a GGUF (parsing SmolLM2's 49152 tokens takes seconds: done once)."""
    reader = gguf.GGUFReader(path)
    return tuple((key, *_field_value(field)) for key, field in reader.fields.items() if key.startswith("tokenizer."))


def write_random_quantized(
    dst: Path,
    shape: BenchShape,
    qtype: str,
    seed: int = 0,
    *,
    tokenizer_source: Path | None = None,
    name: str = "",
    progress: bool = False,
) -> Path:
    """A GGUF of `shape` in type mix `qtype` (`QTYPES`) with random weights from `seed` and the
    tokenizer metadata of `tokenizer_source` (default: the bundled SmolLM2). Streams one tensor at a
    time; written under a temporary name and renamed onto `dst`."""
    tokenizer = _tokenizer_fields(Path(tokenizer_source or default_source()))
    n_vocab = next(len(value) for key, value, _t, _s in tokenizer if key == "tokenizer.ggml.tokens")
    plan = tensor_plan(shape, qtype, n_vocab)
    rng = np.random.default_rng(seed)
    calibration: dict[gguf.GGMLQuantizationType, float] = {}

    def unit_std(t: gguf.GGMLQuantizationType) -> float:
        if t not in calibration:
            calibration[t] = unit_scale_std(t)
        return calibration[t]

    bar: Any = None
    if progress:
        from tqdm import tqdm

        total = sum(spec.nbytes for spec in plan)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {Path(dst).name}")
    with _atomic_output(dst) as tmp:
        a = shape.architecture
        writer = gguf.GGUFWriter(tmp, a)
        writer.add_name(name or f"splitwise-random-{a}-{qtype}-L{shape.n_layer}-d{shape.n_embd}-s{seed}")
        dims = (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_ff, n_vocab)
        write_hyperparameters(writer, a, dims, GPT2_CONTEXT if a == "gpt2" else 4096, rope_theta=10000.0)
        writer.add_file_type(int(_FILE_TYPES[qtype]))
        for key, value, vtype, sub in tokenizer:
            writer.add_key_value(key, value, vtype, sub)
        for spec in plan:
            if spec.qtype == Q.F32:
                writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes)
            else:
                block, size = gguf.GGML_QUANT_SIZES[spec.qtype]
                byte_shape = (spec.shape[0], spec.shape[1] // block * size)
                writer.add_tensor_info(spec.name, byte_shape, np.dtype(np.uint8), spec.nbytes, raw_dtype=spec.qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for spec in plan:
                if spec.qtype == Q.F32:
                    normal = rng.standard_normal(spec.shape, dtype=np.float32)
                    data = (spec.mean + spec.std * normal).astype(np.float32)
                else:
                    data = random_blocks(rng, spec, unit_std)
                writer.write_tensor_data(data)
                if bar is not None:
                    bar.update(spec.nbytes)
        finally:
            if bar is not None:
                bar.close()
        writer.close()
    return Path(dst)


def cached_bench_model(name: str, qtype: str = "q4_k_m", seed: int = 0, progress: bool = True) -> Path:
    """The random `BENCH_SHAPES[name]` file in type mix `qtype`, from the cache or written now."""
    if name not in BENCH_SHAPES:
        raise ValueError(f"unknown shape {name!r}; one of {sorted(BENCH_SHAPES)}")
    if qtype not in QTYPES:
        raise ValueError(f"unknown type mix {qtype!r}; one of {QTYPES}")
    shape = BENCH_SHAPES[name]
    tok = default_source()
    key = {
        "kind": "random-quantized",
        "version": RANDOM_WEIGHTS_VERSION,
        "shape": asdict(shape),
        "type": qtype,
        "seed": seed,
        "tokenizer": source_fingerprint(tok),
    }
    return _cached(
        f"bench-{name}-{qtype}-s{seed}",
        key,
        lambda dst: write_random_quantized(
            dst, shape, qtype, seed, tokenizer_source=tok, name=f"splitwise-random-{name}-{qtype}", progress=progress
        ),
    )


def matrix_bytes(path: Path) -> dict[str, int]:
    """Bytes of each 2-D tensor in the file (read from its header)."""
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2}


def decode_bytes_per_token(path: Path) -> int:
    """Weight bytes one decode step reads: every matrix, except that of token_embd only one row when
    the model has its own output.weight (a tied model reads all of it as the LM head)."""
    matrices = {t.name: t for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2}
    total = sum(int(t.n_bytes) for t in matrices.values())
    embd = matrices.get("token_embd.weight")
    if embd is not None and "output.weight" in matrices:
        rows = int(embd.shape[1])  # GGML order: (n_embd, n_vocab)
        total -= int(embd.n_bytes) - int(embd.n_bytes) // rows
    return total
