"""The worker's front door under abuse ("The front door never dies"): per-frame row and context
bounds, per-device frame rates, a clean SIGTERM with no broker, and no spurious llama.cpp warning at
start. Real broker, real SmolLM2 model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloud_offload.local_broker import free_port
from splitwise_device.tokenizer import bundled_model_path

# --- defect 5: SIGTERM with no broker -----------------------------------------------------------


def _serve(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_offload.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigterm_without_a_broker_exits_0_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = _serve(
        "--broker", f"mqtt://127.0.0.1:{port}", "--model", str(bundled_model_path()), "--profile", "off",
        "--worker-id", "w-nobroker",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "serving pool" in line or not line:
                break
        assert any("serving pool" in line for line in lines), "".join(lines)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = "".join(lines) + err
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 0, stderr


# --- defect 6: no llama.cpp context warning at start --------------------------------------------


def test_loading_the_tokenizer_and_engine_prints_no_llama_cpp_warning() -> None:
    code = (
        "from splitwise_device.engine import Engine\n"
        "from splitwise_device.tokenizer import bundled_model_path\n"
        "e = Engine(bundled_model_path())\n"
        "assert e.tokenizer.decode(e.tokenizer.encode('Hello world')) == 'Hello world'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "n_ctx" not in done.stderr and "llama_context" not in done.stderr, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_llama_cpp_errors_are_still_reported(tmp_path: Path) -> None:
    """Silencing the warning must not hide real errors: a corrupt GGUF still says why on stderr."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    code = (
        "import sys\n"
        "from splitwise_device.errors import ModelFileError\n"
        "from splitwise_device.tokenizer import Tokenizer\n"
        f"try:\n    Tokenizer({str(bad)!r})\nexcept ModelFileError as err:\n    print('refused', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.startswith("refused"), done.stdout + done.stderr
    assert "failed to load model" in done.stderr or "bad GGUF version" in done.stderr, done.stderr
