"""Random quantized llamas written directly (evaluation/random_weights.py): the documented type mix,
the sizes, finite logits from the engine, and bytes that depend on the seed alone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from evaluation import random_weights as rw
from splitwise_core.engine import Model

ROOT = Path(__file__).resolve().parents[2]

#: Every row a multiple of 256, GQA 4:1, untied output: no K-quant fallback.
TINY = rw.BenchShape(n_layer=4, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, tied_output=False)
N_VOCAB = 49152
#: use_more_bits for 4 layers: n/8 = 0, so the last layer (i ≥ 3) and i ≡ 2 (mod 3).
TINY_MORE_BITS = {2, 3}
BLOCK_BYTES = {"Q4_0": (32, 18), "Q5_0": (32, 22), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def expected_types(qtype: str, n_layer: int, more_bits: set[int]) -> dict[str, str]:
    """The mix of the module docstring, written out independently of `tensor_plan`."""
    plain = {"q4_k_m": "Q4_K", "q4_0": "Q4_0", "q8_0": "Q8_0"}[qtype]
    high = "Q6_K" if qtype == "q4_k_m" else plain
    types = {"token_embd.weight": plain, "output_norm.weight": "F32", "output.weight": high}
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{name}.weight"] = plain
        for name in ("attn_v", "ffn_down"):
            types[f"blk.{i}.{name}.weight"] = high if i in more_bits else plain
        types[f"blk.{i}.attn_norm.weight"] = types[f"blk.{i}.ffn_norm.weight"] = "F32"
    return types


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-weights")
    return {q: rw.write_random_quantized(root / f"tiny-{q}.gguf", TINY, q, seed=7) for q in rw.QTYPES}


@pytest.fixture(scope="module")
def readers(tiny_files: dict[str, Path]) -> dict[str, gguf.GGUFReader]:
    return {q: gguf.GGUFReader(path) for q, path in tiny_files.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_use_more_bits_on_32_layers() -> None:
    """Llama-7B's 32 layers: the first 4, the last 4, and 6, 9, ..., 27 between."""
    picked = {i for i in range(32) if rw.use_more_bits(i, 32)}
    assert picked == {0, 1, 2, 3, 28, 29, 30, 31} | set(range(6, 28, 3))
    assert {i for i in range(4) if rw.use_more_bits(i, 4)} == TINY_MORE_BITS


@pytest.mark.parametrize("qtype", rw.QTYPES)
def test_type_mix_and_sizes(tiny_files: dict[str, Path], readers: dict[str, gguf.GGUFReader], qtype: str) -> None:
    reader = readers[qtype]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == expected_types(qtype, TINY.n_layer, TINY_MORE_BITS)
    kv = TINY.n_head_kv * TINY.n_embd // TINY.n_head
    shapes = {"attn_k": (kv, 512), "attn_v": (kv, 512), "ffn_gate": (1536, 512), "ffn_down": (512, 1536)}
    total = 0
    for t in reader.tensors:
        numpy_shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        short = t.name.split(".")[-2]
        if t.name in ("token_embd.weight", "output.weight"):
            assert numpy_shape == (N_VOCAB, 512)
        elif short in shapes:
            assert numpy_shape == shapes[short], t.name
        elif t.name.endswith("norm.weight"):
            assert numpy_shape == (512,)
            assert abs(float(np.mean(t.data)) - 1.0) < 0.05
        if types[t.name] == "F32":
            expected = 4 * int(np.prod(numpy_shape))
        else:
            block, size = BLOCK_BYTES[types[t.name]]
            expected = int(np.prod(numpy_shape)) // block * size
        assert int(t.n_bytes) == expected, t.name
        total += expected
    size = tiny_files[qtype].stat().st_size
    assert total < size < total + (8 << 20)  # the rest is metadata (tokenizer) and alignment
    field = reader.fields["general.file_type"]
    assert int(field.contents()) == {"q4_k_m": 15, "q4_0": 2, "q8_0": 7}[qtype]


