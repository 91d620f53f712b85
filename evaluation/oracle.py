"""llama.cpp as the oracle, always in a child process, its logits cached on disk.

llama.cpp is native code outside our control: a crash in it (the AMX segfault, say) must fail the
one test that asked, not kill pytest. `isolated(fn, ...)` runs any call in a fresh spawned process
and turns a death by signal into `OracleCrashed`, naming the signal; `llama_cpp_logits` is the
cached oracle every test and bench uses. Logits are stored as .npy files under
`model_factory.cache_dir() / "oracle"`, keyed by the model file's SHA-256, the tokens, the settings
and the llama.cpp build (version and system-info line), so the comparisons that share a reference
compute it once per machine.

`SPLITWISE_ORACLE_CRASH=SIGSEGV` (any signal name) makes every child kill itself with that signal
before it calls llama.cpp: how the suite shows that a native crash fails one test and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from evaluation import model_factory as mf
from splitwise_core.engine import model_sha256

CRASH_ENV = "SPLITWISE_ORACLE_CRASH"
DEFAULT_TIMEOUT_S = 900.0
ORACLE_VERSION = 1

T = TypeVar("T")


class OracleCrashed(RuntimeError):
    """A llama.cpp call died (signal, abnormal exit or timeout) in its child process."""


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    crash = os.environ.get(CRASH_ENV)
    if crash:
        os.kill(os.getpid(), signal.Signals[crash if crash.startswith("SIG") else f"SIG{crash}"])
    try:
        conn.send((True, fn(*args, **kwargs)))
    except BaseException as err:  # the parent re-raises it with the child's traceback
        conn.send((False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def isolated(
    fn: Callable[..., T], *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S, label: str = "", **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)` in a spawned child process; its result is pickled back. `label` says
    what the call was for in the error (the model, say)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args, kwargs), daemon=True)
    what = f"{getattr(fn, '__qualname__', fn)}()" + (f" ({label})" if label else "")
    process.start()
    sender.close()
    outcome: tuple[bool, Any] | None = None
    try:
        if not receiver.poll(timeout_s):
            process.kill()
            process.join()
            raise OracleCrashed(f"llama.cpp call {what} did not finish in {timeout_s:.0f} s and was killed")
        with contextlib.suppress(EOFError):  # EOF: the child died before it sent anything
            outcome = receiver.recv()
    finally:
        receiver.close()
    process.join()
    if outcome is not None:
        ok, value = outcome
        if ok:
            return value  # type: ignore[no-any-return]
        raise RuntimeError(f"llama.cpp call {what} raised in its child process: {value}")
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        raise OracleCrashed(f"llama.cpp call {what} died with {name} (signal {-code}) in its child process")
    raise OracleCrashed(f"llama.cpp call {what} exited with code {code} before returning a result")


# ------------------------------------------------------------------------------------ the oracle


def _compute_logits(model: str, tokens: list[int], n_ctx: int, threads: int, n_batch: int = 512) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@cache
def llama_cpp_build() -> str:
    """Version and compiled-in features of the installed llama.cpp (part of every cache key)."""
    from importlib.metadata import version

    import llama_cpp

    return f"{version('llama_cpp_python')} {llama_cpp.llama_print_system_info().decode().strip()}"


def llama_cpp_logits(
    model: Path, tokens: list[int], *, n_ctx: int = 1024, threads: int = 2, n_batch: int = 512
) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens` (float32, tokens × vocab), from the cache
    or from a child process. `n_batch=1` evaluates token by token: another code path (no batched
    matmul), whose results differ from the batched one by more than rounding."""
    key = {
        "oracle": ORACLE_VERSION,
        "model_sha256": model_sha256(model).hex(),
        "tokens": hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest(),
        "n_tokens": len(tokens),
        "n_ctx": n_ctx,
        "threads": threads,
        "n_batch": n_batch,
        "llama_cpp": llama_cpp_build(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = mf.cache_dir() / "oracle" / f"logits-{digest}.npy"
    if path.is_file():
        cached: np.ndarray = np.load(path)
        return cached
    label = f"{Path(model).name}, {len(tokens)} tokens, n_batch {n_batch}"
    logits = isolated(_compute_logits, str(model), list(tokens), n_ctx, threads, n_batch, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, logits)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({**key, "model": str(model)}, indent=1, sort_keys=True) + "\n")
    return logits
