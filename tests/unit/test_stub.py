"""The hand-written stub `_core.pyi` matches what the extension registers (mypy stubtest)."""

from __future__ import annotations

import subprocess
import sys


def test_stub_matches_extension() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "splitwise_device._core"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