@pytest.mark.parametrize("qtype", rw.QTYPES)
def test_weights_have_the_intended_scale(readers: dict[str, gguf.GGUFReader], qtype: str) -> None:
    """Dequantized matrices: std ≈ 1/sqrt(fan_in), mean ≈ 0."""
    for t in readers[qtype].tensors:
        if t.name not in ("blk.0.attn_q.weight", "blk.3.attn_v.weight", "blk.3.ffn_down.weight"):
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        fan_in = values.shape[-1]
        assert np.all(np.isfinite(values))
        assert 0.9 < values.std() * np.sqrt(fan_in) < 1.1, t.name
        assert abs(values.mean()) * np.sqrt(fan_in) < 0.15, t.name


@pytest.mark.parametrize("qtype", rw.QTYPES)
def test_engine_gives_finite_spread_logits(tiny_files: dict[str, Path], qtype: str) -> None:
    model = Model(str(tiny_files[qtype]), 1)
    session = model.new_session()
    tokens = [1, 500, 7000, 20000, 49151]
    logits = np.asarray(model.forward(session, tokens, list(range(len(tokens))), all_logits=True))
    assert logits.shape == (len(tokens), N_VOCAB)
    assert np.all(np.isfinite(logits))
    spread = logits.std(axis=-1)
    assert np.all((spread > 0.5) & (spread < 50)), spread
    assert len(set(logits.argmax(-1).tolist())) > 1  # not the same prediction everywhere


