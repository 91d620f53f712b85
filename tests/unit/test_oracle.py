"""The llama.cpp oracle runs in a child process: a native crash fails the one call that made it,
with the signal named, and the reference logits are computed once and then read from disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from evaluation import oracle
from splitwise_core.tokenizer import bundled_model_path


def _raise_value_error(message: str) -> None:
    raise ValueError(message)


def test_isolated_returns_the_childs_result() -> None:
    assert oracle.isolated(os.getpid) != os.getpid()
    assert oracle.isolated(sorted, [3, 1, 2]) == [1, 2, 3]


def test_an_exception_in_the_child_is_raised_with_its_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"raised in its child process: ValueError: no such token(.|\n)*Traceback"):
        oracle.isolated(_raise_value_error, "no such token")


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGABRT"])
def test_a_crash_in_the_child_names_the_signal(monkeypatch: pytest.MonkeyPatch, signal_name: str) -> None:
    monkeypatch.setenv(oracle.CRASH_ENV, signal_name)
    with pytest.raises(oracle.OracleCrashed, match=rf"_compute_logits\(\) died with {signal_name} \(signal \d+\)"):
        oracle.isolated(oracle._compute_logits, str(bundled_model_path()), [1, 2, 3], 64, 1)


def test_a_hung_child_is_killed_after_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(oracle.OracleCrashed, match=r"sleep\(\) did not finish in 1 s and was killed"):
        oracle.isolated(time.sleep, 60, timeout_s=1.0)
    assert time.monotonic() - start < 30


def test_logits_are_computed_once_then_read_from_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPLITWISE_TEST_MODELS", str(tmp_path))
    model, tokens = bundled_model_path(), [1, 504, 3458, 282, 5248, 314]
    first = oracle.llama_cpp_logits(model, tokens, n_ctx=64, threads=1)
    assert first.shape == (len(tokens), 49152) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std() > 0
    assert len(list((tmp_path / "oracle").glob("logits-*.npy"))) == 1

    def must_not_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a cached reference was computed again")

    monkeypatch.setattr(oracle, "isolated", must_not_run)
    np.testing.assert_array_equal(oracle.llama_cpp_logits(model, tokens, n_ctx=64, threads=1), first)
    with pytest.raises(AssertionError, match="computed again"):  # other tokens: another key
        oracle.llama_cpp_logits(model, tokens[:-1], n_ctx=64, threads=1)


def test_a_crash_leaves_no_cache_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPLITWISE_TEST_MODELS", str(tmp_path))
    monkeypatch.setenv(oracle.CRASH_ENV, "SIGSEGV")
    with pytest.raises(oracle.OracleCrashed, match="SIGSEGV"):
        oracle.llama_cpp_logits(bundled_model_path(), [1, 2, 3], n_ctx=64, threads=1)
    assert not list(tmp_path.rglob("*.npy"))
