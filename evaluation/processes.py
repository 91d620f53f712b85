"""Child processes of the process-level tests and the testbed, and the TOML files they read.

`Proc` runs ``python -m MODULE ...`` (optionally behind a command prefix such as ``ip netns exec``)
with its output in a log file; `kill()` is a real SIGKILL, `pause()` a SIGSTOP. `write_toml`
writes a config file from ``{section: {key: value}}``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """A child process with its log file; `kill()` is a real SIGKILL."""

    def __init__(self, name: str, args: Sequence[str], log: Path, *, prefix: Sequence[str] = ()) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", *args], stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stays connected but goes silent (a hung worker)."""
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.resume()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(
        "\n".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
            for name, values in sections.items()
        )
    )
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set, VmHWM of /proc/self/status (file pages of a memory-mapped
    model that were touched count). Not getrusage's ru_maxrss: Linux carries that across exec, so a
    spawned child would report its parent's peak if that was higher."""
    return _status_bytes("VmHWM:")


def rss_bytes() -> int:
    """This process's resident set now, VmRSS of /proc/self/status (touched pages of mapped files
    count, pages it unmapped or freed back to the system do not)."""
    return _status_bytes("VmRSS:")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(key))
    return int(line.split()[1]) * 1024