def test_a_gpt2_file_runs_in_the_engine_as_in_llama_cpp(tmp_path: Path) -> None:
    """The gpt2-1.5b bench file's layout at a small size (rows of 512: Q5_K attn_qkv without
    fallback): llama.cpp and the engine read it alike."""
    from evaluation.oracle import llama_cpp_logits

    shape = rw.BenchShape(
        n_layer=2, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, tied_output=False, architecture="gpt2"
    )
    path = rw.write_random_quantized(tmp_path / "gpt2.gguf", shape, "q4_k_m", seed=3)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"F32", "Q4_K", "Q5_K", "Q6_K"}
    tokens = [1, 500, 7000, 20000, 49151, 3, 42, 1234]
    model = Model(str(path), 1)
    ours = np.asarray(model.forward(model.new_session(), tokens, list(range(len(tokens))), all_logits=True))
    theirs = llama_cpp_logits(path, tokens, threads=1)
    assert np.all(np.isfinite(ours)) and ours.std(axis=-1).min() > 0.5
    p = np.exp(theirs - theirs.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    log_q = ours - ours.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = float((p * (np.log(p + 1e-30) - log_q)).sum(-1).mean())
    assert kl < 0.01 and (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75, kl


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, tiny_files: dict[str, Path]) -> None:
    again = rw.write_random_quantized(tmp_path / "again.gguf", TINY, "q4_k_m", seed=7)
    other = rw.write_random_quantized(tmp_path / "other.gguf", TINY, "q4_k_m", seed=8)
    assert sha256(again) == sha256(tiny_files["q4_k_m"])
    assert again.stat().st_size == other.stat().st_size
    assert sha256(other) != sha256(again)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plan_of_smollm2_matches_llama_cpp_q4_k_m() -> None:
    """576-wide rows fall back (Q4_K → Q5_0, Q6_K → Q8_0); the counts are those of llama.cpp's own
    SmolLM2 Q4_K_M (tests/unit/test_engine_types.py SMOLLM2_TYPES)."""
    plan = rw.tensor_plan(rw.BENCH_SHAPES["smollm2"], "q4_k_m", N_VOCAB)
    counts = Counter(spec.qtype.name for spec in plan)
    assert counts == {"F32": 61, "Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    assert next(s for s in plan if s.name == "token_embd.weight").qtype.name == "Q8_0"  # tied: output rule


def test_plan_of_gpt2_falls_back_on_1600_wide_rows() -> None:
    """A GPT-2 layer: fused Q/K/V (Q5_K in Q4_K_M, falling back to Q5_1 on 1600-wide rows), biases
    and position embeddings in F32, no gate."""
    plan = {s.name: s.qtype.name for s in rw.tensor_plan(rw.BENCH_SHAPES["gpt2-1.5b"], "q4_k_m", N_VOCAB)}
    assert plan["output.weight"] == "Q8_0"
    assert plan["token_embd.weight"] == plan["blk.7.attn_output.weight"] == plan["blk.7.ffn_up.weight"] == "Q5_0"
    assert plan["blk.0.attn_qkv.weight"] == "Q5_1"
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.6.ffn_down.weight"] == "Q4_K"  # 6400 = 25 × 256
    assert plan["blk.8.ffn_down.weight"] == "Q6_K"  # use_more_bits(8, 48): (8 − 6) mod 3 = 2
    assert plan["position_embd.weight"] == plan["blk.0.attn_qkv.bias"] == "F32"
    assert not any("ffn_gate" in name or "attn_q." in name for name in plan)


def test_paper_sizes() -> None:
    """llama-7b q4_k_m with Llama 2's 32000-token vocabulary comes to 4.08 GB, the size expected of a
    7B Q4_K_M; the 49152-token vocabulary adds 17152 rows of 4096 to token_embd (Q4_K, 144 bytes per
    256) and output.weight (Q6_K, 210 bytes per 256)."""

    def size(name: str, qtype: str, n_vocab: int = N_VOCAB) -> int:
        return sum(s.nbytes for s in rw.tensor_plan(rw.BENCH_SHAPES[name], qtype, n_vocab))

    assert 4.0e9 < size("llama-7b", "q4_k_m", 32000) < 4.1e9
    assert size("llama-7b", "q4_k_m") - size("llama-7b", "q4_k_m", 32000) == 17152 * 4096 // 256 * (144 + 210)
    assert 7.0e9 < size("llama-7b", "q8_0") < 7.5e9
    assert 7.5e9 < size("llama-13b", "q4_k_m") < 8.0e9
    assert size("tinyllama-1.1b", "q4_0") < size("tinyllama-1.1b", "q4_k_m") < size("tinyllama-1.1b", "q8_0")


def test_decode_bytes_per_token(tiny_files: dict[str, Path], readers: dict[str, gguf.GGUFReader]) -> None:
    path = tiny_files["q8_0"]
    matrices = {t.name: int(t.n_bytes) for t in readers["q8_0"].tensors if len(t.shape) == 2}
    one_row = matrices["token_embd.weight"] // N_VOCAB
    assert rw.decode_bytes_per_token(path) == sum(matrices.values()) - matrices["token_embd.weight"] + one_row


def test_cache_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITWISE_TEST_MODELS", str(tmp_path))
    monkeypatch.setitem(rw.BENCH_SHAPES, "tiny", TINY)
    path = rw.cached_bench_model("tiny", "q4_0", seed=3, progress=False)
    assert path.parent == tmp_path
    key = json.loads(path.with_suffix(".json").read_text())
    assert (key["version"], key["type"], key["seed"]) == (rw.RANDOM_WEIGHTS_VERSION, "q4_0", 3)
    assert key["shape"]["n_embd"] == 512
    mtime = path.stat().st_mtime_ns
    assert rw.cached_bench_model("tiny", "q4_0", seed=3, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    assert rw.cached_bench_model("tiny", "q4_0", seed=4, progress=False) != path
    with pytest.raises(ValueError, match="type mix"):
        rw.cached_bench_model("tiny", "q5_k_m")


def test_bench_help_lists_shape_and_type() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--shape" in out and "--type" in out and "llama-13b" in out and "q4_k_m" in out
