"""Every kernel level this CPU runs computes the same sub-blocks: AMX, AVX-512 and AVX2 against the
portable loops on random K-quant and 32-element-format files (the Rust tests compare single rows).

Sub-blocks on identical inputs, not whole forwards: the levels sum floats in different orders, and a
difference of one ulp flips an activation value sitting on a rounding tie of the next matmul's 8-bit
quantization, which the following layers amplify (whole 2-layer forwards of the Q4_1/Q5_0/Q5_1 files
differed by 1.0-1.2 % of the logits' norm between levels, the other files by ≤ 3e-7). Inside one
sub-block that can happen once (attention's output projection and the FFN's down projection quantize
what an earlier matmul computed): up to 4e-4 of the range was seen (Q5_1 attention), ≤ 2e-6 elsewhere.

The level is read once per process from SPLITWISE_SIMD , so each
level runs in its own child, spawned with the variable already set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from evaluation.model_factory import cached_random_llama
from evaluation.oracle import isolated
from splitwise_core.engine import SIMD_LEVELS, Model, simd_level
from splitwise_core.errors import InvalidArgumentError


def runnable() -> list[str]:
    """The levels this CPU runs (a function: the children import this module with SPLITWISE_SIMD
    set, possibly to a value `simd_level()` refuses)."""
    return SIMD_LEVELS[: SIMD_LEVELS.index(simd_level()) + 1]


PROMPT = [1, 504, 3458, 282, 5248, 314, 253, 1789, 28, 2909, 30, 17]


def sub_blocks(path: str) -> tuple[str, list[np.ndarray]]:
    """Layer 0's attention and FFN and the LM head on 12 tokens (token tiles) and on the last one
    (single-token kernels), from the same embedded prompt, 2 threads."""
    model = Model(path, 2)
    x = model.embed(PROMPT)
    positions = list(range(len(PROMPT)))
    outputs = []
    for rows in (x, x[-1:]):
        session = model.new_session()
        heads = list(range(int(model.config["n_head"])))
        outputs.append(model.attention(session, 0, heads, model.attn_norm(0, rows), positions[-len(rows) :]))
        outputs.append(model.ffn(0, "full", model.ffn_norm(0, rows)))
        outputs.append(model.output_logits(rows))
    return simd_level(), outputs


def opens(path: str) -> str:
    try:
        Model(path, 1)
    except InvalidArgumentError as error:
        return str(error)
    return "opened"


def at_level(monkeypatch: pytest.MonkeyPatch, level: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)` in a child process started with SPLITWISE_SIMD=level."""
    with monkeypatch.context() as patch:
        patch.setenv("SPLITWISE_SIMD", level)
        return isolated(fn, *args, label=f"SPLITWISE_SIMD={level}")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_level_computes_the_portable_sub_blocks(ftype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if len(runnable()) == 1:
        pytest.skip("this CPU runs only the portable kernels")
    path = str(cached_random_llama("k256", ftype))
    reference_level, reference = at_level(monkeypatch, "portable", sub_blocks, path)
    assert reference_level == "portable"
    names = ["attention ×12", "ffn ×12", "logits ×12", "attention ×1", "ffn ×1", "logits ×1"]
    for level in runnable()[1:]:
        ran, outputs = at_level(monkeypatch, level, sub_blocks, path)
        assert ran == level
        for name, got, want in zip(names, outputs, reference, strict=True):
            # A rounding-tie flip inside the sub-block: ≤ 4e-4 of the range seen; a wrong lane or
            # scale layout moves values by a sizeable share of it.
            worst = float(np.abs(got - want).max())
            scale = float(np.abs(want).max())
            assert worst <= 5e-3 * scale, f"{ftype} {name} at {level}: max |Δ| {worst:.2e} of range {scale:.1f}"


def test_an_unknown_or_unavailable_level_is_refused_when_a_model_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(cached_random_llama("k256", "Q4_K_M"))
    message = at_level(monkeypatch, "avx1024", opens, path)
    assert 'SPLITWISE_SIMD="avx1024" is not a kernel level' in message
    assert "portable, avx2, avx512" in message
    assert at_level(monkeypatch, "portable", opens, path) == "opened"
    above = SIMD_LEVELS[len(runnable()) :]
    if above:
        message = at_level(monkeypatch, above[0], opens, path)
        assert "asks for more than this CPU has" in message
